"""Faults found by probing the exports with bad inputs: out-of-range and empty batches
to a loaded SavedModel and an ONNX Runtime session, staging folders left by killed
exports, an infer --out that is a file, and options the model cannot serve. A tiny model
trained on random images, so this runs without the shared datasets."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, _train_run

SHAPE = (28, 28, 1)
NEEDS_DISTRIBUTION = {"explain": dict(form="hirescam", target="total-energy",
                                      deviation="standardized", sign="abs",
                                      layers=["conv1"])}


def dead_pid():
    """The pid of a process that has exited (and been reaped)."""
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny run exported both ways; a stale ``model.onnx.partial-<dead pid>`` was
    there before the ONNX export. Returns (folder, run, dead pid)."""
    from export import onnx as onnx_export
    from export import saved_model
    from keras_vae_attn.models import build_vae

    folder = tmp_path_factory.mktemp("tiny")
    run = folder / "run"
    run.mkdir()
    model = build_vae("small", SHAPE, 4, filters=(8, 16), dense_units=32)
    images = np.random.default_rng(0).random((16, *SHAPE), dtype=np.float32)
    _train_run(run, model, images, {"layer": "last"}, batch_size=8)
    saved_model.export(str(run), str(folder / "serving"), "model")
    pid = dead_pid()
    (folder / f"model.onnx.partial-{pid}").write_bytes(b"half written")
    onnx_export.export(str(run), str(folder / "model.onnx"), verify=False)
    return folder, run, pid


@pytest.fixture(scope="module")
def served(tiny):
    import tensorflow as tf

    return tf.saved_model.load(str(tiny[0] / "serving" / "model" / "1"))


# --- 4: out-of-range input ---------------------------------------------------------

BAD_VALUES = {"NaN": (np.nan, "NaN or infinite"), "inf": (np.inf, "NaN or infinite"),
              "0..255": (255.0, r"255\] \(divide 8-bit pixels by 255\)"),
              "negative": (-0.5, r"got values in \[-0.5, 0.5\]")}


def bad_images(value):
    images = np.full((2, *SHAPE), 0.5, np.float32)
    images[1, 3:9, 3:9] = value
    return images


