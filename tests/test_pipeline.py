"""The train -> evaluate -> validate -> export -> push pipeline on a generated category."""

import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from pipeline import cli, lineage, serving, stages

from conftest import MANIFEST_RECORD_FIELDS, QUICK_RUN_FLAGS, REPO

pytestmark = pytest.mark.slow  # the whole pipeline (trainer, exports, push) in subprocesses

TRAINER = [
    "--",
    *"--image-size 32 --backbone small --latent-dim 4 --no-augment".split(),
    *QUICK_RUN_FLAGS,
]


def command(category_root, work, *extra, trainer=TRAINER):
    return [
        sys.executable,
        "-m",
        "pipeline",
        "--category",
        "demo",
        "--data-dir",
        str(category_root),
        "--serving-dir",
        str(work / "serving"),
        "--pipeline-dir",
        str(work / "pipe"),
        *extra,
        *trainer,
    ]


def run(category_root, work, *extra, trainer=TRAINER):
    return subprocess.run(
        command(category_root, work, *extra, trainer=trainer),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )


def stage_lines(result):
    return [line for line in result.stderr.splitlines() if line.startswith("[")]


@pytest.fixture(scope="module")
def first_run(category_root, tmp_path_factory):
    work = tmp_path_factory.mktemp("pipeline")
    result = run(category_root, work)
    assert result.returncode == 0, result.stderr[-3000:]
    return work, result


def test_full_run_writes_every_artifact_and_the_manifest(first_run):
    work, result = first_run
    pipe = work / "pipe"
    manifest = json.loads((pipe / "manifest.json").read_text())["stages"]
    assert list(manifest) == list(stages.STAGES)
    for name, record in manifest.items():
        for field in MANIFEST_RECORD_FIELDS:
            assert field in record, (name, field)
    assert manifest["push"]["status"] == "pushed"
    for path in (
        "train/model/model.json",
        "evaluate/metrics.json",
        "evaluate/thresholds.json",
        "blessing.json",
        "export/model.onnx",
        "holdout.json",
    ):
        assert (pipe / path).exists(), path
    served = work / "serving" / "vae_demo" / "1"
    assert (served / "saved_model.pb").exists() and (
        served / "assets" / "metrics.json"
    ).exists()
    held = json.loads((pipe / "holdout.json").read_text())
    trained_on = os.listdir(pipe / "data" / "demo" / "train" / "good")
    assert held and not set(map(os.path.basename, held)) & set(trained_on)


def test_second_run_reuses_every_stage(category_root, first_run):
    work, _ = first_run
    again = run(category_root, work)
    assert again.returncode == 0, again.stderr[-3000:]
    assert stage_lines(again) == [f"[{s}] cached" for s in stages.STAGES]
    assert sorted(os.listdir(work / "serving" / "vae_demo")) == ["1"]


def test_from_stage_forces_that_stage_and_later_ones(category_root, first_run):
    work, _ = first_run
    forced = run(category_root, work, "--from-stage", "validate")
    assert forced.returncode == 0, forced.stderr[-3000:]
    assert stage_lines(forced) == [
        "[train] cached",
        "[evaluate] cached",
        "[validate] blessed",
        "[export] done",
        "[push] already served",
    ]
    # the same model is never pushed twice
    assert sorted(os.listdir(work / "serving" / "vae_demo")) == ["1"]


def test_no_verify_reaches_the_onnx_export(category_root, first_run):
    """Case 7: the pipeline stopped at export with no way to pass --no-verify."""
    work, _ = first_run
    result = run(category_root, work, "--no-verify")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "parity check skipped (--no-verify)" in result.stderr
    assert "[export] done" in stage_lines(result)
    manifest = json.loads((work / "pipe" / "manifest.json").read_text())["stages"]
    assert manifest["export"]["config"]["verify"] is False


def test_candidate_worse_than_served_is_not_pushed(category_root, first_run):
    work, _ = first_run
    served = work / "serving" / "vae_demo"
    # another team's model, better than ours, is now the newest served version
    other = served / "2"
    shutil.copytree(served / "1", other)
    (other / "assets" / "lineage.json").write_text(json.dumps({"candidate": "someone-else"}))
    metrics = json.loads((other / "assets" / "metrics.json").read_text())
    metrics["methods"]["anomaly_attention"]["pixel_auroc"] = 1.0
    (other / "assets" / "metrics.json").write_text(json.dumps(metrics))
    before = {p.name: lineage.hash_path(str(p)) for p in served.iterdir()}
    # tolerance 0: the default map scores within the default tolerance of 1 on the demo
    result = run(category_root, work, "--tolerance", "0")
    assert result.returncode == cli.NOT_BLESSED, result.stderr[-3000:]
    assert result.stderr.splitlines()[-1].startswith("not blessed, nothing pushed: ")
    lines = stage_lines(result)
    assert lines[:2] == ["[train] cached", "[evaluate] cached"]
    assert "[validate] not blessed" in lines and "[push] skipped (not blessed)" in lines
    assert "worse than the served model" in result.stderr
    assert {p.name: lineage.hash_path(str(p)) for p in served.iterdir()} == before


def test_floors_block_a_push(category_root, first_run):
    work, _ = first_run
    result = run(category_root, work, "--min-pixel-auroc", "1")
    assert result.returncode == cli.NOT_BLESSED, result.stderr[-3000:]
    assert stage_lines(result)[:2] == ["[train] cached", "[evaluate] cached"]
    assert "[export] cached" in stage_lines(result)
    assert "pixel_auroc" in result.stderr and "below the required 1.0" in result.stderr
    blessing = json.loads((work / "pipe" / "blessing.json").read_text())
    assert blessing["blessed"] is False


