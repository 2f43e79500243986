"""Attribution forms: how features and latent gradients become an anomaly map.

A fixed pipeline (:func:`keras_vae_attn.scoring.explain_anomaly`) does the work:

1. the feature map A of a layer, (B, h, w, K);
2. the gradients G of a *target* with respect to A, (B, T, h, w, K): one per latent for
   the per-latent targets ("latent": u_i, "energy": the Eq. 5 energy of dimension i),
   one for "total-energy" (T = 1);
3. a *deviation* of A: "none" (A itself, the paper), "centered" (A minus the normal mean
   feature map) or "standardized" ((A - mean) / std, per position and channel, fitted on
   the normal training images: :class:`FeatureDistribution`);
4. a *form* that turns G and the deviation into one signed map per target;
5. a *sign rule* ("relu", "abs", "signed"), then the mean over targets.

A new form is one small class with a ``signed_map`` hook plus one entry in ``FORMS``.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import tensorflow as tf

DEVIATIONS = ("none", "centered", "standardized")
SIGNS = ("relu", "abs", "signed")
#: std floor, as a fraction of the layer's mean std: a position whose features never
#: varied on normal data (std 0) must not turn a tiny change into an infinite z-score.
STD_FLOOR = 0.05


class FeatureDistribution(NamedTuple):
    """Per-position, per-channel mean and std of a layer's features on normal data,
    (h, w, K) float32 each."""

    mean: tf.Tensor
    std: tf.Tensor


class FeatureMoments:
    """Streaming mean and variance of feature maps, merged batch by batch (Chan et al.)
    in float64, so no list of all features is kept."""

    def __init__(self):
        self.count, self.mean, self.m2 = 0, None, None

    def update(self, features):
        features = np.asarray(features, np.float64)
        count = features.shape[0]
        if count == 0:
            return
        mean = features.mean(0)
        m2 = ((features - mean) ** 2).sum(0)
        if self.mean is None:
            self.count, self.mean, self.m2 = count, mean, m2
            return
        total = self.count + count
        delta = mean - self.mean
        self.mean = self.mean + delta * (count / total)
        self.m2 = self.m2 + m2 + delta ** 2 * (self.count * count / total)
        self.count = total

    def result(self):
        if not self.count:
            raise ValueError("cannot fit a feature distribution on an empty dataset")
        return (self.mean.astype(np.float32),
                np.sqrt(self.m2 / self.count).astype(np.float32))


def deviation(features, distribution, kind):
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
    std = tf.cast(distribution.std, tf.float32)
    floor = STD_FLOOR * tf.reduce_mean(std) + 1e-6
    return centered / tf.sqrt(tf.square(std) + tf.square(floor))


def check_shape(features, mean):
    """A clear error when a fitted (h, w, K) map does not fit ``features`` (B, h, w, K)
    (a tensor, or its TensorShape)."""
    shape = features if isinstance(features, tf.TensorShape) else features.shape
    if not shape[1:].is_compatible_with(mean.shape):
        raise ValueError(f"the normal feature distribution's shape {tuple(mean.shape)} "
                         f"differs from this layer's feature map {tuple(shape[1:])}: "
                         "fit it on images of the size being explained")


def apply_sign(maps, sign):
    """relu / abs / signed (identity) on signed maps."""
    if sign == "relu":
        return tf.nn.relu(maps)
    if sign == "abs":
        return tf.abs(maps)
    return maps


def pooled(grads, gradient_relu=False):
    """Grad-CAM weights: gradients (B, T, h, w, K) averaged over positions, (B, T, K)."""
    if gradient_relu:
        grads = tf.nn.relu(grads)
    return tf.reduce_mean(grads, axis=[2, 3])


class Form:
    """One attribution form. ``signed_map(grads, dev, gradient_relu)`` maps the target
    gradients (B, T, h, w, K) and the deviation (B, h, w, K) to (B, T, h, w)."""

    name = ""
    needs_gradient = True     # False: the map needs no backward pass at all
    uses_sign = True          # False: the map is >= 0 by construction
    integrated = False        # True: gradients averaged along a path (see Integrated)

    def signed_map(self, grads, dev, gradient_relu=False):
        raise NotImplementedError


class GradCAM(Form):
    """The paper's Eq. 3: position-pooled gradient weights times the features."""

    name = "gradcam"

    def signed_map(self, grads, dev, gradient_relu=False):
        return tf.einsum("btk,bhwk->bthw", pooled(grads, gradient_relu), dev)


class HiResCAM(Form):
    """Per-position gradient times deviation, summed over channels: where the gradient
    is stays in the map (pooling throws that away)."""

    name = "hirescam"

    def signed_map(self, grads, dev, gradient_relu=False):
        return tf.reduce_sum(grads * dev[:, None], axis=-1)


class Integrated(HiResCAM):
    """Integrated gradients from a baseline feature map (the normal mean, or zero for
    deviation "none") to A: the pipeline averages the gradients over ``steps`` midpoints
    of the straight path and passes A - baseline as ``dev``. The map sums to
    E(A) - E(baseline) up to the Riemann error."""

    name = "integrated"
    integrated = True


class GradientWeightedDeviation(Form):
    """sqrt(sum_k |w_k| dev_k^2), w the pooled target gradient: a deviation norm whose
    channels count by how much the target responds to them."""

    name = "gradient-weighted-deviation"
    uses_sign = False

    def signed_map(self, grads, dev, gradient_relu=False):
        weights = tf.abs(pooled(grads, gradient_relu))
        return tf.sqrt(tf.einsum("btk,bhwk->bthw", weights, tf.square(dev)) + 1e-12)


class DeviationNorm(Form):
    """||dev|| over channels, no gradient: the reference row showing what the latent
    gradient adds."""

    name = "deviation"
    needs_gradient = False
    uses_sign = False

    def signed_map(self, grads, dev, gradient_relu=False):
        return tf.sqrt(tf.reduce_sum(tf.square(dev), axis=-1) + 1e-12)[:, None]


FORMS = {form.name: form() for form in (GradCAM, HiResCAM, Integrated,
                                        GradientWeightedDeviation, DeviationNorm)}


def get_form(name):
    if name not in FORMS:
        raise ValueError(f"unknown attribution form {name!r}; choose one of {sorted(FORMS)}")
    return FORMS[name]


def attribute(form, grads, dev, sign, gradient_relu=False):
    """The map of ``form`` at feature resolution, (B, h, w): signed maps, the sign rule
    (when the form uses one), mean over targets."""
    maps = form.signed_map(tf.cast(grads, tf.float32) if grads is not None else None,
                           tf.cast(dev, tf.float32), gradient_relu)
    if form.uses_sign:
        maps = apply_sign(maps, sign)
    return tf.reduce_mean(maps, axis=1)
