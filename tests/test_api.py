"""The public API on the user's own encoders: every kind of Keras model, dtypes, errors."""

import re

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_vae_attn import VAEAttention, fit_normal_stats, overlay
from keras_vae_attn.explain import pipeline
from keras_vae_attn.explain.options import ExplainOptions
from keras_vae_attn.models import build_vae

from conftest import REPO

RNG = np.random.default_rng(1)
X = RNG.random((3, 16, 16, 1)).astype("float32")


def readme_snippet(section):
    text = (REPO / "README.md").read_text()
    body = text.split(f"## {section}", 1)[1]
    return re.search(r"```python\n(.*?)```", body, re.S).group(1)


def test_readme_snippet_runs_verbatim(capsys):
    exec(compile(readme_snippet("Explain your own VAE"), "README.md", "exec"), {})
    assert "(4, 8, 7, 7) (4, 28, 28) (4, 28, 28) uint8" in capsys.readouterr().out


def shared_layers():
    return dict(
        conv=keras.layers.Conv2D(4, 3, activation="relu", name="feat"),
        flat=keras.layers.Flatten(),
        mu=keras.layers.Dense(3, name="mu"),
        logvar=keras.layers.Dense(3, name="logvar"),
    )


class SubclassedEncoder(keras.Model):
    def __init__(self, parts):
        super().__init__()
        self.feat, self.flat, self.mu, self.logvar = (
            parts[k] for k in ("conv", "flat", "mu", "logvar")
        )

    def call(self, images):
        hidden = self.flat(self.feat(images))
        return self.mu(hidden), self.logvar(hidden)


def three_encoders():
    """The same weights as a functional, a Sequential and a subclassed model."""
    parts = shared_layers()
    inputs = keras.Input((16, 16, 1))
    hidden = parts["flat"](parts["conv"](inputs))
    functional = keras.Model(inputs, [parts["mu"](hidden), parts["logvar"](hidden)])
    sequential = keras.Sequential(
        [keras.Input((16, 16, 1)), parts["conv"], parts["flat"], parts["mu"]]
    )
    subclassed = SubclassedEncoder(parts)
    subclassed(X)
    return functional, sequential, subclassed


def test_functional_sequential_and_subclassed_encoders_give_the_same_maps():
    functional, sequential, subclassed = three_encoders()
    reference = VAEAttention(functional, "feat").latent_maps(X).numpy()
    seq = VAEAttention(sequential, "feat", latent=0, logvar=None).latent_maps(X).numpy()
    sub_explainer = VAEAttention(subclassed, "feat", latent=0, logvar=1)
    assert sub_explainer.head is None  # no graph to split: vectorized Jacobian path
    np.testing.assert_allclose(seq, reference, atol=1e-6)
    np.testing.assert_allclose(sub_explainer.latent_maps(X).numpy(), reference, atol=1e-6)
    assert reference.shape == (3, 3, 14, 14) and reference.max() > 0


def test_graph_mode_matches_eager():
    _, _, subclassed = three_encoders()
    for encoder in three_encoders()[::2]:
        explainer = VAEAttention(encoder, "feat", latent=0, logvar=1)
        graph = tf.function(explainer.attention)
        np.testing.assert_allclose(graph(X).numpy(), explainer.attention(X).numpy(), atol=1e-6)


