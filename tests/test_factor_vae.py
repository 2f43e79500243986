"""FactorVAE and L_AD: Eq. 6 at its extremes, the second-order gradient of L_AD against
finite differences, the seeded permutation, training steps, and save/load."""

import json
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_vae_attn import losses
from keras_vae_attn.data import dsprites
from keras_vae_attn.models import factor_vae as fv
from keras_vae_attn.models import load_vae, save_vae

from conftest import QUICK_METRIC_FLAGS

TINY = dict(
    input_shape=(16, 16, 1), latent_dim=3, filters=(4, 8), dense_units=8, d_units=16, d_depth=2
)


def tiny_model(**overrides):
    keras.utils.set_random_seed(0)
    return fv.build_factor_vae(**{**TINY, **overrides})


def sprites(count, size=16, seed=0):
    """Real dSprites images, downsized to ``size`` for speed, float32 (N, s, s, 1)."""
    data = dsprites.DSprites()
    images = data.images_from_factors(data.sample_factors(count, np.random.default_rng(seed)))
    return tf.image.resize(images, (size, size), method="area").numpy()


def test_attention_overlap_is_zero_for_disjoint_and_one_for_equal_maps():
    left = np.zeros((2, 4, 4), np.float32)
    left[:, :, :2] = np.array([1.0, 3.0])[:, None, None]
    right = left[:, :, ::-1].copy()
    assert np.allclose(losses.attention_overlap(left, right).numpy(), 0.0)
    assert np.allclose(losses.attention_overlap(left, left).numpy(), 1.0)
    half = np.concatenate([left[:1], left[:1] * 0.5])
    assert 0.0 < losses.attention_overlap(left[:1], half[1:]).numpy()[0] < 1.0


def l_ad(model, images):
    """Mean L_AD of the model's chosen pair, for fixed images."""
    _, _, maps = model.latent_maps_differentiable(images)
    return tf.reduce_mean(model.attention_loss(maps))


def weight_named(model, layer_name):
    return next(
        v
        for v in model.encoder.trainable_variables
        if v.path.split("/")[-2] == layer_name and v.path.endswith("kernel")
    )


@pytest.fixture()
def float64():
    """float64 layers for this test only. Keras 3 pins its global dtype policy to floatx
    at its first read, so the policy is read (and restored) too: otherwise the models of
    every later test in the process get float64 weights."""
    previous, policy = keras.config.floatx(), keras.mixed_precision.global_policy()
    keras.config.set_floatx("float64")
    keras.mixed_precision.set_global_policy("float64")
    yield
    keras.config.set_floatx(previous)
    keras.mixed_precision.set_global_policy(policy)


@pytest.mark.parametrize("ad_maps", ["relu", "normalized"])
def test_l_ad_gradient_matches_finite_differences(float64, ad_maps):
    model = tiny_model(lambda_ad=1.0, ad_maps=ad_maps)
    images = tf.constant(sprites(6), tf.float64)
    rng = np.random.default_rng(0)
    for layer in ("conv1", "mu"):  # mu reaches the maps only through w_i: 2nd order
        variable = weight_named(model, layer)
        with tf.GradientTape() as tape:
            value = l_ad(model, images)
        grad = tape.gradient(value, variable).numpy()
        assert np.abs(grad).max() > 1e-4, layer
        original = variable.numpy()
        flat = (
            np.argsort(-np.abs(grad).ravel())[:3].tolist()
            + rng.choice(grad.size, 2, replace=False).tolist()
        )
        for index in flat:
            where = np.unravel_index(index, grad.shape)
            estimates = []
            for step in (1e-4, -1e-4):
                shifted = original.copy()
                shifted[where] += step
                variable.assign(shifted)
                estimates.append(float(l_ad(model, images)))
            variable.assign(original)
            numeric = (estimates[0] - estimates[1]) / 2e-4
            # L_AD itself is reduced in float32: ~3e-4 of rounding noise at this step
            assert numeric == pytest.approx(grad[where], rel=1e-2, abs=1e-3), (layer, where)


def test_first_order_l_ad_ignores_the_path_through_the_gradient_weights():
    images = tf.constant(sprites(4))
    grads = {}
    for second_order in (True, False):
        model = tiny_model(lambda_ad=1.0, ad_second_order=second_order)
        variable = weight_named(model, "mu")
        with tf.GradientTape() as tape:
            value = l_ad(model, images)
        grads[second_order] = tape.gradient(value, variable)
    assert np.abs(grads[True].numpy()).max() > 0
    assert grads[False] is None or np.abs(grads[False].numpy()).max() == 0


