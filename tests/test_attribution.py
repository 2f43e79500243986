"""Attribution forms (keras_vae_attn/explain/forms.py) against slow, obvious references.

The references below never use the library's gradient code: they run the whole encoder
with a call hook on the chosen layer that either adds a watched zero tensor to the
layer's output (so d target / d delta = d target / d A) or replaces the output (to run
the rest of the encoder on a chosen feature map), take one ``tf.GradientTape`` per
latent dimension, and build every form with numpy.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_vae_attn import VAEAttention
from keras_vae_attn.explain import deviation, pipeline
from keras_vae_attn.explain.options import ExplainOptions, OptionError
from keras_vae_attn.models import build_vae, load_vae, save_vae

LATENT = 5
RNG = np.random.default_rng(0)


def odd_images(count, size=28, channels=1, seed=1):
    """Images unlike the normal ones: noise plus one bright square."""
    rng = np.random.default_rng(seed)
    out = rng.random((count, size, size, channels)).astype("float32") * 0.3
    for image in out:
        r, c = rng.integers(2, size - 10, 2)
        image[r : r + 8, c : c + 8] = 1.0
    return out


def normal_images(count, size=28, channels=1, seed=2):
    return (np.random.default_rng(seed).random((count, size, size, channels)) * 0.5).astype(
        "float32"
    )


def small_vae():
    """A tiny VAE whose untrained codes still spread: random biases (so no layer is
    positively homogeneous), a wider mu and a smaller posterior variance."""
    keras.utils.set_random_seed(0)
    model = build_vae("small", (28, 28, 1), latent_dim=LATENT, filters=(8, 16), dense_units=32)
    rng = np.random.default_rng(3)
    for layer in model.encoder.layers:
        if getattr(layer, "bias", None) is not None:
            layer.bias.assign(rng.normal(0, 0.05, layer.bias.shape).astype("float32"))
    mu, logvar = model.encoder.get_layer("mu"), model.encoder.get_layer("logvar")
    mu.kernel.assign(mu.kernel * 10.0)
    logvar.bias.assign(logvar.bias - 3.0)
    return model


@pytest.fixture(scope="module")
def vae():
    """Small VAE with fitted latent stats and feature distributions at conv1 and conv2."""
    model = small_vae()
    normal = normal_images(8)
    model.fit_normal_stats(tf.data.Dataset.from_tensor_slices(normal).batch(4))
    assert not np.allclose(model.normal_std.numpy(), 1.0)  # not the prior
    model.fit_feature_distributions(
        tf.data.Dataset.from_tensor_slices(normal).batch(4), ["conv1", "conv2"]
    )
    return model


@pytest.fixture(scope="module")
def resnet():
    """ResNet18 VAE (32x32x3, latent 3) with a distribution at a layer inside a
    residual block (no cut point: the library reads A as an extra encoder output)."""
    keras.utils.set_random_seed(0)
    model = build_vae("resnet18", (32, 32, 3), latent_dim=3)
    normal = normal_images(4, 32, 3)
    model.fit_normal_stats(tf.data.Dataset.from_tensor_slices(normal).batch(4))
    model.fit_feature_distributions([normal[:3], normal[3:]], [HOOKED])
    return model


HOOKED = "layer2_block0_relu_a"


# --- the slow reference ------------------------------------------------------------------
def run_encoder(encoder, layer, images, delta=None, override=None):
    """(A, mu, logvar) of the whole encoder; A + ``delta`` (or ``override``) is what the
    layers after ``layer`` see."""
    target = encoder.get_layer(layer)
    captured = {}
    original = target.call

    def hooked(*args, **kwargs):
        out = original(*args, **kwargs)
        captured["A"] = out
        if override is not None:
            return override + 0.0 * out
        return out if delta is None else out + delta

    target.call = hooked
    try:
        mu, logvar = encoder(tf.convert_to_tensor(images), training=False)
    finally:
        target.call = original
    return captured["A"], mu, logvar


def constants(model, layer, images):
    """A, mu, logvar of ``images`` and the fixed energy variances (B, D), numpy."""
    features, mu, logvar = run_encoder(model.encoder, layer, images)
    std = model.normal_std.numpy()
    variance = (std**2 + np.exp(logvar.numpy())).astype("float32")
    return features.numpy(), mu.numpy(), logvar.numpy(), variance


def reference_gradients(model, layer, images, target):
    """(A (B, h, w, K), G (B, T, h, w, K)): one tape per latent for per-latent targets."""
    features, _, _, variance = constants(model, layer, images)
    normal_mean = model.normal_mean.numpy()

    def grad(value_of):
        delta = tf.zeros(features.shape, tf.float32)
        with tf.GradientTape() as tape:
            tape.watch(delta)
            _, mu, _ = run_encoder(model.encoder, layer, images, delta=delta)
            value = value_of(mu)
        return tape.gradient(value, delta).numpy()

    if target == "total-energy":
        return features, grad(
            lambda mu: 0.5 * tf.reduce_sum(tf.square(normal_mean - mu) / variance)
        )[:, None]
    rows = []
    for i in range(normal_mean.shape[0]):
        if target == "latent":  # u_i = m_i - mu_i
            rows.append(grad(lambda mu, i=i: tf.reduce_sum(normal_mean[i] - mu[:, i])))
        else:  # E_i = (m_i - mu_i)^2 / (2 var_i)
            rows.append(
                grad(
                    lambda mu, i=i: tf.reduce_sum(
                        0.5 * tf.square(normal_mean[i] - mu[:, i]) / variance[:, i]
                    )
                )
            )
    return features, np.stack(rows, axis=1)


def energy_at(model, layer, images, feature_map):
    """E with the images' own variances, the encoder after ``layer`` run on
    ``feature_map`` ((h, w, K) broadcast over the batch, or (B, h, w, K))."""
    features, _, _, variance = constants(model, layer, images)
    replacement = tf.constant(np.broadcast_to(feature_map, features.shape), tf.float32)
    _, mu, _ = run_encoder(model.encoder, layer, images, override=replacement)
    return (0.5 * np.square(model.normal_mean.numpy() - mu.numpy()) / variance).sum(-1)


def reference_path_gradients(model, layer, images, baseline, steps):
    """Total-energy gradients averaged over the midpoints t = (j + 0.5) / steps of the
    path baseline + t (A - baseline), one tape per point."""
    features, _, _, variance = constants(model, layer, images)
    normal_mean = model.normal_mean.numpy()
    total = np.zeros_like(features, dtype=np.float64)
    for j in range(steps):
        point = tf.constant(baseline + (j + 0.5) / steps * (features - baseline), tf.float32)
        with tf.GradientTape() as tape:
            tape.watch(point)
            _, mu, _ = run_encoder(model.encoder, layer, images, override=point)
            energy = 0.5 * tf.reduce_sum(tf.square(normal_mean - mu) / variance)
        total += tape.gradient(energy, point).numpy()
    return features, (total / steps)[:, None]


def reference_deviation(features, model, layer, kind):
    if kind == "none":
        return features
    distribution = model.feature_distribution(layer)
    mean, std = distribution.mean.numpy(), distribution.std.numpy()
    if kind == "centered":
        return features - mean
    floor = deviation.STD_FLOOR * std.mean() + 1e-6
    return (features - mean) / np.sqrt(std**2 + floor**2)


def signed(maps, sign):
    return {"relu": np.maximum(maps, 0), "abs": np.abs(maps), "signed": maps}[sign]


def reference_map(model, layer, images, form, target, deviation, sign, steps=8):
    """The map of the options at feature resolution (B, h, w), the slow way."""
    if form == "integrated":
        features = constants(model, layer, images)[0]
        baseline = (
            np.zeros(features.shape[1:], np.float32)
            if deviation == "none"
            else model.feature_distribution(layer).mean.numpy()
        )
        features, grads = reference_path_gradients(model, layer, images, baseline, steps)
        maps = (grads * (features - baseline)[:, None]).sum(-1)
        return signed(maps, sign).mean(1)
    if form == "deviation":
        features = constants(model, layer, images)[0]
        dev = reference_deviation(features, model, layer, deviation)
        return np.sqrt((dev**2).sum(-1))
    features, grads = reference_gradients(model, layer, images, target)
    dev = reference_deviation(features, model, layer, deviation)
    pooled = grads.mean(axis=(2, 3))  # (B, T, K)
    if form == "gradcam":
        maps = signed(np.einsum("btk,bhwk->bthw", pooled, dev), sign)
    elif form == "hirescam":
        maps = signed((grads * dev[:, None]).sum(-1), sign)
    elif form == "gradient-weighted-deviation":
        maps = np.sqrt(np.einsum("btk,bhwk->bthw", np.abs(pooled), dev**2))
    elif form == "gradient-norm":
        maps = np.sqrt((grads**2).sum(-1))
    else:
        raise AssertionError(form)
    return maps.mean(1)


def assert_close(got, expected, rtol=1e-4):
    got, expected = np.asarray(got), np.asarray(expected)
    assert got.shape == expected.shape
    scale = np.abs(expected).max()
    assert scale > 0, "degenerate reference: the map is zero everywhere"
    np.testing.assert_allclose(got, expected, rtol=rtol, atol=rtol * scale)


def heatmap(model, images, options):
    return pipeline.explain_anomaly(model, images, options, keys=("heatmap",))["heatmap"]


# --- 1. every form against its reference ------------------------------------------------
CASES = (
    # gradcam / hirescam: every target, both batching paths (conv1: jacobian, conv2: stack)
    [
        (form, target, deviation, "relu", layer)
        for form in ("gradcam", "hirescam")
        for target in ("total-energy", "energy", "latent")
        for deviation in ("none", "standardized")
        for layer in ("conv1", "conv2")
    ]
    + [
        ("gradcam", "total-energy", "centered", "relu", "conv2"),
        ("hirescam", "energy", "centered", "relu", "conv2"),
        ("gradcam", "energy", "standardized", "abs", "conv2"),
        ("gradcam", "latent", "none", "signed", "conv1"),
        ("hirescam", "total-energy", "standardized", "signed", "conv1"),
        ("hirescam", "energy", "none", "abs", "conv2"),
    ]
    + [
        ("integrated", "total-energy", deviation, sign, "conv2")
        for deviation in ("none", "centered", "standardized")
        for sign in ("relu", "signed")
    ]
    + [("integrated", "total-energy", "none", "abs", "conv1")]
    + [
        ("gradient-weighted-deviation", target, deviation, "abs", "conv2")
        for target in ("total-energy", "energy")
        for deviation in ("none", "standardized")
    ]
    + [("gradient-weighted-deviation", "latent", "centered", "abs", "conv1")]
    + [
        ("gradient-norm", target, "none", "abs", layer)
        for target in ("total-energy", "energy")
        for layer in ("conv1", "conv2")
    ]
    + [
        ("deviation", "total-energy", deviation, "abs", layer)
        for deviation in ("none", "centered", "standardized")
        for layer in ("conv1", "conv2")
    ]
)


@pytest.mark.parametrize("form, target, deviation, sign, layer", CASES)
def test_form_matches_slow_reference(vae, form, target, deviation, sign, layer):
    x = odd_images(3)
    options = ExplainOptions(
        layers=(layer,), form=form, target=target, deviation=deviation, sign=sign, steps=6
    )
    expected = reference_map(vae, layer, x, form, target, deviation, sign, steps=6)
    small, mu, _ = pipeline.layer_map(vae, tf.constant(x), layer, options, vae.normal_stats())
    assert_close(small.numpy(), expected)
    np.testing.assert_allclose(mu.numpy(), constants(vae, layer, x)[1], atol=1e-6)
    got = heatmap(vae, x, options).numpy()
    assert got.shape == (3, 28, 28) and np.isfinite(got).all()
    assert_close(got, pipeline.upsample(tf.constant(expected, tf.float32), (28, 28)).numpy())


@pytest.mark.parametrize(
    "form, target, deviation",
    [
        ("gradcam", "energy", "none"),
        ("hirescam", "total-energy", "standardized"),
        ("hirescam", "latent", "centered"),
        ("gradient-weighted-deviation", "total-energy", "standardized"),
    ],
)
def test_forms_at_a_layer_inside_a_residual_block(resnet, form, target, deviation):
    x = odd_images(2, 32, 3)
    assert resnet.explainer(HOOKED).method == "jacobian" and resnet.explainer(HOOKED).tapped
    options = ExplainOptions(
        layers=(HOOKED,), form=form, target=target, deviation=deviation, sign="abs"
    )
    expected = reference_map(resnet, HOOKED, x, form, target, deviation, "abs")
    small, _, _ = pipeline.layer_map(
        resnet, tf.constant(x), HOOKED, options, resnet.normal_stats()
    )
    assert small.shape == (2, 4, 4)
    assert_close(small.numpy(), expected)


def test_target_gradients_equal_per_latent_tapes(vae):
    """The raw gradients, before any form: (B, T, h, w, K) for each target."""
    x = odd_images(2)
    for layer in ("conv1", "conv2"):
        explainer = vae.explainer(layer)
        for target in ("total-energy", "energy", "latent"):
            features, grads, _, _ = explainer.target_gradients(x, target, vae.normal_stats())
            ref_features, ref_grads = reference_gradients(vae, layer, x, target)
            assert grads.shape == ref_grads.shape
            assert ref_grads.shape[1] == (1 if target == "total-energy" else LATENT)
            np.testing.assert_allclose(features.numpy(), ref_features, atol=1e-6)
            assert_close(grads.numpy(), ref_grads)
    with pytest.raises(ValueError, match="unknown target 'bogus'"):
        vae.explainer("conv1").target_gradients(x, "bogus", vae.normal_stats())


# --- 2. integrated gradients: completeness ----------------------------------------------
@pytest.mark.parametrize(
    "layer, deviation",
    [("conv2", "none"), ("conv2", "centered"), ("conv1", "none"), ("conv1", "standardized")],
)
def test_integrated_sums_to_energy_difference_and_converges(vae, layer, deviation):
    """Completeness: sum over positions = E(A) - E(baseline) up to the midpoint rule's
    error, which shrinks with the steps. (The encoder's ReLUs make the path integrand
    piecewise smooth, so the error falls roughly as 1 / steps, not 1 / steps^2.)"""
    x = odd_images(3)
    features, mu, _, variance = constants(vae, layer, x)
    baseline = (
        np.zeros(features.shape[1:], np.float32)
        if deviation == "none"
        else vae.feature_distribution(layer).mean.numpy()
    )
    own = (0.5 * np.square(vae.normal_mean.numpy() - mu) / variance).sum(-1)
    np.testing.assert_allclose(energy_at(vae, layer, x, features), own, rtol=1e-5)
    start = energy_at(vae, layer, x, baseline)
    difference = own - start
    scale = np.abs(own) + np.abs(start)
    assert (np.abs(difference) > 0.05 * scale).all()  # something to attribute
    errors = {}
    for steps in (4, 32, 256):
        options = ExplainOptions(
            layers=(layer,),
            form="integrated",
            target="total-energy",
            deviation=deviation,
            sign="signed",
            steps=steps,
        )
        small, _, _ = pipeline.layer_map(
            vae, tf.constant(x), layer, options, vae.normal_stats()
        )
        errors[steps] = np.abs(small.numpy().sum(axis=(1, 2)) - difference)
    report = (errors, difference)
    assert (errors[256] < 0.01 * scale).all(), report
    assert errors[32].sum() < errors[4].sum() / 3, report
    assert errors[256].sum() < errors[32].sum() / 3, report


# --- 3. a layer whose normal features never vary -----------------------------------------
def test_standardized_on_constant_features_is_finite():
    model = small_vae()
    normal = normal_images(4)
    model.fit_normal_stats(tf.data.Dataset.from_tensor_slices(normal).batch(4))
    one = normal[:1]
    # fitted on copies of one image: std (numerically) 0 everywhere
    fitted = model.fit_feature_distributions([np.repeat(one, 3, 0), one], ["conv2"])
    assert np.abs(fitted["conv2"].std.numpy()).max() < 1e-6
    # constructed: std exactly 0
    model.add_feature_distribution("conv1", model.explainer("conv1").front.output.shape[1:])
    features, _, _ = model.explainer("conv1").forward(one)
    model._distributions["conv1"][0].assign(features[0])
    model._distributions["conv1"][1].assign(tf.zeros_like(features[0]))
    assert model.feature_distribution("conv1").std.numpy().max() == 0
    x = np.concatenate([one, odd_images(2)])
    for layer in ("conv1", "conv2"):
        for form, target in (
            ("gradcam", "energy"),
            ("hirescam", "total-energy"),
            ("integrated", "total-energy"),
            ("gradient-weighted-deviation", "total-energy"),
            ("deviation", "total-energy"),
        ):
            options = ExplainOptions(
                layers=(layer,), form=form, target=target, deviation="standardized", sign="abs"
            )
            maps = heatmap(model, x, options).numpy()
            assert np.isfinite(maps).all(), (layer, form)
            assert np.abs(maps[1:]).max() > 0, (layer, form)


# --- 4. fitting the normal feature distribution -------------------------------------------
def test_streamed_feature_distribution_equals_all_at_once():
    model = small_vae()
    data = normal_images(11)
    batches = [data[:3], data[3:4], data[4:9], data[9:]]  # 3, 1, 5, 2
    fitted = model.fit_feature_distributions(batches, ["conv1", "last"])
    assert sorted(fitted) == ["conv1", "conv2"] == sorted(model.feature_layers)
    for layer in ("conv1", "conv2"):
        features = run_encoder(model.encoder, layer, data)[0].numpy().astype(np.float64)
        stored = model.feature_distribution(layer)
        assert stored.mean.shape == features.shape[1:]
        np.testing.assert_allclose(stored.mean.numpy(), features.mean(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(stored.std.numpy(), features.std(0), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(
            fitted[layer].std.numpy(), features.std(0), rtol=1e-4, atol=1e-6
        )
    assert model.feature_distribution("last").mean.shape == (7, 7, 16)
    # (images, labels) tuples from a tf.data pipeline, and a refit replaces the values
    other = normal_images(6, seed=5) + 0.25
    dataset = tf.data.Dataset.from_tensor_slices((other, np.zeros(6))).batch(4)
    model.fit_feature_distributions(dataset, ["conv2"])
    features = run_encoder(model.encoder, "conv2", other)[0].numpy().astype(np.float64)
    np.testing.assert_allclose(
        model.feature_distribution("conv2").std.numpy(), features.std(0), rtol=1e-4, atol=1e-6
    )
    assert model.feature_layers == ["conv1", "conv2"]
    with pytest.raises(ValueError, match="empty dataset"):
        model.fit_feature_distributions([], ["conv1"])


def test_feature_moments_merge_batches_exactly():
    data = RNG.normal(3.0, 2.0, size=(23, 2, 3, 4)).astype("float32") * 100
    moments = deviation.FeatureMoments()
    for start, stop in ((0, 1), (1, 1), (1, 9), (9, 10), (10, 23)):  # one empty batch
        moments.update(data[start:stop])
    assert moments.count == 23
    mean, std = moments.result()
    assert mean.dtype == std.dtype == np.float32
    np.testing.assert_allclose(mean, data.astype(np.float64).mean(0), rtol=1e-6)
    np.testing.assert_allclose(std, data.astype(np.float64).std(0), rtol=1e-5)
    single = deviation.FeatureMoments()
    single.update(data[:1])
    np.testing.assert_array_equal(single.result()[1], 0)
    with pytest.raises(ValueError, match="empty dataset"):
        deviation.FeatureMoments().result()


# --- 5. save / load -------------------------------------------------------------------------
def test_feature_distributions_survive_save_and_load(resnet, tmp_path):
    """Every stored distribution (with and without the covariance, at a cut point and
    inside a residual block) comes back equal and gives the same maps; a model saved
    without distributions loads without them, also from a folder that held some."""
    model = small_vae()
    normal = tf.data.Dataset.from_tensor_slices(normal_images(6)).batch(3)
    model.fit_normal_stats(normal)
    model.fit_feature_distributions(normal, ["conv1"], covariance=True)
    model.fit_feature_distributions(normal, ["conv2"])
    cases = (
        (model, "m", odd_images(2), {"conv1": "whitened", "conv2": "standardized"}),
        (resnet, "r", odd_images(2, 32, 3), {HOOKED: "standardized"}),
    )
    for original, folder, x, deviations in cases:
        save_vae(original, str(tmp_path / folder))
        loaded = load_vae(str(tmp_path / folder))
        assert loaded.feature_layers == original.feature_layers == list(deviations)
        np.testing.assert_array_equal(loaded.normal_std.numpy(), original.normal_std.numpy())
        for layer, kind in deviations.items():
            stored = original.feature_distribution(layer)
            for part, value in zip(stored._fields, loaded.feature_distribution(layer)):
                expected = getattr(stored, part)
                assert (value is None) == (expected is None), (layer, part)
                if value is not None:
                    np.testing.assert_array_equal(value.numpy(), expected.numpy())
            for form in ("hirescam", "gradient-weighted-deviation"):
                options = ExplainOptions(
                    layers=(layer,), form=form, target="total-energy", deviation=kind
                )
                np.testing.assert_allclose(
                    heatmap(loaded, x, options).numpy(),
                    heatmap(original, x, options).numpy(),
                    rtol=1e-6,
                    atol=1e-7,
                )
    assert load_vae(str(tmp_path / "m")).has_feature_distribution("conv1", covariance=True)
    plain = small_vae()
    for folder in ("plain", "m"):
        save_vae(plain, str(tmp_path / folder))
        again = load_vae(str(tmp_path / folder))
        assert again.feature_layers == [] and not again.has_feature_distribution("conv1")
        with pytest.raises(ValueError, match="no normal feature distribution"):
            again.feature_distribution("conv1")


# --- 6. several layers in one map ----------------------------------------------------------
def test_layer_scales_and_combined_maps(vae):
    normal = normal_images(5, seed=7)
    x = odd_images(3)
    options = ExplainOptions(
        layers=("conv1", "conv2"),
        form="hirescam",
        target="total-energy",
        deviation="standardized",
        sign="abs",
    )
    assert options.needs_scales
    fitted = pipeline.fit_layer_scales(vae, normal, options, batch_size=2)  # padded batch
    assert fitted.layers == options.layers and not fitted.needs_scales
    singles = {layer: options.replace(layers=(layer,)) for layer in options.layers}
    for layer, scale in zip(options.layers, fitted.layer_scales):
        normal_map = heatmap(vae, normal, singles[layer]).numpy()
        np.testing.assert_allclose(scale, np.percentile(normal_map, 99.0), rtol=1e-4)
    scaled = [
        heatmap(vae, x, singles[layer]).numpy() / scale
        for layer, scale in zip(options.layers, fitted.layer_scales)
    ]
    np.testing.assert_allclose(
        heatmap(vae, x, fitted).numpy(), np.mean(scaled, 0), rtol=1e-5, atol=1e-6
    )
    product = fitted.replace(combine="product")
    assert product.layer_scales == fitted.layer_scales
    np.testing.assert_allclose(
        heatmap(vae, x, product).numpy(), np.prod(scaled, 0), rtol=1e-5, atol=1e-6
    )
    # the fitted scales travel through a run's config.json
    assert ExplainOptions.from_config({"explain": fitted.as_config()}) == fitted
    # a single layer needs no scale
    assert pipeline.fit_layer_scales(vae, normal, singles["conv1"]) is singles["conv1"]


def test_several_configurations_in_one_pass_equal_each_alone(vae):
    """pipeline.layer_maps (the grid's pass: each gradient or path computed once for
    all the configurations reading it) gives every configuration the map it gets alone."""
    x = tf.constant(odd_images(3))
    total = ExplainOptions(layers=("conv2",), target="total-energy", sign="abs", steps=4)
    configurations = [
        total,
        total.replace(deviation="standardized"),
        total.replace(form="hirescam", target="energy", deviation="centered", sign="signed"),
        total.replace(form="gradient-weighted-deviation", deviation="standardized"),
        total.replace(form="gradient-norm"),
        total.replace(form="deviation", deviation="standardized"),
        total.replace(form="integrated"),
        total.replace(form="integrated", deviation="centered"),
        total.replace(form="feature-residual"),
        ExplainOptions.preset("paper", layers=("conv2",)),
    ]
    stats = vae.normal_stats()
    maps, mu, _ = pipeline.layer_maps(vae, x, "conv2", configurations, stats)
    assert list(maps) == configurations
    for options in configurations:
        alone, alone_mu, _ = pipeline.layer_map(vae, x, "conv2", options, stats)
        np.testing.assert_allclose(maps[options].numpy(), alone.numpy(), rtol=1e-6, atol=0)
    np.testing.assert_allclose(mu.numpy(), constants(vae, "conv2", x)[1], atol=1e-6)


# --- 7. bad inputs -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "fields, field, flag",
    [
        (dict(form="nope"), "form", "--form 'nope' is unknown"),
        (dict(target="nope"), "target", "--target"),
        (dict(deviation="nope"), "deviation", "--deviation"),
        (dict(sign="nope"), "sign", "--sign"),
        (dict(combine="sum"), "combine", "--combine"),
        (dict(steps=0), "steps", "--ig-steps"),
        (dict(steps=2.5), "steps", "--ig-steps"),
        (dict(form="integrated", target="energy"), "target", "--form integrated"),
        (dict(form="integrated", target="latent"), "target", "--target total-energy"),
        (dict(layers=("conv1", "conv2"), layer_scales=(1.0,)), "layer_scales", "layer_scales"),
        (dict(layers=("conv1", "conv2"), layer_scales=(1.0, 0.0)), "layer_scales", "positive"),
    ],
)
def test_bad_options_name_their_flag(fields, field, flag):
    with pytest.raises(OptionError, match=flag) as caught:
        ExplainOptions(**fields)
    assert caught.value.field == field


def test_bad_model_inputs_give_clear_errors(vae, resnet):
    x = odd_images(2)
    bare = small_vae()
    for kind in ("centered", "standardized"):
        options = ExplainOptions(
            layers=("conv1",), form="hirescam", target="total-energy", deviation=kind
        )
        with pytest.raises(ValueError, match=r"feature distribution for layer 'conv1'"):
            heatmap(bare, x, options)
    with pytest.raises(ValueError, match=r"feature distribution for layer 'conv2'"):
        heatmap(
            bare,
            x,
            ExplainOptions(
                layers=("last",),
                form="integrated",
                target="total-energy",
                deviation="centered",
            ),
        )
    with pytest.raises(ValueError, match=r"'conv9'.*valid names: conv1, conv2"):
        heatmap(vae, x, ExplainOptions(layers=("conv1", "conv9"), layer_scales=(1.0, 1.0)))
    with pytest.raises(ValueError, match=r"normal-data scales.*fit_layer_scales"):
        heatmap(vae, x, ExplainOptions(layers=("conv1", "conv2")))
    with pytest.raises(OptionError, match="--attribution 'nope'"):
        ExplainOptions.preset("nope")
    # a distribution of the wrong shape is refused, naming both shapes
    wrong = small_vae()
    wrong.add_feature_distribution("conv1", (5, 5, 8))
    with pytest.raises(ValueError, match=r"\(5, 5, 8\) differs from .* \(14, 14, 8\)"):
        heatmap(wrong, x, ExplainOptions(layers=("conv1",), deviation="standardized"))
    # integrated gradients need a cut point
    with pytest.raises(ValueError, match=f"integrated form needs layer '{HOOKED}'"):
        heatmap(
            resnet,
            odd_images(1, 32, 3),
            ExplainOptions(layers=(HOOKED,), form="integrated", target="total-energy"),
        )


# --- 8. the paper's Eq. 3-5 is the pipeline's "paper" preset -----------------------------
@pytest.mark.parametrize("layer", ["conv1", "conv2"])
def test_paper_preset_on_a_bare_encoder_matches_the_reference(vae, layer):
    """VAEAttention on the encoder alone (no VAE model) gives the paper's map through
    the pipeline: Grad-CAM of the per-latent Eq. 5 energy, ReLU per latent, mean."""
    x = odd_images(3)
    options = ExplainOptions.preset("paper")
    assert (options.form, options.target, options.deviation, options.sign) == (
        "gradcam",
        "energy",
        "none",
        "relu",
    )
    explainer = VAEAttention(vae.encoder, layer)
    expected = reference_map(vae, layer, x, "gradcam", "energy", "none", "relu")
    expected = pipeline.upsample(tf.constant(expected, tf.float32), (28, 28)).numpy()
    assert_close(explainer.anomaly_attention(x, vae.normal_stats()).numpy(), expected)
    assert_close(heatmap(vae, x, options.replace(layers=(layer,))).numpy(), expected)


@pytest.mark.parametrize("target", ["energy", "latent"])
def test_gradient_relu_of_a_per_latent_target_acts_on_the_latent_gradient(vae, target):
    """The paper's printed Eq. 3 (ReLU on dmu_i/dA before pooling), then the target's
    per-latent factor: -1 for u_i, -(m_i - mu_i) / var_i for the energy."""
    x = odd_images(3)
    features, mu, _, variance = constants(vae, "conv2", x)
    latent_grads = -reference_gradients(vae, "conv2", x, "latent")[1]  # dmu_i/dA
    factor = (
        -np.ones_like(mu) if target == "latent" else -(vae.normal_mean.numpy() - mu) / variance
    )
    weights = (np.maximum(latent_grads, 0) * factor[:, :, None, None, None]).mean((2, 3))
    expected = np.maximum(np.einsum("btk,bhwk->bthw", weights, features), 0).mean(1)
    options = ExplainOptions.preset(
        "paper", layers=("conv2",), target=target, gradient_relu=True
    )
    small = pipeline.layer_map(vae, tf.constant(x), "conv2", options, vae.normal_stats())[0]
    if target == "latent":  # -ReLU(dmu/dA) pooled times ReLU features: nothing left
        assert np.abs(expected).max() == 0 and np.abs(small.numpy()).max() == 0
    else:
        assert_close(small.numpy(), expected, rtol=1e-5)
        # VAEAttention(gradient_relu=True)'s default anomaly map is this reading
        default = vae.explainer("conv2", gradient_relu=True).anomaly_attention(
            x, vae.normal_stats()
        )
        assert_close(
            default.numpy(),
            pipeline.upsample(tf.constant(expected, tf.float32), (28, 28)).numpy(),
        )


def test_integrated_refuses_a_distribution_of_another_shape(vae):
    model = small_vae()
    model.add_feature_distribution("conv1", (1, 1, 8))
    options = ExplainOptions(
        layers=("conv1",), form="integrated", target="total-energy", deviation="centered"
    )
    with pytest.raises(ValueError, match=r"shape \(1, 1, 8\) differs"):
        pipeline.explain_anomaly(model, odd_images(2), options, keys=("heatmap",))


# --- the whitened deviation (per-position channel covariance) ---------------------------
def test_whitened_deviation_is_the_per_position_mahalanobis_distance():
    """Against numpy: the ridged covariance of the normal features at each position, its
    Cholesky factor L; ||L^-1 (A - mean)|| is the Mahalanobis distance, and the gradient
    forms read dE/dz = L^T dE/dA. Streaming batches equal all at once."""
    from keras_vae_attn.explain.deviation import COVARIANCE_RIDGE

    model = small_vae()
    normal = normal_images(12)
    model.fit_normal_stats(tf.data.Dataset.from_tensor_slices(normal).batch(5))
    model.fit_feature_distributions(
        tf.data.Dataset.from_tensor_slices(normal).batch(5), ["conv2"], covariance=True
    )
    features = run_encoder(model.encoder, "conv2", normal)[0].numpy().astype(np.float64)
    mean = features.mean(0)
    centered = features - mean
    cov = np.einsum("nhwk,nhwl->hwkl", centered, centered) / len(features)
    channels = cov.shape[-1]
    ridge = COVARIANCE_RIDGE * np.trace(cov, axis1=-2, axis2=-1).mean() / channels + 1e-6
    colour = np.linalg.cholesky(cov + ridge * np.eye(channels))
    stored = model.feature_distribution("conv2")
    np.testing.assert_allclose(stored.colour.numpy(), colour, rtol=1e-4, atol=1e-6)

    x = odd_images(3)
    test_features = run_encoder(model.encoder, "conv2", x)[0].numpy().astype(np.float64)
    d = test_features - mean
    maha = np.sqrt(
        np.einsum("bhwk,hwkl,bhwl->bhw", d, np.linalg.inv(cov + ridge * np.eye(channels)), d)
    )
    options = ExplainOptions(layers=("conv2",), form="deviation", deviation="whitened")
    got = pipeline.layer_map(model, x, "conv2", options, model.normal_stats())[0].numpy()
    assert_close(got, maha, rtol=2e-4)

    grads = reference_gradients(model, "conv2", x, "total-energy")[1]  # (B,1,h,w,K)
    z = np.einsum("hwkl,bhwl->bhwk", np.linalg.inv(colour), d)
    weights = np.abs(np.einsum("hwlk,bthwl->bthwk", colour, grads).mean(axis=(2, 3)))
    expected = np.sqrt(np.einsum("btk,bhwk->bthw", weights, z**2)).mean(1)
    options = options.replace(form="gradient-weighted-deviation", target="total-energy")
    got = pipeline.layer_map(model, x, "conv2", options, model.normal_stats())[0].numpy()
    assert_close(got, expected, rtol=2e-4)


def test_whitened_needs_the_covariance(vae):
    options = ExplainOptions(layers=("conv1",), form="deviation", deviation="whitened")
    with pytest.raises(ValueError, match="covariance=True"):
        heatmap(vae, odd_images(2), options)  # fitted without covariance
