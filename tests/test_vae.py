"""The VAE model: training lowers the loss, saving round-trips weights and stats."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_vae_attn import losses
from keras_vae_attn.models import build_vae, load_vae, save_vae


def blobs(count=64, size=28, seed=0):
    """Images of one bright square at random places: an easy 'normal' class."""
    rng = np.random.default_rng(seed)
    out = np.zeros((count, size, size, 1), np.float32)
    for image in out:
        r, c = rng.integers(2, size - 10, 2)
        image[r : r + 8, c : c + 8] = 1.0
    return out


def test_training_lowers_the_loss_and_tracks_each_term():
    keras.utils.set_random_seed(0)  # the same start whatever ran before
    model = build_vae("small", (28, 28, 1), latent_dim=4, filters=(8, 16), dense_units=32)
    model.compile(optimizer=keras.optimizers.Adam(3e-3))
    data = tf.data.Dataset.from_tensor_slices(blobs()).batch(16)
    history = model.fit(data, epochs=10, verbose=0, shuffle=False).history
    assert set(history) == {"loss", "recon", "kl"}
    assert history["loss"][-1] < 0.8 * history["loss"][0]
    np.testing.assert_allclose(
        history["loss"][-1], history["recon"][-1] + history["kl"][-1], rtol=1e-4
    )
    evaluation = model.evaluate(data, verbose=0, return_dict=True)
    assert np.isfinite(evaluation["loss"])


@pytest.mark.parametrize("kind", ["bce", "mse"])
def test_reconstruction_losses(kind):
    images = np.array([[[[0.0], [1.0]]]], np.float32)
    logits = np.array([[[[0.0], [0.0]]]], np.float32)
    value = losses.reconstruction_loss(images, logits, kind).numpy()
    expected = 2 * np.log(2) if kind == "bce" else 2 * 0.25
    np.testing.assert_allclose(value, [expected], rtol=1e-6)


def test_kl_is_zero_at_the_prior_and_positive_elsewhere():
    assert losses.kl_divergence(np.zeros((1, 3)), np.zeros((1, 3))).numpy()[0] == 0
    np.testing.assert_allclose(
        losses.kl_divergence(np.ones((1, 1)), np.zeros((1, 1))).numpy(), [0.5]
    )


def test_unknown_reconstruction_loss_is_refused():
    with pytest.raises(ValueError, match="unknown reconstruction loss 'l7'"):
        build_vae("small", (28, 28, 1), 4, recon_loss="l7")


def test_save_and_load_round_trip_weights_and_normal_stats(tmp_path):
    model = build_vae("small", (28, 28, 1), latent_dim=4, filters=(8, 16), dense_units=32)
    stats = model.fit_normal_stats(tf.data.Dataset.from_tensor_slices(blobs(8)).batch(4))
    assert not np.allclose(model.normal_std.numpy(), 1.0)
    save_vae(model, tmp_path / "model")
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == [
        "model.json",
        "model.weights.h5",
    ]
    loaded = load_vae(tmp_path / "model")
    np.testing.assert_allclose(loaded.normal_mean.numpy(), stats.mean.numpy())
    x = blobs(2, seed=3)
    np.testing.assert_allclose(loaded(x).numpy(), model(x).numpy(), atol=1e-6)
    np.testing.assert_allclose(
        loaded.explainer().attention(x).numpy(),
        model.explainer().attention(x).numpy(),
        atol=1e-6,
    )


def test_loading_a_folder_without_a_model_names_the_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no trained model.*model.json"):
        load_vae(tmp_path)


def test_resnet18_backbone_names_its_stages_and_reconstructs_at_input_size():
    model = build_vae("resnet18", (64, 64, 3), latent_dim=8)
    names = [layer.name for layer in model.encoder.layers]
    for stage in ("conv1", "layer1", "layer2", "layer3", "layer4"):
        assert stage in names
    assert model(np.zeros((1, 64, 64, 3), np.float32)).shape == (1, 64, 64, 3)
    assert model.explainer("layer3").attention(np.zeros((1, 64, 64, 3), np.float32)).shape == (
        1,
        64,
        64,
    )


def test_small_backbone_at_100_pixels_crops_back_to_size():
    model = build_vae("small", (100, 100, 1), latent_dim=4)
    assert model(np.zeros((1, 100, 100, 1), np.float32)).shape == (1, 100, 100, 1)
    feature_sizes = [model.encoder.get_layer(f"conv{i}").output.shape[1] for i in (1, 2, 3)]
    assert feature_sizes == [50, 25, 13]
