"""A layer's normal feature distribution and the deviations read against it.

Fitted on the normal training images (:class:`FeatureMoments`, streamed in float64) and
stored with the model: "centered" (A minus the normal mean feature map), "standardized"
((A - mean) / std per position and channel) and "whitened" (L^-1 (A - mean), L L^T the
channel covariance at each position, so ||dev|| is the per-position Mahalanobis
distance; gradients are taken in the same basis, dE/dz = L^T dE/dA).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import tensorflow as tf

#: std floor, as a fraction of the layer's mean std: a position whose features never
#: varied on normal data (std 0) must not turn a tiny change into an infinite z-score.
STD_FLOOR = 0.05
#: covariance ridge, as a fraction of the layer's mean variance (PaDiM's 0.01 I, scaled to
#: the layer): keeps every position's covariance invertible with few normal images.
COVARIANCE_RIDGE = 0.01


class FeatureDistribution(NamedTuple):
    """Per-position, per-channel mean and std of a layer's features on normal data,
    (h, w, K) float32 each; with the covariance fitted, also ``whiten`` = L^-1 and
    ``colour`` = L (h, w, K, K), L L^T the ridged channel covariance at each position."""

    mean: tf.Tensor
    std: tf.Tensor
    whiten: tf.Tensor = None
    colour: tf.Tensor = None


class FeatureMoments:
    """Streaming mean and variance of feature maps, merged batch by batch (Chan et al.)
    in float64, so no list of all features is kept."""

    def __init__(self, covariance: bool = False):
        self.count, self.mean, self.m2, self.c2 = 0, None, None, None
        self.covariance = covariance  # also the channel covariance at each position

    def update(self, features: np.ndarray) -> None:
        features = np.asarray(features, np.float64)
        count = features.shape[0]
        if count == 0:
            return
        mean = features.mean(0)
        m2 = ((features - mean) ** 2).sum(0)
        c2 = _scatter(features - mean) if self.covariance else None
        if self.mean is None:
            self.count, self.mean, self.m2, self.c2 = count, mean, m2, c2
            return
        total = self.count + count
        delta = mean - self.mean
        weight = self.count * count / total
        self.mean = self.mean + delta * (count / total)
        self.m2 = self.m2 + m2 + delta**2 * weight
        if self.covariance:
            self.c2 = self.c2 + c2 + np.einsum("...k,...l->...kl", delta, delta) * weight
        self.count = total

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        if not self.count:
            raise ValueError("cannot fit a feature distribution on an empty dataset")
        return (self.mean.astype(np.float32), np.sqrt(self.m2 / self.count).astype(np.float32))

    def whitening(self) -> tuple[np.ndarray, np.ndarray]:
        """(L^-1, L) float32 (h, w, K, K) of the ridged covariance (COVARIANCE_RIDGE)."""
        if not self.covariance or not self.count:
            raise ValueError("no covariance was accumulated")
        covariance = self.c2 / self.count
        channels = covariance.shape[-1]
        ridge = (
            COVARIANCE_RIDGE
            * float(np.trace(covariance, axis1=-2, axis2=-1).mean() / channels)
            + 1e-6
        )
        colour = np.linalg.cholesky(covariance + ridge * np.eye(channels))
        return np.linalg.inv(colour).astype(np.float32), colour.astype(np.float32)


def _scatter(centered):
    """sum_n x_n x_n^T at every position: (n, ..., K) -> (..., K, K), as one batched
    matrix product (no per-image outer products in memory)."""
    positions = centered.shape[1:-1]
    flat = centered.reshape(centered.shape[0], -1, centered.shape[-1]).transpose(1, 0, 2)
    return np.matmul(flat.transpose(0, 2, 1), flat).reshape(
        *positions, centered.shape[-1], centered.shape[-1]
    )


def deviation(
    features: tf.Tensor, distribution: FeatureDistribution | None, kind: str
) -> tf.Tensor:
    """The deviation of ``features`` (B, h, w, K) named by ``kind`` (see module doc)."""
    if kind == "none":
        return features
    if distribution is None:
        raise ValueError(f"deviation {kind!r} needs the layer's normal feature distribution")
    mean = tf.cast(distribution.mean, tf.float32)
    check_shape(features, mean)
    centered = features - mean
    if kind == "centered":
        return centered
    if kind == "whitened":
        return tf.einsum("hwlk,bhwk->bhwl", _whitening(distribution).whiten, centered)
    std = tf.cast(distribution.std, tf.float32)
    floor = STD_FLOOR * tf.reduce_mean(std) + 1e-6
    return centered / tf.sqrt(tf.square(std) + tf.square(floor))


def relative_residual(residual: tf.Tensor, distribution: FeatureDistribution) -> tf.Tensor:
    """A reconstruction residual (B, h, w, K) divided by its normal root mean square per
    position and channel (floored like the std), *not* centered: the normal residual's
    mean is the VAE's systematic error where it is trained, but for a VAE that learned
    nothing it is the mean image, and subtracting it would turn the map into a
    model-free mean-image difference (keras_vae_attn/explain/sanity.py)."""
    mean = tf.cast(distribution.mean, tf.float32)
    check_shape(residual, mean)
    rms = tf.sqrt(tf.square(mean) + tf.square(tf.cast(distribution.std, tf.float32)))
    floor = STD_FLOOR * tf.reduce_mean(rms) + 1e-6
    return residual / tf.sqrt(tf.square(rms) + tf.square(floor))


def check_shape(features: tf.Tensor | tf.TensorShape, mean: tf.Tensor) -> None:
    """A clear error when a fitted (h, w, K) map does not fit ``features`` (B, h, w, K)
    (a tensor, or its TensorShape)."""
    shape = features if isinstance(features, tf.TensorShape) else features.shape
    if not shape[1:].is_compatible_with(mean.shape):
        raise ValueError(
            f"the normal feature distribution's shape {tuple(mean.shape)} "
            f"differs from this layer's feature map {tuple(shape[1:])}: "
            "fit it on images of the size being explained"
        )


def _whitening(distribution):
    if distribution.whiten is None:
        raise ValueError(
            "deviation 'whitened' needs the layer's feature covariance: fit it "
            "with model.fit_feature_distributions(..., covariance=True)"
        )
    return distribution


def gradients_in_deviation_basis(
    grads: tf.Tensor | None, distribution: FeatureDistribution | None, kind: str
) -> tf.Tensor | None:
    """For "whitened", the gradients with respect to z = L^-1 (A - mean): L^T dE/dA, so
    that channel k of the gradient and of the deviation are the same direction."""
    if kind != "whitened" or grads is None:
        return grads
    return tf.einsum("hwlk,bthwl->bthwk", _whitening(distribution).colour, grads)
