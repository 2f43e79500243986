"""The explanation checks on a small VAE that really learned its normal images: the
model-randomization check (a model-free map must fail it, the reconstruction difference
must pass it) and deletion curves (a map's own ranking beats a random one)."""

from __future__ import annotations

import numpy as np
import pytest

SIZE = 32


def stripes(count, rng, defect=False):
    """Normal images: vertical stripes of 0.1 and 0.9 with a little noise; defects: a
    6x6 square of 0.5 at a random place (far from both stripe values)."""
    base = np.where((np.arange(SIZE) // 4) % 2 == 0, 0.1, 0.9).astype(np.float32)
    images = np.tile(base[None, None, :, None], (count, SIZE, 1, 1))
    images = images + rng.normal(0, 0.02, images.shape).astype(np.float32)
    masks = np.zeros((count, SIZE, SIZE), bool)
    if defect:
        for index in range(count):
            row, col = rng.integers(2, SIZE - 8, size=2)
            images[index, row : row + 6, col : col + 6] = 0.5
            masks[index, row : row + 6, col : col + 6] = True
    return np.clip(images, 0, 1), masks


@pytest.fixture(scope="module")
def trained():
    """(trained small VAE with its statistics, normal images, test images, masks,
    labels): 4 normal and 12 defective test images."""
    import keras
    import tensorflow as tf

    from keras_vae_attn.models import build_vae

    rng = np.random.default_rng(0)
    normal, _ = stripes(256, rng)
    good, good_masks = stripes(4, rng)
    bad, bad_masks = stripes(12, rng, defect=True)
    keras.utils.set_random_seed(0)
    model = build_vae("small", (SIZE, SIZE, 1), 8, recon_loss="mse")
    model.compile(optimizer=keras.optimizers.Adam(2e-3))
    model.fit(normal, epochs=15, batch_size=32, verbose=0)
    batches = tf.data.Dataset.from_tensor_slices(normal).batch(64)
    model.fit_normal_statistics(batches, ["conv1"], covariance=False)
    images = np.concatenate([good, bad])
    masks = np.concatenate([good_masks, bad_masks])
    labels = np.array([0] * 4 + [1] * 12)
    return model, normal, images, masks, labels


def test_spearman_is_one_for_the_same_ranking_and_zero_for_a_constant_map():
    from keras_vae_attn.explain.sanity import spearman

    rng = np.random.default_rng(1)
    a = rng.random((3, 8, 8))
    assert np.allclose(spearman(a, a**3), 1.0)  # monotone: same ranks
    assert np.allclose(spearman(a, -a), -1.0)
    assert np.allclose(spearman(a, np.zeros_like(a)), 0.0)


def test_the_rule_needs_both_a_drop_and_a_low_correlation():
    from keras_vae_attn.explain.sanity import verdict

    assert verdict(0.9, 0.6, [0.2, 0.4]).passes
    assert not verdict(0.9, 0.8, [0.1]).passes  # drop 0.1 < 0.15
    assert not verdict(0.9, 0.5, [0.7, 0.6]).passes  # Spearman 0.65 > 0.5
    assert verdict(None, 0.5, [0.1]).passes is None  # undefined score


@pytest.mark.slow
def test_stages_cover_every_weighted_layer_once_from_the_top(trained):
    from keras_vae_attn.explain import sanity

    model = trained[0]
    stages = sanity.stages(model)
    labels = [label for label, _ in stages]
    assert labels[:2] == ["decoder", "head"] and labels[-1] == "conv1"
    pairs = [pair for _, members in stages for pair in members]
    weighted = [("encoder", layer.name) for layer in model.encoder.layers if layer.weights] + [
        ("decoder", layer.name) for layer in model.decoder.layers if layer.weights
    ]
    assert sorted(pairs) == sorted(weighted) and len(pairs) == len(set(pairs))


@pytest.mark.slow
def test_randomize_keeps_the_trained_weights_outside_the_stage(trained):
    from keras_vae_attn.explain import sanity

    model = trained[0]
    decoder_only = sanity.randomize(model, 5, sanity.stages(model)[0][1])
    for layer in model.encoder.layers:
        for mine, theirs in zip(
            layer.get_weights(), decoder_only.encoder.get_layer(layer.name).get_weights()
        ):
            np.testing.assert_array_equal(mine, theirs)
    changed = [
        not np.array_equal(a, b)
        for a, b in zip(model.decoder.get_weights(), decoder_only.decoder.get_weights())
    ]
    assert all(changed)


@pytest.mark.slow
def test_model_free_map_fails_and_reconstruction_difference_passes(trained):
    """Adebayo's check on real maps: the pixel z-score is computed from the image alone
    (Spearman 1, no drop on the twin: it fails by construction); the reconstruction
    difference needs the trained decoder (large drop, low correlation: it passes)."""
    import tensorflow as tf

    from keras_vae_attn import evaluate, references
    from keras_vae_attn.explain import sanity
    from keras_vae_attn.explain.options import ExplainOptions

    model, normal, images, masks, labels = trained
    options = ExplainOptions(layers=("conv1",), form="deviation", deviation="standardized")
    twin = sanity.twin(
        model, tf.data.Dataset.from_tensor_slices(normal).batch(64), ["conv1"], False
    )
    result = evaluate.localize(
        model,
        images,
        masks,
        labels,
        options,
        references.fit_pixel_distribution(normal),
        normal,
        batch_size=16,
        twin=twin,
    )
    z_score = result.sanity[references.PIXEL_DEVIATION]
    assert z_score.spearman == pytest.approx(1.0) and z_score.drop == pytest.approx(0.0)
    assert z_score.passes is False
    recon = result.sanity[evaluate.RECON]
    assert recon.trained > 0.9, recon
    assert recon.drop >= sanity.MIN_DROP and recon.spearman <= sanity.MAX_SPEARMAN
    assert recon.passes is True
    assert evaluate.RANDOM_FEATURES in result.compared
    lines = evaluate.summary(result, "stripes")
    assert any("randomization check" in line for line in lines)


@pytest.mark.slow
def test_deletion_by_the_maps_own_ranking_beats_a_random_ranking(trained):
    from keras_vae_attn.explain import faithfulness, pipeline
    from keras_vae_attn.explain.options import ExplainOptions

    model, normal, images, masks, labels = trained
    bad = images[labels == 1]
    recon = pipeline.batched(
        model, bad, 16, ExplainOptions(layers=("conv1",)), keys=("recon_error",)
    )["recon_error"]
    curves = faithfulness.curves(
        model, bad, {"recon": recon, "truth": masks[labels == 1]}, normal.mean(0)
    )
    random = curves[faithfulness.RANDOM]
    assert curves["recon"].deletion[0] == pytest.approx(1.0)
    assert curves["truth"].deletion_auc < random.deletion_auc
    assert curves["recon"].deletion_auc < random.deletion_auc
    assert curves["recon"].insertion_auc > random.insertion_auc


class RegionEncoder:
    """A model whose latent j is the mean of image quadrant j: the right per-latent map
    of latent j is that quadrant, so selectivity must find it."""

    def __init__(self):
        import tensorflow as tf

        from keras_vae_attn.explain.latent import NormalStats

        self.stats = NormalStats(tf.zeros(4), tf.ones(4) * 0.1)

    def encode(self, images):
        import tensorflow as tf

        half = images.shape[1] // 2
        quads = [
            images[:, :half, :half],
            images[:, :half, half:],
            images[:, half:, :half],
            images[:, half:, half:],
        ]
        mu = tf.stack([tf.reduce_mean(q, axis=[1, 2, 3]) for q in quads], axis=1)
        return mu, tf.zeros_like(mu)

    def normal_stats(self):
        return self.stats


def test_selectivity_finds_maps_that_point_at_their_own_latent():
    from keras_vae_attn.explain.faithfulness import selectivity

    rng = np.random.default_rng(2)
    images = rng.random((6, 8, 8, 1)).astype(np.float32)
    right = np.zeros((6, 4, 8, 8), np.float32)
    for j, (r, c) in enumerate([(0, 0), (0, 4), (4, 0), (4, 4)]):
        right[:, j, r : r + 4, c : c + 4] = 1.0 + rng.random((6, 4, 4))
    model, baseline = RegionEncoder(), np.zeros((8, 8, 1), np.float32)
    good = selectivity(model, images, right, baseline, fraction=0.25)
    assert good["top1"] == 1.0 and good["ratio"] > 10
    wrong = selectivity(model, images, right[:, ::-1], baseline, fraction=0.25)
    assert wrong["top1"] == 0.0 and wrong["ratio"] < 0.1
