"""The attention math: batched maps equal per-latent references and closed forms."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_vae_attn import attention as attn
from keras_vae_attn.models import build_vae

RNG = np.random.default_rng(0)


def images(batch, size=28, channels=1):
    return RNG.random((batch, size, size, channels)).astype("float32")


def reference_weights(encoder, layer, x):
    """One tape.gradient per latent dimension: the slow, obvious way."""
    model = keras.Model(encoder.input, encoder.get_layer(layer).output)
    head = keras.Model(encoder.get_layer(layer).output, encoder.outputs)
    features = model(x)
    rows = []
    for i in range(encoder.outputs[0].shape[-1]):
        with tf.GradientTape() as tape:
            tape.watch(features)
            mu = head(features)[0]
            target = tf.reduce_sum(mu[:, i])
        grads = tape.gradient(target, features)
        rows.append(tf.reduce_mean(grads, axis=[1, 2]))
    return features.numpy(), tf.stack(rows, axis=1).numpy()


@pytest.fixture(scope="module")
def vae():
    keras.utils.set_random_seed(0)  # the same weights whatever ran before
    return build_vae("small", (28, 28, 1), latent_dim=6, filters=(8, 16), dense_units=32)


@pytest.mark.parametrize("layer", ["conv1", "conv2"])
def test_batched_maps_equal_per_latent_loop(vae, layer):
    x = images(3)
    features, weights = reference_weights(vae.encoder, layer, x)
    expected = np.maximum(np.einsum("bdk,bhwk->bdhw", weights, features), 0)
    explanation = vae.explainer(layer).explain(x)
    np.testing.assert_allclose(explanation.weights.numpy(), weights, atol=1e-5)
    np.testing.assert_allclose(explanation.latent_maps.numpy(), expected, atol=1e-5)
    assert explanation.latent_maps.shape == (3, 6, *features.shape[1:3])


def linear_head_encoder(latent=4):
    """conv (the layer A) -> flatten -> dense: the head after A is linear."""
    inputs = keras.Input((12, 12, 2))
    feat = keras.layers.Conv2D(3, 3, padding="same", activation="relu", name="feat")(inputs)
    flat = keras.layers.Flatten()(feat)
    mu = keras.layers.Dense(latent, name="mu")(flat)
    logvar = keras.layers.Dense(latent, name="logvar")(flat)
    return keras.Model(inputs, [mu, logvar])


def test_linear_head_matches_closed_form():
    encoder = linear_head_encoder()
    x = RNG.random((2, 12, 12, 2)).astype("float32")
    kernel = encoder.get_layer("mu").kernel.numpy().reshape(12, 12, 3, 4)
    closed_weights = kernel.mean(axis=(0, 1)).T  # (D, K)
    features = keras.Model(encoder.input, encoder.get_layer("feat").output)(x).numpy()
    closed_maps = np.maximum(np.einsum("dk,bhwk->bdhw", closed_weights, features), 0)
    explainer = attn.VAEAttention(encoder, layer="feat")
    np.testing.assert_allclose(explainer.latent_maps(x).numpy(), closed_maps, atol=1e-5)
    overall = explainer.attention(x).numpy()
    assert overall.shape == (2, 12, 12)  # same size: no resize
    np.testing.assert_allclose(overall, closed_maps.mean(axis=1), atol=1e-5)


def test_gradient_relu_reading_pools_positive_gradients_only():
    encoder = linear_head_encoder()
    x = RNG.random((2, 12, 12, 2)).astype("float32")
    kernel = encoder.get_layer("mu").kernel.numpy().reshape(12, 12, 3, 4)
    expected = np.maximum(kernel, 0).mean(axis=(0, 1)).T
    weights = attn.VAEAttention(encoder, "feat", gradient_relu=True).explain(x).weights
    np.testing.assert_allclose(
        weights.numpy(), np.broadcast_to(expected, (2, 4, 3)), atol=1e-6
    )


def test_maps_are_nonnegative_finite_and_upsampled(vae):
    x = images(4)
    explainer = vae.explainer("conv2")
    overall = explainer.attention(x).numpy()
    stats = attn.NormalStats(tf.zeros(6), tf.ones(6))
    anomaly = explainer.anomaly_attention(x, stats).numpy()
    for maps in (overall, anomaly, explainer.latent_maps(x).numpy()):
        assert np.isfinite(maps).all() and (maps >= 0).all()
    assert overall.shape == anomaly.shape == (4, 28, 28)
    assert overall.max() > 0


def test_difference_distribution_follows_eq5():
    mean, var = attn.difference_distribution([1.0, -2.0], [0.5, 2.0], [0.25, 1.0], [1.5, 0.1])
    np.testing.assert_allclose(mean.numpy(), [0.75, -3.0])
    np.testing.assert_allclose(var.numpy(), [0.25 + 2.25, 4.0 + 0.01], rtol=1e-6)


def test_anomaly_weights_scale_pooled_gradients_by_standardised_deviation(vae):
    x = images(2)
    explanation = vae.explainer("conv2").explain(x)
    stats = attn.NormalStats(
        tf.constant(RNG.normal(size=6), tf.float32),
        tf.constant(RNG.uniform(0.5, 2.0, 6), tf.float32),
    )
    mu, sigma = explanation.mu.numpy(), np.exp(0.5 * explanation.logvar.numpy())
    factor = -(stats.mean.numpy() - mu) / (stats.std.numpy() ** 2 + sigma**2)
    energy = attn.anomaly_weights(explanation, stats).numpy()
    np.testing.assert_allclose(
        energy, explanation.weights.numpy() * factor[..., None], rtol=1e-5, atol=1e-8
    )
    latent = attn.anomaly_weights(explanation, stats, score="latent").numpy()
    np.testing.assert_allclose(latent, -explanation.weights.numpy())
    with pytest.raises(ValueError, match="unknown anomaly score"):
        attn.anomaly_weights(explanation, stats, score="bogus")


@pytest.mark.parametrize(
    "layer, hooked", [("conv1", False), ("conv2", False), ("conv1", True)]
)
def test_total_energy_map_from_one_pass_equals_relu_of_summed_energy_maps(vae, layer, hooked):
    x = images(3)
    stats = attn.NormalStats(
        tf.constant(RNG.normal(size=6), tf.float32),
        tf.constant(RNG.uniform(0.5, 2.0, 6), tf.float32),
    )
    explainer = attn.VAEAttention(vae.encoder, layer)
    if hooked:
        explainer.head, explainer.method = None, "hooked"  # as for a subclassed encoder
    explanation = explainer.explain(x)
    per_latent = tf.einsum(
        "bdk,bhwk->bdhw", attn.anomaly_weights(explanation, stats), explanation.features
    ).numpy()
    expected = np.maximum(per_latent.sum(axis=1), 0) / 6
    fast = explainer.energy_attention(x, stats)
    assert expected.max() > 0
    np.testing.assert_allclose(
        fast.heatmap.numpy(), expected, rtol=1e-4, atol=1e-6 * expected.max()
    )
    np.testing.assert_allclose(fast.mu.numpy(), explanation.mu.numpy(), atol=1e-6)
    # the same map derived from the per-latent weights, and through anomaly_attention
    derived = attn.anomaly_maps(explanation, stats, attn.TOTAL_ENERGY).numpy()[:, 0]
    np.testing.assert_allclose(derived, expected, rtol=1e-4, atol=1e-6 * expected.max())
    upsampled = explainer.anomaly_attention(x, stats, score=attn.TOTAL_ENERGY)
    assert upsampled.shape == (3, 28, 28)
    with pytest.raises(ValueError, match="per-latent score"):
        explainer.anomaly_attention(x, stats, score=attn.TOTAL_ENERGY, sample=True)


def test_scoring_with_total_energy_skips_per_latent_outputs_unless_asked(vae):
    from keras_vae_attn.explain import pipeline

    x = images(3)
    full = pipeline.explain_anomaly(vae, x, "conv1", score=attn.TOTAL_ENERGY)
    lean = pipeline.explain_anomaly(
        vae, x, "conv1", score=attn.TOTAL_ENERGY, keys=("heatmap", "recon_error")
    )
    assert set(lean) == {"heatmap", "recon_error"} and "per_latent" in full
    np.testing.assert_allclose(
        lean["heatmap"].numpy(), full["heatmap"].numpy(), rtol=1e-4, atol=1e-6
    )
    for size in (1, 2):  # 2: the last batch is padded, then trimmed
        batched = pipeline.batched(
            vae, x, size, "conv1", keys=("heatmap", "score"), score=attn.TOTAL_ENERGY
        )
        assert batched["heatmap"].shape == (3, 28, 28) and batched["score"].shape == (3,)
        np.testing.assert_allclose(
            batched["heatmap"], full["heatmap"].numpy(), rtol=1e-4, atol=1e-6
        )


def test_sampled_anomaly_weights_are_seeded(vae):
    explanation = vae.explainer("conv2").explain(images(2))
    stats = vae.normal_stats()
    first = attn.anomaly_weights(explanation, stats, sample=True, seed=(1, 2)).numpy()
    again = attn.anomaly_weights(explanation, stats, sample=True, seed=(1, 2)).numpy()
    other = attn.anomaly_weights(explanation, stats, sample=True, seed=(3, 4)).numpy()
    np.testing.assert_array_equal(first, again)
    assert not np.allclose(first, other)


@pytest.mark.parametrize("layer", ["conv1", "conv2"])
def test_every_batching_method_gives_the_same_weights(vae, layer):
    x = images(3)
    results = {}
    for method in ("stack", "jacobian"):
        explainer = attn.VAEAttention(vae.encoder, layer, method=method)
        assert explainer.method == method
        results[method] = explainer.explain(x).weights.numpy()
    hooked = attn.VAEAttention(vae.encoder, layer)
    hooked.head, hooked.method = None, "hooked"  # as for a subclassed encoder
    results["hooked"] = hooked.explain(x).weights.numpy()
    np.testing.assert_allclose(results["jacobian"], results["stack"], atol=1e-6)
    np.testing.assert_allclose(results["hooked"], results["stack"], atol=1e-6)


def test_auto_method_stacks_light_heads_and_vectorizes_convolutional_ones(vae):
    assert vae.explainer("conv2").method == "stack"  # flatten + dense after conv2
    assert vae.explainer("conv1").method == "jacobian"  # conv2 still to come
    with pytest.raises(ValueError, match="unknown method 'fast'"):
        attn.VAEAttention(vae.encoder, "conv1", method="fast")


def test_layer_inside_a_residual_block_uses_the_jacobian_path():
    model = build_vae("resnet18", (32, 32, 3), latent_dim=3)
    explainer = model.explainer("layer2_block0_relu_a")
    assert explainer.head is None and explainer.method == "jacobian"  # shortcut bypasses it
    assert explainer.tapped is not None  # A read as an extra output
    maps = explainer.latent_maps(RNG.random((2, 32, 32, 3)).astype("float32"))
    assert maps.shape == (2, 3, 4, 4) and np.isfinite(maps.numpy()).all()


def test_unknown_layer_lists_valid_names(vae):
    with pytest.raises(ValueError, match=r"'conv9'.*valid names: conv1, conv2"):
        vae.explainer("conv9")


def test_wrong_rank_and_channels_are_refused(vae):
    explainer = vae.explainer("conv2")
    with pytest.raises(ValueError, match="4-D batch"):
        explainer.attention(np.zeros((28, 28, 1), np.float32))
    with pytest.raises(ValueError, match="3 channels but encoder"):
        explainer.attention(np.zeros((1, 28, 28, 3), np.float32))


def test_fit_normal_stats_is_the_aggregate_posterior():
    inputs = keras.Input((2,))
    encoder = keras.Model(inputs, [inputs * 1.0, inputs * 0.0 + 0.5])  # mu = x, logvar = .5
    data = np.array([[1.0, 2.0], [3.0, -2.0], [5.0, 0.0]], np.float32)
    stats = attn.fit_normal_stats(encoder, tf.data.Dataset.from_tensor_slices(data).batch(2))
    np.testing.assert_allclose(stats.mean.numpy(), data.mean(0), rtol=1e-6)
    expected_std = np.sqrt(data.var(0) + np.exp(0.5))
    np.testing.assert_allclose(stats.std.numpy(), expected_std, rtol=1e-6)


def test_normalize_maps_scales_each_map_to_unit_range():
    maps = np.stack([np.arange(4.0).reshape(2, 2), np.full((2, 2), 3.0)])
    scaled = attn.normalize_maps(maps)
    np.testing.assert_allclose(scaled[0], [[0, 1 / 3], [2 / 3, 1]], rtol=1e-6)
    np.testing.assert_array_equal(scaled[1], 0)


@pytest.mark.parametrize("score", ["energy", attn.TOTAL_ENERGY])
def test_feature_baseline_weighs_features_minus_the_normal_mean(vae, score):
    x = images(4)
    stats = attn.NormalStats(
        tf.constant(RNG.normal(size=6), tf.float32),
        tf.constant(RNG.uniform(0.5, 2.0, 6), tf.float32),
    )
    explainer = attn.VAEAttention(vae.encoder, "conv1")
    explanation = explainer.explain(x)
    baseline = explainer.feature_mean(tf.data.Dataset.from_tensor_slices(x).batch(3))
    np.testing.assert_allclose(
        baseline.numpy(), explanation.features.numpy().mean(0), rtol=1e-5, atol=1e-6
    )
    weights = attn.anomaly_weights(explanation, stats, score).numpy()
    relative = explanation.features.numpy() - baseline.numpy()
    expected = np.maximum(np.einsum("bdk,bhwk->bdhw", weights, relative), 0).mean(1)
    got = explainer.anomaly_attention(x, stats, score=score, baseline=baseline).numpy()
    upsampled = attn.upsample(tf.constant(expected), (28, 28)).numpy()
    assert upsampled.max() > 0
    np.testing.assert_allclose(got, upsampled, rtol=1e-4, atol=1e-6 * upsampled.max())
    # an image whose features ARE the baseline has nothing to show
    own = explainer.anomaly_attention(
        x[:1], stats, score=score, baseline=explanation.features[0]
    )
    assert np.abs(own.numpy()).max() < 1e-6
    # zero baseline == the paper's plain form
    plain = explainer.anomaly_attention(x, stats, score=score).numpy()
    zero = explainer.anomaly_attention(
        x, stats, score=score, baseline=tf.zeros_like(baseline)
    ).numpy()
    np.testing.assert_allclose(zero, plain, rtol=1e-5, atol=1e-7)


def test_feature_baseline_of_another_size_is_refused(vae):
    explainer = attn.VAEAttention(vae.encoder, "conv1")
    wrong = tf.zeros((5, 5, explainer.explain(images(1)).features.shape[-1]))
    with pytest.raises(ValueError, match="feature baseline's shape"):
        explainer.anomaly_attention(
            images(1), vae.normal_stats(), score="energy", baseline=wrong
        )
    with pytest.raises(ValueError, match="empty dataset"):
        explainer.feature_mean([])


def test_model_keeps_feature_distributions_through_save_and_load(tmp_path):
    from keras_vae_attn.explain import pipeline
    from keras_vae_attn.models import load_vae, save_vae

    model = build_vae("small", (28, 28, 1), latent_dim=6, filters=(8, 16), dense_units=32)
    x = images(3)
    with pytest.raises(ValueError, match="no normal feature distribution for layer 'conv1'"):
        pipeline.explain_anomaly(model, x, "conv1", feature_baseline="normal")
    with pytest.raises(ValueError, match="unknown feature_baseline"):
        pipeline.explain_anomaly(model, x, "conv1", feature_baseline="mean")
    model.fit_feature_distributions(
        tf.data.Dataset.from_tensor_slices(images(8)).batch(4), ["conv1", "last"]
    )
    assert model.feature_layers == ["conv1", "conv2"]  # "last" resolved
    before = pipeline.explain_anomaly(model, x, "conv1", feature_baseline="normal")
    plain = pipeline.explain_anomaly(model, x, "conv1")
    assert not np.allclose(before["heatmap"].numpy(), plain["heatmap"].numpy())
    save_vae(model, str(tmp_path / "m"))
    assert sorted(os.listdir(tmp_path / "m")) == ["model.json", "model.weights.h5"]
    loaded = load_vae(str(tmp_path / "m"))
    after = pipeline.explain_anomaly(loaded, x, "conv1", feature_baseline="normal")
    np.testing.assert_allclose(
        after["heatmap"].numpy(), before["heatmap"].numpy(), rtol=1e-5, atol=1e-7
    )
    # a model saved without distributions into the same folder loads without them
    save_vae(
        build_vae("small", (28, 28, 1), latent_dim=6, filters=(8, 16), dense_units=32),
        str(tmp_path / "m"),
    )
    assert load_vae(str(tmp_path / "m")).feature_layers == []
