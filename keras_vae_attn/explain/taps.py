"""Reading a layer's feature map A out of a Keras encoder, with the codes beside it.

Three ways, by what the encoder allows: a functional encoder whose layer is a cut point
is split into a "front" (images -> A) and a "head" (A -> outputs), so the head can run
on A itself; a layer with a skip connection around it is read as an extra output of the
functional encoder ("tapped"); a subclassed encoder, whose layers have no symbolic
outputs, is run with a call hook on the layer (Keras has no forward hooks).
"""

from __future__ import annotations

import re

import keras
import numpy as np
import tensorflow as tf

from keras_vae_attn.explain.options import METHODS


def _layer_output_rank(layer) -> int | None:
    try:
        return len(layer.output.shape)
    except (AttributeError, ValueError):
        return None


def _all_layers(model: keras.Model) -> list:
    """Every layer inside ``model``, nested models included, in definition order."""
    found = []
    for layer in model.layers:
        found.append(layer)
        if isinstance(layer, keras.Model):
            found.extend(_all_layers(layer))
    return found


def feature_layer_names(encoder: keras.Model) -> list[str]:
    """Names of the encoder's layers that output a 4-D feature map (candidates for A)."""
    if getattr(encoder, "inputs", None) is None:
        return [layer.name for layer in _all_layers(encoder)]
    return [
        layer.name
        for layer in encoder.layers
        if _layer_output_rank(layer) == 4 and not isinstance(layer, keras.layers.InputLayer)
    ]


def stage_layer_names(encoder: keras.Model) -> list[str]:
    """The encoder's named stages ("conv1", "conv2", ... or "conv1", "layer1", ...): the
    layers attention is usually taken at, in order, without the BN/ReLU/add layers
    inside them. Layer sets "by position" (bench.localization_grid) count these."""
    return [
        name for name in feature_layer_names(encoder) if re.fullmatch(r"(conv|layer)\d+", name)
    ]


def _find_layer(encoder, name):
    for layer in _all_layers(encoder):
        if layer.name == name:
            return layer
    return None


def _output_index(encoder, which, role):
    """Resolve an output given by position or by the name of the layer that produces it."""
    outputs = getattr(encoder, "outputs", None)
    if isinstance(which, int):
        return which
    if outputs is None:
        raise ValueError(
            f"{role}={which!r}: a subclassed encoder has no named outputs; "
            f"pass the output's position (e.g. {role}=0)"
        )
    names = [tensor._keras_history.operation.name for tensor in outputs]
    if which not in names:
        raise ValueError(
            f"{role}={which!r} is not an output of encoder {encoder.name!r}; "
            f"its outputs are {names}"
        )
    return names.index(which)


def as_list(outputs) -> list:
    return list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]


def _upstream_tensors(tensor):
    """{operation name: its output tensor} for everything upstream of a KerasTensor.

    Walks this graph's own nodes, so a layer shared with another model resolves to the
    tensor it produces *here*.
    """
    found, stack = {}, [tensor]
    while stack:
        current = stack.pop()
        operation, node_index, _ = current._keras_history
        if operation.name in found:
            continue
        found[operation.name] = current
        stack.extend(operation._inbound_nodes[node_index].input_tensors)
    return found


