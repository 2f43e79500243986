"""The one-class VAE: a small subclassed model around a named encoder and decoder."""

from __future__ import annotations

import functools

import keras
import numpy as np
import tensorflow as tf

from keras_vae_attn import backbones, losses
from keras_vae_attn.attention import VAEAttention
from keras_vae_attn.explain.deviation import FeatureDistribution, FeatureMoments
from keras_vae_attn.explain.latent import NormalStats, fit_normal_stats


class VAE(keras.Model):
    """VAE trained on normal data; loss = reconstruction + beta * KL.

    ``beta`` > 1 makes it a beta-VAE. After training, :meth:`fit_normal_stats` stores
    the normal data's latent mean and std as (non-trainable) weights, so they are saved,
    restored and exported with the model; until then the prior N(0, I) stands in.
    """

    def __init__(
        self, encoder, decoder, recon_loss="bce", beta=1.0, seed=0, spec=None, **kwargs
    ):
        super().__init__(**kwargs)
        if recon_loss not in losses.RECON_LOSSES:
            raise ValueError(
                f"unknown reconstruction loss {recon_loss!r}; "
                f"choose one of {losses.RECON_LOSSES}"
            )
        self.encoder = encoder
        self.decoder = decoder
        self.recon_loss = recon_loss
        self.beta = float(beta)
        self.spec = dict(spec or {})
        self.latent_dim = int(encoder.outputs[1].shape[-1])
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.normal_mean = self.add_weight(
            shape=(self.latent_dim,), initializer="zeros", trainable=False, name="normal_mean"
        )
        self.normal_std = self.add_weight(
            shape=(self.latent_dim,), initializer="ones", trainable=False, name="normal_std"
        )
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.recon_tracker = keras.metrics.Mean(name="recon")
        self.kl_tracker = keras.metrics.Mean(name="kl")
        self._explainers = {}
        self._distributions = {}  # layer name -> (mean, std[, whiten, colour]) weights

    @property
    def metrics(self):
        return [self.loss_tracker, self.recon_tracker, self.kl_tracker]

    def encode(self, images, training=False):
        """(mu, logvar) of q(z|x)."""
        mu, logvar = self.encoder(images, training=training)
        return mu, logvar

    def sample_latent(self, mu, logvar):
        """Reparameterised draw z = mu + sigma * eps, seeded by the model's generator.

        Under a distribution strategy each replica folds its id into the seed, so the
        replicas draw different noise instead of repeating one pattern.
        """
        return mu + tf.exp(0.5 * logvar) * self.normal_noise(tf.shape(mu), mu.dtype)

    def next_seed(self):
        """The next stateless seed, with the replica id folded in so that replicas under a
        tf.distribute strategy draw different numbers from the same generator state."""
        seed = self.seed_generator.next()
        context = tf.distribute.get_replica_context()
        if context is not None:
            seed = seed + tf.cast(tf.stack([0, context.replica_id_in_sync_group]), seed.dtype)
        return seed

    def normal_noise(self, shape, dtype=tf.float32):
        """Seeded N(0, 1) noise, distinct per replica (see :meth:`sample_latent`)."""
        return tf.random.stateless_normal(shape, seed=self.next_seed(), dtype=dtype)

    def decode(self, z, training=False):
        """Reconstruction in [0, 1]."""
        return tf.sigmoid(tf.cast(self.decoder(z, training=training), tf.float32))

    def call(self, images, training=False):
        mu, logvar = self.encode(images, training=training)
        z = self.sample_latent(mu, logvar) if training else mu
        return self.decode(z, training=training)

    def vae_losses(self, images, training):
        """Per-example reconstruction and KL terms, plus the codes (for subclasses)."""
        mu, logvar = self.encode(images, training=training)
        z = self.sample_latent(mu, logvar)
        logits = self.decoder(z, training=training)
        recon = losses.reconstruction_loss(images, logits, self.recon_loss)
        kl = losses.kl_divergence(mu, logvar)
        return recon, kl, z

    def _images(self, data):
        return data[0] if isinstance(data, (tuple, list)) else data

    def train_step(self, data):
        images = self._images(data)
        with tf.GradientTape() as tape:
            recon, kl, _ = self.vae_losses(images, training=True)
            per_example = recon + self.beta * kl
            loss = losses.replica_mean(per_example)
        variables = self.encoder.trainable_variables + self.decoder.trainable_variables
        grads = tape.gradient(loss, variables)
        self.optimizer.apply_gradients(zip(grads, variables))
        return self._update_trackers(per_example, recon, kl)

    def test_step(self, data):
        images = self._images(data)
        recon, kl, _ = self.vae_losses(images, training=False)
        return self._update_trackers(recon + self.beta * kl, recon, kl)

    def _update_trackers(self, per_example, recon, kl):
        self.loss_tracker.update_state(per_example)
        self.recon_tracker.update_state(recon)
        self.kl_tracker.update_state(kl)
        return self.step_logs()

    def step_logs(self):
        """The logs a train/test step returns: every tracker's current result.

        Under MultiWorkerMirroredStrategy Keras 3 reduces step outputs with a MEAN over
        axis 0, which fails on scalars; there each value travels as a (1,) vector and
        comes out of that reduction a scalar again.
        """
        logs = {m.name: m.result() for m in self.metrics}
        if isinstance(tf.distribute.get_strategy(), tf.distribute.MultiWorkerMirroredStrategy):
            logs = {name: tf.reshape(value, [1]) for name, value in logs.items()}
        return logs

    # --- explanations ---------------------------------------------------------------
    def explainer(self, layer="last", gradient_relu=False, method="auto"):
        """The :class:`VAEAttention` for ``layer`` (cached): the same API users call.

        ``method`` picks how the D backward passes are batched (see VAEAttention); the
        maps are the same either way. Exporters ask for "stack", whose gradient ops
        all convert to ONNX.
        """
        key = (layer, gradient_relu) if method == "auto" else (layer, gradient_relu, method)
        if key not in self._explainers:
            self._explainers[key] = VAEAttention(
                self.encoder, layer=layer, gradient_relu=gradient_relu, method=method
            )
        return self._explainers[key]

    def normal_stats(self):
        """The stored normal-data latent statistics (the prior until fitted)."""
        return NormalStats(
            tf.convert_to_tensor(self.normal_mean), tf.convert_to_tensor(self.normal_std)
        )

    def fit_feature_distributions(self, dataset, layers, covariance=False):
        """Measure and store the normal feature distribution (mean and std per position
        and channel; with ``covariance`` also the whitening of the channel covariance at
        each position) of each of ``layers`` over ``dataset`` (un-augmented normal image
        batches), streamed batch by batch. Stored as non-trainable weights, so it is
        saved, restored and exported with the model.

        In the same pass it fits the distributions of what the VAE fails to reconstruct
        (:data:`PIXELS`: x - decode(mu) per pixel and channel; ``residual_<layer>``:
        A(x) - A(decode(mu)) per position and channel), which the maps that need the
        decoder read (forms "recon-deviation" and "feature-residual", ``gate="recon"``).
        """
        explainers = [self.explainer(layer) for layer in layers]
        names = [e.layer_name for e in explainers]
        moments = {name: FeatureMoments(covariance) for name in names}
        moments.update(
            {PIXELS: FeatureMoments()},
            **{residual_key(name): FeatureMoments() for name in names},
        )
        spec = tf.TensorSpec((None, *self.encoder.inputs[0].shape[1:]), tf.float32)
        # a partial of a module function, not a lambda: one traced function per call, and
        # TensorFlow counts traces per function source (twins and cascades call this often)
        statistics_of = tf.function(
            functools.partial(_normal_statistics, self, explainers), input_signature=[spec]
        )
        for batch in dataset:
            images = batch[0] if isinstance(batch, (tuple, list)) else batch
            features, residuals, pixels = statistics_of(tf.cast(images, tf.float32))
            moments[PIXELS].update(pixels.numpy())
            for name, value, residual in zip(names, features, residuals):
                moments[name].update(value.numpy())
                moments[residual_key(name)].update(residual.numpy())
        for name, moment in moments.items():
            whitening = moment.whitening() if covariance and name in names else ()
            self.store_feature_distribution(name, moment.result() + whitening)
        return {name: self.feature_distribution(name) for name in names}

    def residual_distribution(self, layer=None):
        """The normal distribution of the reconstruction residual: of the pixels
        (``layer`` None) or of ``layer``'s features (see fit_feature_distributions)."""
        key = PIXELS if layer is None else residual_key(self.explainer(layer).layer_name)
        if key not in self._distributions:
            raise ValueError(
                f"no normal reconstruction-residual distribution for "
                f"{'the pixels' if layer is None else repr(layer)}: fit it with "
                "model.fit_feature_distributions(normal_images, layers) "
                "(models saved before it re-fit on loading)"
            )
        return FeatureDistribution(
            *(tf.convert_to_tensor(w) for w in self._distributions[key])
        )

    def has_residual_distribution(self, layers=()):
        return PIXELS in self._distributions and all(
            residual_key(self.explainer(n).layer_name) in self._distributions for n in layers
        )

    def store_feature_distribution(self, layer, values):
        """Store (mean, std) or (mean, std, whiten, colour) arrays for ``layer``."""
        self.add_feature_distribution(layer, values[0].shape, len(values) == 4)
        for weight, value in zip(self._distributions[layer], values):
            weight.assign(value)

    def add_feature_distribution(self, layer, shape, covariance=False):
        """Create the (mean, std[, whiten, colour]) weights of ``layer`` if missing (the
        model's state is locked once built, so it is unlocked for this one addition)."""
        have = self._distributions.get(layer, ())
        parts = [("mean", "zeros", shape), ("std", "ones", shape)]
        if covariance:
            square = (*shape, shape[-1])
            parts += [("whiten", "zeros", square), ("colour", "zeros", square)]
        if len(have) >= len(parts):
            return
        tracker = getattr(self, "_tracker", None)
        if tracker is not None:
            tracker.unlock()
        try:
            self._distributions[layer] = tuple(have) + tuple(
                self.add_weight(
                    shape=tuple(int(d) for d in size),
                    initializer=init,
                    trainable=False,
                    name=f"feature_{part}_{layer}",
                )
                for part, init, size in parts[len(have) :]
            )
        finally:
            if tracker is not None:
                tracker.lock()
        covariances = [n for n in self.feature_layers if len(self._distributions[n]) == 4]
        self.spec["feature_layers"] = list(self._distributions)
        if covariances:
            self.spec["feature_covariance_layers"] = covariances

    @property
    def feature_layers(self):
        """Layers with a fitted normal feature distribution, in fitting order (the
        reconstruction residuals' distributions are stored beside them)."""
        return [
            key
            for key in self._distributions
            if key != PIXELS and not key.startswith(residual_key(""))
        ]

    def has_feature_distribution(self, layer, covariance=False):
        """Whether a normal feature distribution (with the covariance, if asked) is
        stored for ``layer`` ("last" resolved)."""
        stored = self._distributions.get(self.explainer(layer).layer_name, ())
        return len(stored) >= (4 if covariance else 2)

    def feature_distribution(self, layer):
        """The stored :class:`FeatureDistribution` of ``layer`` (variables, so a traced
        graph reads them and exports carry them); a clear error when none is stored."""
        name = layer if layer in self._distributions else self.explainer(layer).layer_name
        if name not in self._distributions:
            fitted = ", ".join(self.feature_layers) or "none"
            raise ValueError(
                f"no normal feature distribution for layer {name!r} (fitted: "
                f"{fitted}); fit it first: model.fit_feature_distributions("
                f"normal_images, [{name!r}])"
            )
        return FeatureDistribution(
            *(tf.convert_to_tensor(w) for w in self._distributions[name])
        )

    def fit_normal_statistics(self, dataset, layers, covariance=False):
        """Everything a map needs from the normal data, fitted over ``dataset``
        (un-augmented normal image batches): the latent statistics of Eq. 5 and the
        feature distributions of ``layers``. One call for a trained model and for its
        randomized twin (keras_vae_attn/explain/sanity.py), so both are fitted alike."""
        self.fit_normal_stats(dataset)
        if layers:
            self.fit_feature_distributions(dataset, list(layers), covariance)

    def fit_normal_stats(self, dataset):
        """Measure and store the normal data's latent statistics; returns them."""
        stats = fit_normal_stats(self.encoder, dataset)
        self.normal_mean.assign(stats.mean)
        self.normal_std.assign(stats.std)
        return stats


