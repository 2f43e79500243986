"""The localization template (trainers/localization.py): a new dataset is a loader and a
small LocalizationExperiment, and the flow gives it a complete run folder."""

import csv
import json
import os

import numpy as np
import pytest

from keras_vae_attn.data import LocalizationSplit
from trainers import cli, localization

SIDE = 32


def squares(count, anomalous, seed):
    """Grey noise images; the anomalous ones hold a bright square (their mask)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(90, 110, (count, SIDE, SIDE, 1)).astype(np.uint8)
    masks = np.zeros((count, SIDE, SIDE), bool)
    for index in range(count - anomalous, count):
        top, left = rng.integers(4, SIDE - 12, 2)
        images[index, top : top + 8, left : left + 8] = 250
        masks[index, top : top + 8, left : left + 8] = True
    return images, masks


class Squares(localization.LocalizationExperiment):
    """The whole dataset-specific part of a trainer: its data, rows and report."""

    dataset = "squares"
    group_column = "kind"

    def load(self, args):
        normal, _ = squares(24, 0, seed=0)
        images, masks = squares(8, 4, seed=1)
        labels = masks.any(axis=(1, 2)).astype(int)
        kinds = ["square" if label else "good" for label in labels]
        paths = [f"test/{index}" for index in range(len(labels))]
        return normal, LocalizationSplit(images, masks, labels, kinds, paths)

    def folder(self, args):
        return "squares"

    def prediction_files(self, args, test):
        return list(test.paths)

    def roc_title(self, args):
        return "squares: pixel ROC"

    def evaluate(self, args, model, normal, test, options, pixels, twin):
        from keras_vae_attn import evaluate

        result = self.localize(args, model, normal, test, options, pixels, twin)
        roc = {
            name: (*result.curves[name], result.methods[name]["pixel_auroc"])
            for name in result.maps
            if result.curves[name] is not None
        }
        lines = evaluate.summary(result, "squares")
        return localization.Evaluation(
            evaluate.as_metrics(result, options), roc, result.maps, lines, result
        )

    def run_metrics(self, args, trained, test, options, evaluation):
        return {"train_images": len(trained.normal)}

    def figures(self, args, model, test, evaluation, metrics, run_dir, options, calibrated,
                predicted):  # fmt: skip
        return []

    def report(self, args, run_dir, metrics, evaluation, figures, trained):
        return [*evaluation.lines, f"done: {run_dir}"]


def parse(argv):
    parser = cli.base_parser("squares", epochs=1, batch_size=8, lr=1e-3, latent_dim=4)
    parser.add_argument("--image-size", type=int, default=SIDE)
    parser.add_argument("--eval-batch-size", type=int, default=8)
    cli.add_localization_flags(parser)
    args = cli.parse(parser, argv)
    args.explain = cli.explain_options(parser, args).as_config()
    return args


@pytest.mark.slow
def test_a_new_dataset_is_a_loader_and_a_small_experiment(tmp_path, capsys):
    flags = ["--runs-root", str(tmp_path), "--steps-per-epoch", "2", "--quiet"]
    flags += ["--layer", "conv1", "--no-sanity", "--faithfulness-images", "0"]
    run_dir = localization.run(Squares(), parse(flags))

    assert capsys.readouterr().out.strip().endswith(f"done: {run_dir}")
    config = json.load(open(f"{run_dir}/config.json"))
    assert config["dataset"] == "squares" and config["explain"]["layers"] == ["conv1"]
    metrics = json.load(open(f"{run_dir}/metrics.json"))
    assert metrics["train_images"] == 22  # 24 normal, the last 10% held out
    assert metrics["predictions"]["calibration_images"] == 2
    assert metrics["methods"]["anomaly_attention"]["pixel_auroc"] is not None
    rows = list(csv.DictReader(open(f"{run_dir}/predictions.csv")))
    assert [row["kind"] for row in rows] == ["good"] * 4 + ["square"] * 4
    assert [row["file"] for row in rows][:2] == ["test/0", "test/1"]
    for name in ("model", "thresholds.json", "roc.png", "curves.png", "tensorboard"):
        assert os.path.exists(os.path.join(run_dir, name)), name
