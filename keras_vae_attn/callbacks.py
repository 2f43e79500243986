"""Keras callbacks and summaries for TensorBoard: losses per epoch, attention while
training, and a run's evaluation (metrics and test heatmaps) at its end.

Scalars and images are written as classic ``Summary`` values (``simple_value``, PNG
``image``): TensorBoard shows them, and so does every reader of event files, e.g.
``EventAccumulator.Scalars``, which sees nothing of ``tf.summary.scalar``'s tensors.
"""

from __future__ import annotations

import json
import os
import shutil
import sys

import keras
import numpy as np
import tensorflow as tf

from keras_vae_attn import viz
from keras_vae_attn.runs import REPLACED, publish, remove_stale, require_space


class AttentionImages(keras.callbacks.Callback):
    """Write input | reconstruction | attention overlay for a few fixed images to
    TensorBoard at the end of each epoch, so maps can be watched forming."""

    def __init__(self, images, log_dir, layer="last", every=1):
        super().__init__()
        self.images = np.asarray(images, np.float32)
        self.writer = tf.summary.create_file_writer(os.path.join(log_dir, "attention"))
        self.layer = layer
        self.every = max(1, int(every))

    def on_epoch_end(self, epoch, logs=None):
        if epoch % self.every:
            return
        maps = self.model.explainer(self.layer).attention(self.images).numpy()
        recon = self.model(self.images).numpy()
        panel = np.concatenate(
            [
                viz.to_rgb(self.images),
                viz.to_rgb(recon),
                viz.overlay(self.images, maps) / 255.0,
            ],
            axis=2,
        )
        panel = np.clip(np.round(panel * 255.0), 0, 255).astype(np.uint8)
        write_summary(
            self.writer,
            epoch,
            images={
                f"input|reconstruction|attention/{index}": image
                for index, image in enumerate(panel)
            },
        )


EXAMPLES = 4  # test heatmaps shown at the end of a run: 1 normal, 3 anomalous


def write_summary(writer, step, scalars=None, images=None):
    """Write ``scalars`` {tag: number} and ``images`` {tag: uint8 (H, W, 3)} at ``step``
    (non-finite and None values are left out)."""
    Summary = tf.compat.v1.Summary
    values = [
        Summary.Value(tag=tag, simple_value=float(value))
        for tag, value in (scalars or {}).items()
        if value is not None and np.isfinite(float(value))
    ]
    for tag, image in (images or {}).items():
        png = tf.io.encode_png(np.asarray(image, np.uint8)).numpy()
        values.append(
            Summary.Value(
                tag=tag,
                image=Summary.Image(
                    height=image.shape[0],
                    width=image.shape[1],
                    colorspace=3,
                    encoded_image_string=png,
                ),
            )
        )
    with writer.as_default():
        tf.summary.experimental.write_raw_pb(
            Summary(value=values).SerializeToString(), step=step
        )
    writer.flush()


class EpochScalars(keras.callbacks.Callback):
    """Each epoch's losses (``loss``, ``recon``, ``kl``, ...) as scalars
    ``epoch_<name>`` in ``<log_dir>/train``."""

    def __init__(self, log_dir):
        super().__init__()
        self.log_dir = os.path.join(log_dir, "train")
        self.writer = None

    def on_epoch_end(self, epoch, logs=None):
        if self.writer is None:
            self.writer = tf.summary.create_file_writer(self.log_dir)
        write_summary(
            self.writer,
            epoch,
            {f"epoch_{name}": value for name, value in (logs or {}).items()},
        )


def flat_metrics(metrics, groups):
    """{"group/.../name": number} of the entries ``groups`` of a metrics.json dict
    (nested dicts become "a/b/c" tags; a verdict (bool) is 1 / 0)."""
    flat = {}

    def walk(prefix, value):
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(f"{prefix}/{key}", inner)
        elif isinstance(value, (int, float, np.number)):
            flat[prefix] = float(value)  # a verdict (bool) as 1 / 0

    for group in groups:
        if group in metrics:
            walk(group, metrics[group])
    return flat


