"""A localization run's evaluation: the chosen anomaly map beside its references, and
every map beside the same map on a randomized twin of the VAE.

Every run scores, on the same test images and at the same smoothing levels:
  anomaly_attention      the run's ExplainOptions (the method)
  paper_form             the paper's Grad-CAM of the per-latent energy (Eq. 3-5) at the
                         last conv layer
  recon_error            |x - reconstruction| of the same VAE
  feature_deviation      the "deviation" form: the VAE's features, no gradient
  random_features        the same on the randomized twin: what random features give
  mean_image_difference  |x - mean normal image| (no model)
  pixel_deviation        |x - mean| / std per pixel (no model)
so a reader sees what the latent gradient, and the VAE at all, adds; with a twin
(keras_vae_attn/explain/sanity.py) each map is also checked for depending on the VAE.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from keras_vae_attn import references
from keras_vae_attn.explain import pipeline, sanity
from keras_vae_attn.explain.options import ExplainOptions
from keras_vae_attn.metrics import comparison, localization

ATTENTION = "anomaly_attention"
PAPER_FORM = "paper_form"
RECON = "recon_error"
FEATURE_DEVIATION = "feature_deviation"
RANDOM_FEATURES = "random_features"
LABELS = {
    ATTENTION: "anomaly attention",
    PAPER_FORM: "paper's form (Eq. 3-5)",
    RECON: "recon difference",
    FEATURE_DEVIATION: "feature deviation (VAE, no grad)",
    RANDOM_FEATURES: "random features (untrained VAE)",
    references.MEAN_IMAGE: "mean-image diff (no model)",
    references.PIXEL_DEVIATION: "pixel z-score (no model)",
}
IMAGE_SCORES = ("recon_score", "latent_distance", "kl")


class Localization(NamedTuple):
    """What :func:`localize` returns."""

    compared: dict  # {method: {sigma key: metrics}}, comparison.compare
    methods: dict  # {method: metrics} at the run's own smoothing (options.smooth)
    curves: dict  # {method: (fpr, tpr)} at that smoothing
    maps: dict  # {method: (N, H, W)} at that smoothing
    image_scores: dict  # {score name: image AUROC} of the non-map scores
    levels: list  # the sigmas
    sanity: dict = None  # {method: sanity.Verdict} (None without a twin)
    twin_maps: dict = None  # {method: (N, H, W)} on the twin, at the run's smoothing


def reference_options(options):
    """The "deviation" form on the same layers (standardized unless a deviation is set)."""
    deviation = options.deviation if options.deviation != "none" else "standardized"
    return options.replace(
        form="deviation", deviation=deviation, layer_scales=None, smooth=0.0
    )


def paper_options(options):
    """The paper's form (``--attribution paper``) at the encoder's last conv layer, the
    paper's own setting (the grid has it at every layer set)."""
    return ExplainOptions.preset("paper", layers=("last",))


def _scaled(model, options, normal_images, batch_size):
    """``options`` with the layer scales a multi-layer map needs, fitted on ``model``."""
    if not options.needs_scales:
        return options
    if normal_images is None:
        raise ValueError("a multi-layer map needs normal_images for its scales")
    return pipeline.fit_layer_scales(model, normal_images, options, batch_size)


def model_maps(model, images, options, normal_images, batch_size, wrap, tag=""):
    """({method: maps (N, H, W)} unsmoothed, {image score: (N,)}) of every map that
    needs the VAE: the run's method, the paper's form, the reconstruction difference
    and the feature deviation. ``options`` carries its fitted layer scales (if any) for
    the trained model; a twin's are re-fitted on it."""
    raw = options.replace(smooth=0.0)
    if tag:
        raw = _scaled(model, raw.replace(layer_scales=None), normal_images, batch_size)
    out = pipeline.batched(
        model,
        images,
        batch_size,
        raw,
        keys=("heatmap", RECON) + IMAGE_SCORES,
        progress=lambda it: wrap(it, desc=tag + "evaluate"),
    )
    maps = {ATTENTION: out.pop("heatmap"), RECON: out.pop(RECON)}
    for name, other in (
        (PAPER_FORM, paper_options(options)),
        (FEATURE_DEVIATION, reference_options(options)),
    ):
        other = _scaled(model, other, normal_images, batch_size)
        maps[name] = pipeline.batched(
            model,
            images,
            batch_size,
            other,
            keys=("heatmap",),
            progress=lambda it, n=name: wrap(it, desc=tag + LABELS[n]),
        )["heatmap"]
    return maps, out


