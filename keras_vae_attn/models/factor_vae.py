"""FactorVAE (Kim & Mnih 2018) with the attention disentanglement loss L_AD (Eq. 6-7).

loss = recon + beta * KL + gamma * TC + lambda_ad * L_AD, where TC is read off a
discriminator that tells codes z ~ q(z) from codes whose dimensions were shuffled across
the batch (a sample of prod_j q(z_j)), and L_AD is the overlap of the attention maps of two
latent dimensions of the same image. The discriminator has its own optimizer.

L_AD keeps the maps differentiable through the gradient weights w_i (a GradientTape
nested inside the training tape: second order). Which two dimensions: by default the two
with the highest *response*, the total mass sum_hw M_i of their map, i.e. the two latents
whose codes depend most on this image's features (|mu_i| would instead rank distance from
the prior mean, which says nothing about where a latent looks); random distinct pairs are
an option, and so is first order only (w_i treated as constants).

The maps L_AD compares are the paper's ReLU(sum_k w_i[k] A_k) by default. Measured on
dSprites (bench/RESULTS.md), training satisfies that L_AD by *emptying* maps: weights
whose weighted sum is negative everywhere give an all-zero map, which overlaps nothing.
``ad_maps="abs"`` compares |sum_k w_i[k] A_k| instead: a map can then only vanish where
the latent does not depend on the features at all. That still leaves a magnitude
shortcut: a second map much weaker than the first also overlaps little.
``ad_maps="normalized"`` scales each of the two abs maps to unit mass before comparing, so
L_AD = sum_hw min(p_1, p_2) can only fall by separating *where* the latents look.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from keras_vae_attn import backbones, losses
from keras_vae_attn.explain import forms
from keras_vae_attn.explain.gradients import stacked_gradients
from keras_vae_attn.models.vae import VAE

PAIR_MODES = ("top", "random")
AD_MAPS = ("relu", "abs", "normalized")


def build_discriminator(latent_dim, units=1000, depth=6, name="discriminator"):
    """MLP z (B, D) -> logits (B, 2) for [from q(z), from the permuted codes]."""
    inputs = keras.Input(shape=(latent_dim,), name="z")
    x = inputs
    for index in range(1, depth + 1):
        x = keras.layers.Dense(units, name=f"dense{index}")(x)
        x = keras.layers.LeakyReLU(negative_slope=0.2, name=f"lrelu{index}")(x)
    logits = keras.layers.Dense(2, name="logits")(x)
    return keras.Model(inputs, logits, name=name)


def permute_dims(z, seed):
    """Shuffle each latent dimension independently across the batch, (B, D) -> (B, D).

    Stateless: the same seed gives the same permutation.
    """
    keys = tf.random.stateless_uniform(tf.shape(z), seed=seed)
    order = tf.argsort(keys, axis=0)  # (B, D): a column each
    return tf.transpose(tf.gather(tf.transpose(z), tf.transpose(order), batch_dims=1))


def top_pair(maps):
    """The two latent dims with the largest map mass per image: (B, D, h, w) -> (B, 2)."""
    response = tf.reduce_sum(maps, axis=[2, 3])
    return tf.math.top_k(response, k=2).indices


def random_pair(batch, depth, seed):
    """Two distinct latent dims per image, uniformly, (B, 2) int32."""
    first = tf.random.stateless_uniform([batch], seed=seed, maxval=depth, dtype=tf.int32)
    shift = tf.random.stateless_uniform(
        [batch], seed=seed + 1, minval=1, maxval=depth, dtype=tf.int32
    )
    return tf.stack([first, (first + shift) % depth], axis=1)


def pair_maps(maps, pair):
    """The two selected maps per image: (B, D, h, w), (B, 2) -> two (B, h, w)."""
    chosen = tf.gather(maps, pair, axis=1, batch_dims=1)  # (B, 2, h, w)
    return chosen[:, 0], chosen[:, 1]


def unit_mass(maps, eps=1e-8):
    """Each non-negative map (B, h, w) divided by its sum: where it looks, not how much."""
    return maps / (tf.reduce_sum(maps, axis=[1, 2], keepdims=True) + eps)


class FactorVAE(VAE):
    """VAE + gamma * TC (discriminator) + lambda_ad * L_AD; ``lambda_ad=0`` is FactorVAE."""

    def __init__(
        self,
        encoder,
        decoder,
        discriminator,
        gamma=40.0,
        lambda_ad=0.0,
        ad_layer="last",
        ad_pairs="top",
        ad_second_order=True,
        ad_maps="relu",
        **kwargs,
    ):
        super().__init__(encoder, decoder, **kwargs)
        if ad_pairs not in PAIR_MODES:
            raise ValueError(f"unknown ad_pairs {ad_pairs!r}; choose one of {PAIR_MODES}")
        if ad_maps not in AD_MAPS:
            raise ValueError(f"unknown ad_maps {ad_maps!r}; choose one of {AD_MAPS}")
        if lambda_ad and self.latent_dim < 2:
            raise ValueError(f"L_AD needs at least 2 latent dims, got {self.latent_dim}")
        self.discriminator = discriminator
        self.gamma = float(gamma)
        self.lambda_ad = float(lambda_ad)
        self.ad_layer = ad_layer
        self.ad_pairs = ad_pairs
        self.ad_second_order = bool(ad_second_order)
        self.ad_maps = ad_maps
        self.d_optimizer = None
        if self.lambda_ad:
            split = self.explainer(ad_layer)
            if split.head is None:
                raise ValueError(
                    f"L_AD needs encoder layer {split.layer_name!r} to be a cut "
                    "point (nothing after it may read earlier tensors)"
                )
        self.tc_tracker = keras.metrics.Mean(name="tc")
        self.d_loss_tracker = keras.metrics.Mean(name="d_loss")
        self.ad_tracker = keras.metrics.Mean(name="l_ad")

    @property
    def metrics(self):
        return super().metrics + [self.tc_tracker, self.d_loss_tracker, self.ad_tracker]

    def compile(self, optimizer=None, d_optimizer=None, **kwargs):
        """Adam(1e-4, 0.9/0.999) for the VAE and Adam(1e-4, 0.5/0.9) for the discriminator
        unless given. Both are built here: a second optimizer left to build itself inside
        the first (distributed) train step would create variables there and fail."""
        optimizer = optimizer or keras.optimizers.Adam(1e-4, beta_1=0.9, beta_2=0.999)
        super().compile(optimizer=optimizer, **kwargs)
        self.d_optimizer = d_optimizer or keras.optimizers.Adam(1e-4, beta_1=0.5, beta_2=0.9)
        self.optimizer.build(self.vae_variables)
        self.d_optimizer.build(self.discriminator.trainable_variables)

    @property
    def vae_variables(self):
        return self.encoder.trainable_variables + self.decoder.trainable_variables

    # --- L_AD --------------------------------------------------------------------------
    def latent_maps_differentiable(self, images, training=False):
        """(mu, logvar, maps (B, D, h, w)) with the maps differentiable w.r.t. the weights.

        One encoder pass up to the attention layer; the (cheap) rest of the encoder runs
        on D stacked copies of the feature map, each back-propagating one latent, inside
        an inner tape. Called under an outer tape, that tape sees the inner gradient as
        part of the forward computation (second order), unless ``ad_second_order`` is off.
        """
        split = self.explainer(self.ad_layer)
        features = split.front(images, training=training)
        (mu, logvar), grads = stacked_gradients(split, features, training=training)
        dtype = tf.float64 if features.dtype == tf.float64 else tf.float32  # >= float32
        weights = forms.pooled(tf.cast(grads, dtype))  # (B, D, K)
        if not self.ad_second_order:
            weights = tf.stop_gradient(weights)
        signed = forms.weigh(weights, tf.cast(features, dtype))
        maps = tf.nn.relu(signed) if self.ad_maps == "relu" else tf.abs(signed)
        return mu, logvar, maps

    def choose_pair(self, maps):
        """(B, 2) latent dims whose maps L_AD pushes apart (see the module docstring)."""
        if self.ad_pairs == "top":
            return top_pair(tf.stop_gradient(maps))
        seed = self.next_seed()
        return random_pair(tf.shape(maps)[0], self.latent_dim, seed)

    def attention_loss(self, maps):
        """Per-example L_AD (B,) of the chosen pair of the maps (B, D, h, w)."""
        first, second = pair_maps(maps, self.choose_pair(maps))
        if self.ad_maps == "normalized":
            first, second = unit_mass(first), unit_mass(second)
        return losses.attention_overlap(first, second)

    # --- training ----------------------------------------------------------------------
    def forward_losses(self, images, training):
        """Per-example recon, KL, L_AD (zeros without it) and the sampled codes z."""
        if not self.lambda_ad:
            recon, kl, z = self.vae_losses(images, training)
            return recon, kl, tf.zeros_like(recon), z
        mu, logvar, maps = self.latent_maps_differentiable(images, training)
        z = self.sample_latent(mu, logvar)
        logits = self.decoder(z, training=training)
        recon = losses.reconstruction_loss(images, logits, self.recon_loss)
        kl = losses.kl_divergence(mu, logvar)
        return recon, kl, self.attention_loss(maps), z

    def total_correlation(self, z, training=False):
        """Per-example TC estimate logit(real) - logit(permuted) of the discriminator."""
        logits = tf.cast(self.discriminator(z, training=training), tf.float32)
        return logits[:, 0] - logits[:, 1]

    def discriminator_loss(self, z, training=True):
        """Per-example cross-entropy of telling z (class 0) from permuted z (class 1)."""
        z = tf.stop_gradient(z)
        shuffled = permute_dims(z, self.next_seed())
        real = tf.cast(self.discriminator(z, training=training), tf.float32)
        fake = tf.cast(self.discriminator(shuffled, training=training), tf.float32)
        zeros = tf.zeros(tf.shape(real)[:1], tf.int32)
        xent = keras.losses.sparse_categorical_crossentropy
        return 0.5 * (
            xent(zeros, real, from_logits=True) + xent(zeros + 1, fake, from_logits=True)
        )

    def train_step(self, data):
        images = self._images(data)
        with tf.GradientTape() as tape:
            recon, kl, overlap, z = self.forward_losses(images, training=True)
            tc = self.total_correlation(z, training=True)
            per_example = recon + self.beta * kl + self.gamma * tc + self.lambda_ad * overlap
            loss = losses.replica_mean(per_example)
        grads = tape.gradient(loss, self.vae_variables)
        self.optimizer.apply_gradients(zip(grads, self.vae_variables))

        with tf.GradientTape() as d_tape:
            d_per_example = self.discriminator_loss(z)
            d_loss = losses.replica_mean(d_per_example)
        d_variables = self.discriminator.trainable_variables
        d_grads = d_tape.gradient(d_loss, d_variables)
        self.d_optimizer.apply_gradients(zip(d_grads, d_variables))
        return self._update_factor_trackers(per_example, recon, kl, tc, d_per_example, overlap)

    def test_step(self, data):
        images = self._images(data)
        recon, kl, z = self.vae_losses(images, training=False)
        tc = self.total_correlation(z)
        d_per_example = self.discriminator_loss(z, training=False)
        return self._update_factor_trackers(
            recon + self.beta * kl + self.gamma * tc,
            recon,
            kl,
            tc,
            d_per_example,
            tf.zeros_like(recon),
        )

    def _update_factor_trackers(self, per_example, recon, kl, tc, d_loss, overlap):
        self.tc_tracker.update_state(tc)
        self.d_loss_tracker.update_state(d_loss)
        self.ad_tracker.update_state(overlap)
        return self._update_trackers(per_example, recon, kl)


def build_factor_vae(
    backbone="factorvae",
    input_shape=(64, 64, 1),
    latent_dim=10,
    filters=(32, 32, 64, 64),
    dense_units=128,
    recon_loss="bce",
    beta=1.0,
    gamma=40.0,
    lambda_ad=0.0,
    ad_layer="last",
    ad_pairs="top",
    ad_second_order=True,
    d_units=1000,
    d_depth=6,
    seed=0,
    ad_maps="relu",
):
    """Build a FactorVAE (an AD-FactorVAE when ``lambda_ad`` > 0) from a plain-dict spec.

    Defaults are the FactorVAE paper's dSprites net: conv 32-32-64-64, dense 128, 10
    latents, a 6 x 1000 discriminator.
    """
    spec = dict(
        backbones.backbone_spec(backbone, input_shape, latent_dim, filters, dense_units),
        recon_loss=recon_loss,
        beta=float(beta),
        gamma=float(gamma),
        lambda_ad=float(lambda_ad),
        ad_layer=ad_layer,
        ad_pairs=ad_pairs,
        ad_second_order=bool(ad_second_order),
        d_units=int(d_units),
        d_depth=int(d_depth),
        seed=int(seed),
        ad_maps=ad_maps,
    )
    encoder, decoder = backbones.build_backbone(
        backbone, tuple(input_shape), latent_dim, filters=filters, dense_units=dense_units
    )
    discriminator = build_discriminator(latent_dim, d_units, d_depth)
    model = FactorVAE(
        encoder,
        decoder,
        discriminator,
        gamma=gamma,
        lambda_ad=lambda_ad,
        ad_layer=ad_layer,
        ad_pairs=ad_pairs,
        ad_second_order=ad_second_order,
        ad_maps=ad_maps,
        recon_loss=recon_loss,
        beta=beta,
        seed=seed,
        spec=spec,
    )
    model(np.zeros((1, *input_shape), np.float32))
    model.discriminator(np.zeros((1, latent_dim), np.float32))
    return model
