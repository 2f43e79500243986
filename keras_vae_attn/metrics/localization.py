"""Anomaly-localization metrics: pixel AUROC, best IoU, AUPRO and image AUROC.

All pixel metrics pool every pixel of every test image (good images count, with empty
masks). They are read off one pass of histograms over shared thresholds, so memory stays
bounded for a whole category at full size: the maps are scanned in chunks of images and
no second copy of all scores (sorted or indexed) is ever made.

The thresholds are the distinct scores when there are at most ``max_thresholds`` pixels
(then every metric is exact), otherwise order statistics of an even subsample of the
scores (then scores falling between two neighbouring thresholds count as tied; with the
default 65,536 thresholds that moves AUROC by well under 1e-3).

Shapes: ``maps`` float (N, H, W), ``masks`` bool (N, H, W), ``scores`` float (N,),
``labels`` int (N,) with 1 = anomalous.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from scipy import ndimage

MAX_THRESHOLDS = 1 << 16
CHUNK_PIXELS = 1 << 21
METRIC_NAMES = ("pixel_auroc", "best_iou", "best_iou_threshold", "aupro", "image_auroc")


class UndefinedMetric(ValueError):
    """A metric has no value for this data (e.g. no anomalous pixel, or no normal one)."""


class PixelStats(NamedTuple):
    """Pixel counts per threshold, highest threshold first.

    thresholds (T,)  descending; "predicted anomalous" means score >= threshold
    positives  (T,)  anomalous pixels at or above each threshold (cumulative)
    negatives  (T,)  normal pixels at or above each threshold (cumulative)
    overlap    (T,)  sum over GT regions of the region's fraction at or above it
    n_positive, n_negative, n_regions: totals
    """

    thresholds: np.ndarray
    positives: np.ndarray
    negatives: np.ndarray
    overlap: np.ndarray
    n_positive: int
    n_negative: int
    n_regions: int


def _check_pair(maps, masks):
    maps = np.asarray(maps)
    masks = np.asarray(masks)
    if maps.ndim != 3:
        raise ValueError(f"maps must be (N, H, W); got shape {maps.shape}")
    if masks.shape != maps.shape:
        raise ValueError(
            f"masks of shape {masks.shape} do not match maps of shape {maps.shape}"
        )
    if not np.issubdtype(maps.dtype, np.floating):
        maps = maps.astype(np.float32)
    return maps, masks.astype(bool, copy=False)


def _chunks(count, pixels_per_item, chunk_pixels=CHUNK_PIXELS):
    step = max(1, chunk_pixels // max(1, pixels_per_item))
    for start in range(0, count, step):
        yield slice(start, start + step)


def _thresholds(maps, max_thresholds=MAX_THRESHOLDS):
    """Ascending thresholds: all distinct values, or order statistics of a subsample.

    The global minimum is always the first, so the lowest threshold flags every pixel.
    """
    flat = maps.reshape(-1)
    low, high = np.inf, -np.inf
    for part in _chunks(len(flat), 1):
        chunk = flat[part]
        if not np.isfinite(chunk).all():
            bad = int(np.flatnonzero(~np.isfinite(chunk))[0]) + part.start
            raise ValueError(
                f"maps hold a non-finite value ({flat[bad]}) at image "
                f"{bad // (maps.shape[1] * maps.shape[2])}"
            )
        low, high = min(low, chunk.min()), max(high, chunk.max())
    if len(flat) <= max_thresholds:
        return np.unique(flat)
    stride = -(-len(flat) // (4 * max_thresholds))  # ~4 samples per threshold
    sample = np.sort(flat[::stride])
    picks = np.linspace(0, len(sample) - 1, max_thresholds).round().astype(np.int64)
    return np.unique(np.concatenate([[low], sample[picks], [high]]).astype(flat.dtype))


def pixel_stats(maps, masks, max_thresholds=MAX_THRESHOLDS, regions=True):
    """Count pixels above every threshold in one chunked pass; see :class:`PixelStats`.

    ``regions`` also accumulates the per-region overlap AUPRO needs (connected
    components of each mask, 8-connected as in the MVTec AD evaluation).
    """
    maps, masks = _check_pair(maps, masks)
    edges = _thresholds(maps, max_thresholds)
    bins = len(edges) + 1  # bin k >= 1 holds edges[k-1] <= x < edges[k]
    positive = np.zeros(bins, np.int64)
    negative = np.zeros(bins, np.int64)
    overlap = np.zeros(bins, np.float64)
    n_regions = 0
    structure = np.ones((3, 3), bool)
    for part in _chunks(len(maps), maps.shape[1] * maps.shape[2]):
        index = np.searchsorted(edges, maps[part], side="right")
        truth = masks[part]
        positive += np.bincount(index[truth], minlength=bins)
        negative += np.bincount(index[~truth], minlength=bins)
        if regions:
            for image_index, image_truth in zip(index, truth):
                labels, count = ndimage.label(image_truth, structure=structure)
                if not count:
                    continue
                inside = labels > 0
                sizes = np.bincount(labels[inside])
                overlap += np.bincount(
                    image_index[inside], weights=1.0 / sizes[labels[inside]], minlength=bins
                )
                n_regions += count
    # Cumulate from the top bin down: position j <-> threshold edges[-1 - j].
    return PixelStats(
        thresholds=edges[::-1].copy(),
        positives=np.cumsum(positive[::-1])[:-1],
        negatives=np.cumsum(negative[::-1])[:-1],
        overlap=np.cumsum(overlap[::-1])[:-1],
        n_positive=int(positive.sum()),
        n_negative=int(negative.sum()),
        n_regions=n_regions,
    )


def _require_both(stats, what):
    if stats.n_positive == 0:
        raise UndefinedMetric(f"{what} is undefined: the masks mark no anomalous pixel")
    if stats.n_negative == 0:
        raise UndefinedMetric(f"{what} is undefined: the masks mark every pixel anomalous")


def roc_curve(stats):
    """(fpr, tpr) arrays of the pooled pixel ROC, from (0, 0) to (1, 1)."""
    _require_both(stats, "the ROC curve")
    fpr = np.concatenate([[0.0], stats.negatives / stats.n_negative])
    tpr = np.concatenate([[0.0], stats.positives / stats.n_positive])
    return fpr, tpr


def auroc_from_stats(stats):
    """Area under the pooled ROC (ties count half, as in ``roc_auc_score``)."""
    fpr, tpr = roc_curve(stats)
    return float(np.trapezoid(tpr, fpr))


def best_iou_from_stats(stats):
    """(best IoU, its threshold) over all thresholds; IoU = TP / (TP + FP + FN)."""
    _require_both(stats, "best IoU")
    iou = stats.positives / (stats.n_positive + stats.negatives)
    best = int(np.argmax(iou))
    return float(iou[best]), float(stats.thresholds[best])


def aupro_from_stats(stats, fpr_limit=0.3):
    """Area under the per-region-overlap curve up to ``fpr_limit``, divided by it.

    PRO at a threshold is the mean over all ground-truth regions of the fraction of the
    region flagged; FPR is the fraction of normal pixels flagged. 1.0 is perfect.
    """
    if not 0 < fpr_limit <= 1:
        raise ValueError(f"fpr_limit must be in (0, 1]; got {fpr_limit}")
    _require_both(stats, "AUPRO")
    fpr = np.concatenate([[0.0], stats.negatives / stats.n_negative])
    pro = np.concatenate([[0.0], stats.overlap / stats.n_regions])
    inside = int(np.searchsorted(fpr, fpr_limit, side="right"))  # points with fpr <= limit
    fpr_part, pro_part = fpr[:inside], pro[:inside]
    if inside < len(fpr) and fpr_part[-1] < fpr_limit:
        # Close the area at the limit, interpolating the segment that crosses it.
        x0, x1, y0, y1 = fpr[inside - 1], fpr[inside], pro[inside - 1], pro[inside]
        y = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
        fpr_part, pro_part = np.append(fpr_part, fpr_limit), np.append(pro_part, y)
    return float(np.trapezoid(pro_part, fpr_part) / fpr_limit)


def pixel_auroc(maps, masks):
    """Pixel-level AUROC pooled over all pixels of all images."""
    return auroc_from_stats(pixel_stats(maps, masks, regions=False))


def best_iou(maps, masks):
    """(best IoU, threshold) of the pooled pixels; the threshold is tuned on these very
    maps, so report it as test-set-tuned (optimistic)."""
    return best_iou_from_stats(pixel_stats(maps, masks, regions=False))


def aupro(maps, masks, fpr_limit=0.3):
    """Normalized area under the PRO curve up to ``fpr_limit`` (MVTec AD's AUPRO)."""
    return aupro_from_stats(pixel_stats(maps, masks), fpr_limit)


def image_auroc(scores, labels):
    """Image-level AUROC of ``scores`` (N,) against ``labels`` (N,), 1 = anomalous."""
    scores = np.asarray(scores, np.float64).reshape(-1, 1, 1)
    labels = np.asarray(labels)
    if labels.shape != (len(scores),):
        raise ValueError(f"labels of shape {labels.shape} do not match {len(scores)} scores")
    return auroc_from_stats(
        pixel_stats(scores, labels.reshape(-1, 1, 1).astype(bool), regions=False)
    )


def _or_none(compute, *args):
    """``compute(*args)``, or None where the data cannot define the metric."""
    try:
        return compute(*args)
    except UndefinedMetric:
        return None


def evaluate_methods(
    method_maps, masks, labels=None, image_scores=None, fpr_limit=0.3, return_curves=False
):
    """Every localization metric for each method, side by side.

    ``method_maps``: {name: maps (N, H, W)}; ``labels`` default to "mask not empty";
    ``image_scores``: {name: (N,)}, default the max of each map. Returns
    {name: {pixel_auroc, best_iou, best_iou_threshold, aupro, image_auroc}}; a metric
    the data cannot define (e.g. image AUROC with no good image) is None. With
    ``return_curves`` also returns {name: (fpr, tpr)} of the pixel ROC.
    """
    masks = np.asarray(masks, bool)
    labels = masks.any(axis=(1, 2)).astype(int) if labels is None else np.asarray(labels)
    image_scores = dict(image_scores or {})
    results, curves = {}, {}
    for name, maps in method_maps.items():
        stats = pixel_stats(maps, masks)
        iou = _or_none(best_iou_from_stats, stats) or (None, None)
        scores = image_scores.get(name)
        if scores is None:
            scores = np.asarray(maps).reshape(len(maps), -1).max(axis=1)
        results[name] = {
            "pixel_auroc": _or_none(auroc_from_stats, stats),
            "best_iou": iou[0],
            "best_iou_threshold": iou[1],
            "aupro": _or_none(aupro_from_stats, stats, fpr_limit),
            "image_auroc": _or_none(image_auroc, scores, labels),
        }
        if return_curves:
            curves[name] = _or_none(roc_curve, stats)
    return (results, curves) if return_curves else results
