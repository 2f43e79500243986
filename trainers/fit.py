"""The one-class fit every localization trainer runs (seeded build under the strategy
and precision, ``model.fit`` resumable from its backup, BatchNorm and normal statistics,
the model saved), and the training callbacks it runs with.

Imports Keras: a trainer imports this module once its flags are checked
(trainers/cli.parse has started TensorFlow).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import keras
import numpy as np

from keras_vae_attn import callbacks as kva_callbacks
from keras_vae_attn import runs
from keras_vae_attn.runs import require_space
from trainers.devices import jit_compile, make_strategy, precision_scope, resolve_precision
from trainers.guard import STAGE, TrainingDiverged
from trainers.run_dirs import (
    BACKUP_DIR,
    CHECKPOINTS,
    TENSORBOARD,
    finish_training,
    losses_per_epoch,
)

#: Newest per-epoch weight files kept in <run>/checkpoints while training (a diverged
#: run keeps them; resuming reads the backup, and a trained run its model/ folder, so
#: the folder is removed once the model is saved).
KEEP_CHECKPOINTS = 1


def fit_one_class(
    args: argparse.Namespace,
    build_model: Callable[[], Any],
    dataset: Any,
    normal: Any,
    run_dir: str,
    watch: keras.callbacks.Callback | None,
    feature_layers: Sequence[str],
    batch_norm_batches: Any = None,
    covariance: bool = False,
) -> tuple[Any, dict[str, list[float]], float]:
    """The one-class training every localization trainer runs, in one place.

    Seeded build and compile under the ``--strategy``; ``model.fit`` with the standard
    callbacks (resume from backup, log, checkpoints, TensorBoard, NaN guard); the
    divergence check; BatchNorm statistics re-estimated when the model has BatchNorm
    (over ``batch_norm_batches``, default ``normal``); the normal latent statistics and
    the feature distributions of ``feature_layers`` (with the channel covariance when
    ``covariance``) fitted on ``normal`` (un-augmented batches); the model saved.
    Returns (model, {loss: [per epoch]} from the training log, so right after a resume
    too, training seconds).
    """
    from keras_vae_attn.models import load_vae, save_vae
    from keras_vae_attn.models.io import MODEL_SPEC, MODEL_WEIGHTS, rebuild

    model_dir = os.path.join(run_dir, "model")
    log = os.path.join(run_dir, "training_log.jsonl")
    runs.remove_stale(model_dir)  # a save that a kill interrupted
    if all(os.path.isfile(os.path.join(model_dir, n)) for n in (MODEL_SPEC, MODEL_WEIGHTS)):
        # killed after the model was saved (during evaluation): never train it again
        print(
            f"{model_dir} holds this run's trained model; resuming at evaluation "
            "(--fresh starts a new run)",
            file=sys.stderr,
        )
        model = load_vae(model_dir)
        resolve_precision(args, announce=False)  # what the same command trained in
        finish_training(run_dir)
        STAGE["evaluating"] = True
        missing = [
            name
            for name in feature_layers
            if not model.has_feature_distribution(name, covariance)
        ]
        if missing:
            model.fit_feature_distributions(normal, missing, covariance)
        return model, losses_per_epoch(log) if os.path.isfile(log) else {}, 0.0
    keras.utils.set_random_seed(args.seed)
    if getattr(args, "deterministic", False):
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()
    with make_strategy(args).scope(), precision_scope(resolve_precision(args)):
        model = build_model()
        model.compile(optimizer=keras.optimizers.Adam(args.lr), jit_compile=jit_compile(args))
    steps = args.steps_per_epoch or epoch_steps(dataset)
    dataset = fast_forward(dataset, steps, backup_epoch(os.path.join(run_dir, BACKUP_DIR)))
    callbacks, guard = standard_callbacks(run_dir, watch)
    started = time.perf_counter()
    model.fit(
        dataset,
        epochs=args.epochs,
        steps_per_epoch=steps,
        shuffle=False,  # the tf.data stream is shuffled (and seeded) itself
        callbacks=callbacks,
        verbose=0 if args.quiet else 1,
    )
    seconds = time.perf_counter() - started
    check_diverged(guard)
    if args.precision != "float32":
        model = rebuild(model)  # stats, evaluation and the saved model in float32
    recalibrate_batch_norm(model, batch_norm_batches or normal)
    model.fit_normal_stats(normal)
    model.fit_feature_distributions(normal, list(feature_layers), covariance)
    save_vae(model, model_dir)
    finish_training(run_dir)  # the backup only now: model/ holds the training
    STAGE["evaluating"] = True
    return model, losses_per_epoch(log), seconds


def standard_callbacks(
    run_dir: str,
    log_images: keras.callbacks.Callback | None = None,
    keep_checkpoints: int = KEEP_CHECKPOINTS,
) -> tuple[list[keras.callbacks.Callback], NaNGuard]:
    """Resume-from-backup, training log, checkpoint, TensorBoard and NaN guard callbacks.

    The backup (keras_vae_attn.callbacks.TrainingBackup) is written under a temporary
    name and renamed, so a kill or Ctrl-C while it is written leaves the previous one;
    it stays after ``fit`` until the trainer has saved model/ (:func:`finish_training`).
    Its restore runs first, so the training log sees restored weights. Only the newest
    ``keep_checkpoints`` per-epoch checkpoints are kept.
    """
    guard = NaNGuard()
    callbacks = [
        kva_callbacks.TrainingBackup(os.path.join(run_dir, BACKUP_DIR)),
        TrainingLog(os.path.join(run_dir, "training_log.jsonl")),
        EpochWeights(os.path.join(run_dir, CHECKPOINTS), keep_checkpoints),
        kva_callbacks.EpochScalars(os.path.join(run_dir, TENSORBOARD)),
        guard,
    ]
    if log_images is not None:
        callbacks.append(log_images)
    return callbacks, guard


class NaNGuard(keras.callbacks.Callback):
    """Stops training at the first non-finite loss and remembers where (``failure``,
    raised by :func:`check_diverged` once ``fit`` returns)."""

    def __init__(self) -> None:
        super().__init__()
        self.epoch = 0
        self.failure: str | None = None

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        bad = {k: float(v) for k, v in (logs or {}).items() if not math.isfinite(float(v))}
        if bad:
            self.failure = (
                f"training diverged at epoch {self.epoch + 1}, batch "
                f"{batch + 1}: non-finite {bad}. Lower --lr or check the "
                "input data for NaNs; the last checkpoint is kept."
            )
            self.model.stop_training = True


class TrainingLog(keras.callbacks.Callback):
    """Appends one JSON line per epoch (and per start) to ``path``.

    Each line holds the process id, the epoch and a checksum of the weights, so a
    resumed run shows where it picked up and from which weights.
    """

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path

    def _write(self, event, epoch, logs=None):
        total = float(sum(np.abs(np.asarray(v)).sum() for v in self.model.weights))
        optimizer = getattr(self.model, "optimizer", None)
        step = int(np.asarray(optimizer.iterations)) if optimizer is not None else None
        line = {
            "event": event,
            "epoch": epoch,
            "pid": os.getpid(),
            "weights_checksum": total,
            "optimizer_step": step,
            **{k: float(v) for k, v in (logs or {}).items()},
        }
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(line) + "\n")

    def on_epoch_begin(self, epoch, logs=None):
        STAGE["epoch"] = epoch + 1

    def on_train_begin(self, logs=None):
        start = int(getattr(self.model, "_initial_epoch", 0) or 0)
        if start:
            print(f"resuming from the backup at epoch {start + 1}", file=sys.stderr)
        self._write("train_begin", start)

    def on_epoch_end(self, epoch, logs=None):
        self._write("epoch_end", epoch + 1, logs)


class EpochWeights(keras.callbacks.Callback):
    """Writes the weights after each epoch to ``<folder>/epoch-NNN.weights.h5`` (through
    a temporary name, so a kill never leaves a half-written file under a real name) and
    deletes all but the newest ``keep`` (a 256-px ResNet18 checkpoint is ~130 MB; one
    per epoch fills a disk)."""

    def __init__(self, folder: str, keep: int) -> None:
        super().__init__()
        self.folder, self.keep = folder, keep

    def on_epoch_end(self, epoch, logs=None):
        folder = self.folder
        os.makedirs(folder, exist_ok=True)
        require_space(
            folder,
            kva_callbacks.state_bytes(self.model),
            f"the checkpoint of epoch {epoch + 1}",
        )
        partial = os.path.join(folder, f".partial-{os.getpid()}.weights.h5")
        try:
            self.model.save_weights(partial)
            os.replace(partial, os.path.join(folder, f"epoch-{epoch + 1:03d}.weights.h5"))
        finally:
            if os.path.exists(partial):
                os.remove(partial)
        names = sorted(
            n
            for n in os.listdir(folder)
            if n.startswith("epoch-") and n.endswith(".weights.h5")
        )
        for name in names[: -self.keep] if self.keep > 0 else []:
            os.remove(os.path.join(folder, name))


def check_diverged(guard: NaNGuard) -> None:
    """Raise TrainingDiverged (one line, exit 2) when ``guard`` saw a non-finite loss."""
    if guard.failure:
        raise TrainingDiverged(guard.failure)


def recalibrate_batch_norm(model: Any, dataset: Iterable) -> None:
    """Set every BatchNorm layer's moving mean/variance to the average of its batch
    statistics over ``dataset``, run through the training forward pass.

    With momentum 0.99 the moving averages trail the weights by ~100 steps, so after a
    short training the model in inference mode is not the one that was trained (its
    reconstructions drift to a wrong mean image). Batch k is blended in with momentum
    k / (k + 1), which leaves the exact average of all batches. Weights are untouched.
    """
    layers = [
        layer
        for part in (model.encoder, model.decoder)
        for layer in part.layers
        if isinstance(layer, keras.layers.BatchNormalization)
    ]
    if not layers:
        return
    saved = [layer.momentum for layer in layers]
    try:
        for index, images in enumerate(dataset):
            for layer in layers:
                layer.momentum = index / (index + 1.0)
            model.vae_losses(images, training=True)  # eager: reads momentum each call
    finally:
        for layer, momentum in zip(layers, saved):
            layer.momentum = momentum


def backup_epoch(backup_dir: str) -> int:
    """The epoch the run's newest complete backup resumes from (0: none)."""
    if not os.path.isdir(backup_dir):
        return 0
    for name in sorted(os.listdir(backup_dir), reverse=True):
        path = os.path.join(backup_dir, name, kva_callbacks.BACKUP_STATE)
        if kva_callbacks.is_backup_name(name) and os.path.isfile(path):
            try:
                with open(path, encoding="utf-8") as handle:
                    return int(json.load(handle)["epoch"])
            except (OSError, ValueError, KeyError):
                continue
    return 0


def epoch_steps(dataset: Any) -> int | None:
    """The batches in one pass of ``dataset`` (None when tf.data cannot tell)."""
    count = int(dataset.cardinality())
    return count if count > 0 else None


def fast_forward(dataset: Any, steps_per_epoch: int | None, epochs_done: int) -> Any:
    """The training stream, one repeated dataset read across epochs, as the
    uninterrupted run sees it after ``epochs_done`` epochs.

    A seeded stream (shuffle order, augmentation draws) is a function of how much of it
    was read; a resumed run skips what the backed-up epochs consumed, so the epochs it
    trains see the same batches as those of an uninterrupted run. Keras reads a
    repeated stream on across epochs (each pass reshuffled); a fresh pass per epoch
    would restart the shuffle's seed state with every new process. Without a known
    ``steps_per_epoch`` the stream is left as it is (a resume then sees other batches).
    """
    if not steps_per_epoch:
        return dataset
    dataset = dataset.repeat()
    return dataset.skip(epochs_done * steps_per_epoch) if epochs_done else dataset