#: the key of the pixel reconstruction residual's distribution
PIXELS = "pixels"


def residual_key(layer_name):
    """The key of ``layer_name``'s feature reconstruction residual's distribution."""
    return f"residual_{layer_name}"


def _normal_statistics(model, explainers, images):
    """Per explainer: the features, and the feature residual A(x) - A(decode(mu)); and
    the pixel residual x - decode(mu): one batch of what fit_feature_distributions
    accumulates."""
    features = [e.forward(images)[0] for e in explainers]
    mu, _ = model.encode(images)
    reconstruction = model.decode(mu)
    residuals = [f - e.forward(reconstruction)[0] for f, e in zip(features, explainers)]
    return features, residuals, images - reconstruction


def build_vae(
    backbone="small",
    input_shape=(28, 28, 1),
    latent_dim=16,
    filters=None,
    dense_units=256,
    recon_loss="bce",
    beta=1.0,
    seed=0,
):
    """Build a VAE from a plain-dict spec; the spec is saved with the weights."""
    spec = dict(
        backbones.backbone_spec(backbone, input_shape, latent_dim, filters, dense_units),
        recon_loss=recon_loss,
        beta=float(beta),
        seed=int(seed),
    )
    encoder, decoder = backbones.build_backbone(
        backbone, tuple(input_shape), latent_dim, filters=filters, dense_units=dense_units
    )
    model = VAE(encoder, decoder, recon_loss=recon_loss, beta=beta, seed=seed, spec=spec)
    model(np.zeros((1, *input_shape), np.float32))
    return model
