"""Anomaly outputs of a trained VAE for a batch: the one function trainers, metrics and
exported graphs all call, so they cannot disagree."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable

import numpy as np
import tensorflow as tf

from keras_vae_attn import losses
from keras_vae_attn.explain import deviation, forms
from keras_vae_attn.explain.deviation import FeatureDistribution
from keras_vae_attn.explain.latent import NormalStats, difference_distribution, energy
from keras_vae_attn.explain.options import ExplainOptions


def gaussian_blur(maps: tf.Tensor, sigma: float) -> tf.Tensor:
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
    x = tf.pad(
        maps[..., None], [[0, 0], [radius, radius], [radius, radius], [0, 0]], mode="REFLECT"
    )
    x = tf.nn.conv2d(x, tf.reshape(kernel, [-1, 1, 1, 1]), 1, "VALID")
    x = tf.nn.conv2d(x, tf.reshape(kernel, [1, -1, 1, 1]), 1, "VALID")
    return x[..., 0]


def resolve_options(options: ExplainOptions | None = None) -> ExplainOptions:
    """``options``, or the plain :class:`ExplainOptions` when None; TypeError otherwise."""
    if options is None:
        return ExplainOptions()
    if not isinstance(options, ExplainOptions):
        raise TypeError(f"options must be an ExplainOptions, got {type(options).__name__}")
    return options


def upsample(maps: tf.Tensor, size: tf.Tensor | tuple[int, int]) -> tf.Tensor:
    """Bilinear resize of (B, h, w) maps to ``size`` = (H, W)."""
    return tf.image.resize(maps[..., None], size, method="bilinear")[..., 0]


def attribution_map(
    explainer,
    images: tf.Tensor,
    options: ExplainOptions,
    stats: NormalStats,
    distribution: FeatureDistribution | None = None,
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """The map of ``options`` at ``explainer``'s layer (B, h, w), and mu, logvar: for
    the forms that read no decoder. ``distribution``: the layer's normal features,
    needed by deviations other than "none" (and as the integrated form's start)."""
    return _one_map(explainer, images, options, stats, distribution, _Passes())


def layer_map(
    model, images: tf.Tensor, layer: str, options: ExplainOptions, stats: NormalStats
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """One layer's anomaly map at feature resolution (B, h, w), and mu, logvar."""
    maps, mu, logvar = layer_maps(model, images, layer, [options], stats)
    return maps[options], mu, logvar


def layer_maps(
    model,
    images: tf.Tensor,
    layer: str,
    configurations: list[ExplainOptions],
    stats: NormalStats,
) -> tuple[dict, tf.Tensor, tf.Tensor]:
    """The maps of several :class:`ExplainOptions` at one ``layer`` in one pass:
    ({options: map (B, h, w)}, mu, logvar of the first). Each backward pass (a target's
    gradients, an integrated path, the forward pass, the feature residual) runs once,
    however many configurations read it; every form, deviation and sign is then a
    cheap function of those (bench/localization_grid.py scores a whole grid so)."""
    passes = _Passes()
    maps, codes = {}, None
    for options in configurations:
        explainer = model.explainer(layer, method=options.method)
        form = forms.get_form(options.form)
        if form.residual:
            found = passes.once(
                ("residual",), _feature_residual, model, explainer, images, form
            )
        else:
            distribution = (
                model.feature_distribution(layer) if options.needs_distribution else None
            )
            found = _one_map(explainer, images, options, stats, distribution, passes)
        maps[options] = found[0]
        codes = codes or found[1:]
    return maps, *codes


class _Passes:
    """The passes of one batch that several maps share, each run on first request."""

    def __init__(self):
        self.done = {}

    def once(self, key, compute, *args):
        if key not in self.done:
            self.done[key] = compute(*args)
        return self.done[key]


def _feature_residual(model, explainer, images, form):
    """The residual forms' map: the layer's feature residual A(x) - A(decode(mu))
    relative to its normal size (B, h, w), and mu, logvar."""
    features, mu, logvar = explainer.forward(images)
    residual = features - explainer.forward(model.decode(mu))[0]
    dev = deviation.relative_residual(
        residual, model.residual_distribution(explainer.layer_name)
    )
    return forms.attribute(form, None, dev, "abs"), mu, logvar


def _one_map(explainer, images, options, stats, distribution, passes):
    form = forms.get_form(options.form)
    if form.reads_decoder:
        raise ValueError(
            f"form {options.form!r} reads the decoder: explain the VAE through "
            "pipeline.explain_anomaly"
        )
    # gradient_relu of a per-latent target acts on dmu_i/dA, before the energy factor
    relu_first = options.gradient_relu and options.target != "total-energy"
    method = explainer.method
    if not form.needs_gradient:
        features, mu, logvar = passes.once(("forward", method), explainer.forward, images)
        grads = None
    elif form.integrated:
        start = (
            distribution.mean
            if distribution is not None
            else tf.zeros(explainer.front.output.shape[1:], tf.float32)
        )
        deviation.check_shape(tf.TensorShape(explainer.front.output.shape), start)
        features, grads, mu, logvar = passes.once(
            ("path", method, options.deviation != "none", options.steps),
            explainer.path_gradients,
            images,
            stats,
            start,
            options.steps,
        )
    else:
        features, grads, mu, logvar = passes.once(
            ("target", method, options.target, relu_first),
            explainer.target_gradients,
            images,
            options.target,
            stats,
            relu_first,
        )
    if form.integrated:
        dev = features - tf.cast(start, tf.float32)
    else:
        dev = deviation.deviation(features, distribution, options.deviation)
        grads = deviation.gradients_in_deviation_basis(grads, distribution, options.deviation)
    relu_after = options.gradient_relu and not relu_first
    return forms.attribute(form, grads, dev, options.sign, relu_after), mu, logvar


def combine_layers(maps: list[tf.Tensor], options: ExplainOptions) -> tf.Tensor:
    """Maps of several layers (each (B, H, W), at input size) in one: each divided by
    its normal-data scale, then their mean or product."""
    if len(maps) == 1:
        return maps[0]
    if options.layer_scales is None:
        raise ValueError(
            f"combining layers {options.layers} needs their normal-data scales: "
            "fit them first (pipeline.fit_layer_scales)"
        )
    scaled = tf.stack([m / s for m, s in zip(maps, options.layer_scales)], 0)
    return (
        tf.reduce_mean(scaled, 0) if options.combine == "mean" else tf.reduce_prod(scaled, 0)
    )


def explain_anomaly(
    model, images, options: ExplainOptions | None = None, keys: Iterable[str] | None = None
) -> dict[str, tf.Tensor]:
    """Heatmaps and image scores for ``images`` (B, H, W, C) in [0, 1].

    ``options``: an :class:`~keras_vae_attn.explain.options.ExplainOptions` (layers,
    target, form, deviation, sign, smooth, ...; see keras_vae_attn/explain/forms.py), or
    None for the plain paper-form defaults. ``smooth`` > 0 blurs heatmap and recon_error alike
    (:func:`gaussian_blur`, sigma in pixels), so the two stay comparable. ``keys`` limits
    the outputs computed: without "per_latent" and "attention" no per-latent Grad-CAM
    pass runs.

    Returns a dict of float32 tensors (those in ``keys``, or all):
      heatmap (B, H, W)        the anomaly map of ``options``
      per_latent (B, D, h, w)  per-latent attention M_i (Eq. 3-4) at the first layer
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
    options = resolve_options(options)
    images = tf.convert_to_tensor(images, tf.float32)
    stats = model.normal_stats()
    size = tf.shape(images)[1:3]
    wanted = set(keys) if keys is not None else None
    pixels = forms.get_form(options.form).pixels
    if pixels:
        mu, logvar = model.encode(images)
    else:
        maps = []
        for layer in options.layers:
            small, mu, logvar = layer_map(model, images, layer, options, stats)
            maps.append(upsample(small, size))
        heatmap = combine_layers(maps, options)
    reconstruction = None
    if pixels or options.gate == "recon":
        reconstruction = model.decode(mu)
        deviation = recon_deviation(images, reconstruction, model.residual_distribution())
        heatmap = (
            deviation if pixels else tf.sqrt(tf.nn.relu(heatmap) * deviation + 1e-12)
        )  # geometric mean
    heatmap = gaussian_blur(heatmap, options.smooth)
    out = {
        "heatmap": heatmap,
        "mu": mu,
        "logvar": logvar,
        "score": tf.reduce_max(heatmap, axis=[1, 2]),
        "latent_distance": energy(
            *difference_distribution(stats.mean, stats.std, mu, tf.exp(0.5 * logvar))
        ),
        "kl": losses.kl_divergence(mu, logvar),
        "attention_energy": tf.reduce_mean(heatmap, axis=[1, 2]),
    }
    if wanted is None or wanted & {"reconstruction", "recon_error", "recon_score"}:
        if reconstruction is None:
            reconstruction = model.decode(mu)
        recon_error = gaussian_blur(
            tf.reduce_mean(tf.abs(images - reconstruction), axis=-1), options.smooth
        )
        out.update(
            reconstruction=reconstruction,
            recon_error=recon_error,
            recon_score=tf.reduce_mean(recon_error, axis=[1, 2]),
        )
    if wanted is None or wanted & {"per_latent", "attention"}:
        explainer = model.explainer(
            options.layer, gradient_relu=options.gradient_relu, method=options.method
        )
        latent_maps = explainer.explain(images).latent_maps
        out["per_latent"] = latent_maps
        out["attention"] = upsample(tf.reduce_mean(latent_maps, axis=1), size)
    return {key: value for key, value in out.items() if wanted is None or key in wanted}


def recon_deviation(
    images: tf.Tensor, reconstruction: tf.Tensor, distribution: FeatureDistribution
) -> tf.Tensor:
    """sqrt(mean_c z_c^2) per pixel, z the reconstruction residual relative to its
    normal root mean square (deviation.relative_residual): (B, H, W)."""
    z = deviation.relative_residual(images - reconstruction, distribution)
    return tf.sqrt(tf.reduce_mean(tf.square(z), axis=-1) + 1e-12)


def fit_missing_statistics(model, normal_batches: Iterable, options: ExplainOptions) -> bool:
    """Fit on ``normal_batches`` what ``options`` need and ``model`` lacks (a model saved
    before a distribution existed, or fitted for other layers): the feature
    distributions of its layers and the reconstruction residuals'. True if it fitted."""
    layers = list(options.layers)
    missing = not all(
        model.has_feature_distribution(n, options.needs_covariance) for n in layers
    ) or not model.has_residual_distribution(layers)
    if missing:
        model.fit_feature_distributions(normal_batches, layers, options.needs_covariance)
    return missing


def fit_layer_scales(
    model, images: np.ndarray, options: ExplainOptions, batch_size: int = 64
) -> ExplainOptions:
    """``options`` with ``layer_scales`` set: each layer's 99th-percentile map value over
    ``images`` (normal training images, float (N, H, W, C)). Single layers need none."""
    if len(options.layers) == 1:
        return options
    scales = []
    for layer in options.layers:
        single = options.replace(layers=(layer,), smooth=0.0)
        heat = batched(model, images, batch_size, options=single, keys=("heatmap",))["heatmap"]
        scales.append(max(float(np.percentile(heat, 99.0)), 1e-12))
    return options.replace(layer_scales=tuple(scales))


def batched(
    model,
    images: np.ndarray,
    batch_size: int = 64,
    options: ExplainOptions | None = None,
    keys: Iterable[str] | None = None,
    progress: Callable | None = None,
) -> dict[str, np.ndarray]:
    """Run :func:`explain_anomaly` over a numpy array in batches; numpy dict out.

    ``options`` as in :func:`explain_anomaly`; ``keys`` limits what is kept (maps of a
    whole test set are large); ``progress`` wraps the batch iterator (e.g. a tqdm factory).
    """
    options = resolve_options(options)
    starts = range(0, len(images), batch_size)
    if progress is not None:
        starts = progress(starts)
    # One graph per pass over ``images`` (the last batch is padded to the same shape). A
    # partial, not a lambda: TensorFlow counts traces per function source, so the passes
    # of one run with different options (method, references, layers) would add up to a
    # false "retracing" warning.
    run = tf.function(
        functools.partial(explain_anomaly, model, options=options, keys=keys),
        reduce_retracing=True,
    )
    collected = {}
    for start in starts:
        batch = np.asarray(images[start : start + batch_size], np.float32)
        count = len(batch)
        if count < batch_size and len(images) > batch_size:
            # pad the last batch to the traced shape: one trace, not two
            batch = np.concatenate([batch, np.repeat(batch[-1:], batch_size - count, 0)])
        out = run(tf.constant(batch))
        for key, value in out.items():
            if keys is None or key in keys:
                collected.setdefault(key, []).append(value.numpy()[:count])
    return {key: np.concatenate(values) for key, values in collected.items()}