class LayerTap:
    """Where A comes from in ``encoder``, and how its D latent gradients are batched.

    ``encoder`` maps images to outputs that include the latent mean (``latent``) and,
    for anomaly maps, the log-variance (``logvar``, or None); both may be given by output
    position (int) or by the name (str) of the layer producing them. ``layer`` names the
    feature map A ("last" picks the encoder's last 4-D layer). ``method`` (see
    :meth:`_choose_method`) is one of :data:`~keras_vae_attn.explain.options.METHODS`;
    the resolved ``method`` attribute may also be "hooked" (a subclassed encoder).
    """

    def __init__(self, encoder: keras.Model, layer: str, latent, logvar, method: str):
        self.encoder = encoder
        self.functional = getattr(encoder, "inputs", None) is not None
        candidates = feature_layer_names(encoder)
        if layer == "last":
            if not candidates:
                raise ValueError(f"encoder {encoder.name!r} has no 4-D feature layer")
            layer = candidates[-1]
        target = _find_layer(encoder, layer)
        if target is None or (self.functional and layer not in candidates):
            raise ValueError(
                f"layer {layer!r} is not a feature-map layer of encoder "
                f"{encoder.name!r}; valid names: {', '.join(candidates)}"
            )
        self.layer_name = layer
        self.latent_index = _output_index(encoder, latent, "latent")
        self.logvar_index = (
            None if logvar is None else _output_index(encoder, logvar, "logvar")
        )
        self.front = self.head = self.tapped = None
        self._target_layer = target
        if self.functional:
            self._split(target)
        self.method = self._choose_method(method)

    def _split(self, target):
        latent_tensor = self.encoder.outputs[self.latent_index]
        features = _upstream_tensors(latent_tensor).get(target.name)
        if features is None:
            raise ValueError(
                f"layer {target.name!r} is not upstream of the latent output "
                f"of encoder {self.encoder.name!r}, so the latent has no "
                "gradient with respect to it"
            )
        inputs = self.encoder.inputs
        self.front = keras.Model(inputs[0] if len(inputs) == 1 else inputs, features)
        try:
            self.head = keras.Model(features, list(self.encoder.outputs))
        except ValueError:
            # The part after the layer also reads earlier tensors (a skip connection
            # around it): run the whole encoder, reading A as an extra output.
            self.head = None
            self.tapped = keras.Model(self.front.inputs, [features, *self.encoder.outputs])

    def _choose_method(self, method):
        """How the D backward passes are batched (keras_vae_attn/explain/gradients.py).

        "stack" runs the head on D stacked copies of A: cheapest when the head is light
        (pooling and dense layers after the last conv). "jacobian" runs the head once
        and vectorizes the D backward passes with ``batch_jacobian``: cheaper when the
        head holds convolutions (an early layer). "auto" picks by that rule; without a
        head it is "jacobian" (a layer inside a residual block) or "hooked" (a
        subclassed encoder).
        """
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
        if self.head is None:
            return "jacobian" if self.tapped is not None else "hooked"
        if method == "auto":
            convolutional = any(
                len(getattr(layer, "kernel", np.zeros(0)).shape) == 4
                for layer in self.head.layers
            )
            return "jacobian" if convolutional else "stack"
        return method

    @property
    def latent_dim(self) -> int | None:
        return (
            int(self.encoder.outputs[self.latent_index].shape[-1]) if self.functional else None
        )

    def check_images(self, images: tf.Tensor) -> None:
        """Raise a clear error for images of the wrong rank or channel count."""
        shape = images.shape
        if shape.rank is not None and shape.rank != 4:
            raise ValueError(f"images must be a 4-D batch (B, H, W, C); got shape {shape}")
        if self.functional:
            expected = self.encoder.inputs[0].shape
            if (
                shape[-1] is not None
                and expected[-1] is not None
                and shape[-1] != expected[-1]
            ):
                raise ValueError(
                    f"images have {shape[-1]} channels but encoder "
                    f"{self.encoder.name!r} expects {expected[-1]} "
                    f"(input shape {tuple(expected[1:])})"
                )

    def read(self, images: tf.Tensor, tape: tf.GradientTape) -> tuple[tf.Tensor, list]:
        """The feature map A (watched by ``tape``) and the encoder outputs, running the
        encoder once: through front and head when split, as an extra output of the
        functional encoder when not, else with a call hook on the layer."""
        if self.head is not None:
            features = self.front(images, training=False)
            tape.watch(features)
            return features, as_list(self.head(features, training=False))
        if self.tapped is not None:
            tape.watch(images)  # records A -> codes even for frozen weights
            features, *outputs = self.tapped(images, training=False)
            return features, outputs
        captured = {}
        layer = self._target_layer
        original_call = layer.call

        def recording_call(*args, **kwargs):
            captured["features"] = original_call(*args, **kwargs)
            return captured["features"]

        layer.call = recording_call
        try:
            outputs = as_list(self.encoder(images, training=False))
        finally:
            layer.call = original_call
        return captured["features"], outputs
