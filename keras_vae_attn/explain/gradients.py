"""The gradient engines: gradients of the latent code, or of an anomaly target, with
respect to a layer's feature map A, as batched graph functions of a
:class:`~keras_vae_attn.explain.taps.LayerTap`.

All D latent gradients come from one batched backward pass. "stack": the encoder runs
once up to A, then the head runs on D stacked copies of A, each copy back-propagating a
different one-hot latent direction. "jacobian"/"hooked": the encoder runs once and
``GradientTape.batch_jacobian`` vectorizes the D backward passes. The "path" engine
averages the total energy's gradient over points between a baseline feature map and A
(integrated gradients), all points in one batched pass.
"""

from __future__ import annotations

import tensorflow as tf

from keras_vae_attn.explain.latent import difference_distribution, energy
from keras_vae_attn.explain.options import TARGETS
from keras_vae_attn.explain.taps import LayerTap, as_list


def stacked_gradients(
    tap: LayerTap, features: tf.Tensor, training: bool = False
) -> tuple[list, tf.Tensor]:
    """dmu_i/dA for every latent i from ONE backward pass: the head runs on D stacked
    copies of A (copy d holds rows d*B..d*B+B-1), copy d back-propagating latent d.
    Differentiable itself, so an outer tape sees it (FactorVAE's L_AD).
    Returns (the head's outputs for the B images, grads (B, D, h, w, K))."""
    depth = tap.latent_dim
    batch = tf.shape(features)[0]
    stacked = tf.tile(features, [depth, 1, 1, 1])
    with tf.GradientTape() as tape:
        tape.watch(stacked)
        outputs = as_list(tap.head(stacked, training=training))
        latent = outputs[tap.latent_index]
        dtype = tf.float64 if latent.dtype == tf.float64 else tf.float32
        selector = tf.repeat(tf.eye(depth, dtype=dtype), repeats=batch, axis=0)
        chosen = tf.reduce_sum(tf.cast(latent, dtype) * selector)
    grads = tape.gradient(chosen, stacked)  # (D*B, h, w, K)
    grads = tf.reshape(grads, tf.concat([[depth, batch], tf.shape(grads)[1:]], 0))
    return [output[:batch] for output in outputs], tf.transpose(grads, [1, 0, 2, 3, 4])


def latent_gradients(tap: LayerTap, images: tf.Tensor) -> tuple:
    """(A, dmu_i/dA (B, D, h, w, K), mu float32, the encoder outputs), the D backward
    passes batched by ``tap.method``."""
    if tap.method == "stack":
        features = tap.front(images, training=False)
        outputs, grads = stacked_gradients(tap, features)
        return features, grads, tf.cast(outputs[tap.latent_index], tf.float32), outputs
    with tf.GradientTape() as tape:
        features, outputs = tap.read(images, tape)
        mu = tf.cast(outputs[tap.latent_index], tf.float32)
    return features, tape.batch_jacobian(mu, features), mu, outputs


def features_and_codes(tap: LayerTap, images: tf.Tensor) -> tuple:
    """(A, mu, logvar) float32 without any gradient: what the no-gradient forms need."""
    with tf.GradientTape() as tape:
        features, outputs = tap.read(images, tape)
    return (
        tf.cast(features, tf.float32),
        tf.cast(outputs[tap.latent_index], tf.float32),
        tf.cast(outputs[tap.logvar_index], tf.float32),
    )


def target_gradients(
    tap: LayerTap,
    images: tf.Tensor,
    normal_mean: tf.Tensor,
    normal_std: tf.Tensor,
    target: str,
    relu_latent_gradients: bool = False,
) -> tuple:
    """Gradients of an anomaly target with respect to A, unpooled.

    ``target``: "latent" (u_i, per latent), "energy" (the Eq. 5 energy of each latent,
    its variance held at this image's value) or "total-energy" (their sum, one backward
    pass). Returns (A (B, h, w, K), grads (B, T, h, w, K), mu, logvar) float32, T = D
    for the per-latent targets and 1 for the total energy. ``relu_latent_gradients``
    applies ReLU to dmu_i/dA before the per-latent factor (the paper's printed Eq. 3).
    """
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; choose one of {TARGETS}")
    if target == "total-energy":
        with tf.GradientTape() as tape:
            features, outputs = tap.read(images, tape)
            mu = tf.cast(outputs[tap.latent_index], tf.float32)
            logvar = tf.cast(outputs[tap.logvar_index], tf.float32)
            mean, variance = difference_distribution(
                normal_mean, normal_std, mu, tf.exp(0.5 * logvar)
            )
            value = energy(mean, tf.stop_gradient(variance))
        grads = tf.cast(tape.gradient(value, features), tf.float32)
        return tf.cast(features, tf.float32), grads[:, None], mu, logvar
    features, grads, mu, outputs = latent_gradients(tap, images)
    grads = tf.cast(grads, tf.float32)
    if relu_latent_gradients:
        grads = tf.nn.relu(grads)
    logvar = tf.cast(outputs[tap.logvar_index], tf.float32)
    if target == "latent":  # du_i = -dmu_i
        factor = -tf.ones_like(mu)
    else:  # dE_i/dmu_i
        mean, variance = difference_distribution(
            normal_mean, normal_std, mu, tf.exp(0.5 * logvar)
        )
        factor = -mean / variance
    return (
        tf.cast(features, tf.float32),
        grads * factor[:, :, None, None, None],
        mu,
        logvar,
    )


def path_gradients(
    tap: LayerTap,
    images: tf.Tensor,
    normal_mean: tf.Tensor,
    normal_std: tf.Tensor,
    baseline: tf.Tensor,
    steps: int,
) -> tuple:
    """Integrated-gradient ingredients for the total energy: the gradients averaged over
    ``steps`` midpoints of the straight path from ``baseline`` (h, w, K) to A, all path
    points in one batched pass. The energy along the path uses this image's variance
    (fixed), so the attributions sum to E(A) - E(baseline). Needs a head (a cut point).
    Returns (A, mean gradients (B, 1, h, w, K), mu, logvar) float32."""
    features = tf.cast(tap.front(images, training=False), tf.float32)
    outputs = as_list(tap.head(features, training=False))
    mu = tf.cast(outputs[tap.latent_index], tf.float32)
    logvar = tf.cast(outputs[tap.logvar_index], tf.float32)
    _, variance = difference_distribution(normal_mean, normal_std, mu, tf.exp(0.5 * logvar))
    alphas = (tf.range(steps, dtype=tf.float32) + 0.5) / float(steps)
    path = baseline + alphas[:, None, None, None, None] * (features - baseline)[None]
    shape = tf.shape(features)
    path = tf.reshape(path, tf.concat([[-1], shape[1:]], 0))  # (m*B, h, w, K)
    with tf.GradientTape() as tape:
        tape.watch(path)
        along = as_list(tap.head(path, training=False))
        mu_path = tf.cast(along[tap.latent_index], tf.float32)
        value = energy(normal_mean - mu_path, tf.tile(variance, [steps, 1]))
    grads = tf.reshape(tape.gradient(value, path), tf.concat([[steps], shape], 0))
    return features, tf.reduce_mean(grads, 0)[:, None], mu, logvar
