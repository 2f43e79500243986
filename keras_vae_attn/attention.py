"""Gradient-based attention from a VAE's latent space (the paper's Eq. 3-5).

For a feature map A of a chosen encoder layer and each latent dimension i:

    w_i[k] = mean_{h,w} d z_i / d A[h, w, k]          (pooled gradient)
    M_i    = ReLU(sum_k w_i[k] A[:, :, k])             (per-latent map)
    M      = mean_i M_i                                (overall map)

All D gradients come from one batched backward pass. When the encoder is functional and
the layer is a cut point, the encoder runs once up to A; only the part after A (the
"head") runs on D stacked copies of A, each copy back-propagating a different one-hot
latent direction. Otherwise the encoder runs once and ``GradientTape.batch_jacobian``
vectorizes the D backward passes: for a layer with a skip connection around it, through
a functional model that outputs A beside the codes; for a subclassed encoder, whose
layers have no symbolic outputs, through a call hook on the layer (Keras has no forward
hooks).

Anomaly maps can be taken relative to the normal data's mean feature map
(``baseline=``, see :meth:`VAEAttention.feature_mean`): ReLU(sum_k w[k] (A_k - mean A_k)).
Plain Grad-CAM weighs A itself, so whatever the layer responds to in *every* frame (the
crowd of a normal scene, zero-padding responses along the border, fixed texture) lights
up wherever its channels got positive weight. With the normal mean removed, the map is a
first-order expansion of the anomaly score around the normal feature map, spread over
the pixels where this image's features differ from normal ones.
"""

from __future__ import annotations

from typing import NamedTuple

import keras
import numpy as np
import tensorflow as tf

TOTAL_ENERGY = "total-energy"
ANOMALY_SCORES = ("energy", "latent", TOTAL_ENERGY)
METHODS = ("auto", "stack", "jacobian")  # what callers may ask for
#: what ``VAEAttention.method`` may hold: a choice above, or "hooked" (a subclassed
#: encoder, which has no graph to read A from: a call hook on the layer records it)
RESOLVED_METHODS = ("stack", "jacobian", "hooked")


class NormalStats(NamedTuple):
    """Latent statistics of the normal data: per-dimension mean and std of q(z), (D,)."""

    mean: tf.Tensor
    std: tf.Tensor


class Explanation(NamedTuple):
    """Everything one batched pass yields. Maps are raw, non-negative float32."""

    mu: tf.Tensor  # (B, D)
    logvar: tf.Tensor  # (B, D) or None
    features: tf.Tensor  # (B, h, w, K) the feature map A
    weights: tf.Tensor  # (B, D, K) pooled gradients w_i
    latent_maps: tf.Tensor  # (B, D, h, w) the M_i at feature resolution


class EnergyAttention(NamedTuple):
    """What :meth:`VAEAttention.energy_attention` yields (float32)."""

    heatmap: tf.Tensor  # (B, h, w) at feature resolution
    mu: tf.Tensor  # (B, D)
    logvar: tf.Tensor  # (B, D)
    energy: tf.Tensor  # (B,) sum_i u_i^2 / (2 var_i)


def difference_distribution(normal_mean, normal_std, mu, sigma):
    """Mean and variance of u = z_x - z_y for independent Gaussians (the paper's Eq. 5).

    ``u_i ~ N(mu_x,i - mu_y,i, sigma_x,i^2 + sigma_y,i^2)``; shapes broadcast.
    """
    mean = tf.cast(normal_mean, tf.float32) - tf.cast(mu, tf.float32)
    variance = tf.square(tf.cast(normal_std, tf.float32)) + tf.square(
        tf.cast(sigma, tf.float32)
    )
    return mean, variance


def energy(mean, variance):
    """The Gaussian energy of Eq. 5, sum_i u_i^2 / (2 var_i), (B,), from the difference
    distribution's mean and variance (:func:`difference_distribution`)."""
    return 0.5 * tf.reduce_sum(tf.square(mean) / variance, -1)


def _layer_output_rank(layer):
    try:
        return len(layer.output.shape)
    except (AttributeError, ValueError):
        return None


