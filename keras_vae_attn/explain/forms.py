"""Attribution forms: how features and latent gradients become an anomaly map.

A fixed pipeline (:func:`keras_vae_attn.explain.pipeline.explain_anomaly`) does the work:

1. the feature map A of a layer, (B, h, w, K);
2. the gradients G of a *target* with respect to A, (B, T, h, w, K): one per latent for
   the per-latent targets ("latent": u_i, "energy": the Eq. 5 energy of dimension i),
   one for "total-energy" (T = 1);
3. a *deviation* of A: "none" (A itself, the paper), "centered" (A minus the normal mean
   feature map), "standardized" ((A - mean) / std, per position and channel) or
   "whitened" (L^-1 (A - mean) with L L^T the channel covariance at each position, so
   ||dev|| is the per-position Mahalanobis distance; the gradients are taken in the same
   basis, dE/dz = L^T dE/dA), all fitted on the normal training images
   (:mod:`keras_vae_attn.explain.deviation`);
4. a *form* that turns G and the deviation into one signed map per target;
5. a *sign rule* ("relu", "abs", "signed"), then the mean over targets.

A new form is one small ``Form`` subclass in this file, with a ``name`` and a
``signed_map`` hook; it registers itself, and the CLI choices, ``describe``, the grid and
the tests read the names from :data:`FORMS`. TensorFlow loads on first use of a form's
math, so the CLIs list the names before TensorFlow starts.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from keras_vae_attn.explain.options import ExplainOptions


class _TensorFlowOnFirstUse:
    """``tf`` for this module, imported when a form first computes (not at import)."""

    def __getattr__(self, name):
        return getattr(importlib.import_module("tensorflow"), name)


tf = _TensorFlowOnFirstUse()


def apply_sign(maps: tf.Tensor, sign: str) -> tf.Tensor:
    """relu / abs / signed (identity) on signed maps."""
    if sign == "relu":
        return tf.nn.relu(maps)
    if sign == "abs":
        return tf.abs(maps)
    return maps


def pooled(grads: tf.Tensor, gradient_relu: bool = False) -> tf.Tensor:
    """Grad-CAM weights: gradients (B, T, h, w, K) averaged over positions, (B, T, K)."""
    if gradient_relu:
        grads = tf.nn.relu(grads)
    return tf.reduce_mean(grads, axis=[2, 3])


def weigh(weights: tf.Tensor, features: tf.Tensor) -> tf.Tensor:
    """sum_k w_t[k] A_k, signed: weights (B, T, K) x features (B, h, w, K) -> (B, T, h, w).
    With :func:`pooled` weights, Grad-CAM's map before its ReLU (the paper's Eq. 3)."""
    return tf.einsum("btk,bhwk->bthw", weights, features)


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
    #: True: a reference that shows what the other forms add; the grid scores it, but
    #: its rule never picks it as the default (bench/localization_grid.py)
    reference = False
    #: relative cost of the map, for ties in the grid's ranking (cheaper first)
    cost = 2

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        FORMS[cls.name] = cls()

    @property
    def reads_decoder(self) -> bool:
        """Whether the map reads the reconstruction (and so its normal residual)."""
        return self.residual or self.pixels

    def label(self, options: ExplainOptions) -> str:
        """This form's part of ``ExplainOptions.describe()``: 'gradcam/energy/none/relu'."""
        if self.reads_decoder:
            return self.name
        parts = [self.name, options.target, options.deviation]
        return "/".join(parts + [options.sign] if self.uses_sign else parts)

    def signed_map(
        self, grads: tf.Tensor | None, dev: tf.Tensor, gradient_relu: bool = False
    ) -> tf.Tensor:
        raise NotImplementedError


class GradCAM(Form):
    """The paper's Eq. 3: position-pooled gradient weights times the features."""

    name = "gradcam"

    def signed_map(self, grads, dev, gradient_relu=False):
        return weigh(pooled(grads, gradient_relu), dev)


