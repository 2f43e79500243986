"""A method beside its references, at the same smoothing levels, in one table.

Smoothing lifts every map (a speckled pixel difference most), so a method is only
compared with a reference blurred by the same Gaussian. Levels: none and sigma = 1/32
and 1/16 of the image side (plus the run's own ``--smooth``).
"""

from __future__ import annotations

import numpy as np

from keras_vae_attn.metrics.localization import evaluate_methods

METRIC_KEYS = ("pixel_auroc", "aupro", "best_iou", "image_auroc")


def smoothing_levels(image_size, chosen=0.0):
    """Sorted sigmas in pixels: 0, side/32, side/16 and ``chosen``."""
    return sorted({0.0, image_size / 32.0, image_size / 16.0, float(chosen or 0.0)})


def level_key(sigma):
    return f"{sigma:g}"


def blur(maps, sigma, batch_size=64):
    """Gaussian blur of numpy maps (N, H, W), in batches (pipeline.gaussian_blur)."""
    if not sigma:
        return np.asarray(maps, np.float32)
    import tensorflow as tf

    from keras_vae_attn.explain.pipeline import gaussian_blur

    blurred = [
        gaussian_blur(tf.constant(maps[i : i + batch_size], tf.float32), sigma).numpy()
        for i in range(0, len(maps), batch_size)
    ]
    return np.concatenate(blurred)


def compare(maps, masks, labels, levels, keep, progress=None):
    """Unsmoothed ``maps`` {name: (N, H, W)}, each blurred at every level of ``levels``
    and scored by ``evaluate_methods``, in one pass over the levels.

    Returns (results {method: {level key: metrics}}, kept): ``kept`` holds, at sigma
    ``keep`` (one of ``levels``), the blurred maps, every metric and the ROC curves, as
    (maps, methods, curves) dicts keyed by method.
    """
    results = {name: {} for name in maps}
    kept = None
    steps = [(name, sigma) for sigma in levels for name in maps]
    for name, sigma in progress(steps) if progress else steps:
        blurred = blur(maps[name], sigma)
        scored, curves = evaluate_methods({name: blurred}, masks, labels, return_curves=True)
        results[name][level_key(sigma)] = {k: scored[name][k] for k in METRIC_KEYS}
        if sigma == keep:
            kept = kept or ({}, {}, {})
            kept[0][name], kept[1][name], kept[2][name] = blurred, scored[name], curves[name]
    return results, kept


def beats(results, primary, metric="pixel_auroc"):
    """{reference: {level: primary's ``metric`` > the reference's}} (None when either
    is undefined)."""
    out = {}
    for name, by_level in results.items():
        if name == primary:
            continue
        out[name] = {}
        for level, values in by_level.items():
            ours, theirs = results[primary][level][metric], values[metric]
            out[name][level] = None if ours is None or theirs is None else ours > theirs
    return out


def best(results, name, metric="pixel_auroc"):
    """(level key, value) of ``name``'s best ``metric`` over the levels."""
    pairs = [(level, v[metric]) for level, v in results[name].items() if v[metric] is not None]
    return max(pairs, key=lambda pair: pair[1]) if pairs else (None, None)


def table_lines(results, primary, labels=None, metric="pixel_auroc"):
    """Text table: a row per method, ``metric`` at each smoothing level, then AUPRO,
    best IoU and image AUROC at the method's best level. ``primary`` is starred."""
    labels = labels or {}
    levels = list(next(iter(results.values())).keys())
    head = (
        f"{'method':<34}"
        + "".join(f"{'s=' + lv:>9}" for lv in levels)
        + f"{'best s':>8}{'AUPRO':>8}{'IoU':>7}{'imgAUC':>8}"
    )
    lines = [
        f"{metric} by smoothing sigma (px); AUPRO / IoU / image AUROC at each "
        f"method's best sigma (the 'best s' column)",
        head,
    ]
    for name, by_level in results.items():
        cells = "".join(f"{_fmt(by_level[lv][metric]):>9}" for lv in levels)
        level, _ = best(results, name, metric)
        extra = by_level.get(level, {}) if level is not None else {}
        tail = f"{'s=' + level if level is not None else 'n/a':>8}" + "".join(
            f"{_fmt(extra.get(k)):>{w}}"
            for k, w in (("aupro", 8), ("best_iou", 7), ("image_auroc", 8))
        )
        shown = ("* " if name == primary else "  ") + labels.get(name, name)
        lines.append(f"{shown[:34]:<34}{cells}{tail}")
    return lines


def verdict(results, primary, labels=None):
    """One line per reference: at which sigmas the primary method beats it."""
    labels = labels or {}
    lines = []
    for name, by_level in beats(results, primary).items():
        won = [lv for lv, ok in by_level.items() if ok]
        lost = [lv for lv, ok in by_level.items() if ok is False]
        undefined = [lv for lv, ok in by_level.items() if ok is None]
        ours, theirs = labels.get(primary, primary), labels.get(name, name)
        note = f"; n/a at {', '.join(undefined)}" if undefined else ""
        if not won and not lost:  # e.g. a test set with no anomalous pixel
            lines.append(f"no verdict on {ours} vs {theirs}: the metric is n/a at every sigma")
        elif not lost:
            lines.append(
                f"{ours} beats {theirs} at every sigma"
                if not undefined
                else f"{ours} beats {theirs} at sigma {', '.join(won)}{note}"
            )
        elif not won:
            lines.append(f"{ours} does not beat {theirs} at any sigma{note}")
        else:
            lines.append(
                f"{ours} beats {theirs} at sigma {', '.join(won)} "
                f"(not at {', '.join(lost)}{note})"
            )
    return lines


def _fmt(value):
    return "n/a" if value is None else f"{value:.3f}"