def test_abs_maps_keep_what_relu_maps_drop():
    images = tf.constant(sprites(6))
    maps = {}
    for kind in fv.AD_MAPS:
        model = tiny_model(lambda_ad=1.0, ad_maps=kind)  # same seed: same weights
        maps[kind] = model.latent_maps_differentiable(images)[2].numpy()
    explanation = model.explainer("last").explain(images)
    signed = np.einsum(
        "bdk,bhwk->bdhw", explanation.weights.numpy(), explanation.features.numpy()
    )
    np.testing.assert_allclose(maps["relu"], np.maximum(signed, 0), atol=1e-5)
    np.testing.assert_allclose(maps["abs"], np.abs(signed), atol=1e-5)
    # where the weighted sum is negative the ReLU form shows nothing, the absolute form does
    negative = signed < -1e-6
    assert negative.any()
    assert (maps["relu"][negative] == 0).all() and (maps["abs"][negative] > 0).all()
    with pytest.raises(ValueError, match="unknown ad_maps"):
        tiny_model(lambda_ad=1.0, ad_maps="square")


def test_normalized_maps_compare_where_latents_look_not_how_strongly():
    rng = np.random.default_rng(0)
    strong = tf.constant(rng.random((3, 4, 4)), tf.float32)
    weak = 0.1 * strong
    # the same place at a tenth of the strength: abs maps call that little overlap
    assert losses.attention_overlap(strong, weak).numpy() == pytest.approx([2 * 0.1 / 1.1] * 3)
    assert losses.attention_overlap(
        fv.unit_mass(strong), fv.unit_mass(weak)
    ).numpy() == pytest.approx([1.0] * 3)
    images = tf.constant(sprites(6))
    model = tiny_model(lambda_ad=1.0, ad_maps="normalized")
    maps = model.latent_maps_differentiable(images)[2]
    first, second = fv.pair_maps(maps, fv.top_pair(maps))
    expected = losses.attention_overlap(
        first / tf.reduce_sum(first, [1, 2], keepdims=True),
        second / tf.reduce_sum(second, [1, 2], keepdims=True),
    )
    np.testing.assert_allclose(model.attention_loss(maps).numpy(), expected.numpy(), rtol=1e-5)
    # scaling every map leaves L_AD unchanged
    np.testing.assert_allclose(
        model.attention_loss(7.0 * maps).numpy(), expected.numpy(), rtol=1e-5
    )


def test_pairs_are_distinct_and_top_pair_has_the_largest_maps():
    maps = np.zeros((2, 4, 3, 3), np.float32)
    maps[0, [1, 3]] = [[[2.0]], [[1.0]]]
    maps[1, [0, 2]] = [[[1.0]], [[5.0]]]
    assert fv.top_pair(tf.constant(maps)).numpy().tolist() == [[1, 3], [2, 0]]
    pairs = fv.random_pair(500, 4, tf.constant([1, 2])).numpy()
    assert (pairs[:, 0] != pairs[:, 1]).all() and set(pairs.ravel()) == {0, 1, 2, 3}


def test_permute_dims_shuffles_each_column_and_is_seeded():
    z = tf.reshape(tf.range(40, dtype=tf.float32), (10, 4))
    shuffled = fv.permute_dims(z, tf.constant([3, 4])).numpy()
    again = fv.permute_dims(z, tf.constant([3, 4])).numpy()
    assert np.array_equal(shuffled, again)
    assert not np.array_equal(shuffled, z.numpy())
    for column in range(4):
        assert sorted(shuffled[:, column]) == sorted(z.numpy()[:, column])
    assert not np.array_equal(fv.permute_dims(z, tf.constant([5, 6])).numpy(), shuffled)


def test_training_updates_vae_and_discriminator():
    lambda_ad = 1.0
    model = tiny_model(lambda_ad=lambda_ad, ad_pairs="random")
    model.compile()
    assert model.d_optimizer.built and model.optimizer.built  # both before fit
    before = [v.numpy().copy() for v in model.discriminator.trainable_variables]
    history = model.fit(sprites(32), batch_size=8, epochs=2, verbose=0)
    logs = {k: v[-1] for k, v in history.history.items()}
    assert set(logs) >= {"loss", "recon", "kl", "tc", "d_loss", "l_ad"}
    assert all(np.isfinite(v) for v in logs.values())
    assert (logs["l_ad"] > 0) == bool(lambda_ad)
    assert int(model.d_optimizer.iterations) == 8
    after = model.discriminator.trainable_variables
    assert any(not np.allclose(a, b.numpy()) for a, b in zip(before, after))


