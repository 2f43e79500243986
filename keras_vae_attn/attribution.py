"""Attribution forms: how features and latent gradients become an anomaly map.

A fixed pipeline (:func:`keras_vae_attn.scoring.explain_anomaly`) does the work:

1. the feature map A of a layer, (B, h, w, K);
2. the gradients G of a *target* with respect to A, (B, T, h, w, K): one per latent for
   the per-latent targets ("latent": u_i, "energy": the Eq. 5 energy of dimension i),
   one for "total-energy" (T = 1);
3. a *deviation* of A: "none" (A itself, the paper), "centered" (A minus the normal mean
   feature map), "standardized" ((A - mean) / std, per position and channel) or
   "whitened" (L^-1 (A - mean) with L L^T the channel covariance at each position, so
   ||dev|| is the per-position Mahalanobis distance; the gradients are taken in the same
   basis, dE/dz = L^T dE/dA), all fitted on the normal training images
   (:class:`FeatureDistribution`);
4. a *form* that turns G and the deviation into one signed map per target;
5. a *sign rule* ("relu", "abs", "signed"), then the mean over targets.

A new form is one small ``Form`` subclass with a ``name`` and a ``signed_map`` hook; it
registers itself. Its name goes in ``runs.FORMS`` too, the list the CLIs check flags
against without importing TensorFlow (a name missing there fails at import).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import tensorflow as tf

from keras_vae_attn import runs

DEVIATIONS = ("none", "centered", "standardized", "whitened")
SIGNS = ("relu", "abs", "signed")
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

    def __init__(self, covariance=False):
        self.count, self.mean, self.m2, self.c2 = 0, None, None, None
        self.covariance = covariance  # also the channel covariance at each position

    def update(self, features):
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

    def result(self):
        if not self.count:
            raise ValueError("cannot fit a feature distribution on an empty dataset")
        return (self.mean.astype(np.float32), np.sqrt(self.m2 / self.count).astype(np.float32))

    def whitening(self):
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
    if kind == "whitened":
        return tf.einsum("hwlk,bhwk->bhwl", _whitening(distribution).whiten, centered)
    std = tf.cast(distribution.std, tf.float32)
    floor = STD_FLOOR * tf.reduce_mean(std) + 1e-6
    return centered / tf.sqrt(tf.square(std) + tf.square(floor))


def relative_residual(residual, distribution):
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


def check_shape(features, mean):
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


def gradients_in_deviation_basis(grads, distribution, kind):
    """For "whitened", the gradients with respect to z = L^-1 (A - mean): L^T dE/dA, so
    that channel k of the gradient and of the deviation are the same direction."""
    if kind != "whitened" or grads is None:
        return grads
    return tf.einsum("hwlk,bthwl->bthwk", _whitening(distribution).colour, grads)


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


#: {name: form instance}, filled by ``Form`` subclasses as they are defined.
FORMS = {}


class Form:
    """One attribution form. ``signed_map(grads, dev, gradient_relu)`` maps the target
    gradients (B, T, h, w, K) and the deviation (B, h, w, K) to (B, T, h, w)."""

    name = ""
    needs_gradient = True  # False: the map needs no backward pass at all
    uses_sign = True  # False: the map is >= 0 by construction
    integrated = False  # True: gradients averaged along a path (see Integrated)
    residual = False  # True: dev is the standardized feature reconstruction residual
    pixels = False  # True: a map of the pixels, no layer (see ReconDeviation)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.name not in runs.FORMS:
            raise TypeError(
                f"attribution form {cls.name!r} is not listed in "
                "keras_vae_attn.runs.FORMS, so no flag could choose it"
            )
        FORMS[cls.name] = cls()

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


class GradientNorm(Form):
    """||G|| over channels at each position, the deviation unused: the plain gradient
    saliency (Simonyan et al. 2014), a reference for what weighing by A adds."""

    name = "gradient-norm"
    uses_sign = False

    def signed_map(self, grads, dev, gradient_relu=False):
        return tf.sqrt(tf.reduce_sum(tf.square(grads), axis=-1) + 1e-12)


class DeviationNorm(Form):
    """||dev|| over channels, no gradient: the reference row showing what the latent
    gradient adds."""

    name = "deviation"
    needs_gradient = False
    uses_sign = False

    def signed_map(self, grads, dev, gradient_relu=False):
        return tf.sqrt(tf.reduce_sum(tf.square(dev), axis=-1) + 1e-12)[:, None]


class FeatureResidual(DeviationNorm):
    """||z|| of z = (A(x) - A(decode(mu))) / r per position, r the normal images'
    residual root mean square (:func:`relative_residual`): where the features of the
    image differ from those of its reconstruction more than on normal images. It reads
    the decoder, so a VAE that learned nothing cannot fake it with feature statistics."""

    name = "feature-residual"
    residual = True


class ReconDeviation(DeviationNorm):
    """The reconstruction residual relative to its normal size, sqrt(mean_c z_c^2) with
    z = (x - decode(mu)) / r per pixel and channel (r the normal residual's root mean
    square, :func:`relative_residual`): a reconstruction difference that discounts where
    the VAE always errs (edges, texture). No layer: computed at image resolution."""

    name = "recon-deviation"
    pixels = True


if set(FORMS) != set(runs.FORMS):
    raise TypeError(f"runs.FORMS lists forms no class defines: {set(runs.FORMS) - set(FORMS)}")


def get_form(name):
    if name not in FORMS:
        raise ValueError(f"unknown attribution form {name!r}; choose one of {sorted(FORMS)}")
    return FORMS[name]


def attribute(form, grads, dev, sign, gradient_relu=False):
    """The map of ``form`` at feature resolution, (B, h, w): signed maps, the sign rule
    (when the form uses one), mean over targets."""
    maps = form.signed_map(
        tf.cast(grads, tf.float32) if grads is not None else None,
        tf.cast(dev, tf.float32),
        gradient_relu,
    )
    if form.uses_sign:
        maps = apply_sign(maps, sign)
    return tf.reduce_mean(maps, axis=1)
