"""The graph every exporter serves: its outputs, decisions, image decoding and input checks.

The SavedModel signatures (:mod:`export.saved_model`), the ONNX graph (:mod:`export.onnx`)
and the checker of a deployed model (:mod:`export.infer`) all build or feed the graph
from these pieces, so a served heatmap, decision or decoded image is the same whichever
exporter wrote the model. TensorFlow is imported on first use, so the CLIs answer
``--help`` without it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from export import InputError

#: serving_default and serve_bytes (and the ONNX graph): what a client acts on
SERVING_OUTPUTS = ("heatmap", "score")
#: added to them with thresholds
DECISION_OUTPUTS = ("pred_score", "pred_label", "pred_mask")
#: explain_latents: every output of the anomaly attention
ANOMALY_OUTPUTS = ("heatmap", "per_latent", "recon_error", "score", "mu", "logvar")
#: explain: the plain per-latent attention (Eq. 3-4)
ATTENTION_OUTPUTS = ("per_latent", "attention", "mu")

#: How an image file becomes the float input of serving_default (what serve_bytes,
#: export.infer and the trainers do; README "Serving" shows it in Python).
PREPROCESSING = (
    "decode the file, resize to input_shape's height x width with "
    "tf.image.resize(method='bilinear', antialias=True), round to 8-bit "
    "values, divide by 255"
)


def input_shape(model: Any) -> tuple[int, int, int]:
    """(H, W, C) the model was built for."""
    return tuple(int(d) for d in model.encoder.inputs[0].shape[1:])


def anomaly_outputs(
    model: Any, images: Any, options: Any, thresholds: Any = None, full: bool = False
) -> dict[str, Any]:
    """The serving outputs for float images (B, H, W, C): a dict of tensors.

    ``options``: the run's :class:`~keras_vae_attn.explain.options.ExplainOptions`. Lean by
    default (:data:`SERVING_OUTPUTS`: no per-latent or reconstruction pass runs);
    ``full`` gives :data:`ANOMALY_OUTPUTS`. With ``thresholds`` the decisions of
    :func:`decisions` are added.
    """
    from keras_vae_attn.explain import pipeline

    names = ANOMALY_OUTPUTS if full else SERVING_OUTPUTS
    out = pipeline.explain_anomaly(model, images, options, keys=names)
    result = {name: out[name] for name in names}
    if thresholds is not None:
        result.update(
            flag_non_finite(images, decisions(out["heatmap"], out["score"], thresholds, full))
        )
    return result


def flag_non_finite(images: Any, decided: dict[str, Any]) -> dict[str, Any]:
    """``decided`` with every image holding NaN or inf labelled anomalous (pred_label
    True, pred_score 1): its maps are NaN and its score compares false, which would call
    it "normal". The SavedModel signatures refuse such input in the graph; an ONNX graph
    cannot (tf2onnx drops asserts), so this is what it answers instead."""
    import tensorflow as tf

    bad = tf.logical_not(tf.reduce_all(tf.math.is_finite(images), axis=[1, 2, 3]))
    return {
        **decided,
        "pred_label": tf.logical_or(decided["pred_label"], bad),
        "pred_score": tf.where(
            bad, tf.ones_like(decided["pred_score"]), decided["pred_score"]
        ),
    }


def decisions(heatmap: Any, score: Any, thresholds: Any, full: bool = False) -> dict[str, Any]:
    """pred_score, pred_label and pred_mask of :data:`DECISION_OUTPUTS` (tensors).

    ``pred_score`` is the image score on [0, 1] with the image threshold at 0.5, the
    formula of predictions.csv's column (:func:`keras_vae_attn.calibration.normalize`),
    so ``pred_score > 0.5`` is ``pred_label``; the label and the mask are
    :func:`keras_vae_attn.calibration.decide`'s. ``full`` adds its heatmap_normalized.
    """
    from keras_vae_attn import calibration

    decided = calibration.decide(heatmap, score, thresholds)
    result = {
        "pred_score": calibration.normalize(score, thresholds.image),
        "pred_label": decided["pred_label"],
        "pred_mask": decided["pred_mask"],
    }
    if full:
        result["heatmap_normalized"] = decided["heatmap_normalized"]
    return result


def attention_outputs(
    model: Any, images: Any, layer: str, gradient_relu: bool = False
) -> dict[str, Any]:
    """Per-latent maps M_i (B, D, h, w), their mean upsampled (B, H, W), and mu."""
    from keras_vae_attn.explain import pipeline
    from keras_vae_attn.explain.options import ExplainOptions

    options = ExplainOptions(layers=(layer,), gradient_relu=gradient_relu)
    out = pipeline.explain_anomaly(model, images, options)
    return {name: out[name] for name in ATTENTION_OUTPUTS}


def signature_outputs(with_thresholds: bool) -> dict[str, list[str]]:
    """{SavedModel signature: its output names}, as :mod:`export.saved_model` builds them."""
    decided = DECISION_OUTPUTS if with_thresholds else ()
    lean = [*SERVING_OUTPUTS, *decided]
    full = [*ANOMALY_OUTPUTS, *decided, *(("heatmap_normalized",) if decided else ())]
    return {
        "serving_default": lean,
        "serve_bytes": lean,
        "explain_latents": full,
        "explain": list(ATTENTION_OUTPUTS),
    }


def decode_images(encoded: Any, height: int, width: int, channels: int) -> Any:
    """PNG/JPEG/BMP/GIF strings (B,) -> float32 (B, height, width, channels) in [0, 1].

    The trainers' loading (:data:`PREPROCESSING`), in graph: decode, bilinear
    antialiased resize, round to 8-bit, divide by 255. An image already of the model's
    size passes through unchanged.
    """
    import tensorflow as tf

    def one(data):
        image = tf.io.decode_image(data, channels=channels, expand_animations=False)
        image = tf.image.resize(image, (height, width), method="bilinear", antialias=True)
        return tf.clip_by_value(tf.round(image), 0.0, 255.0) / 255.0

    return tf.map_fn(
        one, encoded, fn_output_signature=tf.TensorSpec((height, width, channels), tf.float32)
    )


def assert_not_empty(tensor: Any, name: str) -> Any:
    """An assert op failing on a batch of 0 (the model's reshapes would fail on it with
    "input depth must be evenly divisible ..." instead)."""
    import tensorflow as tf

    return tf.debugging.assert_positive(
        tf.shape(tensor)[0], message=f"{name} must hold at least one image"
    )


def assert_valid_images(images: Any, height: int, width: int, channels: int) -> Any:
    """``images`` tied to in-graph asserts that fail clearly on the wrong shape, an empty
    batch, or values outside [0, 1] (NaN and inf included: both comparisons are false
    for NaN).

    A signature's declared shape is not enforced when it is called (TF Serving and
    ``tf.saved_model.load`` check the dtype only), so the shape is checked at run time:
    "Shape of tensor images [...] is not compatible with expected shape [?,H,W,C]".
    """
    import tensorflow as tf

    images = tf.ensure_shape(images, (None, height, width, channels), name="images")
    message = (
        "images must be float32 in [0, 1] (divide 8-bit pixels by 255, or send "
        "encoded files to the serve_bytes signature)"
    )
    with tf.control_dependencies(
        [
            assert_not_empty(images, "images"),
            tf.debugging.assert_greater_equal(images, tf.constant(0.0), message=message),
            tf.debugging.assert_less_equal(images, tf.constant(1.0), message=message),
        ]
    ):
        return tf.identity(images)


def assert_valid_bytes(image_bytes: Any) -> Any:
    """``image_bytes`` (B,) tied to the asserts that it is a vector of at least one file."""
    import tensorflow as tf

    image_bytes = tf.ensure_shape(image_bytes, (None,), name="image_bytes")
    with tf.control_dependencies([assert_not_empty(image_bytes, "image_bytes")]):
        return tf.identity(image_bytes)


def validated_images(images: Any, shape: Sequence[int]) -> np.ndarray:
    """``images`` as an array if an exported graph may take them: float32 (B >= 1, H, W,
    C) in [0, 1] for ``shape`` (H, W, C); else InputError saying what is wrong.

    The check :func:`assert_valid_images` does in the SavedModel signatures' graph; an
    ONNX graph cannot keep it (tf2onnx drops TensorFlow's assert ops), so ONNX Runtime
    callers run this first (:mod:`export.infer` does before every run).
    """
    images = np.asarray(images)
    height, width, channels = (int(d) for d in shape)
    expected = f"(batch, {height}, {width}, {channels})"
    if images.dtype != np.float32:
        hint = (
            " (divide 8-bit pixels by 255)" if np.issubdtype(images.dtype, np.integer) else ""
        )
        raise InputError(
            f"images must be float32 {expected} in [0, 1]; got dtype {images.dtype}{hint}"
        )
    if images.ndim != 4:
        raise InputError(
            f"images must be a 4-D batch {expected}; got shape {images.shape}"
            + (" (add a batch axis)" if images.ndim == 3 else "")
        )
    if images.shape[-1] != channels:
        raise InputError(
            f"images have {images.shape[-1]} channels but the model takes "
            f"{channels}: expected {expected}, got {images.shape}"
        )
    if images.shape[1:3] != (height, width):
        raise InputError(
            f"images are {images.shape[1]}x{images.shape[2]} but the model "
            f"takes {height}x{width}: expected {expected}, got {images.shape}"
        )
    if images.shape[0] == 0:
        raise InputError(f"images must hold at least one image; got shape {images.shape}")
    finite = np.isfinite(images)
    if not finite.all():
        raise InputError(
            f"images must be float32 in [0, 1]; got {int((~finite).sum())} "
            "NaN or infinite values"
        )
    if images.min() < 0 or images.max() > 1:
        raise InputError(
            f"images must be float32 in [0, 1]; got values in "
            f"[{images.min():g}, {images.max():g}]"
            + (" (divide 8-bit pixels by 255)" if images.max() > 1 else "")
        )
    return images