def example_picks(labels, count=EXAMPLES):
    """Indices of the first normal test image and the first ``count - 1`` anomalous ones
    (fewer when the test set has fewer)."""
    labels = np.asarray(labels)
    return list(np.flatnonzero(labels == 0)[:1]) + list(
        np.flatnonzero(labels != 0)[: count - 1]
    )


def log_evaluation(log_dir, metrics, groups, step, examples=None):
    """A finished run's evaluation in ``<log_dir>/evaluation`` at ``step`` (its last
    epoch): the metrics.json entries named in ``groups`` (:func:`flat_metrics`) and,
    with ``examples`` = (test images (N, H, W, C), uint8 or in [0, 1], heatmaps
    (N, H, W), labels (N,)), the heatmaps of :func:`example_picks` over their images,
    all on one scale."""
    images = {}
    if examples is not None:
        pictures, maps, labels = examples
        picks = example_picks(labels)
        pictures = np.asarray(pictures)[picks]
        if np.issubdtype(pictures.dtype, np.integer):
            pictures = pictures / 255.0
        maps = np.asarray(maps)[picks]
        shown = viz.overlay(pictures, maps, vmax=float(maps.max()) or None)
        images = {
            f"test heatmap {index} ({'anomalous' if labels[i] else 'normal'})": image
            for index, (i, image) in enumerate(zip(picks, shown))
        }
    writer = tf.summary.create_file_writer(os.path.join(log_dir, "evaluation"))
    write_summary(writer, step, flat_metrics(metrics, groups), images)
    writer.close()


# --- the training state a killed or interrupted run resumes from --------------------

BACKUP_STATE = "state.json"
BACKUP_WEIGHTS = "state.weights.h5"
#: legacy layout of keras.callbacks.BackupAndRestore (runs started by older versions)
LEGACY_WEIGHTS, LEGACY_STATE = "latest.weights.h5", "training_metadata.json"


def state_bytes(model):
    """The bytes the model's weights and optimizer state take on disk, with a margin
    for HDF5's bookkeeping: what a backup or a saved model needs free."""
    variables = list(model.variables)
    optimizer = getattr(model, "optimizer", None)
    if optimizer is not None:
        variables += list(optimizer.variables)
    total = sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in variables)
    return int(total * 1.1) + (1 << 20)


