"""The normal data's latent distribution and the Gaussian energy of Eq. 5 against it."""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

import keras
import numpy as np
import tensorflow as tf

from keras_vae_attn.explain.taps import as_list


class NormalStats(NamedTuple):
    """Latent statistics of the normal data: per-dimension mean and std of q(z), (D,)."""

    mean: tf.Tensor
    std: tf.Tensor


def difference_distribution(normal_mean, normal_std, mu, sigma) -> tuple[tf.Tensor, tf.Tensor]:
    """Mean and variance of u = z_x - z_y for independent Gaussians (the paper's Eq. 5).

    ``u_i ~ N(mu_x,i - mu_y,i, sigma_x,i^2 + sigma_y,i^2)``; shapes broadcast.
    """
    mean = tf.cast(normal_mean, tf.float32) - tf.cast(mu, tf.float32)
    variance = tf.square(tf.cast(normal_std, tf.float32)) + tf.square(
        tf.cast(sigma, tf.float32)
    )
    return mean, variance


def energy(mean: tf.Tensor, variance: tf.Tensor) -> tf.Tensor:
    """The Gaussian energy of Eq. 5, sum_i u_i^2 / (2 var_i), (B,), from the difference
    distribution's mean and variance (:func:`difference_distribution`)."""
    return 0.5 * tf.reduce_sum(tf.square(mean) / variance, -1)


def fit_normal_stats(
    encoder: keras.Model, dataset: Iterable, latent_index: int = 0, logvar_index: int = 1
) -> NormalStats:
    """Mean and std of the aggregate posterior q(z) = mean_x q(z|x) over ``dataset``.

    std^2 = mean(sigma^2) + var(mu): the spread of the codes the encoder actually uses
    for normal data. ``dataset`` yields image batches or (images, ...) tuples.
    """
    total = total_sq = total_var = None
    count = 0
    for batch in dataset:
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        outputs = as_list(encoder(images, training=False))
        mu = np.asarray(outputs[latent_index], dtype=np.float64)
        var = np.exp(np.asarray(outputs[logvar_index], dtype=np.float64))
        if total is None:
            total, total_sq, total_var = (np.zeros(mu.shape[1]) for _ in range(3))
        total += mu.sum(0)
        total_sq += (mu**2).sum(0)
        total_var += var.sum(0)
        count += mu.shape[0]
    if count == 0:
        raise ValueError("cannot fit normal latent statistics on an empty dataset")
    mean = total / count
    spread = np.maximum(total_sq / count - mean**2, 0.0) + total_var / count
    return NormalStats(tf.constant(mean, tf.float32), tf.constant(np.sqrt(spread), tf.float32))