class GradCAMPlusPlus(Form):
    """Grad-CAM++ (Chattopadhay et al., WACV 2018): channel k's weight sums its positive
    gradients g, each times alpha = g^2 / (2 g^2 + sum_ab dev_ab g^3), the paper's
    closed form for an exponential of the target (its higher derivatives are powers of
    the first-order g). Several weak responses of a channel then count beside one
    strong one instead of being averaged away as in Grad-CAM. Where g > 0, alpha g is
    g / (2 + sum_ab dev_ab g), computed so (0 where that denominator is 0): no g^3 to
    underflow in float32."""

    name = "gradcam++"
    cost = 3

    def signed_map(self, grads, dev, gradient_relu=False):
        positive = tf.nn.relu(grads)
        total = tf.reduce_sum(dev, axis=[1, 2])  # (B, K)
        scaled = tf.einsum("bk,bthwk->bthwk", total, positive)
        weights = tf.reduce_sum(tf.math.divide_no_nan(positive, 2.0 + scaled), axis=[2, 3])
        return weigh(weights, dev)


class HiResCAM(Form):
    """Per-position gradient times deviation, summed over channels: where the gradient
    is stays in the map (pooling throws that away)."""

    name = "hirescam"
    cost = 4

    def signed_map(self, grads, dev, gradient_relu=False):
        return tf.reduce_sum(grads * dev[:, None], axis=-1)


class Integrated(HiResCAM):
    """Integrated gradients from a baseline feature map (the normal mean, or zero for
    deviation "none") to A: the pipeline averages the gradients over ``steps`` midpoints
    of the straight path and passes A - baseline as ``dev``. The map sums to
    E(A) - E(baseline) up to the Riemann error."""

    name = "integrated"
    integrated = True
    cost = 5


class GradientWeightedDeviation(Form):
    """sqrt(sum_k |w_k| dev_k^2), w the pooled target gradient: a deviation norm whose
    channels count by how much the target responds to them."""

    name = "gradient-weighted-deviation"
    uses_sign = False
    cost = 3

    def signed_map(self, grads, dev, gradient_relu=False):
        weights = tf.abs(pooled(grads, gradient_relu))
        return tf.sqrt(weigh(weights, tf.square(dev)) + 1e-12)


class GradientNorm(Form):
    """||G|| over channels at each position, the deviation unused: the plain gradient
    saliency (Simonyan et al. 2014), a reference for what weighing by A adds."""

    name = "gradient-norm"
    uses_sign = False
    reference = True
    cost = 4

    def signed_map(self, grads, dev, gradient_relu=False):
        return tf.sqrt(tf.reduce_sum(tf.square(grads), axis=-1) + 1e-12)


class DeviationNorm(Form):
    """||dev|| over channels, no gradient: the reference row showing what the latent
    gradient adds."""

    name = "deviation"
    needs_gradient = False
    uses_sign = False
    reference = True
    cost = 1

    def signed_map(self, grads, dev, gradient_relu=False):
        return tf.sqrt(tf.reduce_sum(tf.square(dev), axis=-1) + 1e-12)[:, None]


class FeatureResidual(DeviationNorm):
    """||z|| of z = (A(x) - A(decode(mu))) / r per position, r the normal images'
    residual root mean square (:func:`.deviation.relative_residual`): where the features
    of the image differ from those of its reconstruction more than on normal images. It reads
    the decoder, so a VAE that learned nothing cannot fake it with feature statistics."""

    name = "feature-residual"
    residual = True
    reference = False
    cost = 1


class ReconDeviation(DeviationNorm):
    """The reconstruction residual relative to its normal size, sqrt(mean_c z_c^2) with
    z = (x - decode(mu)) / r per pixel and channel (r the normal residual's root mean
    square, :func:`.deviation.relative_residual`): a reconstruction difference that
    discounts where the VAE always errs (edges, texture). No layer: computed at image
    resolution."""

    name = "recon-deviation"
    pixels = True
    reference = False
    cost = 0

    def label(self, options):
        return "recon-deviation (reconstruction residual relative to its normal size)"


def get_form(name: str) -> Form:
    if name not in FORMS:
        raise ValueError(f"unknown attribution form {name!r}; choose one of {sorted(FORMS)}")
    return FORMS[name]


def attribute(
    form: Form,
    grads: tf.Tensor | None,
    dev: tf.Tensor,
    sign: str,
    gradient_relu: bool = False,
) -> tf.Tensor:
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