class TrainingBackup(keras.callbacks.Callback):
    """The run's training state at the end of each epoch, for the same command to
    resume from, written so that no kill, Ctrl-C or full disk leaves a state that fails
    to load or resumes at the wrong epoch.

    Each backup is written into ``<backup_dir>/.partial-<pid>`` (weights with the
    optimizer's state, and ``state.json`` with the epoch and optimizer step), synced,
    and renamed to ``epoch-NNNN``; only then is the previous one removed. A kill at any
    moment leaves the previous complete backup (or none, before the first one). The
    backup is not deleted when ``fit`` ends: the trainer removes it once ``model/`` is
    saved (:func:`trainers.fit.fit_one_class`), so a kill between the two resumes
    with nothing left to train rather than from epoch 0.
    """

    def __init__(self, backup_dir):
        super().__init__()
        self.backup_dir = backup_dir
        self.restored = None

    # --- reading -------------------------------------------------------------------
    def complete_backups(self):
        """Folders of complete backups, newest first."""
        if not os.path.isdir(self.backup_dir):
            return []
        names = sorted(
            (n for n in os.listdir(self.backup_dir) if is_backup_name(n)), reverse=True
        )
        return [
            os.path.join(self.backup_dir, n)
            for n in names
            if os.path.isfile(os.path.join(self.backup_dir, n, BACKUP_STATE))
        ]

    def remove_partial(self):
        """Staging folders of writes a kill interrupted: never loaded, removed; a backup
        a kill left moved aside while a same-epoch one replaced it is put back
        (runs.remove_stale)."""
        if os.path.isdir(self.backup_dir):
            for name in os.listdir(self.backup_dir):
                if name.startswith(".partial-"):
                    shutil.rmtree(os.path.join(self.backup_dir, name), ignore_errors=True)
                elif REPLACED in name:
                    remove_stale(os.path.join(self.backup_dir, name.split(REPLACED)[0]))

    def on_train_begin(self, logs=None):
        self.remove_partial()
        if not self.model.optimizer.built:
            self.model.optimizer.build(self.model.trainable_variables)
        for folder in self.complete_backups():
            try:
                self.model.load_weights(os.path.join(folder, BACKUP_WEIGHTS))
                with open(os.path.join(folder, BACKUP_STATE), encoding="utf-8") as handle:
                    state = json.load(handle)
            except (OSError, ValueError) as error:  # damaged on disk: the older one
                print(
                    f"warning: the backup {folder} does not load ({error}); trying an "
                    "older one",
                    file=sys.stderr,
                )
                continue
            self.restored = state
            self.model._initial_epoch = int(state["epoch"])
            stored = state.get("seed_states", {})
            for variable in seed_variables(self.model):
                if variable.path in stored:
                    variable.assign(np.asarray(stored[variable.path], variable.dtype))
            return
        self._load_legacy()

    def _load_legacy(self):
        """A backup written by keras.callbacks.BackupAndRestore (older runs)."""
        weights = os.path.join(self.backup_dir, LEGACY_WEIGHTS)
        meta = os.path.join(self.backup_dir, LEGACY_STATE)
        if os.path.isfile(weights) and os.path.isfile(meta):
            self.model.load_weights(weights)
            with open(meta, encoding="utf-8") as handle:
                self.model._initial_epoch = int(json.load(handle)["epoch"])

    # --- writing -------------------------------------------------------------------
    def on_epoch_end(self, epoch, logs=None):
        if (
            getattr(self.model, "stop_training", False)
            and logs
            and not all(np.isfinite(float(v)) for v in logs.values())
        ):
            return  # a diverged epoch is not a state to resume from
        self.write(epoch + 1)

    def write(self, epoch):
        """Back up the state after ``epoch`` epochs (see the class docstring)."""
        os.makedirs(self.backup_dir, exist_ok=True)
        require_space(self.backup_dir, state_bytes(self.model), f"the backup of epoch {epoch}")
        staging = os.path.join(self.backup_dir, f".partial-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(staging)
        try:
            write_backup(self.model, staging, epoch)
            commit_backup(staging, os.path.join(self.backup_dir, f"epoch-{epoch:04d}"))
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        for old in self.complete_backups()[1:]:
            shutil.rmtree(old, ignore_errors=True)


def write_backup(model, staging, epoch):
    """The state files of a backup into the ``staging`` folder."""
    model.save_weights(os.path.join(staging, BACKUP_WEIGHTS))
    step = int(np.asarray(model.optimizer.iterations))
    with open(os.path.join(staging, BACKUP_STATE), "w", encoding="utf-8") as handle:
        json.dump(
            {
                "epoch": epoch,
                "optimizer_step": step,
                "seed_states": {v.path: np.asarray(v).tolist() for v in seed_variables(model)},
            },
            handle,
        )


def seed_variables(model):
    """The model's random-generator states (e.g. the VAE's sampling noise): variables
    that its weights files leave out, stored in the backup's state.json so a resumed
    run draws the noise the uninterrupted one would."""
    weights = {id(v) for v in model.weights}
    return [v for v in model.variables if id(v) not in weights]


def commit_backup(staging, final):
    """Publish a written backup: synced, then renamed in one step (replacing a
    same-epoch one a kill left)."""
    publish(staging, final, replace=True)


def is_backup_name(name):
    """Whether ``name`` is a published backup folder's (``epoch-NNNN``), not a staging
    or a replaced one."""
    return name.startswith("epoch-") and name[len("epoch-") :].isdigit()
