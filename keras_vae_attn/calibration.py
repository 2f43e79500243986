"""Decision thresholds for heatmaps and image scores, and the decisions themselves.

Thresholds are calibrated on held-out *normal* images (a high percentile of their
scores: no labels needed) or, when a labelled validation set exists, at the F1-optimal
point. :func:`decide` turns raw outputs into masks, labels and a heatmap normalized so
that 0.5 is the threshold; exported graphs call the same function.
"""

from __future__ import annotations

import json
import math
from typing import Any, NamedTuple

import numpy as np

#: The normal-data percentiles of :func:`from_normal` (pixel heatmap, image score).
PIXEL_PERCENTILE = 99.5
IMAGE_PERCENTILE = 99.0


class Thresholds(NamedTuple):
    """A pixel threshold for the heatmap and an image threshold for the score."""

    pixel: float
    image: float
    method: str

    def as_dict(self) -> dict:
        return {"pixel": float(self.pixel), "image": float(self.image), "method": self.method}


def read_thresholds(path: str) -> Thresholds:
    """The Thresholds of a ``thresholds.json`` (a run's, or one an exporter is given);
    ValueError naming the file when it does not hold finite numbers ``pixel`` > 0 and
    ``image``, OSError when it cannot be read."""
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    try:
        data = json.loads(text)
        values = Thresholds(
            float(data["pixel"]), float(data["image"]), str(data.get("method", ""))
        )
    except (ValueError, TypeError, KeyError) as error:
        raise ValueError(
            f"{path!r} must be a JSON object with numbers "
            f"'pixel' and 'image' ({type(error).__name__}: {error})"
        ) from None
    for name in ("pixel", "image"):  # json reads NaN and Infinity: every label "normal"
        if not math.isfinite(getattr(values, name)):
            raise ValueError(
                f"{path!r}: {name} threshold must be a finite number, got "
                f"{getattr(values, name)}"
            )
    if not values.pixel > 0:
        raise ValueError(f"{path!r}: pixel threshold must be > 0, got {values.pixel}")
    return values


def from_normal(
    heatmaps: Any,
    scores: Any,
    pixel_percentile: float = PIXEL_PERCENTILE,
    image_percentile: float = IMAGE_PERCENTILE,
) -> Thresholds:
    """Thresholds from normal images only: percentiles of their pixel and image scores.

    ``heatmaps`` (N, H, W) and ``scores`` (N,) of held-out normal images. A pixel of a
    normal image then exceeds the threshold with probability ~(100 - percentile)%.
    """
    heatmaps = np.asarray(heatmaps, np.float32)
    scores = np.asarray(scores, np.float32)
    if heatmaps.size == 0 or scores.size == 0:
        raise ValueError("calibration needs at least one held-out normal image")
    return Thresholds(
        float(np.percentile(heatmaps, pixel_percentile)),
        float(np.percentile(scores, image_percentile)),
        f"normal percentiles {pixel_percentile}/{image_percentile}",
    )


def from_model(
    model: Any,
    normal_images: Any,
    options: Any,
    batch_size: int = 16,
    pixel_percentile: float = PIXEL_PERCENTILE,
    image_percentile: float = IMAGE_PERCENTILE,
    keys: tuple[str, ...] = (),
) -> tuple[Thresholds, dict]:
    """:func:`from_normal` on a model's outputs for held-out ``normal_images`` (float
    (N, H, W, C)) with the run's ExplainOptions: how a run's predictions.csv and the
    export pipeline calibrate. Returns (thresholds, outputs); the outputs (numpy) hold
    heatmap, score and the extra ``keys`` (e.g. "recon_error")."""
    from keras_vae_attn.explain import pipeline

    out = pipeline.batched(
        model, normal_images, batch_size, options, keys=("heatmap", "score", *keys)
    )
    return from_normal(out["heatmap"], out["score"], pixel_percentile, image_percentile), out


def best_f1_threshold(scores: Any, labels: Any, candidates: int = 1000) -> tuple[float, float]:
    """The threshold maximising F1 of ``scores > t`` against boolean ``labels``.

    Candidates are quantiles of the scores, and counts come from histograms, so memory
    stays at a few arrays of ``candidates`` entries whatever the number of pixels.
    Returns (threshold, f1).
    """
    scores = np.asarray(scores, np.float32).ravel()
    labels = np.asarray(labels, bool).ravel()
    if not labels.any():
        raise ValueError("F1 calibration needs at least one positive (anomalous) label")
    edges = np.unique(np.quantile(scores, np.linspace(0.0, 1.0, candidates + 1)))
    positives = np.histogram(scores[labels], bins=edges)[0]
    negatives = np.histogram(scores[~labels], bins=edges)[0]
    # predicted positive for threshold edges[i]: every bin from i on (scores >= edge)
    true_pos = np.cumsum(positives[::-1])[::-1]
    false_pos = np.cumsum(negatives[::-1])[::-1]
    false_neg = labels.sum() - true_pos
    f1 = 2 * true_pos / np.maximum(2 * true_pos + false_pos + false_neg, 1)
    best = int(np.argmax(f1))
    # scores >= edges[best] are positive; a strict `>` rule needs a value just below it
    return float(np.nextafter(edges[best], -np.inf)), float(f1[best])


def from_labelled(heatmaps: Any, masks: Any, scores: Any, labels: Any) -> Thresholds:
    """F1-optimal thresholds on a labelled validation set (pixels pooled)."""
    pixel, _ = best_f1_threshold(heatmaps, masks)
    image, _ = best_f1_threshold(scores, labels)
    return Thresholds(pixel, image, "F1-optimal on labelled validation set")


def decide(heatmap: Any, score: Any, thresholds: Thresholds) -> dict:
    """Masks, labels and a normalized heatmap from raw outputs (NumPy or TF tensors).

    Returns ``pred_mask`` (B, H, W) bool, ``pred_label`` (B,) bool and
    ``heatmap_normalized`` in [0, 1] with the pixel threshold at 0.5 (linear, twice the
    threshold maps to 1).
    """
    import tensorflow as tf

    pixel = tf.constant(thresholds.pixel, tf.float32)
    image = tf.constant(thresholds.image, tf.float32)
    heatmap = tf.cast(heatmap, tf.float32)
    return {
        "pred_mask": heatmap > pixel,
        "pred_label": tf.cast(score, tf.float32) > image,
        "heatmap_normalized": normalize(heatmap, pixel),
    }


def normalize(values: Any, threshold: Any) -> Any:
    """``values`` on [0, 1] with ``threshold`` at 0.5 (linear, twice it maps to 1): the
    exported ``heatmap_normalized``, and a run's ``pred_score`` of image scores."""
    import tensorflow as tf

    threshold = tf.maximum(tf.cast(threshold, tf.float32), 1e-12)
    return tf.clip_by_value(0.5 * tf.cast(values, tf.float32) / threshold, 0.0, 1.0)
