"""Per-example losses. Every function returns a (B,) tensor so callers can average over
the *global* batch under a distribution strategy."""

from __future__ import annotations

import tensorflow as tf

RECON_LOSSES = ("bce", "mse")


def reconstruction_loss(images, logits, kind="bce"):
    """Sum over pixels of BCE (the paper's choice) or squared error, per example."""
    images = tf.cast(images, tf.float32)
    logits = tf.cast(logits, tf.float32)
    if kind == "bce":
        per_pixel = tf.nn.sigmoid_cross_entropy_with_logits(labels=images, logits=logits)
    elif kind == "mse":
        per_pixel = tf.square(images - tf.sigmoid(logits))
    else:
        raise ValueError(f"unknown reconstruction loss {kind!r}; choose one of {RECON_LOSSES}")
    return tf.reduce_sum(per_pixel, axis=[1, 2, 3])


def kl_per_dimension(mu, logvar):
    """KL(N(mu_i, exp(logvar_i)) || N(0, 1)) for every example and latent dimension."""
    mu = tf.cast(mu, tf.float32)
    logvar = tf.cast(logvar, tf.float32)
    return 0.5 * (tf.exp(logvar) + tf.square(mu) - 1.0 - logvar)


def kl_divergence(mu, logvar):
    """KL(N(mu, exp(logvar)) || N(0, I)) per example."""
    return tf.reduce_sum(kl_per_dimension(mu, logvar), axis=-1)


def attention_overlap(map_a, map_b, eps=1e-8):
    """L_AD of the paper's Eq. 6 per example: 2 * sum(min) / sum(a + b).

    0 when the maps do not overlap, 1 when they are equal. Maps are (B, H, W) and
    non-negative.
    """
    map_a = tf.cast(map_a, tf.float32)
    map_b = tf.cast(map_b, tf.float32)
    overlap = tf.reduce_sum(tf.minimum(map_a, map_b), axis=[1, 2])
    total = tf.reduce_sum(map_a + map_b, axis=[1, 2])
    return 2.0 * overlap / (total + eps)


def replica_mean(per_example):
    """Average over the global batch: per-replica mean divided by the replica count.

    Gradients are summed across replicas, so this gives the same update as one replica
    holding the whole global batch (when replicas get equal shares).
    """
    replicas = tf.distribute.get_strategy().num_replicas_in_sync
    return tf.reduce_mean(per_example) / tf.cast(replicas, per_example.dtype)
