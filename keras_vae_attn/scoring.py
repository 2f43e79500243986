"""Anomaly outputs of a trained VAE for a batch: the one function trainers, metrics and
exported graphs all call, so they cannot disagree."""
from __future__ import annotations

import tensorflow as tf

from keras_vae_attn import attention as attn


def gaussian_blur(maps, sigma):
    """Blur (B, H, W) maps with a Gaussian of ``sigma`` pixels (reflected borders).

    Coarse attention upsampled from a small feature map has bilinear creases, and a
    pixel difference map is speckled; smoothing both removes noise the masks never mark.
    """
    if not sigma:
        return maps
    radius = max(1, int(3.0 * sigma + 0.5))
    offsets = tf.range(-radius, radius + 1, dtype=tf.float32)
    kernel = tf.exp(-0.5 * tf.square(offsets / sigma))
    kernel = kernel / tf.reduce_sum(kernel)
    x = tf.pad(maps[..., None], [[0, 0], [radius, radius], [radius, radius], [0, 0]],
               mode="REFLECT")
    x = tf.nn.conv2d(x, tf.reshape(kernel, [-1, 1, 1, 1]), 1, "VALID")
    x = tf.nn.conv2d(x, tf.reshape(kernel, [1, -1, 1, 1]), 1, "VALID")
    return x[..., 0]


FEATURE_BASELINES = ("zero", "normal")


def explain_anomaly(model, images, layer="last", score="energy", gradient_relu=False,
                    smooth=0.0, method="auto", keys=None, feature_baseline="zero"):
    """Heatmaps and image scores for ``images`` (B, H, W, C) in [0, 1].

    ``smooth`` > 0 blurs heatmap and recon_error alike (:func:`gaussian_blur`, sigma in
    pixels), so the two stay comparable. ``method`` batches the backward passes
    (:class:`~keras_vae_attn.attention.VAEAttention`); it does not change the maps.
    ``score`` is what the anomaly attention back-propagates: "energy" and "latent" are
    per-latent (D backward passes), "total-energy" the summed energy (one pass).
    ``keys`` limits the outputs computed: without "per_latent" and "attention", a
    "total-energy" heatmap skips the D per-latent backward passes entirely.
    ``feature_baseline="normal"`` weighs the layer's features minus the model's stored
    mean normal feature map (``model.fit_feature_baselines``) instead of the features
    themselves ("zero", the paper's Grad-CAM form); see keras_vae_attn/attention.py.

    Returns a dict of float32 tensors (those in ``keys``, or all):
      heatmap (B, H, W)        anomaly attention (Eq. 5) at ``layer``
      per_latent (B, D, h, w)  per-latent attention M_i (Eq. 3-4)
      attention (B, H, W)      overall attention M
      recon_error (B, H, W)    |x - reconstruction|, mean over channels (the baseline)
      reconstruction (B, H, W, C)
      mu, logvar (B, D)
      score (B,)               max of the heatmap (image-level anomaly score)
      latent_distance (B,)     sum_i u_i^2 / (2 var_i), the energy of Eq. 5
      kl (B,)                  KL(q(z|x) || N(0, I))
      recon_score (B,)         mean reconstruction error
      attention_energy (B,)    mean of the heatmap
    """
    images = tf.convert_to_tensor(images, tf.float32)
    if feature_baseline not in FEATURE_BASELINES:
        raise ValueError(f"unknown feature_baseline {feature_baseline!r}; choose one of "
                         f"{FEATURE_BASELINES}")
    explainer = model.explainer(layer, gradient_relu=gradient_relu, method=method)
    stats = model.normal_stats()
    baseline = model.feature_baseline(layer) if feature_baseline == "normal" else None
    size = tf.shape(images)[1:3]
    wanted = set(keys) if keys is not None else None
    needs_latent_maps = wanted is None or bool(wanted & {"per_latent", "attention"})
    explanation = (explainer.explain(images)
                   if needs_latent_maps or score != attn.TOTAL_ENERGY else None)
    if explanation is None:                  # total-energy heatmap alone: one backward pass
        fast = explainer.energy_attention(images, stats, baseline)
        small, mu, logvar = fast.heatmap, fast.mu, fast.logvar
    else:
        small = tf.reduce_mean(attn.anomaly_maps(explanation, stats, score,
                                                 baseline=baseline), 1)
        mu, logvar = explanation.mu, explanation.logvar
    heatmap = gaussian_blur(attn.upsample(small, size), smooth)
    reconstruction = model.decode(mu)
    recon_error = gaussian_blur(tf.reduce_mean(tf.abs(images - reconstruction), axis=-1),
                                smooth)
    mean, variance = attn.difference_distribution(stats.mean, stats.std, mu,
                                                  tf.exp(0.5 * logvar))
    out = {
        "heatmap": heatmap,
        "recon_error": recon_error,
        "reconstruction": reconstruction,
        "mu": mu,
        "logvar": logvar,
        "score": tf.reduce_max(heatmap, axis=[1, 2]),
        "latent_distance": 0.5 * tf.reduce_sum(tf.square(mean) / variance, axis=-1),
        "kl": 0.5 * tf.reduce_sum(tf.exp(logvar) + tf.square(mu) - 1.0 - logvar, axis=-1),
        "recon_score": tf.reduce_mean(recon_error, axis=[1, 2]),
        "attention_energy": tf.reduce_mean(heatmap, axis=[1, 2]),
    }
    if explanation is not None:
        out["per_latent"] = explanation.latent_maps
        out["attention"] = attn.upsample(tf.reduce_mean(explanation.latent_maps, axis=1), size)
    return {key: value for key, value in out.items() if wanted is None or key in wanted}


def batched(model, images, batch_size=64, layer="last", keys=None, progress=None, **kwargs):
    """Run :func:`explain_anomaly` over a numpy array in batches; numpy dict out.

    ``keys`` limits what is kept (maps of a whole test set are large); ``progress``
    wraps the batch iterator (e.g. a tqdm factory).
    """
    import numpy as np

    starts = range(0, len(images), batch_size)
    if progress is not None:
        starts = progress(starts)
    run = tf.function(lambda x: explain_anomaly(model, x, layer, keys=keys, **kwargs))
    collected = {}
    for start in starts:
        batch = np.asarray(images[start:start + batch_size], np.float32)
        count = len(batch)
        if count < batch_size and len(images) > batch_size:
            # pad the last batch to the traced shape: one trace, not two
            batch = np.concatenate([batch, np.repeat(batch[-1:], batch_size - count, 0)])
        out = run(tf.constant(batch))
        for key, value in out.items():
            if keys is None or key in keys:
                collected.setdefault(key, []).append(value.numpy()[:count])
    return {key: np.concatenate(values) for key, values in collected.items()}
