"""Is a map faithful to the VAE's own anomaly score? Deletion and insertion curves.

Deletion: replace the top k% of an image's pixels, ranked by a map, with the normal mean
image, re-encode, and follow the latent energy of Eq. 5 as a share of the original
image's energy. A map that points at what makes the VAE call the image anomalous drops
it fast (low area). Insertion: start from the mean image and put back the top k% of the
image's pixels; the energy should come back fast (high area). Every map is measured
beside a random ordering of the pixels (the same seeded one for all maps).

Per-latent maps (the paper's Fig. 1) are faithful when deleting map i's top pixels moves
mu_i more than the other latents: :func:`selectivity`.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import tensorflow as tf

from keras_vae_attn.explain import latent

#: share of pixels replaced: 0, 5%, ..., 50%
FRACTIONS = np.linspace(0.0, 0.5, 11)
RANDOM = "random order"


class Curves(NamedTuple):
    """One map's deletion and insertion curves (mean over images) and their areas,
    normalized by the fraction range so both lie on the curves' own scale."""

    fractions: np.ndarray
    deletion: np.ndarray
    insertion: np.ndarray
    deletion_auc: float
    insertion_auc: float

    def as_dict(self):
        return {
            "fractions": self.fractions.tolist(),
            "deletion": self.deletion.tolist(),
            "insertion": self.insertion.tolist(),
            "deletion_auc": self.deletion_auc,
            "insertion_auc": self.insertion_auc,
        }


def energy_fn(model):
    """A traced function: images (B, H, W, C) -> Eq. 5 latent energy (B,), with the
    model's normal latent statistics."""
    stats = model.normal_stats()

    @tf.function(reduce_retracing=True)
    def run(images):
        mu, logvar = model.encode(images)
        return latent.energy(
            *latent.difference_distribution(stats.mean, stats.std, mu, tf.exp(0.5 * logvar))
        )

    return run


def _top_masks(maps, fraction):
    """(N, H, W) bool: each map's top ``fraction`` of pixels (ties: first in order)."""
    flat = np.asarray(maps, np.float32).reshape(len(maps), -1)
    count = int(round(fraction * flat.shape[1]))
    masks = np.zeros(flat.shape, bool)
    if count:
        top = np.argsort(-flat, axis=1, kind="stable")[:, :count]
        np.put_along_axis(masks, top, True, axis=1)
    return masks.reshape(np.shape(maps))


def _energies(run, images, batch_size):
    return np.concatenate(
        [
            run(tf.constant(images[i : i + batch_size], tf.float32)).numpy()
            for i in range(0, len(images), batch_size)
        ]
    )


def curves(model, images, maps, baseline, batch_size=32, fractions=FRACTIONS, seed=0):
    """{map name: Curves} for ``maps`` {name: (N, H, W)} on ``images`` (N, H, W, C) in
    [0, 1], ``baseline`` (H, W, C) the normal mean image; plus RANDOM, a seeded random
    ranking. All perturbed images of one fraction are encoded in batches."""
    images = np.asarray(images, np.float32)
    baseline = np.asarray(baseline, np.float32)[None]
    run = energy_fn(model)
    original = np.maximum(_energies(run, images, batch_size), 1e-12)
    rng = np.random.default_rng(seed)
    ranked = dict(maps)
    ranked[RANDOM] = rng.random(images.shape[:3], dtype=np.float32)
    out = {}
    for name, chosen in ranked.items():
        deletion, insertion = [], []
        for fraction in fractions:
            top = _top_masks(chosen, fraction)[..., None]
            deleted = np.where(top, baseline, images)
            inserted = np.where(top, images, baseline)
            deletion.append(float(np.mean(_energies(run, deleted, batch_size) / original)))
            insertion.append(float(np.mean(_energies(run, inserted, batch_size) / original)))
        deletion, insertion = np.array(deletion), np.array(insertion)
        span = float(fractions[-1] - fractions[0]) or 1.0
        out[name] = Curves(
            np.asarray(fractions),
            deletion,
            insertion,
            float(np.trapezoid(deletion, fractions) / span),
            float(np.trapezoid(insertion, fractions) / span),
        )
    return out


def selectivity(model, images, latent_maps, baseline, fraction=0.1, batch_size=32):
    """How selectively per-latent maps explain their own latent.

    For each image and latent i, the top ``fraction`` of pixels of map i (``latent_maps``
    (N, D, H, W), at image size) are replaced by ``baseline``; the change of every mu_j
    is measured in units of its normal std. Returns {"own": mean |change| of mu_i,
    "others": mean |change| of the other latents, "ratio": own / others (> 1: the maps
    select their latent), "top1": share of (image, i) where mu_i moved the most}."""
    images = np.asarray(images, np.float32)
    latent_maps = np.asarray(latent_maps, np.float32)
    count, dims = latent_maps.shape[:2]
    std = np.maximum(model.normal_stats().std.numpy(), 1e-6)
    encode = tf.function(lambda x: model.encode(x)[0], reduce_retracing=True)
    mu = np.concatenate(
        [
            encode(tf.constant(images[i : i + batch_size])).numpy()
            for i in range(0, count, batch_size)
        ]
    )
    changes = np.zeros((count, dims, dims), np.float32)  # (image, map i, latent j)
    for i in range(dims):
        top = _top_masks(latent_maps[:, i], fraction)[..., None]
        deleted = np.where(top, np.asarray(baseline, np.float32)[None], images)
        moved = np.concatenate(
            [
                encode(tf.constant(deleted[k : k + batch_size])).numpy()
                for k in range(0, count, batch_size)
            ]
        )
        changes[:, i] = np.abs(moved - mu) / std
    own = np.einsum("nii->ni", changes)
    others = (changes.sum(2) - own) / max(dims - 1, 1)
    return {
        "own": float(own.mean()),
        "others": float(others.mean()),
        "ratio": float(own.mean() / max(others.mean(), 1e-12)),
        "top1": float(np.mean(changes.argmax(2) == np.arange(dims)[None])),
        "fraction": float(fraction),
        "images": int(count),
    }
