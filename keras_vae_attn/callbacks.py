"""Keras callbacks and summaries for TensorBoard: losses per epoch, attention while
training, and a run's evaluation (metrics and test heatmaps) at its end.

Scalars and images are written as classic ``Summary`` values (``simple_value``, PNG
``image``): TensorBoard shows them, and so does every reader of event files, e.g.
``EventAccumulator.Scalars``, which sees nothing of ``tf.summary.scalar``'s tensors.
"""
from __future__ import annotations

import os

import keras
import numpy as np
import tensorflow as tf

from keras_vae_attn import viz


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
        panel = np.concatenate([viz.to_rgb(self.images), viz.to_rgb(recon),
                                viz.overlay(self.images, maps) / 255.0], axis=2)
        panel = np.clip(np.round(panel * 255.0), 0, 255).astype(np.uint8)
        write_summary(self.writer, epoch, images={
            f"input|reconstruction|attention/{index}": image
            for index, image in enumerate(panel)})


#: metrics.json entries written as evaluation scalars: {method: {metric: value}}-like
#: dicts (nested dicts become "a/b/c" tags).
METRIC_GROUPS = ("methods", "image_auroc", "image_auroc_other_scores",
                 "pixel_auroc_per_defect", "best_auroc", "factor_vae_score",
                 "factor_vae_train_accuracy", "attention_overlap_top_pair")
EXAMPLES = 4              # test heatmaps shown at the end of a run: 1 normal, 3 anomalous


def write_summary(writer, step, scalars=None, images=None):
    """Write ``scalars`` {tag: number} and ``images`` {tag: uint8 (H, W, 3)} at ``step``
    (non-finite and None values are left out)."""
    Summary = tf.compat.v1.Summary
    values = [Summary.Value(tag=tag, simple_value=float(value))
              for tag, value in (scalars or {}).items()
              if value is not None and np.isfinite(float(value))]
    for tag, image in (images or {}).items():
        png = tf.io.encode_png(np.asarray(image, np.uint8)).numpy()
        values.append(Summary.Value(tag=tag, image=Summary.Image(
            height=image.shape[0], width=image.shape[1], colorspace=3,
            encoded_image_string=png)))
    with writer.as_default():
        tf.summary.experimental.write_raw_pb(Summary(value=values).SerializeToString(),
                                             step=step)
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
        write_summary(self.writer, epoch, {f"epoch_{name}": value
                                           for name, value in (logs or {}).items()})


def flat_metrics(metrics):
    """{"group/.../name": number} of the :data:`METRIC_GROUPS` in a metrics.json dict."""
    flat = {}

    def walk(prefix, value):
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(f"{prefix}/{key}", inner)
        elif isinstance(value, (int, float, np.number)) and not isinstance(value, bool):
            flat[prefix] = float(value)

    for group in METRIC_GROUPS:
        if group in metrics:
            walk(group, metrics[group])
    return flat


def example_picks(labels, count=EXAMPLES):
    """Indices of the first normal test image and the first ``count - 1`` anomalous ones
    (fewer when the test set has fewer)."""
    labels = np.asarray(labels)
    return (list(np.flatnonzero(labels == 0)[:1])
            + list(np.flatnonzero(labels != 0)[:count - 1]))


def log_evaluation(log_dir, metrics, step, examples=None):
    """A finished run's evaluation in ``<log_dir>/evaluation`` at ``step`` (its last
    epoch): the metrics (:func:`flat_metrics`) and, with ``examples`` = (test images
    (N, H, W, C), uint8 or in [0, 1], heatmaps (N, H, W), labels (N,)), the heatmaps of
    :func:`example_picks` over their images, all on one scale."""
    images = {}
    if examples is not None:
        pictures, maps, labels = examples
        picks = example_picks(labels)
        pictures = np.asarray(pictures)[picks]
        if np.issubdtype(pictures.dtype, np.integer):
            pictures = pictures / 255.0
        maps = np.asarray(maps)[picks]
        shown = viz.overlay(pictures, maps, vmax=float(maps.max()) or None)
        images = {f"test heatmap {index} ({'anomalous' if labels[i] else 'normal'})": image
                  for index, (i, image) in enumerate(zip(picks, shown))}
    writer = tf.summary.create_file_writer(os.path.join(log_dir, "evaluation"))
    write_summary(writer, step, flat_metrics(metrics), images)
    writer.close()