def localize(
    model,
    images,
    masks,
    labels,
    options,
    pixel_distribution,
    normal_images=None,
    batch_size=16,
    progress=None,
    twin=None,
):
    """Score ``images`` (N, H, W, C) float in [0, 1] against ``masks`` (N, H, W) with the
    method and every reference (module doc). ``normal_images`` (float) fit the layer
    scales of a multi-layer map; ``progress`` wraps iterators (e.g. tqdm); ``twin``: the
    randomized VAE (sanity.twin), whose maps give the "random features" row and the
    randomization check of every map."""
    wrap = progress or (lambda it, **_: it)
    maps, out = model_maps(model, images, options, normal_images, batch_size, wrap)
    free = references.reference_maps(images, pixel_distribution)
    maps.update(free)
    twin_maps = None
    if twin is not None:
        twin_maps, _ = model_maps(
            twin, images, options, normal_images, batch_size, wrap, tag="randomized: "
        )
        maps[RANDOM_FEATURES] = twin_maps[FEATURE_DEVIATION]
        twin_maps.update(free)  # model-free: the same maps on any model
    levels = comparison.smoothing_levels(images.shape[1], options.smooth)
    compared, (chosen, methods, curves) = comparison.compare(
        maps,
        masks,
        labels,
        levels,
        keep=float(options.smooth),
        progress=lambda it: wrap(it, desc="metrics"),
    )
    image_scores = {}
    if 0 < np.sum(labels) < len(labels):
        image_scores = {
            name: localization.image_auroc(out[name], labels) for name in IMAGE_SCORES
        }
    checks = shown = None
    if twin_maps is not None:
        checks = randomization_check(maps, twin_maps, masks, compared, images.shape[1])
        shown = {
            name: comparison.blur(m, float(options.smooth)) for name, m in twin_maps.items()
        }
    return Localization(compared, methods, curves, chosen, image_scores, levels, checks, shown)


def middle_level(image_size):
    """The sigma the randomization check is read at: side / 32."""
    return image_size / 32.0


def randomization_check(maps, twin_maps, masks, compared, image_size):
    """{method: sanity.Verdict} at the middle smoothing level: pixel AUROC on the trained
    and the twin model, and the per-image Spearman correlation of the two maps."""
    sigma = middle_level(image_size)
    key = comparison.level_key(sigma)
    checks = {}
    for name, twin_map in twin_maps.items():
        trained = comparison.blur(maps[name], sigma)
        randomized = comparison.blur(twin_map, sigma)
        checks[name] = sanity.verdict(
            compared[name][key]["pixel_auroc"],
            _pixel_auroc(randomized, masks),
            sanity.spearman(trained, randomized),
        )
    return checks


def _pixel_auroc(maps, masks):
    try:
        return localization.pixel_auroc(maps, masks)
    except localization.UndefinedMetric:
        return None


def summary(result, title):
    """Printable lines: the side-by-side table, what the method beats and, with a twin,
    the randomization check of each map."""
    lines = (
        [title]
        + comparison.table_lines(result.compared, ATTENTION, LABELS)
        + comparison.verdict(result.compared, ATTENTION, LABELS)
    )
    if result.sanity:
        lines += sanity_lines(result.sanity)
    return lines


def sanity_lines(checks):
    """The randomization table (one row per map) and the method's verdict line."""
    lines = [
        f"randomization check (Adebayo et al. 2018) at sigma = side/32: the same map "
        f"on a randomized VAE; passes: drop >= {sanity.MIN_DROP} and Spearman <= "
        f"{sanity.MAX_SPEARMAN}",
        f"{'map':<34}{'trained':>9}{'random':>9}{'drop':>8}{'Spearman':>10}  verdict",
    ]
    for name, check in checks.items():
        word = {True: "passes", False: "fails", None: "n/a"}[check.passes]
        lines.append(
            f"{LABELS.get(name, name)[:34]:<34}{_fmt(check.trained):>9}"
            f"{_fmt(check.randomized):>9}{_fmt(check.drop, '+.3f'):>8}"
            f"{check.spearman:>10.2f}  {word}"
        )
    lines.append(sanity.verdict_line(LABELS[ATTENTION], checks[ATTENTION]))
    return lines


def _fmt(value, spec=".3f"):
    return "n/a" if value is None else format(value, spec)


def as_metrics(result, options):
    """The metrics.json entries of a localization."""
    metrics = {
        "methods": result.methods,
        "references": result.compared,
        "smoothing_levels": result.levels,
        "attention_beats": comparison.beats(result.compared, ATTENTION),
        "image_auroc_other_scores": result.image_scores,
        "explain": options.as_config(),
        "attribution": options.describe(),
        "paper_form": paper_options(options).describe(),
    }
    if result.sanity:
        metrics["sanity"] = {name: check.as_dict() for name, check in result.sanity.items()}
        metrics["sanity_rule"] = {
            "sigma": "side/32",
            "min_drop": sanity.MIN_DROP,
            "max_spearman": sanity.MAX_SPEARMAN,
        }
        metrics["sanity_passes"] = result.sanity[ATTENTION].passes
    return metrics