def test_inputs_of_any_size_the_encoder_accepts():
    inputs = keras.Input((None, None, 1))
    feat = keras.layers.Conv2D(4, 3, activation="relu", name="feat")(inputs)
    pooled = keras.layers.GlobalAveragePooling2D()(feat)
    encoder = keras.Model(
        inputs, [keras.layers.Dense(3)(pooled), keras.layers.Dense(3)(pooled)]
    )
    explainer = VAEAttention(encoder, "feat", latent=0, logvar=1)
    for shape in ((2, 20, 24, 1), (1, 9, 9, 1)):
        assert explainer.attention(RNG.random(shape).astype("float32")).shape == shape[:3]


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_low_precision_encoder_gives_float32_maps_close_to_float32(policy):
    reference, _, _ = three_encoders()
    keras.mixed_precision.set_global_policy(policy)
    try:
        low = keras.models.clone_model(reference)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    low.set_weights(reference.get_weights())
    maps = VAEAttention(low, "feat").latent_maps(X)
    expected = VAEAttention(reference, "feat").latent_maps(X).numpy()
    assert maps.dtype == tf.float32
    assert np.isfinite(maps.numpy()).all()
    np.testing.assert_allclose(maps.numpy(), expected, atol=0.05 * np.abs(expected).max())


def test_unknown_layer_lists_the_candidates():
    functional, _, _ = three_encoders()
    with pytest.raises(ValueError, match=r"'nope'.*valid names: feat"):
        VAEAttention(functional, layer="nope")


def test_layer_the_latent_does_not_depend_on_is_refused():
    inputs = keras.Input((16, 16, 1))
    a = keras.layers.Conv2D(2, 3, activation="relu", name="used")(inputs)
    b = keras.layers.Conv2D(2, 3, activation="relu", name="logvar_only")(inputs)
    mu = keras.layers.Dense(3, name="mu")(keras.layers.Flatten()(a))
    logvar = keras.layers.Dense(3, name="logvar")(keras.layers.Flatten()(b))
    encoder = keras.Model(inputs, [mu, logvar])
    with pytest.raises(ValueError, match="'logvar_only' is not upstream of the latent"):
        VAEAttention(encoder, layer="logvar_only")


def test_unknown_output_name_lists_the_outputs():
    functional, _, _ = three_encoders()
    with pytest.raises(ValueError, match=r"latent='z'.*outputs are \['mu', 'logvar'\]"):
        VAEAttention(functional, "feat", latent="z")


def test_api_equals_the_trainers_internal_path():
    model = build_vae("small", (28, 28, 1), latent_dim=5, filters=(8, 16), dense_units=32)
    data = RNG.random((6, 28, 28, 1)).astype("float32")
    model.fit_normal_stats([data[:3], data[3:]])
    explainer = VAEAttention(model.encoder, layer="conv2")
    stats = explainer.fit_normal_stats([data[:3], data[3:]])
    np.testing.assert_allclose(stats.mean.numpy(), model.normal_mean.numpy(), atol=1e-7)
    internal = pipeline.explain_anomaly(model, data, ExplainOptions(layers=("conv2",)))
    np.testing.assert_allclose(
        explainer.anomaly_attention(data, stats).numpy(),
        internal["heatmap"].numpy(),
        atol=1e-6,
    )
    np.testing.assert_allclose(
        explainer.attention(data).numpy(), internal["attention"].numpy(), atol=1e-6
    )


def test_every_public_name_resolves_where_the_package_says():
    import keras_vae_attn
    from keras_vae_attn.explain import latent, taps

    for name in keras_vae_attn.__all__:
        assert getattr(keras_vae_attn, name) is not None, name
    assert issubclass(keras_vae_attn.VAEAttention, taps.LayerTap)
    assert keras_vae_attn.fit_normal_stats is latent.fit_normal_stats
    assert keras_vae_attn.feature_layer_names is taps.feature_layer_names


def test_overlay_checks_sizes_and_returns_uint8_rgb():
    maps = RNG.random((3, 16, 16))
    pictures = overlay(X, maps)
    assert pictures.shape == (3, 16, 16, 3) and pictures.dtype == np.uint8
    with pytest.raises(ValueError, match="upsample the maps first"):
        overlay(X, maps[:, :8, :8])


def test_fit_normal_stats_refuses_empty_data():
    functional, _, _ = three_encoders()
    with pytest.raises(ValueError, match="empty dataset"):
        fit_normal_stats(functional, [])
