"""Threshold calibration and the decisions it drives."""

import numpy as np
import pytest

from keras_vae_attn import calibration

RNG = np.random.default_rng(0)


def test_normal_percentiles_bound_the_false_positive_rate():
    maps = RNG.random((20, 8, 8)).astype("float32")
    scores = RNG.random(200).astype("float32")
    found = calibration.from_normal(maps, scores, pixel_percentile=99, image_percentile=90)
    assert np.mean(maps > found.pixel) == pytest.approx(0.01, abs=0.005)
    assert np.mean(scores > found.image) == pytest.approx(0.10, abs=0.01)


def test_best_f1_threshold_separates_separable_scores():
    scores = np.concatenate([RNG.uniform(0, 1, 500), RNG.uniform(2, 3, 50)])
    labels = np.r_[np.zeros(500, bool), np.ones(50, bool)]
    threshold, f1 = calibration.best_f1_threshold(scores, labels)
    assert f1 == 1.0
    assert ((scores > threshold) == labels).all()


def test_best_f1_threshold_matches_brute_force():
    scores = RNG.normal(size=400)
    labels = RNG.random(400) < 1 / (1 + np.exp(-2 * scores))
    threshold, f1 = calibration.best_f1_threshold(scores, labels, candidates=10000)

    def f1_at(t):
        pred = scores > t
        tp = (pred & labels).sum()
        return 2 * tp / (pred.sum() + labels.sum())

    brute = max(f1_at(t) for t in np.r_[scores - 1e-9, scores.max()])
    assert f1 == pytest.approx(brute, abs=1e-9)
    assert f1_at(threshold) == pytest.approx(f1, abs=1e-9)


def test_decisions_put_the_threshold_at_one_half():
    thresholds = calibration.Thresholds(pixel=2.0, image=5.0, method="test")
    heatmap = np.array([[[0.0, 1.0], [2.0, 8.0]]], np.float32)
    out = calibration.decide(heatmap, np.array([5.5], np.float32), thresholds)
    np.testing.assert_array_equal(out["pred_mask"].numpy(), [[[False, False], [False, True]]])
    np.testing.assert_array_equal(out["pred_label"].numpy(), [True])
    np.testing.assert_allclose(out["heatmap_normalized"].numpy(), [[[0, 0.25], [0.5, 1.0]]])


def test_calibration_errors_are_specific():
    with pytest.raises(ValueError, match="at least one held-out normal image"):
        calibration.from_normal(np.zeros((0, 4, 4)), np.zeros(0))
    with pytest.raises(ValueError, match="at least one positive"):
        calibration.best_f1_threshold(np.ones(5), np.zeros(5, bool))
