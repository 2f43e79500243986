"""FactorVAE score sanity checks: true factors score ~1, random codes ~chance, collapsed
dims are dropped, and the score is seeded."""

import numpy as np
import pytest

from keras_vae_attn.data import dsprites
from keras_vae_attn.metrics.disentanglement import factor_vae_score


class FactorsAsImages:
    """Ground truth whose 'images' are the factor classes themselves (N, 6), so a
    representation can read the true factors straight off its input."""

    factor_sizes = dsprites.FACTOR_SIZES

    def sample_factors(self, num, rng):
        return np.stack([rng.integers(0, s, num) for s in self.factor_sizes], axis=1)

    def images_from_factors(self, factors):
        return np.asarray(factors, np.float32)


NOISE_PROJECTION = np.random.default_rng(0).normal(size=(6, 3)) * 7.3


def true_factors_plus_noise(images):
    """The five varying factors, then three pseudo-random dims (a fixed function of the
    input, but tied to no single factor)."""
    noise = np.sin(images @ NOISE_PROJECTION) * 10
    return np.concatenate([images[:, 1:], noise], axis=1)


def test_true_factors_score_one():
    votes = dict(train_votes=200, eval_votes=200, samples_per_vote=32, variance_samples=2000)
    score = factor_vae_score(true_factors_plus_noise, FactorsAsImages(), seed=0, **votes)
    assert score["eval_accuracy"] >= 0.99 and score["train_accuracy"] >= 0.99
    assert score["num_active_dims"] == 8
    votes = np.array(score["eval_votes"])
    assert votes[5:].sum() == 0  # noise dims never win a vote


def test_random_codes_score_about_chance():
    rng = np.random.default_rng(1)

    def random_codes(images):
        return rng.normal(size=(len(images), 10))

    votes = dict(train_votes=300, eval_votes=500, samples_per_vote=32, variance_samples=2000)
    score = factor_vae_score(random_codes, FactorsAsImages(), seed=0, **votes)
    assert 0.1 < score["eval_accuracy"] < 0.35  # chance is 1/5 varying factors


def test_collapsed_dims_are_dropped_and_counted():
    def with_constant_dims(images):
        codes = true_factors_plus_noise(images)[:, :5]
        return np.concatenate([np.zeros((len(images), 2)), codes], axis=1)

    votes = dict(train_votes=50, eval_votes=50, samples_per_vote=16, variance_samples=500)
    score = factor_vae_score(with_constant_dims, FactorsAsImages(), seed=0, **votes)
    assert score["num_active_dims"] == 5
    assert np.array(score["train_votes"])[:2].sum() == 0
    assert score["eval_accuracy"] >= 0.99

    nothing = factor_vae_score(
        lambda x: np.zeros((len(x), 4)),
        FactorsAsImages(),
        train_votes=5,
        eval_votes=5,
        variance_samples=100,
    )
    assert nothing["num_active_dims"] == 0 and nothing["eval_accuracy"] == 0.0


def test_score_is_seeded_on_real_dsprites_images():
    def centroid_and_area(images):
        mask = images[..., 0]
        area = mask.sum(axis=(1, 2))
        rows = (mask.sum(axis=2) * np.arange(64)).sum(axis=1) / area
        cols = (mask.sum(axis=1) * np.arange(64)).sum(axis=1) / area
        return np.stack([cols, rows, area], axis=1)

    data = dsprites.load(source="generate")
    votes = dict(train_votes=40, eval_votes=40, samples_per_vote=16, variance_samples=400)
    first = factor_vae_score(centroid_and_area, data, seed=5, **votes)
    again = factor_vae_score(centroid_and_area, data, seed=5, **votes)
    assert first == again
    # x, y and size are read off exactly: votes for pos_x, pos_y, scale are right, so
    # well above the 0.2 of chance (shape and orientation votes cannot be).
    assert first["eval_accuracy"] > 0.45


def test_bad_parameters_are_rejected():
    with pytest.raises(ValueError, match="samples_per_vote"):
        factor_vae_score(true_factors_plus_noise, FactorsAsImages(), samples_per_vote=1)
    with pytest.raises(ValueError, match="train_votes"):
        factor_vae_score(true_factors_plus_noise, FactorsAsImages(), train_votes=0)