@pytest.mark.parametrize("case", sorted(BAD_VALUES))
def test_onnx_users_get_the_range_check_of_the_saved_model(tiny, served, case):
    import onnxruntime as ort
    import tensorflow as tf

    from export import InputError
    from export import onnx as onnx_export
    from export.infer import OnnxBackend

    value, detail = BAD_VALUES[case]
    images = bad_images(value)
    range_message = r"images must be float32 in \[0, 1\]"
    with pytest.raises(tf.errors.InvalidArgumentError, match=range_message):
        served.signatures["serving_default"](images=tf.constant(images))
    session = ort.InferenceSession(str(tiny[0] / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    shape = session.get_inputs()[0].shape[1:]
    for check in (lambda: onnx_export.check_images(images, shape),       # the user's helper
                  lambda: OnnxBackend(str(tiny[0] / "model.onnx")).run(images)):  # infer's
        with pytest.raises(InputError, match=range_message) as error:
            check()
        assert error.match(detail), str(error.value)
    good = onnx_export.check_images(bad_images(0.25), shape)
    assert session.run(None, {"images": good})[0].shape == (2, 28, 28)


# --- 5: empty batch ----------------------------------------------------------------

def test_an_empty_batch_fails_clearly_on_both_backends(tiny, served):
    import tensorflow as tf

    from export import InputError
    from export import onnx as onnx_export
    from export.infer import OnnxBackend, SavedModelBackend

    empty = np.zeros((0, *SHAPE), np.float32)
    for name in ("serving_default", "explain"):
        with pytest.raises(tf.errors.InvalidArgumentError,
                           match="images must hold at least one image"):
            served.signatures[name](images=tf.constant(empty))
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match="image_bytes must hold at least one image"):
        served.signatures["serve_bytes"](image_bytes=tf.constant([], tf.string))
    with pytest.raises(InputError, match=r"images must hold at least one image; got shape "
                                         r"\(0, 28, 28, 1\)"):
        onnx_export.check_images(empty, SHAPE)
    for backend in (OnnxBackend(str(tiny[0] / "model.onnx")),
                    SavedModelBackend(str(tiny[0] / "serving" / "model" / "1"))):
        with pytest.raises(InputError, match="images must hold at least one image"):
            backend.run(empty)


# --- 2: staging left by a killed push / export -------------------------------------

def test_staging_folders_of_dead_writers_are_removed_by_the_next_export_and_push(tiny):
    from export import pipeline, saved_model

    folder, run, stale_partial = tiny
    assert not (folder / f"model.onnx.partial-{stale_partial}").exists()     # ONNX export
    base = folder / "serving" / "model"
    dead = dead_pid()
    writer = subprocess.Popen(["sleep", "60"])             # an export still running
    try:
        stale = [f".incoming-{dead}", f".incoming-2-{dead}", f"1.replaced-{dead}"]
        live = [f".incoming-{writer.pid}", f".incoming-7-{writer.pid}"]
        for name in stale + live:
            (base / name).mkdir()
            (base / name / "saved_model.pb").write_bytes(b"partial")
        target = saved_model.export(str(run), str(folder / "serving"), "model")
        assert os.path.basename(target) == "2"
        assert sorted(os.listdir(base)) == sorted(["1", "2", *live])

        (base / f".incoming-{dead}").mkdir()             # a push killed before its rename
        pushed = pipeline.push_version(str(base / "1"), str(folder / "serving"), "model")
        assert os.path.basename(pushed) == "3"
        assert sorted(os.listdir(base)) == sorted(["1", "2", "3", *live])
    finally:
        writer.kill()
        writer.wait()
    for name in live:
        shutil.rmtree(base / name)


# --- 6: infer --out that is a file -------------------------------------------------

def test_infer_refuses_an_out_file_before_loading_the_model(tiny, tmp_path):
    image = tmp_path / "digit.png"
    Image.fromarray(np.full((28, 28), 128, np.uint8)).save(image)
    out = tmp_path / "results.txt"
    out.write_text("keep me")
    command = [sys.executable, "-m", "export.infer", "--model", str(tmp_path / "no-model"),
               str(image), "--out", str(out)]
    refused = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2
    assert refused.stderr.splitlines() == [
        f"error: --out {str(out)!r} already exists and is not a folder; choose another "
        "path or pass --force to replace it"]
    assert out.read_text() == "keep me"

    command[4] = str(tiny[0] / "model.onnx")              # a real model, and --force
    forced = subprocess.run([*command, "--force"], cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert forced.returncode == 0, forced.stderr[-3000:]
    scores = json.loads((out / "scores.json").read_text())
    assert scores["backend"] == "onnx" and len(scores["images"]) == 1


# --- 7: options the model cannot serve ---------------------------------------------

def test_both_exporters_refuse_options_without_their_distribution_writing_nothing(
        tiny, tmp_path, capsys):
    from export import onnx as onnx_export
    from export import saved_model

    run = tmp_path / "run"
    shutil.copytree(tiny[1], run)
    (run / "config.json").write_text(json.dumps(NEEDS_DISTRIBUTION))
    exports = {"onnx": (onnx_export.main, tmp_path / "onnx", ["--out", str(tmp_path / "onnx" /
                                                                          "model.onnx")]),
               "saved_model": (saved_model.main, tmp_path / "serving",
                               ["--out", str(tmp_path / "serving"), "--model-name", "m"])}
    for name, (main, out, flags) in exports.items():
        with pytest.raises(SystemExit) as exit_info:
            main(["--run", str(run), *flags])
        assert exit_info.value.code == 2, name
        err = capsys.readouterr().err
        assert "no normal feature distribution for layer 'conv1'" in err, (name, err)
        assert not out.exists(), name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
