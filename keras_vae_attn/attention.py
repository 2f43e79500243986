"""Gradient-based attention from a VAE's latent space (the paper's Eq. 3-5): the public
class users call on their own encoders.

For a feature map A of a chosen encoder layer and each latent dimension i:

    w_i[k] = mean_{h,w} d z_i / d A[h, w, k]          (pooled gradient)
    M_i    = ReLU(sum_k w_i[k] A[:, :, k])             (per-latent map)
    M      = mean_i M_i                                (overall map)

Reading A is :mod:`keras_vae_attn.explain.taps`, the batched gradients are
:mod:`keras_vae_attn.explain.gradients`, and the anomaly maps (Eq. 5 and the other
attribution forms) are the one pipeline, :mod:`keras_vae_attn.explain.pipeline`; the
paper's form there is ``ExplainOptions.preset("paper")``.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import NamedTuple

import keras
import numpy as np
import tensorflow as tf

from keras_vae_attn.explain import forms, gradients, pipeline
from keras_vae_attn.explain.deviation import FeatureDistribution, FeatureMoments
from keras_vae_attn.explain.latent import NormalStats, fit_normal_stats
from keras_vae_attn.explain.options import ExplainOptions
from keras_vae_attn.explain.taps import LayerTap


class Explanation(NamedTuple):
    """Everything one batched pass yields. Maps are raw, non-negative float32."""

    mu: tf.Tensor  # (B, D)
    logvar: tf.Tensor  # (B, D) or None
    features: tf.Tensor  # (B, h, w, K) the feature map A
    weights: tf.Tensor  # (B, D, K) pooled gradients w_i
    latent_maps: tf.Tensor  # (B, D, h, w) the M_i at feature resolution


class VAEAttention(LayerTap):
    """Per-latent attention, overall attention and anomaly attention for any Keras encoder.

    ``encoder``, ``layer``, ``latent``, ``logvar`` and ``method`` as in
    :class:`~keras_vae_attn.explain.taps.LayerTap`. ``gradient_relu`` applies ReLU to the
    gradients before pooling (the paper's printed Eq. 3); the default is the Grad-CAM
    form. Called eagerly, each pass runs as a compiled ``tf.function`` (XLA too with
    ``jit_compile=True``), traced once per input signature; inside the caller's own
    ``tf.function`` it simply becomes part of that graph.
    """

    def __init__(
        self,
        encoder: keras.Model,
        layer: str = "last",
        latent: str | int = "mu",
        logvar: str | int | None = "logvar",
        gradient_relu: bool = False,
        jit_compile: bool = False,
        method: str = "auto",
    ):
        super().__init__(encoder, layer, latent, logvar, method)
        self.gradient_relu = gradient_relu
        self.jit_compile = jit_compile
        self._compiled = {}  # graph function -> its compiled tf.function

    def _run(self, graph_fn, *args):
        """``graph_fn(self, *args)``: compiled once per function when called eagerly,
        inlined into the caller's graph otherwise."""
        if not tf.executing_eagerly():
            return graph_fn(self, *args)
        if graph_fn not in self._compiled:
            self._compiled[graph_fn] = tf.function(
                functools.partial(graph_fn, self),
                reduce_retracing=True,
                jit_compile=self.jit_compile,
            )
        return self._compiled[graph_fn](*args)

    def _checked(self, images, needs_logvar=True):
        images = tf.convert_to_tensor(images)
        self.check_images(images)
        if needs_logvar and self.logvar_index is None:
            raise ValueError("anomaly attention needs the encoder's log-variance output")
        return images

    # --- the paper's Eq. 3-4 ----------------------------------------------------------
    def explain(self, images) -> Explanation:
        """One batched pass: latent codes, feature map, pooled gradients and the M_i."""
        return self._run(_explain_graph, self._checked(images, needs_logvar=False))

    def latent_maps(self, images) -> tf.Tensor:
        """Per-latent maps M_i, (B, D, h, w), at the feature map's resolution."""
        return self.explain(images).latent_maps

    def attention(self, images) -> tf.Tensor:
        """Overall attention M = mean_i M_i, upsampled to the input size, (B, H, W)."""
        images = tf.convert_to_tensor(images)
        maps = tf.reduce_mean(self.latent_maps(images), axis=1)
        return pipeline.upsample(maps, tf.shape(images)[1:3])

    # --- anomaly maps (Eq. 5 and the other forms): the pipeline -------------------------
    def anomaly_attention(
        self,
        images,
        normal_stats: NormalStats,
        options: ExplainOptions | None = None,
        distribution: FeatureDistribution | None = None,
    ) -> tf.Tensor:
        """The anomaly map of ``options`` at this layer, upsampled to the input size,
        (B, H, W): by default the paper's (``ExplainOptions.preset("paper")``: Grad-CAM
        of the per-latent Eq. 5 energy). Deviations other than "none" need this layer's
        normal ``distribution`` (:meth:`fit_feature_distribution`)."""
        if options is None:
            options = ExplainOptions.preset("paper", gradient_relu=self.gradient_relu)
        stats = NormalStats(*(tf.cast(v, tf.float32) for v in normal_stats))
        return self._run(_anomaly_graph, self._checked(images), options, stats, distribution)

    def fit_feature_distribution(
        self, dataset: Iterable, covariance: bool = False
    ) -> FeatureDistribution:
        """The normal distribution of this layer's features over ``dataset`` (image
        batches or (images, ...) tuples), for the anomaly maps' deviations."""
        moments = FeatureMoments(covariance)
        for batch in dataset:
            images = batch[0] if isinstance(batch, (tuple, list)) else batch
            moments.update(self.forward(images)[0].numpy())
        mean, std = moments.result()
        whitening = moments.whitening() if covariance else (None, None)
        return FeatureDistribution(
            *(None if v is None else tf.constant(v) for v in (mean, std, *whitening))
        )

    # --- the gradient engines, compiled (the pipeline's ingredients) ---------------------
    def target_gradients(
        self,
        images,
        target: str,
        normal_stats: NormalStats,
        relu_latent_gradients: bool = False,
    ) -> tuple:
        """:func:`keras_vae_attn.explain.gradients.target_gradients` of ``images``:
        (A, grads (B, T, h, w, K), mu, logvar)."""
        mean, std = (tf.cast(v, tf.float32) for v in normal_stats)
        return self._run(
            gradients.target_gradients,
            self._checked(images),
            mean,
            std,
            target,
            bool(relu_latent_gradients),
        )

    def path_gradients(
        self, images, normal_stats: NormalStats, baseline: tf.Tensor, steps: int
    ) -> tuple:
        """:func:`keras_vae_attn.explain.gradients.path_gradients` of ``images``:
        (A, mean path gradients (B, 1, h, w, K), mu, logvar)."""
        images = self._checked(images)
        if self.head is None:
            raise ValueError(
                f"the integrated form needs layer {self.layer_name!r} to be a "
                "cut point of a functional encoder (no skip connection around "
                "it)"
            )
        mean, std = (tf.cast(v, tf.float32) for v in normal_stats)
        return self._run(
            gradients.path_gradients,
            images,
            mean,
            std,
            tf.cast(baseline, tf.float32),
            int(steps),
        )

    def forward(self, images) -> tuple:
        """(A, mu, logvar) without any gradient: what the "deviation" form needs."""
        return self._run(gradients.features_and_codes, self._checked(images))

    def fit_normal_stats(self, dataset: Iterable) -> NormalStats:
        """Latent statistics of normal data; see :func:`fit_normal_stats`."""
        return fit_normal_stats(self.encoder, dataset, self.latent_index, self.logvar_index)


def _explain_graph(explainer: VAEAttention, images: tf.Tensor) -> Explanation:
    features, grads, mu, outputs = gradients.latent_gradients(explainer, images)
    weights = forms.pooled(tf.cast(grads, tf.float32), explainer.gradient_relu)
    features = tf.cast(features, tf.float32)
    maps = tf.nn.relu(forms.weigh(weights, features))
    index = explainer.logvar_index
    logvar = None if index is None else tf.cast(outputs[index], tf.float32)
    return Explanation(mu, logvar, features, weights, maps)


def _anomaly_graph(explainer, images, options, stats, distribution):
    small = pipeline.attribution_map(explainer, images, options, stats, distribution)[0]
    return pipeline.upsample(small, tf.shape(images)[1:3])


def normalize_maps(maps, eps: float = 1e-8) -> np.ndarray:
    """Min-max scale each map to [0, 1] for display; (B, ..., H, W) in, same shape out."""
    maps = np.asarray(maps, dtype=np.float32)
    axes = (-2, -1)
    low = maps.min(axis=axes, keepdims=True)
    high = maps.max(axis=axes, keepdims=True)
    return (maps - low) / np.maximum(high - low, eps)
