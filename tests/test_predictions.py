"""A run's predictions.csv and thresholds.json: one row per test image, decided as the
SavedModel exported with the run's thresholds.json decides."""

import csv
import json

import numpy as np
import pytest
import tensorflow as tf

from export import load_thresholds, saved_model
from keras_vae_attn.data import mvtec, split_held_out
from keras_vae_attn.data.synthetic import write_mvtec_category
from trainers import mvtec as trainer

from conftest import QUICK_RUN_FLAGS

QUICK = [
    *"--image-size 32 --backbone small --eval-batch-size 8 --smooth 1".split(),
    *QUICK_RUN_FLAGS,
]


@pytest.mark.slow
def test_predictions_match_the_saved_model_exported_with_the_runs_thresholds(tmp_path):
    data = tmp_path / "data"  # 20 normal training images; tests: 1 good, 3 defects
    write_mvtec_category(
        str(data), "widget", size=32, n_train=20, n_test_good=1, n_test_defect=1
    )
    run = tmp_path / "run"
    trainer.main(
        [
            "--category",
            "widget",
            "--data-dir",
            str(data),
            "--run-dir",
            str(run),
            "--save-predictions-png",
            *QUICK,
        ]
    )
    with open(run / "predictions.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    metrics = json.loads((run / "metrics.json").read_text())
    assert len(rows) == metrics["test_images"] == 4
    assert list(rows[0]) == [
        "file",
        "defect_type",
        "label",
        "image_score",
        "pred_score",
        "pred_label",
        "pred_mask_fraction",
    ]
    # 2 of the 20 normal training images held out, not trained on, calibrate
    assert metrics["train_images"] == 18 and metrics["predictions"]["calibration_images"] == 2
    thresholds = load_thresholds(str(run / "thresholds.json"))
    for row in rows:
        score = float(row["image_score"])
        assert row["pred_label"] == str(int(score > thresholds.image))
        assert 0.0 <= float(row["pred_score"]) <= 1.0
        assert (float(row["pred_score"]) > 0.5) == (row["pred_label"] == "1")
        assert row["label"] == str(int(row["defect_type"] != "good"))
    counts = metrics["predictions"]["at_threshold"]
    assert sum(counts.values()) == 4
    assert counts["true_positive"] + counts["false_positive"] == sum(
        r["pred_label"] == "1" for r in rows
    )
    # one PNG per test image
    assert len(list((run / "predictions").glob("*.png"))) == 4

    serving = tmp_path / "serving"
    saved_model.export(
        str(run), str(serving), "model", thresholds=str(run / "thresholds.json")
    )
    images, _ = mvtec.decode_files([str(data / r["file"]) for r in rows], 32, 3)
    loaded = tf.saved_model.load(str(serving / "model" / "1"))
    got = loaded.signatures["serving_default"](images=tf.constant(mvtec.to_float(images)))
    np.testing.assert_array_equal(
        got["pred_label"].numpy().astype(int), [int(r["pred_label"]) for r in rows]
    )
    np.testing.assert_allclose(
        got["score"].numpy(), [float(r["image_score"]) for r in rows], rtol=1e-4
    )


def test_held_out_split_takes_the_last_images_and_refuses_to_leave_none():
    images = np.arange(10)
    trained, held = split_held_out(images, 0.2)
    assert list(trained) == list(range(8)) and list(held) == [8, 9]
    assert list(split_held_out(images, 0.01)[1]) == [9]  # at least one
    trained, held = split_held_out(images, 0.0)  # no split: the same
    assert list(trained) == list(held) == list(range(10))
    with pytest.raises(ValueError, match="leaves none to train on"):
        split_held_out(images[:1], 0.5)
    files = [f"train/good/{i:03d}.png" for i in range(10)]  # the pipeline holds out files
    assert split_held_out(files, 0.3) == (files[:7], files[7:])


def test_bad_holdout_fraction_is_a_one_line_parser_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        trainer.parse_args(["--category", "demo", "--calibration-holdout", "1.5"])
    assert exit_info.value.code == 2
    assert "--calibration-holdout: must be in [0, 1), got 1.5" in capsys.readouterr().err
