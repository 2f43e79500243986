"""Training speed options: --precision mixed_bfloat16 and --jit-compile give the same model
(losses, maps, saved weights) as float32; bench.speed_limit and the GPU-sized dSprites grid
run end to end at tiny sizes."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_vae_attn.data.dsprites import DSprites
from trainers import cli, devices, dsprites

from conftest import QUICK_METRIC_FLAGS

TINY = ["--batch-size", "8", "--dense-units", "16", "--latent-dim", "4"]


def dsprites_args(*flags):
    parser = dsprites.build_parser()
    return dsprites.check_args(parser, cli.parse(parser, [*TINY, *flags]))


def frames(count, seed=0):
    """Regenerated dSprites images float32 (count, 64, 64, 1)."""
    data = DSprites()
    return data.images_from_factors(data.sample_factors(count, np.random.default_rng(seed)))


def train_steps(model, batches):
    """Losses of one train step per batch (the same seeded model and batches each time)."""
    return [float(model.train_on_batch(batch, return_dict=True)["loss"]) for batch in batches]


def test_bad_precision_value_is_a_parser_error(capsys):
    with pytest.raises(SystemExit) as stop:
        dsprites_args("--precision", "float16")
    assert stop.value.code == 2
    error = capsys.readouterr().err
    assert "--precision" in error and "'float16'" in error and "mixed_bfloat16" in error


@pytest.mark.slow
def test_bf16_with_xla_trains_like_float32_and_saves_and_loads(tmp_path):
    from keras_vae_attn.models import load_vae, save_vae

    batches = [frames(8, seed) for seed in range(4)]
    runs = {}
    flags = ["--precision", "mixed_bfloat16", "--jit-compile"]
    for name, extra in (("float32", ["--precision", "float32"]), ("low", flags)):
        args = dsprites_args("--model", "factor_vae", "--seed", "3", "--lr", "3e-3", *extra)
        keras.utils.set_random_seed(3)
        runs[name] = (dsprites.build_model(args), args)
    model, args = runs["low"]
    assert model.encoder.get_layer("conv1").compute_dtype == "bfloat16"
    assert all(w.dtype == "float32" for w in model.weights)
    assert keras.mixed_precision.global_policy().name == "float32"  # restored
    reference = train_steps(runs["float32"][0], batches)
    low = train_steps(model, batches)
    assert reference[-1] < 0.98 * reference[0]  # training moved the loss ...
    # ... more than bf16's rounding moves it away from float32 (same weights and batches)
    np.testing.assert_allclose(low, reference, rtol=0.01)

    save_vae(model, str(tmp_path / "model"))
    loaded = load_vae(str(tmp_path / "model"))
    assert loaded.encoder.get_layer("conv1").compute_dtype == "float32"
    for saved, restored in zip(model.weights, loaded.weights):
        np.testing.assert_array_equal(saved.numpy(), restored.numpy())
    with devices.precision_scope("mixed_bfloat16"):
        loaded_low = load_vae(str(tmp_path / "model"))
    mu = model.encode(batches[0])[0].numpy()
    np.testing.assert_array_equal(loaded_low.encode(batches[0])[0].numpy(), mu)
    np.testing.assert_allclose(
        loaded.encode(batches[0])[0].numpy(), mu, atol=0.03 * np.abs(mu).max()
    )


def test_maps_are_float32_under_bf16_and_match_float32_maps():
    from keras_vae_attn.models import build_vae
    from keras_vae_attn.models.factor_vae import build_factor_vae

    images = np.random.default_rng(0).random((4, 28, 28, 1)).astype("f4")
    keras.utils.set_random_seed(0)
    reference = build_vae("small", (28, 28, 1), 4, filters=(8, 16), dense_units=16)
    with devices.precision_scope("mixed_bfloat16"):
        low = build_vae("small", (28, 28, 1), 4, filters=(8, 16), dense_units=16)
    low.set_weights(reference.get_weights())
    assert low.encoder.get_layer("conv2").compute_dtype == "bfloat16"
    expected = reference.explainer("conv2").latent_maps(images).numpy()
    maps = low.explainer("conv2").latent_maps(images)
    assert maps.dtype == tf.float32
    np.testing.assert_allclose(maps.numpy(), expected, atol=0.05 * np.abs(expected).max())
    energy = low.explainer("conv2").anomaly_attention(images, low.normal_stats())
    assert energy.dtype == tf.float32 and low(images).dtype == tf.float32

    net = dict(
        input_shape=(16, 16, 1),
        filters=(8, 8),
        dense_units=16,
        d_units=16,
        d_depth=2,
        lambda_ad=1.0,
        ad_maps="normalized",
    )
    reference = build_factor_vae(**net)
    with devices.precision_scope("mixed_bfloat16"):
        low = build_factor_vae(**net)
    low.set_weights(reference.get_weights())
    sprites = tf.image.resize(frames(4), (16, 16), method="area")
    _, _, maps = low.latent_maps_differentiable(sprites)
    _, _, expected = reference.latent_maps_differentiable(sprites)
    assert maps.dtype == tf.float32 and low.attention_loss(maps).dtype == tf.float32
    np.testing.assert_allclose(
        maps.numpy(), expected.numpy(), atol=0.05 * np.abs(expected.numpy()).max()
    )


@pytest.mark.slow
def test_speed_limit_quick_prints_the_limit_and_step_rows(capsys):
    from bench import speed_limit

    speed_limit.main(["--quick"])
    printed = capsys.readouterr().out
    lines = printed.splitlines()
    ops = [
        line
        for line in lines
        if line.startswith("| ") and ("conv2d" in line or "matmul" in line)
    ]
    steps = [line for line in lines if " | off " in line]  # the XLA column
    assert len(ops) == 4 and len(steps) == 4, printed  # 2 models x 2 ops / precisions
    assert sum("| mixed_bfloat16 " in line for line in steps) == 2
    assert any(line.startswith("| AD-FactorVAE") for line in steps)


def test_flop_count_follows_the_layer_shapes():
    from bench import speed_limit
    from keras_vae_attn.models import build_vae

    model = build_vae("small", (28, 28, 1), 4, filters=(8, 16), dense_units=16)
    conv1 = model.encoder.get_layer("conv1")  # 4x4 stride 2, 1 -> 8, out 14x14
    assert speed_limit.layer_flops(conv1) == 2 * 14 * 14 * 8 * 4 * 4 * 1
    forward = speed_limit.forward_flops(model.encoder)
    assert forward["dense"] == 2 * (7 * 7 * 16 * 16 + 2 * 16 * 4)
    step = speed_limit.step_flops(model, batch=5)
    decoder = speed_limit.forward_flops(model.decoder)
    assert step["conv"] == 3 * 5 * (forward["conv"] + decoder["conv"])


def test_grid_plan_shrinks_to_the_budget_or_refuses():
    from bench import dsprites_table as table3

    calibration = {"jobs": 4, "seconds_per_step": 0.01, "overhead_s": 30.0}
    steps, line = table3.plan(calibration, 8, 30000, 30000, 700)  # 2 waves x 330 s
    assert steps == 30000 and "660 s" in line
    steps, line = table3.plan(calibration, 8, 30000, 10000, 500)
    assert steps == 22000 and "shrunk to 22000" in line
    with pytest.raises(SystemExit, match="below --min-steps 30000"):
        table3.plan(calibration, 8, 30000, 30000, 500)


@pytest.mark.slow
def test_dsprites_grid_runs_calibrated_on_the_cpu_at_tiny_size(tmp_path, capsys):
    from bench import dsprites_table as table3

    out = tmp_path / "grid"
    tiny = [
        *TINY,
        *QUICK_METRIC_FLAGS,
        "--metric-variance-samples",
        "64",
        "--precision",
        "mixed_bfloat16",
    ]
    result = table3.main(
        [
            "--steps",
            "4",
            "--seeds",
            "0",
            "--jobs",
            "1",
            "--models",
            "beta_vae",
            "--budget-minutes",
            "10",
            "--calibrate-steps",
            "2",
            "--out",
            str(out),
            "--",
            *tiny,
        ]
    )
    printed = capsys.readouterr().out
    assert printed.startswith("calibration: 1 x beta_vae at once")
    assert "projected" in printed and "| beta-VAE (beta 4) |" in printed
    assert result["steps"] == 4 and result["calibration"]["steps"] == 4
    metrics = json.loads((out / "beta_vae-seed0" / "metrics.json").read_text())
    assert metrics["model"] == "beta_vae" and metrics["precision"] == "mixed_bfloat16"
    assert metrics["steps"] == 4 and len(metrics["epoch_seconds"]) >= 1
    assert (out / "table.json").is_file()