def test_saved_factor_vae_reloads_with_its_spec(tmp_path):
    model = tiny_model(lambda_ad=1.0, gamma=10.0)
    images = sprites(3)
    save_vae(model, tmp_path / "model")
    loaded = load_vae(tmp_path / "model")
    assert isinstance(loaded, fv.FactorVAE)
    assert (loaded.gamma, loaded.lambda_ad) == (10.0, 1.0)
    assert np.allclose(loaded.encode(images)[0], model.encode(images)[0])
    z = np.ones((2, 3), np.float32)
    assert np.allclose(loaded.total_correlation(z), model.total_correlation(z))
    with pytest.raises(ValueError, match="ad_pairs"):
        tiny_model(ad_pairs="nearest")


@pytest.mark.slow
def test_trainer_writes_a_complete_run(tmp_path):
    from trainers import dsprites as trainer

    scoring = [
        *QUICK_METRIC_FLAGS,
        *("--metric-variance-samples", "32", "--runs-root", str(tmp_path), "--quiet"),
    ]
    run_dir = trainer.main(
        [
            *"--model factor_vae --steps 4 --epochs 2 --batch-size 8".split(),
            *"--score-every 1 --score-every-votes 3".split(),
            *scoring,
        ]
    )
    metrics = json.loads((Path(run_dir) / "metrics.json").read_text())
    assert 0.0 <= metrics["factor_vae_score"] <= 1.0
    assert (metrics["model"], metrics["gamma"], metrics["steps"]) == ("factor_vae", 40.0, 4)
    curve = metrics["score_curve"]
    assert curve["steps"] == [2, 4]
    assert all(0.0 <= s <= 1.0 for s in curve["scores"])
    for figure in ("curves.png", "traversals.png", "attention_pairs.png", "score_curve.png"):
        assert (Path(run_dir) / figure).stat().st_size > 0
    assert not (Path(run_dir) / "checkpoints").exists()  # model/ holds the weights
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    attention = EventAccumulator(str(Path(run_dir) / "tensorboard" / "attention"))
    attention.Reload()  # the figure's six images, one panel per epoch
    assert len(attention.Tags()["images"]) == 6
    assert [p.step for p in attention.Images("input|reconstruction|attention/0")] == [0, 1]
    assert isinstance(load_vae(Path(run_dir) / "model"), fv.FactorVAE)
    assert 0 <= metrics["non_empty_maps_per_image"] <= 10
    assert 0 <= metrics["empty_second_map_fraction"] <= 1
    selectivity = metrics["latent_selectivity"]
    assert selectivity["ratio"] > 0 and 0 <= selectivity["top1"] <= 1

    # the saved model scored again: the same seed and votes give the same score
    rescored_dir = trainer.main(["--model-dir", str(Path(run_dir) / "model"), *scoring])
    rescored = json.loads((Path(rescored_dir) / "metrics.json").read_text())
    assert rescored_dir != run_dir and rescored["steps"] is None
    assert (rescored["model"], rescored["gamma"]) == ("factor_vae", 40.0)
    for key in ("factor_vae_score", "attention_overlap_top_pair", "non_empty_maps_per_image"):
        assert rescored[key] == pytest.approx(metrics[key], abs=1e-6), key
    assert not (Path(rescored_dir) / "curves.png").exists()


def test_map_usage_counts_switched_off_maps():
    from trainers import dsprites as trainer

    maps = np.zeros((2, 4, 2, 2))
    maps[0, 0], maps[0, 2], maps[0, 3] = 1.0, 0.5, 1e-5  # image 0: 2 maps show something
    maps[1, 1], maps[1, 3] = 2.0, 2.0  # image 1: 2 equal maps
    pair = np.array([[0, 3], [1, 3]])  # image 0's 2nd map is empty
    usage = trainer.map_usage(maps, pair)
    assert usage == {"non_empty_maps_per_image": 2.0, "empty_second_map_fraction": 0.5}


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "beta_vae", "--gamma", "10"], "--gamma applies"),
        (["--model", "factor_vae", "--lambda-ad", "1"], "--lambda-ad applies"),
        (["--model", "ad_factor_vae", "--lambda-ad", "0"], "use --model factor_vae"),
        (["--steps", "0"], "--steps must be at least 1"),
        (["--score-every", "-1"], "--score-every must be 0"),
        (["--beta", "-1"], "--beta must be a non-negative"),
        (["--source", "archive"], "needs --data-dir"),
        (["--model-dir", "m", "--steps", "5"], "--steps only applies to training"),
    ],
)
def test_trainer_rejects_bad_flags(argv, message, capsys):
    from trainers import dsprites as trainer

    with pytest.raises(SystemExit) as stop:
        trainer.main(argv + ["--runs-root", "unused"])
    assert stop.value.code == 2
    assert message in capsys.readouterr().err