def test_exported_decisions_match_python_thresholds(first_run):
    import onnxruntime as ort
    import tensorflow as tf

    from export import load_thresholds
    from keras_vae_attn import calibration
    from keras_vae_attn.explain import pipeline as explain_pipeline
    from keras_vae_attn.models import load_vae
    from keras_vae_attn.runs import RunFolder

    work, _ = first_run
    pipe = work / "pipe"
    thresholds = load_thresholds(str(pipe / "evaluate" / "thresholds.json"))
    images = np.random.default_rng(0).random((5, 32, 32, 3)).astype("float32")
    model = load_vae(str(pipe / "train" / "model"))
    options = RunFolder(pipe / "train").options()
    raw = explain_pipeline.explain_anomaly(model, images, options)
    expected = calibration.decide(raw["heatmap"], raw["score"], thresholds)
    loaded = tf.saved_model.load(str(work / "serving" / "vae_demo" / "1"))
    served = loaded.signatures["serving_default"](images=tf.constant(images))
    session = ort.InferenceSession(str(pipe / "export" / "model.onnx"))
    onnx_out = dict(
        zip(
            [o.name for o in session.get_outputs()],
            session.run(None, {session.get_inputs()[0].name: images}),
        )
    )
    for outputs in (served, onnx_out):
        np.testing.assert_array_equal(
            np.asarray(outputs["pred_label"]), expected["pred_label"].numpy()
        )
        heat = np.asarray(outputs["heatmap"])
        np.testing.assert_array_equal(
            np.asarray(outputs["pred_mask"]), heat > thresholds.pixel
        )
        score = np.asarray(outputs["score"])
        np.testing.assert_allclose(
            np.asarray(outputs["pred_score"]),
            np.clip(0.5 * score / thresholds.image, 0, 1),
            atol=1e-6,
        )


def read_csv(path):
    import csv

    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_predictions_are_the_served_models_decisions_at_its_thresholds(
    category_root, first_run
):
    """Issue 25, 2: train/predictions.csv was calibrated on the training images while
    the pushed model used evaluate/thresholds.json. Now evaluate/predictions.csv holds
    the decisions at the served thresholds, the train run's copy is the same file, and
    the served SavedModel answers the same labels for the same test images."""
    import tensorflow as tf

    from export import load_thresholds
    from keras_vae_attn.data import mvtec

    work, _ = first_run
    pipe = work / "pipe"
    rows = read_csv(pipe / "evaluate" / "predictions.csv")
    assert (pipe / "train" / "predictions.csv").read_text() == (
        pipe / "evaluate" / "predictions.csv"
    ).read_text()
    served_thresholds = work / "serving" / "vae_demo" / "1" / "assets" / "thresholds.json"
    thresholds = load_thresholds(str(served_thresholds))
    assert load_thresholds(str(pipe / "train" / "thresholds.json")) == thresholds
    assert "held out" in json.loads(served_thresholds.read_text())["calibrated_on"]
    test = mvtec.load_test(str(category_root), "demo", 32, 3)
    files = [os.path.relpath(p, category_root) for p in test.paths]
    assert [r["file"] for r in rows] == files
    for row in rows:
        assert int(row["pred_label"]) == (float(row["image_score"]) > thresholds.image)
    loaded = tf.saved_model.load(str(work / "serving" / "vae_demo" / "1"))
    served = loaded.signatures["serving_default"](
        images=tf.constant(mvtec.to_float(test.images))
    )
    np.testing.assert_array_equal(
        np.asarray(served["pred_label"]).astype(int), [int(r["pred_label"]) for r in rows]
    )
    np.testing.assert_allclose(
        np.asarray(served["score"]), [float(r["image_score"]) for r in rows], rtol=1e-4
    )
    metrics = json.loads((pipe / "evaluate" / "metrics.json").read_text())
    at = metrics["predictions"]["at_threshold"]
    assert sum(at.values()) == len(rows)
    assert at["true_positive"] + at["false_positive"] == sum(
        int(r["pred_label"]) for r in rows
    )


READER = r"""
import os, sys, time
base, seconds = sys.argv[1], float(sys.argv[2])
seen, partial = set(), []
end = time.time() + seconds
while time.time() < end:
    for name in os.listdir(base):
        if name.isdigit():
            files = set(os.listdir(os.path.join(base, name)))
            if not {"saved_model.pb", "variables", "assets"} <= files:
                partial.append((name, sorted(files)))
            seen.add(name)
print(len(seen), len(partial))
"""


def test_push_never_exposes_a_partial_version(first_run, tmp_path):
    work, _ = first_run
    source = work / "pipe" / "export" / "saved_model" / "vae_demo" / "1"
    base = tmp_path / "serving" / "model"
    base.mkdir(parents=True)
    reader = subprocess.Popen(
        [sys.executable, "-c", READER, str(base), "6"], stdout=subprocess.PIPE, text=True
    )
    time.sleep(0.5)
    for _ in range(8):
        serving.push_version(str(source), str(tmp_path / "serving"), "model")
    out, _ = reader.communicate(timeout=60)
    seen, partial = map(int, out.split())
    assert seen == 8 and partial == 0
    assert sorted(int(n) for n in os.listdir(base)) == list(range(1, 9))


@pytest.mark.parametrize("name", ["../escaped", "a/b", ".."])
def test_a_model_name_leaving_the_serving_dir_is_refused_before_any_stage(
    category_root, tmp_path, name
):
    result = run(category_root, tmp_path, "--model-name", name)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"error: --model-name: model name {name!r} must be a plain folder name (not a "
        "number, no path separator or '..', not starting with '.')"
    ]
    assert not (tmp_path / "pipe").exists() and not (tmp_path / "serving").exists()
