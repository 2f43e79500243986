"""Localization metrics against scikit-learn and hand-computed cases."""

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from keras_vae_attn.metrics import localization as loc


def random_case(seed, shape=(6, 16, 16), levels=None):
    rng = np.random.default_rng(seed)
    masks = np.zeros(shape, bool)
    masks[1, 3:8, 4:9] = True
    masks[2, 10:12, :] = True
    masks[4, 0:2, 0:2] = True
    maps = rng.random(shape).astype(np.float32) + 0.6 * masks
    if levels:  # coarse values -> many ties
        maps = np.round(maps * levels) / levels
    return maps, masks


@pytest.mark.parametrize("levels", [None, 4])
def test_pixel_auroc_matches_sklearn(levels):
    maps, masks = random_case(0, levels=levels)
    expected = roc_auc_score(masks.ravel(), maps.ravel())
    assert loc.pixel_auroc(maps, masks) == pytest.approx(expected, abs=1e-12)


def test_binned_pixel_auroc_stays_close_to_sklearn():
    # More pixels than thresholds: the subsampled-threshold path, heavy-tailed scores.
    rng = np.random.default_rng(1)
    masks = np.zeros((12, 96, 96), bool)
    for i in range(0, 12, 2):
        masks[i, 20 + i : 50 + i, 30:60] = True
    maps = (rng.standard_exponential(masks.shape) ** 3).astype(np.float32)
    maps += masks * rng.random(masks.shape, dtype=np.float32) * 2
    assert maps.size > loc.MAX_THRESHOLDS
    expected = roc_auc_score(masks.ravel(), maps.ravel())
    assert loc.pixel_auroc(maps, masks) == pytest.approx(expected, abs=2e-4)
    coarse = loc.auroc_from_stats(
        loc.pixel_stats(maps, masks, max_thresholds=512, regions=False)
    )
    assert coarse == pytest.approx(expected, abs=5e-3)


def test_image_auroc_matches_sklearn():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 2, 40)
    scores = rng.random(40) + 0.3 * labels
    assert loc.image_auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores))


def test_best_iou_hand_computed():
    # 2 images of 1x4 pixels; anomalous pixels score 0.9, 0.8, 0.3; normal 0.7, 0.2 ...
    maps = np.array([[[0.9, 0.8, 0.7, 0.2]], [[0.3, 0.1, 0.1, 0.0]]])
    masks = np.array([[[1, 1, 0, 0]], [[1, 0, 0, 0]]], bool)
    # t=0.8: TP 2, FP 0, FN 1 -> 2/3;  t=0.7: 2/4;  t=0.3: TP 3, FP 1 -> 3/4 (best)
    iou, threshold = loc.best_iou(maps, masks)
    assert iou == pytest.approx(0.75)
    assert threshold == pytest.approx(0.3)


def test_best_iou_is_the_best_over_every_threshold():
    maps, masks = random_case(3, levels=8)
    iou, threshold = loc.best_iou(maps, masks)
    brute = []
    for t in np.unique(maps):
        pred = maps >= t
        brute.append((pred & masks).sum() / (pred | masks).sum())
    assert iou == pytest.approx(max(brute))
    pred = maps >= threshold
    assert (pred & masks).sum() / (pred | masks).sum() == pytest.approx(iou)


def test_aupro_hand_computed():
    # One row: region A (4 px) at 0.75, a normal pixel, region B (1 px) at 0.95, and
    # nine more normal pixels; normal scores are 0.0, 0.1, ..., 0.9.
    row = [0.75] * 4 + [0.0] + [0.95] + [i / 10 for i in range(1, 10)]
    truth = [True] * 4 + [False] + [True] + [False] * 9
    maps, masks = np.array([[row]]), np.array([[truth]])
    # Curve: (0,0) -> (0,.5) at 0.95 -> (.2,.5) at 0.8 -> (.2,1) at 0.75 -> (.3,1) ...
    # area up to FPR 0.3 = .5 * .2 + 1 * .1 = .2, normalized by .3.
    assert loc.aupro(maps, masks) == pytest.approx(0.2 / 0.3)
    # Up to FPR 0.15 the limit falls inside a flat segment: .5 * .15 / .15.
    assert loc.aupro(maps, masks, fpr_limit=0.15) == pytest.approx(0.5)


def test_aupro_averages_regions_not_pixels():
    # Region A (4 px) caught before any false positive, region B (1 px) only after all.
    maps = np.full((1, 4, 6), 0.5)
    masks = np.zeros((1, 4, 6), bool)
    maps[0, 0, 0:4], masks[0, 0, 0:4] = 1.0, True
    maps[0, 3, 5], masks[0, 3, 5] = 0.2, True
    # Curve (0,0) -> (0, .5) -> (1, .5) -> (1, 1): PRO is 0.5 on all of [0, 0.3].
    assert loc.aupro(maps, masks) == pytest.approx(0.5)
    # Pixel recall would say 0.8 there; a perfect map scores 1.
    assert loc.aupro(masks.astype(float), masks) == pytest.approx(1.0)


def test_regions_are_eight_connected():
    masks = np.zeros((1, 4, 4), bool)
    masks[0, 0, 0] = masks[0, 1, 1] = True  # diagonal neighbours: one region
    stats = loc.pixel_stats(np.random.default_rng(0).random((1, 4, 4)), masks)
    assert stats.n_regions == 1


def test_evaluate_methods_side_by_side():
    maps, masks = random_case(4)
    labels = masks.any(axis=(1, 2)).astype(int)
    perfect = masks.astype(np.float32)
    out = loc.evaluate_methods({"good": perfect, "noisy": maps}, masks, labels)
    assert set(out) == {"good", "noisy"}
    for values in out.values():
        assert set(values) == set(loc.METRIC_NAMES)
    assert out["good"]["pixel_auroc"] == 1.0 and out["good"]["best_iou"] == 1.0
    assert out["good"]["aupro"] == pytest.approx(1.0)
    assert out["noisy"]["pixel_auroc"] == pytest.approx(
        roc_auc_score(masks.ravel(), maps.ravel())
    )
    assert out["noisy"]["image_auroc"] == pytest.approx(
        roc_auc_score(labels, maps.reshape(len(maps), -1).max(1))
    )
    flipped = loc.evaluate_methods(
        {"noisy": maps}, masks, labels, image_scores={"noisy": -labels}
    )
    assert flipped["noisy"]["image_auroc"] == 0.0


def test_undefined_metrics_are_none_or_errors():
    maps, masks = random_case(5)
    only_anomalous = masks[[1, 2]]
    out = loc.evaluate_methods({"m": maps[[1, 2]]}, only_anomalous)
    assert out["m"]["image_auroc"] is None and out["m"]["pixel_auroc"] is not None
    with pytest.raises(loc.UndefinedMetric, match="no anomalous pixel"):
        loc.pixel_auroc(maps, np.zeros_like(masks))


def test_bad_inputs_are_named():
    maps, masks = random_case(6)
    with pytest.raises(ValueError, match="do not match"):
        loc.pixel_auroc(maps[:, :8], masks)
    with pytest.raises(ValueError, match=r"must be \(N, H, W\)"):
        loc.pixel_auroc(maps[0], masks[0])
    maps[3, 2, 2] = np.nan
    with pytest.raises(ValueError, match="non-finite.*image 3"):
        loc.pixel_auroc(maps, masks)
    with pytest.raises(ValueError, match="fpr_limit"):
        loc.aupro(maps[:2], masks[:2], fpr_limit=0)
