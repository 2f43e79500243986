"""The FactorVAE disentanglement score (Kim & Mnih 2018, section 4).

1. Normalise each code dimension by its std over the data set; drop collapsed dims
   (std < ``collapse_std``).
2. A vote: fix one factor k at a random value, draw ``samples_per_vote`` images that
   agree on it (all else random), encode them, and vote (argmin_d normalised variance, k).
3. A majority-vote classifier d -> k is read off ``train_votes`` votes; the score is its
   accuracy on ``eval_votes`` fresh votes.

Written against the ground-truth interface of :mod:`keras_vae_attn.data.dsprites`
(``factor_sizes``, ``sample_factors(num, rng)``, ``images_from_factors(factors)``); the
representation is any function images float32 (N, H, W, C) -> codes (N, D). Seeded: the
same seed, data and representation give the same score.
"""

from __future__ import annotations

import numpy as np

COLLAPSE_STD = 0.05


def encode_all(representation, data, factors, batch_size=256, progress=None):
    """Codes float64 (N, D) of the images of ``factors`` (N, F), in batches."""
    starts = range(0, len(factors), batch_size)
    codes = [
        np.asarray(
            representation(data.images_from_factors(factors[i : i + batch_size])), np.float64
        )
        for i in (progress(starts) if progress else starts)
    ]
    codes = np.concatenate(codes)
    if codes.ndim != 2 or len(codes) != len(factors):
        raise ValueError(
            f"the representation must map N images to codes (N, D); got "
            f"{codes.shape} for {len(factors)} images"
        )
    return codes


def code_std(representation, data, rng, num_samples=10000, batch_size=256):
    """Std over the data set of each code dimension, (D,)."""
    factors = data.sample_factors(num_samples, rng)
    return encode_all(representation, data, factors, batch_size).std(axis=0)


def vote_factors(data, rng, num_votes, samples_per_vote):
    """Factors (V, L, F) of ``num_votes`` batches, each agreeing on one random factor,
    and that factor per vote (V,)."""
    varying = np.flatnonzero(np.asarray(data.factor_sizes) > 1)
    fixed = rng.choice(varying, size=num_votes)
    factors = data.sample_factors(num_votes * samples_per_vote, rng)
    factors = factors.reshape(num_votes, samples_per_vote, -1)
    votes = np.arange(num_votes)
    factors[votes, :, fixed] = factors[votes, 0, fixed][:, None]
    return factors, fixed


def collect_votes(
    representation,
    data,
    rng,
    num_votes,
    std,
    active,
    samples_per_vote,
    batch_size=256,
    progress=None,
):
    """Vote counts int64 (D, F): entry (d, k) counts batches with factor k fixed whose
    least-varying (normalised) active code dimension was d."""
    factors, fixed = vote_factors(data, rng, num_votes, samples_per_vote)
    codes = (
        encode_all(
            representation, data, factors.reshape(-1, factors.shape[-1]), batch_size, progress
        )
        / std
    )
    codes = codes.reshape(num_votes, samples_per_vote, -1)[:, :, active]
    dims = active[np.argmin(codes.var(axis=1, ddof=1), axis=1)]
    counts = np.zeros((len(std), len(data.factor_sizes)), np.int64)
    np.add.at(counts, (dims, fixed), 1)
    return counts


def factor_vae_score(
    representation,
    data,
    seed=0,
    train_votes=800,
    eval_votes=800,
    samples_per_vote=64,
    variance_samples=10000,
    collapse_std=COLLAPSE_STD,
    batch_size=256,
    progress=None,
):
    """Flat dict: ``eval_accuracy`` (the score), ``train_accuracy``, ``num_active_dims``
    and the vote counts (D, F) of both phases.

    ``progress`` optionally wraps the encoding loops (e.g. a tqdm factory).
    """
    for name, value in (
        ("train_votes", train_votes),
        ("eval_votes", eval_votes),
        ("variance_samples", variance_samples),
    ):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    if samples_per_vote < 2:
        raise ValueError(
            f"samples_per_vote must be at least 2 (a variance), got {samples_per_vote}"
        )
    rng = np.random.default_rng(seed)
    std = code_std(representation, data, rng, variance_samples, batch_size)
    active = np.flatnonzero(std >= collapse_std)
    num_active = int(np.count_nonzero(std >= collapse_std))
    if num_active == 0:
        return {
            "eval_accuracy": 0.0,
            "train_accuracy": 0.0,
            "num_active_dims": 0,
            "train_votes": None,
            "eval_votes": None,
        }
    safe_std = np.where(std > 0, std, 1.0)
    train = collect_votes(
        representation,
        data,
        rng,
        train_votes,
        safe_std,
        active,
        samples_per_vote,
        batch_size,
        progress,
    )
    evaluation = collect_votes(
        representation,
        data,
        rng,
        eval_votes,
        safe_std,
        active,
        samples_per_vote,
        batch_size,
        progress,
    )
    classifier = np.argmax(train, axis=1)  # dim -> factor
    train_accuracy = train.max(axis=1).sum() / train.sum()
    eval_accuracy = evaluation[np.arange(len(classifier)), classifier].sum() / evaluation.sum()
    return {
        "eval_accuracy": float(eval_accuracy),
        "train_accuracy": float(train_accuracy),
        "num_active_dims": num_active,
        "train_votes": train.tolist(),
        "eval_votes": evaluation.tolist(),
    }
