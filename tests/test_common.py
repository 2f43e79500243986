"""Shared trainer plumbing: run folders, resumption choice, NaN guard, worker roles."""
import argparse
import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_vae_attn.models import build_vae
from trainers import common


def args_for(tmp_path, **overrides):
    parser = common.base_parser("test", epochs=1, batch_size=4, lr=1e-3, latent_dim=4)
    args = parser.parse_args(["--runs-root", str(tmp_path)])
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


def test_same_command_reuses_the_unfinished_run_and_a_finished_one_is_kept(tmp_path):
    first = common.run_dir_for(args_for(tmp_path), "exp")
    assert common.run_dir_for(args_for(tmp_path), "exp") == first          # resumed
    assert json.load(open(f"{first}/config.json"))["epochs"] == 1
    other = common.run_dir_for(args_for(tmp_path, epochs=2), "exp")        # other config
    assert other != first
    common.write_json(f"{first}/metrics.json", {"done": True})
    fresh = common.run_dir_for(args_for(tmp_path), "exp")
    assert fresh != first and fresh.endswith(first[-8:])                   # same hash
    assert common.run_dir_for(args_for(tmp_path, fresh=True), "exp") != fresh


def test_bad_flag_values_name_the_flag(capsys):
    parser = common.base_parser("test", epochs=1, batch_size=4, lr=1e-3, latent_dim=4)
    for argv, message in ((["--epochs", "0"], "--epochs must be at least 1"),
                          (["--lr", "nan"], "--lr must be a positive number"),
                          (["--batch-size", "-3"], "--batch-size must be at least 1")):
        with pytest.raises(SystemExit):
            common.parse(parser, argv)
        assert message in capsys.readouterr().err


def test_nan_loss_stops_training_and_names_the_batch(tmp_path):
    model = build_vae("small", (28, 28, 1), 4, filters=(8, 16), dense_units=32)
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    images = np.random.default_rng(0).random((12, 28, 28, 1)).astype("float32")
    images[8] = np.nan                                        # third batch of 4
    callbacks, guard = common.standard_callbacks(str(tmp_path))
    history = model.fit(tf.data.Dataset.from_tensor_slices(images).batch(4), epochs=3,
                        callbacks=callbacks, verbose=0)
    assert len(history.history["loss"]) == 1                  # stopped in the first epoch
    with pytest.raises(common.TrainingDiverged, match="epoch 1, batch 3: non-finite"):
        common.check_diverged(guard)


def test_only_the_newest_checkpoints_are_kept(tmp_path):
    model = build_vae("small", (28, 28, 1), 4, filters=(8, 16), dense_units=32)
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    images = np.random.default_rng(0).random((8, 28, 28, 1)).astype("float32")
    callbacks, _ = common.standard_callbacks(str(tmp_path), keep_checkpoints=2)
    model.fit(tf.data.Dataset.from_tensor_slices(images).batch(4), epochs=5,
              callbacks=callbacks, verbose=0)
    kept = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert kept == ["epoch-004.weights.h5", "epoch-005.weights.h5"]
    model.load_weights(str(tmp_path / "checkpoints" / kept[-1]))      # still loadable


@pytest.mark.parametrize("config, index", [
    ({}, 0),
    ({"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 0}}, 0),
    ({"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 1}}, 1),
    ({"cluster": {"chief": ["c:0"], "worker": ["a:1"]}, "task": {"type": "chief"}}, 0),
    ({"cluster": {"chief": ["c:0"], "worker": ["a:1"]},
      "task": {"type": "worker", "index": 0}}, 1),
])
def test_worker_index_makes_only_the_chief_own_the_run_folder(monkeypatch, config, index):
    monkeypatch.setenv("TF_CONFIG", json.dumps(config))
    assert common.worker_index() == index


def test_write_json_leaves_no_partial_file(tmp_path):
    common.write_json(str(tmp_path / "m.json"), {"a": np.float32(0.5), "b": np.arange(2)})
    assert json.loads((tmp_path / "m.json").read_text()) == {"a": 0.5, "b": [0, 1]}
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]
