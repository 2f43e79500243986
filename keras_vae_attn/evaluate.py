"""A localization run's evaluation: the chosen anomaly map beside its references.

Every run scores, on the same test images and at the same smoothing levels:
  anomaly_attention      the run's ExplainOptions (the method)
  recon_error            |x - reconstruction| of the same VAE
  feature_deviation      the "deviation" form: the VAE's features, no gradient
  mean_image_difference  |x - mean normal image| (no model)
  pixel_deviation        |x - mean| / std per pixel (no model)
so a reader sees what the latent gradient, and the VAE at all, adds.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from keras_vae_attn import references, scoring
from keras_vae_attn.metrics import comparison, localization

ATTENTION = "anomaly_attention"
RECON = "recon_error"
FEATURE_DEVIATION = "feature_deviation"
LABELS = {ATTENTION: "anomaly attention", RECON: "recon difference",
          FEATURE_DEVIATION: "feature deviation (VAE, no grad)",
          references.MEAN_IMAGE: "mean-image diff (no model)",
          references.PIXEL_DEVIATION: "pixel z-score (no model)"}
IMAGE_SCORES = ("recon_score", "latent_distance", "kl")


class Localization(NamedTuple):
    """What :func:`localize` returns."""

    compared: dict      # {method: {sigma key: metrics}}, comparison.compare
    methods: dict       # {method: metrics} at the run's own smoothing (options.smooth)
    curves: dict        # {method: (fpr, tpr)} at that smoothing
    maps: dict          # {method: (N, H, W)} at that smoothing
    image_scores: dict  # {score name: image AUROC} of the non-map scores
    levels: list        # the sigmas


def reference_options(options):
    """The "deviation" form on the same layers (standardized unless a deviation is set)."""
    deviation = options.deviation if options.deviation != "none" else "standardized"
    return options.replace(form="deviation", deviation=deviation, layer_scales=None,
                           smooth=0.0)


def localize(model, images, masks, labels, options, pixel_distribution, normal_images=None,
             batch_size=16, progress=None):
    """Score ``images`` (N, H, W, C) float in [0, 1] against ``masks`` (N, H, W) with the
    method and every reference (module doc). ``normal_images`` (float) fit the layer
    scales of a multi-layer reference; ``progress`` wraps iterators (e.g. tqdm)."""
    wrap = progress or (lambda it, **_: it)
    raw = options.replace(smooth=0.0)
    out = scoring.batched(model, images, batch_size, raw,
                          keys=("heatmap", RECON) + IMAGE_SCORES,
                          progress=lambda it: wrap(it, desc="evaluate"))
    feature = reference_options(options)
    if feature.needs_scales:
        if normal_images is None:
            raise ValueError("a multi-layer reference needs normal_images for its scales")
        feature = scoring.fit_layer_scales(model, normal_images, feature, batch_size)
    deviation = scoring.batched(model, images, batch_size, feature, keys=("heatmap",),
                                progress=lambda it: wrap(it, desc="feature deviation"))
    maps = {ATTENTION: out.pop("heatmap"), RECON: out.pop(RECON),
            FEATURE_DEVIATION: deviation["heatmap"],
            **references.reference_maps(images, pixel_distribution)}
    levels = comparison.smoothing_levels(images.shape[1], options.smooth)
    compared, (chosen, methods, curves) = comparison.compare(
        maps, masks, labels, levels, keep=float(options.smooth),
        progress=lambda it: wrap(it, desc="metrics"))
    image_scores = {}
    if 0 < np.sum(labels) < len(labels):
        image_scores = {name: localization.image_auroc(out[name], labels)
                        for name in IMAGE_SCORES}
    return Localization(compared, methods, curves, chosen, image_scores, levels)


def summary(result, title):
    """Printable lines: the side-by-side table and what the method beats."""
    return ([title] + comparison.table_lines(result.compared, ATTENTION, LABELS)
            + comparison.verdict(result.compared, ATTENTION, LABELS))


def as_metrics(result, options):
    """The metrics.json entries of a localization."""
    return {"methods": result.methods,
            "references": result.compared,
            "smoothing_levels": result.levels,
            "attention_beats": comparison.beats(result.compared, ATTENTION),
            "image_auroc_other_scores": result.image_scores,
            "explain": options.as_config(),
            "attribution": options.describe()}
