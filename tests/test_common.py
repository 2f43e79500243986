"""Shared trainer plumbing: run folders, resumption choice, NaN guard, worker roles."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_vae_attn import runs
from keras_vae_attn.models import build_vae
from trainers import cli, devices, fit, guard, run_dirs


def args_for(tmp_path, **overrides):
    parser = cli.base_parser("test", epochs=1, batch_size=4, lr=1e-3, latent_dim=4)
    args = parser.parse_args(["--runs-root", str(tmp_path)])
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


def test_same_command_reuses_the_unfinished_run_and_a_finished_one_is_kept(tmp_path):
    first = run_dirs.run_dir_for(args_for(tmp_path), "exp")
    assert run_dirs.run_dir_for(args_for(tmp_path), "exp") == first  # resumed
    assert json.load(open(f"{first}/config.json"))["epochs"] == 1
    other = run_dirs.run_dir_for(args_for(tmp_path, epochs=2), "exp")  # other config
    assert other != first
    runs.write_json(f"{first}/metrics.json", {"done": True})
    with pytest.raises(run_dirs.RunFinished) as finished:  # not trained again
        run_dirs.run_dir_for(args_for(tmp_path), "exp")
    assert str(finished.value) == (
        f"this command already finished a run: {first} (metrics.json and figures); "
        "--fresh trains a new one"
    )
    fresh = run_dirs.run_dir_for(args_for(tmp_path, fresh=True), "exp")
    assert fresh != first and fresh.endswith(first[-8:])  # same hash


def test_a_finished_run_is_named_with_how_to_rescore_it_and_exit_0(tmp_path, capsys):
    args = args_for(tmp_path, model_dir=None)
    first = run_dirs.run_dir_for(args, "exp")
    runs.write_json(f"{first}/metrics.json", {"done": True})
    with pytest.raises(SystemExit) as stop:
        guard.main_guard(lambda: run_dirs.run_dir_for(args, "exp"))
    assert stop.value.code == 0
    assert capsys.readouterr().err.splitlines() == [
        f"this command already finished a run: {first} (metrics.json and figures); "
        f"re-score its model with other flags: --model-dir {first}/model; --fresh trains "
        "a new one"
    ]


def test_bad_flag_values_name_the_flag(capsys):
    parser = cli.base_parser("test", epochs=1, batch_size=4, lr=1e-3, latent_dim=4)
    for argv, message in (
        (["--epochs", "0"], "--epochs must be at least 1"),
        (["--lr", "nan"], "--lr must be a positive number"),
        (["--batch-size", "-3"], "--batch-size must be at least 1"),
    ):
        with pytest.raises(SystemExit):
            cli.parse(parser, argv)
        assert message in capsys.readouterr().err


def random_images(count):
    return np.random.default_rng(0).random((count, 28, 28, 1)).astype("float32")


def fit_small_vae(images, epochs, callbacks):
    """(a small VAE fitted on ``images`` in batches of 4 in order, its fit history)."""
    model = build_vae("small", (28, 28, 1), 4, filters=(8, 16), dense_units=32)
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    history = model.fit(
        tf.data.Dataset.from_tensor_slices(images).batch(4),
        epochs=epochs,
        callbacks=callbacks,
        verbose=0,
        shuffle=False,
    )
    return model, history


def test_nan_loss_stops_training_and_names_the_batch(tmp_path):
    images = random_images(12)
    images[8] = np.nan  # third batch of 4
    callbacks, nan_guard = fit.standard_callbacks(str(tmp_path))
    _, history = fit_small_vae(images, 3, callbacks)
    assert len(history.history["loss"]) == 1  # stopped in the first epoch
    with pytest.raises(guard.TrainingDiverged, match="epoch 1, batch 3: non-finite"):
        fit.check_diverged(nan_guard)


def test_only_the_newest_checkpoints_are_kept(tmp_path):
    callbacks, _ = fit.standard_callbacks(str(tmp_path), keep_checkpoints=2)
    model, _ = fit_small_vae(random_images(8), 5, callbacks)
    kept = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert kept == ["epoch-004.weights.h5", "epoch-005.weights.h5"]
    model.load_weights(str(tmp_path / "checkpoints" / kept[-1]))  # still loadable


@pytest.mark.parametrize(
    "config, index",
    [
        ({}, 0),
        ({"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 0}}, 0),
        ({"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 1}}, 1),
        ({"cluster": {"chief": ["c:0"], "worker": ["a:1"]}, "task": {"type": "chief"}}, 0),
        (
            {
                "cluster": {"chief": ["c:0"], "worker": ["a:1"]},
                "task": {"type": "worker", "index": 0},
            },
            1,
        ),
    ],
)
def test_worker_index_makes_only_the_chief_own_the_run_folder(monkeypatch, config, index):
    monkeypatch.setenv("TF_CONFIG", json.dumps(config))
    assert devices.worker_index() == index


def test_write_json_leaves_no_partial_file(tmp_path):
    runs.write_json(str(tmp_path / "m.json"), {"a": np.float32(0.5), "b": np.arange(2)})
    assert json.loads((tmp_path / "m.json").read_text()) == {"a": 0.5, "b": [0, 1]}
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


def test_tensorboard_holds_loss_scalars_and_the_runs_evaluation(tmp_path):
    """Real scalars (EventAccumulator.Scalars sees them), then at the end the metrics
    and test heatmaps; the run is complete and its checkpoints can go."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from keras_vae_attn.callbacks import AttentionImages

    images = random_images(8)
    watch = AttentionImages(images[:2], str(tmp_path / "tensorboard"), layer="conv2")
    callbacks, _ = fit.standard_callbacks(str(tmp_path), watch)
    fit_small_vae(images, 2, callbacks)
    assert len(list((tmp_path / "checkpoints").iterdir())) == fit.KEEP_CHECKPOINTS
    attention = EventAccumulator(str(tmp_path / "tensorboard" / "attention"))
    attention.Reload()
    assert attention.Tags()["images"] == [
        "input|reconstruction|attention/0",
        "input|reconstruction|attention/1",
    ]
    panels = attention.Images("input|reconstruction|attention/1")
    assert [p.step for p in panels] == [0, 1] and (panels[0].width, panels[0].height) == (
        84,
        28,
    )
    metrics = {
        "methods": {"anomaly_attention": {"pixel_auroc": 0.75, "image_auroc": None}},
        "image_auroc_other_scores": {"kl": 0.5},
        "category": "demo",
    }
    heatmaps = np.random.default_rng(1).random((8, 28, 28)).astype("float32")
    labels = np.array([0, 0, 1, 1, 1, 1, 1, 0])
    run_dirs.complete_run(
        str(tmp_path), metrics, ((images * 255).astype("uint8"), heatmaps, labels)
    )
    assert json.load(open(tmp_path / "metrics.json"))["category"] == "demo"

    train = EventAccumulator(str(tmp_path / "tensorboard" / "train"))
    train.Reload()
    assert {"epoch_loss", "epoch_recon", "epoch_kl"} <= set(train.Tags()["scalars"])
    assert [event.step for event in train.Scalars("epoch_loss")] == [0, 1]
    evaluation = EventAccumulator(str(tmp_path / "tensorboard" / "evaluation"))
    evaluation.Reload()
    assert sorted(evaluation.Tags()["scalars"]) == [
        "image_auroc_other_scores/kl",
        "methods/anomaly_attention/pixel_auroc",
    ]
    (auroc,) = evaluation.Scalars("methods/anomaly_attention/pixel_auroc")
    assert auroc.value == 0.75 and auroc.step == 1  # the last epoch
    assert evaluation.Tags()["images"] == [
        "test heatmap 0 (normal)",
        "test heatmap 1 (anomalous)",
        "test heatmap 2 (anomalous)",
        "test heatmap 3 (anomalous)",
    ]
    (image,) = evaluation.Images("test heatmap 1 (anomalous)")
    assert (image.width, image.height) == (28, 28)
