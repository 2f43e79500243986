"""The UCSD trainer end to end on a generated dataset, its flags and its errors."""

import json
import os
import re

import numpy as np
import pytest

from keras_vae_attn.data import LocalizationSplit
from keras_vae_attn.data import ucsd as ucsd_data
from keras_vae_attn.data.synthetic import write_ucsd_dataset
from keras_vae_attn.evaluate import LABELS
from trainers import fit, guard
from trainers import ucsd as trainer

from conftest import QUICK_RUN_FLAGS

SMALL = dict(
    width=48, height=32, frames=8, n_train=2, n_test=3, n_test_without_gt=1, walkers=3
)
QUICK = [*"--image-size 40 --latent-dim 4 --eval-batch-size 8".split(), *QUICK_RUN_FLAGS]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("ucsd-data")
    write_ucsd_dataset(str(root), "ped1", **SMALL)
    return root


@pytest.mark.slow
def test_a_short_run_writes_every_output(data_root, tmp_path, capsys):
    run_dir = trainer.main(
        [
            "--data-dir",
            str(data_root),
            "--runs-root",
            str(tmp_path),
            "--layers",
            "conv1,conv2,conv3",
            *QUICK,
        ]
    )
    for name in (
        "metrics.json",
        "config.json",
        "examples.png",
        "roc.png",
        "curves.png",
        "training_log.jsonl",
        "model/model.json",
        "model/model.weights.h5",
    ):
        assert os.path.getsize(os.path.join(run_dir, name)) > 0, name
    assert os.listdir(os.path.join(run_dir, "tensorboard"))
    with open(os.path.join(run_dir, "metrics.json"), encoding="utf-8") as handle:
        metrics = json.load(handle)
    # the anomaly attention, every reference it is compared with, the ablation rows
    names = [*LABELS, "attention_conv1", "attention_conv2", "attention_conv3"]
    assert sorted(metrics["methods"]) == sorted(names)
    assert metrics["sanity"]["pixel_deviation"]["passes"] is False  # model-free
    for values in metrics["methods"].values():
        for key in ("pixel_auroc", "aupro", "best_iou", "image_auroc"):
            assert 0.0 <= values[key] <= 1.0, key
    assert metrics["test_clips"] == ["Test001", "Test002"]  # Test003 has no masks
    assert metrics["test_frames"] == 2 * SMALL["frames"]
    assert metrics["train_frames"] == 2 * SMALL["frames"] - 2  # the last 2 calibrate
    assert metrics["predictions"]["calibration_images"] == 2
    assert set(metrics["attention_beats_recon"]) == {
        "anomaly_attention",
        "conv1",
        "conv2",
        "conv3",
    }
    # every reference at every smoothing level (0, side/32, side/16), side by side
    assert set(metrics["references"]) == set(LABELS)
    assert list(metrics["references"]["recon_error"]) == ["0", "1.25", "2.5"]
    config = json.loads(open(os.path.join(run_dir, "config.json")).read())
    assert metrics["exported_layers"] == config["explain"]["layers"]  # what exports serve
    printed = capsys.readouterr().out
    rows = (
        "anomaly attention",
        "recon difference",
        "feature deviation",
        "mean-image diff",
        "pixel z-score",
    )
    positions = [printed.find(row) for row in rows]  # the table, in order
    assert -1 not in positions and positions == sorted(positions)
    assert "0.86" in printed and "0.92" in printed  # the paper's column
    assert "anomaly attention beats" in printed or "does not beat" in printed
    # one comparison of the references, every table says at which sigma, and the run's
    # decisions at its calibrated thresholds close the output
    rows = [
        line
        for line in printed.splitlines()  # the comparison table's rows
        if line.strip().startswith("mean-image") and " s=" in line
    ]
    assert len(rows) == 1 and "best s" in printed  # one table row per reference
    assert "FAILS the randomization check" in printed or "passes the randomization" in printed
    assert "the paper's Table 1: every metric at sigma 0 px" in printed
    counts = metrics["predictions"]["at_threshold"]
    flagged = counts["true_positive"] + counts["false_positive"]
    assert (
        f"{flagged} of {metrics['test_frames']} test frames flagged anomalous, "
        f"{counts['true_positive']} of them anomalous"
    ) in printed

    # The saved model reproduces the recorded number through the shared scoring code.
    from keras_vae_attn.explain import pipeline
    from keras_vae_attn.explain.options import ExplainOptions
    from keras_vae_attn.metrics import localization
    from keras_vae_attn.models import load_vae

    model = load_vae(os.path.join(run_dir, "model"))
    test = ucsd_data.load_test(str(data_root), "ped1", size=40)
    from trainers.ucsd import layer_options

    options = layer_options(ExplainOptions.from_config(config), "conv2")
    assert options.form == "gradcam"  # the default reads no layer: Table 1 is the paper's
    heatmap = pipeline.batched(
        model, ucsd_data.to_float(test.images), 8, options, keys=("heatmap",)
    )["heatmap"]
    assert localization.pixel_auroc(heatmap, test.masks) == pytest.approx(
        metrics["methods"]["attention_conv2"]["pixel_auroc"], abs=1e-4
    )