def _all_layers(model):
    """Every layer inside ``model``, nested models included, in definition order."""
    found = []
    for layer in model.layers:
        found.append(layer)
        if isinstance(layer, keras.Model):
            found.extend(_all_layers(layer))
    return found


def feature_layer_names(encoder):
    """Names of the encoder's layers that output a 4-D feature map (candidates for A)."""
    if getattr(encoder, "inputs", None) is None:
        return [layer.name for layer in _all_layers(encoder)]
    return [
        layer.name
        for layer in encoder.layers
        if _layer_output_rank(layer) == 4 and not isinstance(layer, keras.layers.InputLayer)
    ]


def stage_layer_names(encoder):
    """The encoder's named stages ("conv1", "conv2", ... or "conv1", "layer1", ...): the
    layers attention is usually taken at, in order, without the BN/ReLU/add layers
    inside them. Layer sets "by position" (bench.localization_grid) count these."""
    import re

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


def _as_list(outputs):
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


class VAEAttention:
    """Per-latent attention, overall attention and anomaly attention for any Keras encoder.

    ``encoder`` maps images to outputs that include the latent mean (``latent``) and,
    for anomaly attention, the log-variance (``logvar``); both may be given by output
    position or by the name of the layer producing them. ``layer`` names the feature map
    A ("last" picks the encoder's last 4-D layer). ``gradient_relu`` applies ReLU to the
    gradients before pooling (the paper's printed Eq. 3); the default is the Grad-CAM form.
    """

    def __init__(
        self,
        encoder,
        layer="last",
        latent="mu",
        logvar="logvar",
        gradient_relu=False,
        jit_compile=False,
        method="auto",
    ):
        self.encoder = encoder
        self.gradient_relu = gradient_relu
        self.jit_compile = jit_compile
        self._compiled = {}  # graph function -> its compiled tf.function
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
        """How the D backward passes are batched (see the module docstring).

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
    def latent_dim(self):
        return (
            int(self.encoder.outputs[self.latent_index].shape[-1]) if self.functional else None
        )

    def check_images(self, images):
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

    def _pool(self, grads, axes=(1, 2)):
        """Average gradients over the spatial ``axes`` (after ReLU if asked), float32."""
        if self.gradient_relu:
            grads = tf.nn.relu(grads)
        return tf.reduce_mean(tf.cast(grads, tf.float32), axis=list(axes))

    def stacked_gradients(self, features, training=False):
        """dmu_i/dA for every latent i from ONE backward pass: the head runs on D stacked
        copies of A (copy d holds rows d*B..d*B+B-1), copy d back-propagating latent d.
        Differentiable itself, so an outer tape sees it (FactorVAE's L_AD).
        Returns (the head's outputs for the B images, grads (B, D, h, w, K))."""
        depth = self.latent_dim
        batch = tf.shape(features)[0]
        stacked = tf.tile(features, [depth, 1, 1, 1])
        with tf.GradientTape() as tape:
            tape.watch(stacked)
            outputs = _as_list(self.head(stacked, training=training))
            latent = outputs[self.latent_index]
            dtype = tf.float64 if latent.dtype == tf.float64 else tf.float32
            selector = tf.repeat(tf.eye(depth, dtype=dtype), repeats=batch, axis=0)
            chosen = tf.reduce_sum(tf.cast(latent, dtype) * selector)
        grads = tape.gradient(chosen, stacked)  # (D*B, h, w, K)
        grads = tf.reshape(grads, tf.concat([[depth, batch], tf.shape(grads)[1:]], 0))
        return [output[:batch] for output in outputs], tf.transpose(grads, [1, 0, 2, 3, 4])

    def _explain_split(self, images):
        features = self.front(images, training=False)
        outputs, grads = self.stacked_gradients(features)
        weights = self._pool(grads, axes=(2, 3))  # (B, D, K)
        logvar = None if self.logvar_index is None else outputs[self.logvar_index]
        return features, weights, tf.cast(outputs[self.latent_index], tf.float32), logvar

    def _forward(self, images, tape):
        """The feature map A (watched by ``tape``) and the encoder outputs, running the
        encoder once: through front and head when split, as an extra output of the
        functional encoder when not, else with a call hook on the layer."""
        if self.head is not None:
            features = self.front(images, training=False)
            tape.watch(features)
            return features, _as_list(self.head(features, training=False))
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
            outputs = _as_list(self.encoder(images, training=False))
        finally:
            layer.call = original_call
        return captured["features"], outputs

    def feature_mean(self, dataset):
        """The mean feature map A over ``dataset`` (image batches or (images, ...)
        tuples), (h, w, K) float32: the ``baseline`` of the anomaly maps."""
        from keras_vae_attn.explain.deviation import FeatureMoments

        moments = FeatureMoments()
        for batch in dataset:
            images = batch[0] if isinstance(batch, (tuple, list)) else batch
            images = tf.convert_to_tensor(images)
            self.check_images(images)
            moments.update(self._run(self._features_graph, images).numpy())
        if not moments.count:
            raise ValueError("cannot fit a feature baseline on an empty dataset")
        return tf.constant(moments.result()[0], tf.float32)

    def _features_graph(self, images):
        with tf.GradientTape() as tape:
            features, _ = self._forward(images, tape)
        return tf.cast(features, tf.float32)

    def _explain_jacobian(self, images):
        with tf.GradientTape() as tape:
            features, outputs = self._forward(images, tape)
            latent = tf.cast(outputs[self.latent_index], tf.float32)
        weights = self._pool(tape.batch_jacobian(latent, features), axes=(2, 3))
        logvar = None if self.logvar_index is None else outputs[self.logvar_index]
        return features, weights, latent, logvar

    def explain(self, images):
        """One batched pass: latent codes, feature map, pooled gradients and the M_i.

        Called eagerly, it runs as a compiled ``tf.function`` (XLA too with
        ``jit_compile=True``), traced once per input signature; inside the caller's own
        ``tf.function`` it simply becomes part of that graph.
        """
        images = tf.convert_to_tensor(images)
        self.check_images(images)
        return self._run(self._explain_graph, images)

    def _run(self, graph_fn, *args):
        """``graph_fn(*args)``: compiled once per function when called eagerly, inlined
        into the caller's graph otherwise."""
        if not tf.executing_eagerly():
            return graph_fn(*args)
        key = getattr(graph_fn, "__func__", graph_fn)  # a bound method's function
        if key not in self._compiled:
            self._compiled[key] = tf.function(
                graph_fn, reduce_retracing=True, jit_compile=self.jit_compile
            )
        return self._compiled[key](*args)

    def _explain_graph(self, images):
        run = {
            "stack": self._explain_split,
            "jacobian": self._explain_jacobian,
            "hooked": self._explain_jacobian,
        }[self.method]
        features, weights, mu, logvar = run(images)
        features = tf.cast(features, tf.float32)
        maps = combine(weights, features)
        if logvar is not None:
            logvar = tf.cast(logvar, tf.float32)
        return Explanation(mu, logvar, features, weights, maps)

    def latent_maps(self, images):
        """Per-latent maps M_i, (B, D, h, w), at the feature map's resolution."""
        return self.explain(images).latent_maps

    def attention(self, images):
        """Overall attention M = mean_i M_i, upsampled to the input size, (B, H, W)."""
        images = tf.convert_to_tensor(images)
        maps = tf.reduce_mean(self.latent_maps(images), axis=1)
        return upsample(maps, tf.shape(images)[1:3])

    def anomaly_attention(
        self, images, normal_stats, score="energy", sample=False, seed=None, baseline=None
    ):
        """Anomaly attention of Eq. 5, upsampled to the input size, (B, H, W).

        ``score="total-energy"`` takes one backward pass (:meth:`energy_attention`); the
        per-latent scores take the D passes of :meth:`explain`. ``baseline`` (from
        :meth:`feature_mean` on normal images) makes the maps relative to normal features.
        """
        images = tf.convert_to_tensor(images)
        if score == TOTAL_ENERGY:
            if sample:
                raise ValueError("sample=True needs a per-latent score ('energy' or 'latent')")
            maps = self.energy_attention(images, normal_stats, baseline).heatmap
        else:
            maps = tf.reduce_mean(
                anomaly_maps(
                    self.explain(images), normal_stats, score, sample, seed, baseline
                ),
                axis=1,
            )
        return upsample(maps, tf.shape(images)[1:3])

    def energy_attention(self, images, normal_stats, baseline=None):
        """Grad-CAM of the total Gaussian energy of Eq. 5, from ONE backward pass.

        E = sum_i u_i^2 / (2 var_i) with the difference distribution of
        :func:`difference_distribution` (var held constant), w = pooled dE/dA and the
        map ReLU(sum_k w[k] A_k) / D. That equals ReLU of the *sum* of the per-latent
        "energy" maps before their ReLU, so it needs no per-latent gradients: its cost is
        one forward and one backward pass at any layer, where the per-latent forms cost
        D backward passes through the part of the encoder after the layer.
        ``baseline`` as in :meth:`anomaly_attention`.
        Returns ``EnergyAttention`` with the map at feature resolution (B, h, w).
        """
        images = tf.convert_to_tensor(images)
        self.check_images(images)
        if self.logvar_index is None:
            raise ValueError("anomaly attention needs the encoder's log-variance output")
        if baseline is not None:
            baseline = tf.cast(baseline, tf.float32)
        return self._run(
            self._energy_graph,
            images,
            tf.cast(normal_stats.mean, tf.float32),
            tf.cast(normal_stats.std, tf.float32),
            baseline,
        )

    def _energy_graph(self, images, normal_mean, normal_std, baseline=None):
        features, grads, mu, logvar, energy = self._energy_and_gradients(
            images, normal_mean, normal_std
        )
        weights = self._pool(grads)  # (B, K)
        features = relative_features(tf.cast(features, tf.float32), baseline)
        heatmap = tf.nn.relu(tf.einsum("bk,bhwk->bhw", weights, features))
        return EnergyAttention(
            heatmap / tf.cast(tf.shape(mu)[-1], tf.float32), mu, logvar, energy
        )

    # --- gradients for the attribution forms (keras_vae_attn/explain/forms.py) ----------
    def target_gradients(self, images, target, normal_stats, relu_latent_gradients=False):
        """Gradients of a target with respect to A, unpooled.

        ``target``: "latent" (u_i, per latent), "energy" (the Eq. 5 energy of each latent,
        its variance held at this image's value) or "total-energy" (their sum, one
        backward pass). Returns (A (B, h, w, K), grads (B, T, h, w, K), mu, logvar) with
        T = D for the per-latent targets and 1 for the total energy.
        ``relu_latent_gradients`` applies ReLU to dmu_i/dA before the per-latent factor
        (the paper's printed Eq. 3, as ``gradient_relu`` does in :meth:`explain`).
        """
        images = self._checked(images)
        mean, std = (tf.cast(v, tf.float32) for v in normal_stats)
        if target == TOTAL_ENERGY:
            return self._run(self._total_energy_gradients, images, mean, std)
        if target not in ANOMALY_SCORES:
            raise ValueError(f"unknown target {target!r}; choose one of {ANOMALY_SCORES}")
        return self._run(
            self._latent_target_gradients,
            images,
            mean,
            std,
            target,
            bool(relu_latent_gradients),
        )

    def path_gradients(self, images, normal_stats, baseline, steps):
        """Integrated-gradient ingredients for the total energy: the gradients averaged
        over ``steps`` midpoints of the straight path from ``baseline`` (h, w, K) to A,
        all path points in one batched pass. The energy along the path uses this image's
        variance (fixed), so the attributions sum to E(A) - E(baseline).
        Returns (A, mean gradients (B, 1, h, w, K), mu, logvar)."""
        images = self._checked(images)
        if self.head is None:
            raise ValueError(
                f"the integrated form needs layer {self.layer_name!r} to be a "
                "cut point of a functional encoder (no skip connection around "
                "it)"
            )
        mean, std = (tf.cast(v, tf.float32) for v in normal_stats)
        return self._run(
            self._path_gradients, images, mean, std, tf.cast(baseline, tf.float32), int(steps)
        )

    def forward(self, images):
        """(A, mu, logvar) without any gradient: what the "deviation" form needs."""
        images = self._checked(images)
        return self._run(self._forward_graph, images)

    def _checked(self, images):
        images = tf.convert_to_tensor(images)
        self.check_images(images)
        if self.logvar_index is None:
            raise ValueError("anomaly attention needs the encoder's log-variance output")
        return images

    def _forward_graph(self, images):
        with tf.GradientTape() as tape:
            features, outputs = self._forward(images, tape)
        return (
            tf.cast(features, tf.float32),
            tf.cast(outputs[self.latent_index], tf.float32),
            tf.cast(outputs[self.logvar_index], tf.float32),
        )

    def _energy_and_gradients(self, images, normal_mean, normal_std):
        """(A, dE/dA (B, h, w, K), mu, logvar, E) of the total energy, variance held."""
        with tf.GradientTape() as tape:
            features, outputs = self._forward(images, tape)
            mu = tf.cast(outputs[self.latent_index], tf.float32)
            logvar = tf.cast(outputs[self.logvar_index], tf.float32)
            mean, variance = difference_distribution(
                normal_mean, normal_std, mu, tf.exp(0.5 * logvar)
            )
            value = energy(mean, tf.stop_gradient(variance))
        grads = tf.cast(tape.gradient(value, features), tf.float32)
        return tf.cast(features, tf.float32), grads, mu, logvar, value

    def _total_energy_gradients(self, images, normal_mean, normal_std):
        features, grads, mu, logvar, _ = self._energy_and_gradients(
            images, normal_mean, normal_std
        )
        return features, grads[:, None], mu, logvar

    def _latent_target_gradients(
        self, images, normal_mean, normal_std, target, relu_latent_gradients=False
    ):
        if self.method == "stack":
            features = self.front(images, training=False)
            outputs, grads = self.stacked_gradients(features)
            mu = tf.cast(outputs[self.latent_index], tf.float32)
            logvar = outputs[self.logvar_index]
        else:
            with tf.GradientTape() as tape:
                features, outputs = self._forward(images, tape)
                mu = tf.cast(outputs[self.latent_index], tf.float32)
            grads = tape.batch_jacobian(mu, features)  # (B, D, h, w, K)
            logvar = outputs[self.logvar_index]
        grads = tf.cast(grads, tf.float32)
        if relu_latent_gradients:
            grads = tf.nn.relu(grads)
        logvar = tf.cast(logvar, tf.float32)
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

    def _path_gradients(self, images, normal_mean, normal_std, baseline, steps):
        features = tf.cast(self.front(images, training=False), tf.float32)
        outputs = _as_list(self.head(features, training=False))
        mu = tf.cast(outputs[self.latent_index], tf.float32)
        logvar = tf.cast(outputs[self.logvar_index], tf.float32)
        _, variance = difference_distribution(
            normal_mean, normal_std, mu, tf.exp(0.5 * logvar)
        )
        alphas = (tf.range(steps, dtype=tf.float32) + 0.5) / float(steps)
        path = baseline + alphas[:, None, None, None, None] * (features - baseline)[None]
        shape = tf.shape(features)
        path = tf.reshape(path, tf.concat([[-1], shape[1:]], 0))  # (m*B, h, w, K)
        with tf.GradientTape() as tape:
            tape.watch(path)
            along = _as_list(self.head(path, training=False))
            mu_path = tf.cast(along[self.latent_index], tf.float32)
            value = energy(normal_mean - mu_path, tf.tile(variance, [steps, 1]))
        grads = tf.reshape(tape.gradient(value, path), tf.concat([[steps], shape], 0))
        return features, tf.reduce_mean(grads, 0)[:, None], mu, logvar

    def fit_normal_stats(self, dataset):
        """Latent statistics of normal data; see :func:`fit_normal_stats`."""
        return fit_normal_stats(self.encoder, dataset, self.latent_index, self.logvar_index)


def relative_features(features, baseline):
    """A - baseline (B, h, w, K) when a baseline (h, w, K) is given, else A."""
    if baseline is None:
        return features
    baseline = tf.cast(baseline, tf.float32)
    if not features.shape[1:].is_compatible_with(baseline.shape):
        raise ValueError(
            f"the feature baseline's shape {tuple(baseline.shape)} differs from "
            f"this layer's feature map {tuple(features.shape[1:])}: fit it "
            "(feature_mean) on images of the size being explained"
        )
    return features - baseline


def weighted_sum(weights, features):
    """sum_k w_i[k] A_k, signed: (B, D, K) x (B, h, w, K) -> (B, D, h, w)."""
    return tf.einsum("bdk,bhwk->bdhw", weights, features)


def combine(weights, features):
    """M_i = ReLU(sum_k w_i[k] A_k): (B, D, K) x (B, h, w, K) -> (B, D, h, w)."""
    return tf.nn.relu(weighted_sum(weights, features))


def anomaly_weights(explanation, normal_stats, score="energy", sample=False, seed=None):
    """Gradient weights of u (Eq. 5) from the pooled gradients of mu, (B, D, K).

    ``u_i = z_x,i - z_y,i`` with the difference distribution of
    :func:`difference_distribution`. ``score="latent"`` back-propagates each u_i as is
    (du_i/dA = -dmu_i/dA). ``score="energy"`` (default) back-propagates the Gaussian
    energy sum_i u_i^2 / (2 var_i) split by latent, i.e. weights w_i * (-u_i / var_i):
    a dimension counts in proportion to how far the image sits from the normal data
    along it, and with the sign that points away from normal.
    """
    if score not in ANOMALY_SCORES:
        raise ValueError(f"unknown anomaly score {score!r}; choose one of {ANOMALY_SCORES}")
    if score == TOTAL_ENERGY:
        summed = tf.reduce_sum(
            anomaly_weights(explanation, normal_stats, "energy"), axis=1, keepdims=True
        )
        return summed / tf.cast(tf.shape(explanation.weights)[1], tf.float32)
    if explanation.logvar is None:
        raise ValueError("anomaly attention needs the encoder's log-variance output")
    sigma = tf.exp(0.5 * explanation.logvar)
    mean, variance = difference_distribution(
        normal_stats.mean, normal_stats.std, explanation.mu, sigma
    )
    if score == "latent":
        return -explanation.weights
    u = mean
    if sample:
        noise = tf.random.stateless_normal(tf.shape(mean), seed=seed or (0, 0))
        u = mean + tf.sqrt(variance) * noise
    return explanation.weights * (-u / variance)[..., None]


def anomaly_maps(
    explanation, normal_stats, score="energy", sample=False, seed=None, baseline=None
):
    """Per-latent anomaly maps (B, D, h, w); their mean is the anomaly attention.
    ``baseline`` (h, w, K): weigh A - baseline instead of A (module docstring)."""
    weights = anomaly_weights(explanation, normal_stats, score, sample, seed)
    return combine(weights, relative_features(explanation.features, baseline))


def upsample(maps, size):
    """Bilinear resize of (B, h, w) maps to ``size`` = (H, W)."""
    return tf.image.resize(maps[..., None], size, method="bilinear")[..., 0]


def fit_normal_stats(encoder, dataset, latent_index=0, logvar_index=1):
    """Mean and std of the aggregate posterior q(z) = mean_x q(z|x) over ``dataset``.

    std^2 = mean(sigma^2) + var(mu): the spread of the codes the encoder actually uses
    for normal data. ``dataset`` yields image batches or (images, ...) tuples.
    """
    total = total_sq = total_var = None
    count = 0
    for batch in dataset:
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        outputs = _as_list(encoder(images, training=False))
        mu = np.asarray(outputs[latent_index], dtype=np.float64)
        var = np.exp(np.asarray(outputs[logvar_index], dtype=np.float64))
        if total is None:
            total, total_sq, total_var = (np.zeros(mu.shape[1]) for _ in range(3))
        total += mu.sum(0)
        total_sq += (mu**2).sum(0)
        total_var += var.sum(0)
        count += mu.shape[0]
    if count == 0:
        raise ValueError("cannot fit normal latent statistics on an empty dataset")
    mean = total / count
    spread = np.maximum(total_sq / count - mean**2, 0.0) + total_var / count
    return NormalStats(tf.constant(mean, tf.float32), tf.constant(np.sqrt(spread), tf.float32))


def normalize_maps(maps, eps=1e-8):
    """Min-max scale each map to [0, 1] for display; (B, ..., H, W) in, same shape out."""
    maps = np.asarray(maps, dtype=np.float32)
    axes = (-2, -1)
    low = maps.min(axis=axes, keepdims=True)
    high = maps.max(axis=axes, keepdims=True)
    return (maps - low) / np.maximum(high - low, eps)
