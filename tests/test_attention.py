"""The attention math: batched maps equal per-latent references and closed forms; the
anomaly maps of VAEAttention are the pipeline's (the paper's preset by default)."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_vae_attn import NormalStats, VAEAttention, fit_normal_stats, normalize_maps
from keras_vae_attn.explain import forms, pipeline
from keras_vae_attn.explain.deviation import FeatureDistribution
from keras_vae_attn.explain.latent import difference_distribution
from keras_vae_attn.explain.options import ExplainOptions
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
    explainer = VAEAttention(encoder, layer="feat")
    np.testing.assert_allclose(explainer.latent_maps(x).numpy(), closed_maps, atol=1e-5)
    overall = explainer.attention(x).numpy()
    assert overall.shape == (2, 12, 12)  # same size: no resize
    np.testing.assert_allclose(overall, closed_maps.mean(axis=1), atol=1e-5)


def test_gradient_relu_reading_pools_positive_gradients_only():
    encoder = linear_head_encoder()
    x = RNG.random((2, 12, 12, 2)).astype("float32")
    kernel = encoder.get_layer("mu").kernel.numpy().reshape(12, 12, 3, 4)
    expected = np.maximum(kernel, 0).mean(axis=(0, 1)).T
    weights = VAEAttention(encoder, "feat", gradient_relu=True).explain(x).weights
    np.testing.assert_allclose(
        weights.numpy(), np.broadcast_to(expected, (2, 4, 3)), atol=1e-6
    )


def test_maps_are_nonnegative_finite_and_upsampled(vae):
    x = images(4)
    explainer = vae.explainer("conv2")
    overall = explainer.attention(x).numpy()
    stats = NormalStats(tf.zeros(6), tf.ones(6))
    anomaly = explainer.anomaly_attention(x, stats).numpy()
    for maps in (overall, anomaly, explainer.latent_maps(x).numpy()):
        assert np.isfinite(maps).all() and (maps >= 0).all()
    assert overall.shape == anomaly.shape == (4, 28, 28)
    assert overall.max() > 0


def test_difference_distribution_follows_eq5():
    mean, var = difference_distribution([1.0, -2.0], [0.5, 2.0], [0.25, 1.0], [1.5, 0.1])
    np.testing.assert_allclose(mean.numpy(), [0.75, -3.0])
    np.testing.assert_allclose(var.numpy(), [0.25 + 2.25, 4.0 + 0.01], rtol=1e-6)


def random_stats():
    return NormalStats(
        tf.constant(RNG.normal(size=6), tf.float32),
        tf.constant(RNG.uniform(0.5, 2.0, 6), tf.float32),
    )


def energy_weights(explanation, stats):
    """The per-latent energy's pooled gradients in closed form from the pooled latent
    gradients w_i: dE_i/dA = -(m_i - mu_i) / var_i * dmu_i/dA (Eq. 5), (B, D, K)."""
    mu, sigma = explanation.mu.numpy(), np.exp(0.5 * explanation.logvar.numpy())
    factor = -(stats.mean.numpy() - mu) / (stats.std.numpy() ** 2 + sigma**2)
    return explanation.weights.numpy() * factor[..., None]


def test_target_gradients_scale_latent_gradients_by_standardised_deviation(vae):
    x = images(2)
    explainer = vae.explainer("conv2")
    explanation = explainer.explain(x)
    stats = random_stats()
    energy = forms.pooled(explainer.target_gradients(x, "energy", stats)[1]).numpy()
    np.testing.assert_allclose(
        energy, energy_weights(explanation, stats), rtol=1e-5, atol=1e-8
    )
    latent = forms.pooled(explainer.target_gradients(x, "latent", stats)[1]).numpy()
    np.testing.assert_allclose(latent, -explanation.weights.numpy(), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize(
    "layer, hooked", [("conv1", False), ("conv2", False), ("conv1", True)]
)
def test_total_energy_map_from_one_pass_equals_relu_of_summed_energy_maps(vae, layer, hooked):
    x = images(3)
    stats = random_stats()
    explainer = VAEAttention(vae.encoder, layer)
    if hooked:
        explainer.head, explainer.method = None, "hooked"  # as for a subclassed encoder
    explanation = explainer.explain(x)
    per_latent = np.einsum(
        "bdk,bhwk->bdhw", energy_weights(explanation, stats), explanation.features.numpy()
    )
    expected = np.maximum(per_latent.sum(axis=1), 0)
    total = ExplainOptions.preset("paper", target="total-energy")
    small, mu, _ = pipeline.attribution_map(explainer, x, total, stats)
    assert expected.max() > 0
    np.testing.assert_allclose(small.numpy(), expected, rtol=1e-4, atol=1e-6 * expected.max())
    np.testing.assert_allclose(mu.numpy(), explanation.mu.numpy(), atol=1e-6)
    upsampled = explainer.anomaly_attention(x, stats, total)
    np.testing.assert_allclose(
        upsampled.numpy(),
        pipeline.upsample(tf.constant(expected), (28, 28)).numpy(),
        rtol=1e-4,
        atol=1e-6 * expected.max(),
    )


def test_scoring_with_total_energy_skips_per_latent_outputs_unless_asked(vae):
    x = images(3)
    options = ExplainOptions(layers=("conv1",), target="total-energy")
    full = pipeline.explain_anomaly(vae, x, options)
    lean = pipeline.explain_anomaly(vae, x, options, keys=("heatmap", "recon_error"))
    assert set(lean) == {"heatmap", "recon_error"} and "per_latent" in full
    np.testing.assert_allclose(
        lean["heatmap"].numpy(), full["heatmap"].numpy(), rtol=1e-4, atol=1e-6
    )
    for size in (1, 2):  # 2: the last batch is padded, then trimmed
        batched = pipeline.batched(vae, x, size, options, keys=("heatmap", "score"))
        assert batched["heatmap"].shape == (3, 28, 28) and batched["score"].shape == (3,)
        np.testing.assert_allclose(
            batched["heatmap"], full["heatmap"].numpy(), rtol=1e-4, atol=1e-6
        )


@pytest.mark.parametrize("layer", ["conv1", "conv2"])
def test_every_batching_method_gives_the_same_weights(vae, layer):
    x = images(3)
    results = {}
    for method in ("stack", "jacobian"):
        explainer = VAEAttention(vae.encoder, layer, method=method)
        assert explainer.method == method
        results[method] = explainer.explain(x).weights.numpy()
    hooked = VAEAttention(vae.encoder, layer)
    hooked.head, hooked.method = None, "hooked"  # as for a subclassed encoder
    results["hooked"] = hooked.explain(x).weights.numpy()
    np.testing.assert_allclose(results["jacobian"], results["stack"], atol=1e-6)
    np.testing.assert_allclose(results["hooked"], results["stack"], atol=1e-6)


def test_auto_method_stacks_light_heads_and_vectorizes_convolutional_ones(vae):
    assert vae.explainer("conv2").method == "stack"  # flatten + dense after conv2
    assert vae.explainer("conv1").method == "jacobian"  # conv2 still to come
    with pytest.raises(ValueError, match="unknown method 'fast'"):
        VAEAttention(vae.encoder, "conv1", method="fast")


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
    stats = fit_normal_stats(encoder, tf.data.Dataset.from_tensor_slices(data).batch(2))
    np.testing.assert_allclose(stats.mean.numpy(), data.mean(0), rtol=1e-6)
    expected_std = np.sqrt(data.var(0) + np.exp(0.5))
    np.testing.assert_allclose(stats.std.numpy(), expected_std, rtol=1e-6)


def test_normalize_maps_scales_each_map_to_unit_range():
    maps = np.stack([np.arange(4.0).reshape(2, 2), np.full((2, 2), 3.0)])
    scaled = normalize_maps(maps)
    np.testing.assert_allclose(scaled[0], [[0, 1 / 3], [2 / 3, 1]], rtol=1e-6)
    np.testing.assert_array_equal(scaled[1], 0)


@pytest.mark.parametrize("target", ["energy", "total-energy"])
def test_centered_deviation_weighs_features_minus_the_normal_mean(vae, target):
    x = images(4)
    stats = random_stats()
    explainer = VAEAttention(vae.encoder, "conv1")
    explanation = explainer.explain(x)
    fitted = explainer.fit_feature_distribution(tf.data.Dataset.from_tensor_slices(x).batch(3))
    features = explanation.features.numpy()
    np.testing.assert_allclose(fitted.mean.numpy(), features.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fitted.std.numpy(), features.std(0), rtol=1e-4, atol=1e-6)
    signed = np.einsum(
        "bdk,bhwk->bdhw", energy_weights(explanation, stats), features - fitted.mean.numpy()
    )
    expected = (
        np.maximum(signed, 0).mean(1) if target == "energy" else np.maximum(signed.sum(1), 0)
    )
    centered = ExplainOptions.preset("paper", target=target, deviation="centered")
    got = explainer.anomaly_attention(x, stats, centered, fitted).numpy()
    upsampled = pipeline.upsample(tf.constant(expected), (28, 28)).numpy()
    assert upsampled.max() > 0
    np.testing.assert_allclose(got, upsampled, rtol=1e-4, atol=1e-6 * upsampled.max())
    # an image whose features ARE the normal mean has nothing to show
    own = fitted._replace(mean=explanation.features[0])
    assert np.abs(explainer.anomaly_attention(x[:1], stats, centered, own)).max() < 1e-6
    # a zero mean is the paper's plain form
    plain = explainer.anomaly_attention(x, stats, centered.replace(deviation="none"))
    zero = explainer.anomaly_attention(
        x, stats, centered, fitted._replace(mean=tf.zeros_like(fitted.mean))
    )
    np.testing.assert_allclose(zero.numpy(), plain.numpy(), rtol=1e-5, atol=1e-7)


def test_feature_distribution_of_another_size_is_refused(vae):
    explainer = VAEAttention(vae.encoder, "conv1")
    channels = explainer.explain(images(1)).features.shape[-1]
    wrong = FeatureDistribution(tf.zeros((5, 5, channels)), tf.ones((5, 5, channels)))
    centered = ExplainOptions.preset("paper", deviation="centered")
    with pytest.raises(ValueError, match=r"shape \(5, 5, 8\) differs"):
        explainer.anomaly_attention(images(1), vae.normal_stats(), centered, wrong)
    with pytest.raises(ValueError, match="needs the layer's normal feature distribution"):
        explainer.anomaly_attention(images(1), vae.normal_stats(), centered)
    with pytest.raises(ValueError, match="empty dataset"):
        explainer.fit_feature_distribution([])