def test_figure_frames_are_anomalous_one_per_clip_first():
    masks = np.zeros((6, 4, 4), bool)
    masks[1, :2] = True  # clip A: area 8
    masks[2, :1] = True  # clip A: area 4
    masks[4, :3] = True  # clip B: area 12
    frames = LocalizationSplit(
        images=np.zeros((6, 4, 4, 1), np.uint8),
        masks=masks,
        labels=masks.any(axis=(1, 2)).astype(int),
        groups=["A", "A", "A", "B", "B", "B"],
        paths=[""] * 6,
    )
    assert trainer.pick_frames(frames, 2) == [1, 4]
    assert trainer.pick_frames(frames, 3) == [1, 4, 2]
    assert trainer.pick_frames(frames, 5) == [1, 4, 2]  # only anomalous frames
    quiet = frames._replace(masks=np.zeros_like(masks))
    assert trainer.pick_frames(quiet, 2) == [0, 1]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--layers", "conv1,conv9"], "--layers 'conv9' is not a feature map.*valid: conv1"),
        (["--layer", "conv1,nosuch"], "--layer/--layers 'nosuch' is not a feature map"),
        (["--form", "integrated", "--target", "energy"], "--form integrated integrates one"),
        (["--ig-steps", "0"], "--ig-steps must be an integer >= 1"),
        (["--layers", "conv1,conv1"], "--layers repeats a layer"),
        (["--layers", ","], "--layers names no layer"),
        (["--frame-step", "0"], "--frame-step must be at least 1"),
        (["--image-size", "8"], "--image-size must be at least 16"),
        (["--subset", "ped3"], "invalid choice: 'ped3'"),
    ],
)
def test_bad_flags_are_named(flags, message, data_root, capsys):
    with pytest.raises(SystemExit) as exit_info:
        trainer.parse_args(["--data-dir", str(data_root), *flags])
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)


def test_data_root_comes_from_the_environment_or_the_demo(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("UCSD_ROOT", raising=False)
    with pytest.raises(SystemExit):
        trainer.parse_args([])
    assert "--data-dir" in capsys.readouterr().err
    monkeypatch.setenv("UCSD_ROOT", str(tmp_path))
    assert trainer.parse_args([]).data_dir == str(tmp_path)
    demo = trainer.parse_args(["--demo", "--runs-root", str(tmp_path / "runs")])
    assert demo.data_dir == os.path.join(str(tmp_path / "runs"), "data")
    assert demo.layers == ["conv1", "conv2", "conv3"]


def test_data_errors_end_in_one_clear_line(data_root, tmp_path, capsys):
    missing = tmp_path / "empty" / "UCSDped1"
    (missing / "Train").mkdir(parents=True)
    with pytest.raises(SystemExit) as exit_info:
        guard.main_guard(
            lambda: trainer.main(
                ["--data-dir", str(missing.parent), "--runs-root", str(tmp_path), *QUICK]
            )
        )
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "error: UCSDped1 has no Test folder" in err and "Traceback" not in err
    assert not (tmp_path / "ucsd-ped1").exists()  # nothing written before the data


@pytest.mark.slow
def test_a_resnet18_run_re_estimates_batch_norm_statistics(data_root, tmp_path, monkeypatch):
    """The shared one-class routine re-estimates BatchNorm statistics for every trainer
    whose model has BatchNorm (UCSD's --backbone resnet18 too): the moving statistics
    after training are replaced by the average batch statistics of the normal frames."""
    import keras

    seen = []
    real = fit.recalibrate_batch_norm

    def recording(model, dataset):
        layers = [
            layer
            for part in (model.encoder, model.decoder)
            for layer in part.layers
            if isinstance(layer, keras.layers.BatchNormalization)
        ]
        before = [np.array(layer.moving_mean) for layer in layers]
        real(model, dataset)
        after = [np.array(layer.moving_mean) for layer in layers]
        seen.append((len(layers), max(np.abs(a - b).max() for a, b in zip(after, before))))

    monkeypatch.setattr(fit, "recalibrate_batch_norm", recording)
    trainer.main(
        [
            "--data-dir",
            str(data_root),
            "--runs-root",
            str(tmp_path),
            *QUICK,
            "--backbone",
            "resnet18",
            "--layers",
            "conv1",
            "--layer",
            "conv1",
        ]
    )
    assert len(seen) == 1
    count, change = seen[0]
    assert count > 10 and change > 1e-3  # ResNet18 has BatchNorm; its stats moved


def test_batch_norm_recalibration_sets_the_average_batch_statistics():
    import keras
    import tensorflow as tf

    from keras_vae_attn.models import build_vae

    model = build_vae("resnet18", (32, 32, 1), 4)
    bn = model.encoder.get_layer("stem_bn")
    batches = [
        np.random.default_rng(i).random((8, 32, 32, 1), dtype=np.float32) for i in range(3)
    ]
    fit.recalibrate_batch_norm(
        model, tf.data.Dataset.from_tensor_slices(np.concatenate(batches)).batch(8)
    )
    conv = keras.Model(model.encoder.input, model.encoder.get_layer("stem_conv").output)
    means = [conv(b).numpy().mean(axis=(0, 1, 2)) for b in batches]
    np.testing.assert_allclose(
        np.array(bn.moving_mean), np.mean(means, 0), rtol=1e-4, atol=1e-5
    )
