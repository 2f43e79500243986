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

from conftest import HIRESCAM_EXPLAIN, REPO, train_tiny_run

SHAPE = (28, 28, 1)


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
    from keras_vae_attn.explain.options import ExplainOptions

    folder = tmp_path_factory.mktemp("tiny")
    images = np.random.default_rng(0).random((16, *SHAPE), dtype=np.float32)
    config = {"layer": "last", "explain": ExplainOptions().as_config()}
    run = train_tiny_run(folder / "run", images, config)
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

BAD_VALUES = {
    "NaN": (np.nan, "NaN or infinite"),
    "inf": (np.inf, "NaN or infinite"),
    "0..255": (255.0, r"255\] \(divide 8-bit pixels by 255\)"),
    "negative": (-0.5, r"got values in \[-0.5, 0.5\]"),
}


def bad_images(value):
    images = np.full((2, *SHAPE), 0.5, np.float32)
    images[1, 3:9, 3:9] = value
    return images


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(BAD_VALUES))
def test_onnx_users_get_the_range_check_of_the_saved_model(tiny, served, case):
    import onnxruntime as ort
    import tensorflow as tf

    from export import InputError
    from export.graph import validated_images
    from export.infer import OnnxBackend

    value, detail = BAD_VALUES[case]
    images = bad_images(value)
    range_message = r"images must be float32 in \[0, 1\]"
    with pytest.raises(tf.errors.InvalidArgumentError, match=range_message):
        served.signatures["serving_default"](images=tf.constant(images))
    session = ort.InferenceSession(
        str(tiny[0] / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    shape = session.get_inputs()[0].shape[1:]
    for check in (
        lambda: validated_images(images, shape),  # the user's helper
        lambda: OnnxBackend(str(tiny[0] / "model.onnx")).run(images),
    ):  # infer's
        with pytest.raises(InputError, match=range_message) as error:
            check()
        assert error.match(detail), str(error.value)
    good = validated_images(bad_images(0.25), shape)
    assert session.run(None, {"images": good})[0].shape == (2, 28, 28)


# --- 5: empty batch ----------------------------------------------------------------


@pytest.mark.slow
def test_an_empty_batch_fails_clearly_on_both_backends(tiny, served):
    import tensorflow as tf

    from export import InputError
    from export.graph import validated_images
    from export.infer import OnnxBackend, SavedModelBackend

    empty = np.zeros((0, *SHAPE), np.float32)
    for name in ("serving_default", "explain"):
        with pytest.raises(
            tf.errors.InvalidArgumentError, match="images must hold at least one image"
        ):
            served.signatures[name](images=tf.constant(empty))
    with pytest.raises(
        tf.errors.InvalidArgumentError, match="image_bytes must hold at least one image"
    ):
        served.signatures["serve_bytes"](image_bytes=tf.constant([], tf.string))
    with pytest.raises(
        InputError,
        match=r"images must hold at least one image; got shape "
        r"\(0, 28, 28, 1\)",
    ):
        validated_images(empty, SHAPE)
    for backend in (
        OnnxBackend(str(tiny[0] / "model.onnx")),
        SavedModelBackend(str(tiny[0] / "serving" / "model" / "1")),
    ):
        with pytest.raises(InputError, match="images must hold at least one image"):
            backend.run(empty)


# --- 2: staging left by a killed push / export -------------------------------------


@pytest.mark.slow
def test_staging_folders_of_dead_writers_are_removed_by_the_next_export_and_push(tiny):
    from export import saved_model
    from pipeline import serving

    folder, run, stale_partial = tiny
    assert not (folder / f"model.onnx.partial-{stale_partial}").exists()  # ONNX export
    base = folder / "serving" / "model"
    dead = dead_pid()
    writer = subprocess.Popen(["sleep", "60"])  # an export still running
    try:
        stale = [f"5.partial-{dead}", f"2.partial-{dead}", f"1.replaced-{dead}"]
        live = [f"6.partial-{writer.pid}", f"7.partial-{writer.pid}"]
        for name in stale + live:
            (base / name).mkdir()
            (base / name / "saved_model.pb").write_bytes(b"partial")
        target = saved_model.export(str(run), str(folder / "serving"), "model")
        assert os.path.basename(target) == "2"
        assert sorted(os.listdir(base)) == sorted(["1", "2", *live])

        (base / f"3.partial-{dead}").mkdir()  # a push killed before its rename
        pushed = serving.push_version(str(base / "1"), str(folder / "serving"), "model")
        assert os.path.basename(pushed) == "3"
        assert sorted(os.listdir(base)) == sorted(["1", "2", "3", *live])
    finally:
        writer.kill()
        writer.wait()
    for name in live:
        shutil.rmtree(base / name)


# --- 6: infer --out that is a file -------------------------------------------------


@pytest.mark.slow
def test_infer_refuses_an_out_file_before_loading_the_model(tiny, tmp_path):
    image = tmp_path / "digit.png"
    Image.fromarray(np.full((28, 28), 128, np.uint8)).save(image)
    out = tmp_path / "results.txt"
    out.write_text("keep me")
    command = [
        sys.executable,
        "-m",
        "export.infer",
        "--model",
        str(tmp_path / "no-model"),
        str(image),
        "--out",
        str(out),
    ]
    refused = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2
    assert refused.stderr.splitlines() == [
        f"error: --out {str(out)!r} already exists and is not a folder; choose another "
        "path or pass --force to replace it"
    ]
    assert out.read_text() == "keep me"

    command[4] = str(tiny[0] / "model.onnx")  # a real model, and --force
    forced = subprocess.run(
        [*command, "--force"], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert forced.returncode == 0, forced.stderr[-3000:]
    scores = json.loads((out / "scores.json").read_text())
    assert scores["backend"] == "onnx" and len(scores["images"]) == 1


# --- 7: options the model cannot serve ---------------------------------------------


@pytest.mark.slow
def test_both_exporters_refuse_options_without_their_distribution_writing_nothing(
    tiny, tmp_path, capsys
):
    from export import onnx as onnx_export
    from export import saved_model

    run = tmp_path / "run"
    shutil.copytree(tiny[1], run)
    (run / "config.json").write_text(json.dumps({"explain": HIRESCAM_EXPLAIN}))
    exports = {
        "onnx": (
            onnx_export.main,
            tmp_path / "onnx",
            ["--out", str(tmp_path / "onnx" / "model.onnx")],
        ),
        "saved_model": (
            saved_model.main,
            tmp_path / "serving",
            ["--out", str(tmp_path / "serving"), "--model-name", "m"],
        ),
    }
    for name, (main, out, flags) in exports.items():
        with pytest.raises(SystemExit) as exit_info:
            main(["--run", str(run), *flags])
        assert exit_info.value.code == 2, name
        err = capsys.readouterr().err
        assert "no normal feature distribution for layer 'conv1'" in err, (name, err)
        assert not out.exists(), name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


# --- issue 26, 8: thresholds and opsets checked where they enter -------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    "values",
    [
        {"pixel": float("nan"), "image": 0.5},
        {"pixel": 0.1, "image": float("nan")},
        {"pixel": float("inf"), "image": 0.5},
        {"pixel": 0.1, "image": float("-inf")},
    ],
    ids=["pixel-nan", "image-nan", "pixel-inf", "image-minus-inf"],
)
def test_thresholds_holding_nan_or_infinity_are_refused(tiny, tmp_path, capsys, values):
    """json reads NaN and Infinity; exported with them, every image was "normal"."""
    from export import saved_model

    path = tmp_path / "thresholds.json"
    path.write_text(json.dumps(values))  # NaN / Infinity, as Python's json writes
    name = "pixel" if values["pixel"] != 0.1 else "image"
    with pytest.raises(SystemExit) as stop:
        saved_model.main(
            [
                "--run",
                str(tiny[1]),
                "--out",
                str(tmp_path / "serving"),
                "--thresholds",
                str(path),
            ]
        )
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: --thresholds {str(path)!r}: {name} threshold must be a finite number, "
        f"got {values[name]}"
    ]
    assert not (tmp_path / "serving").exists()


@pytest.mark.slow
def test_an_opset_tf2onnx_cannot_write_is_refused_before_the_model_is_loaded(tmp_path):
    """--opset 100 failed after a minute of conversion; now before loading (the --run
    here does not even exist, and the opset is what is named)."""
    command = [
        sys.executable,
        "-m",
        "export.onnx",
        "--run",
        str(tmp_path / "no-run"),
        "--out",
        str(tmp_path / "model.onnx"),
        "--opset",
        "100",
    ]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: --opset must be between 13 and "), (
        result.stderr
    )
    assert lines[0].endswith("got 100") and not os.listdir(tmp_path)


# --- issue 26, 5: export versions claimed atomically --------------------------------


def test_version_claims_never_hand_out_one_number_twice(tmp_path):
    import threading

    from export.versions import claim_version, release_version

    base = str(tmp_path / "model")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "3").mkdir()  # an existing version
    start, got = threading.Barrier(8), []

    def claim():
        start.wait()
        got.append(claim_version(base))

    threads = [threading.Thread(target=claim) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(number for number, _ in got) == list(range(4, 12))
    for _, claim in got:
        assert os.readlink(claim) == str(os.getpid())
        release_version(claim)
    assert sorted(os.listdir(base)) == ["3"]
    dead = dead_pid()  # a claim of a killed exporter
    os.symlink(str(dead), os.path.join(base, ".claim-4"))
    number, claim = claim_version(base)
    assert number == 4 and os.readlink(claim) == str(os.getpid())
    from export import ExportError

    with pytest.raises(
        ExportError, match=f"version 4 under .* is being written by process {os.getpid()}"
    ):
        claim_version(base, 4)
    release_version(claim)


def test_a_version_a_killed_replace_moved_aside_is_put_back(tmp_path):
    """A --force export killed between its two renames leaves the old version as
    <version>.replaced-<pid>; the next writer puts it back (TF Serving would otherwise
    lose the version), and removes the dead writers' staging, not a live one's."""
    from export.versions import claim_version, release_version

    base = tmp_path / "model"
    dead = dead_pid()
    for name in (f"4.replaced-{dead}", f"5.partial-{dead}", f"6.partial-{os.getpid()}"):
        (base / name).mkdir(parents=True)
        (base / name / "saved_model.pb").write_bytes(name.encode())
    number, claim = claim_version(str(base))
    release_version(claim)
    assert number == 5  # after the version put back
    assert sorted(os.listdir(base)) == ["4", f"6.partial-{os.getpid()}"]
    assert (base / "4" / "saved_model.pb").read_bytes() == f"4.replaced-{dead}".encode()


@pytest.mark.slow
def test_two_concurrent_exports_into_one_out_write_two_versions(tiny, tmp_path):
    """Case 5: both reported version 1 and one silently replaced the other."""
    command = [
        sys.executable,
        "-m",
        "export.saved_model",
        "--run",
        str(tiny[1]),
        "--out",
        str(tmp_path / "serving"),
        "--model-name",
        "m",
    ]
    exports = [
        subprocess.Popen(
            command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    results = [(p.communicate(timeout=600), p.returncode) for p in exports]
    assert [code for _, code in results] == [0, 0], [err[-2000:] for (_, err), _ in results]
    written = sorted(out.strip().splitlines()[-1] for (out, _), _ in results)
    base = tmp_path / "serving" / "m"
    assert written == [
        f"SavedModel written to {base / '1'}",
        f"SavedModel written to {base / '2'}",
    ]
    assert sorted(os.listdir(base)) == ["1", "2"]
    for version in ("1", "2"):
        assert (base / version / "saved_model.pb").exists()


# --- issue 26, 13: non-finite input is flagged, not called normal --------------------


@pytest.mark.slow
def test_non_finite_images_are_labelled_anomalous_not_normal(tiny, tmp_path):
    import onnxruntime as ort
    import tensorflow as tf

    from export import load_run, load_thresholds
    from export import onnx as onnx_export
    from export.graph import anomaly_outputs

    path = tmp_path / "thresholds.json"
    path.write_text(json.dumps({"pixel": 1e-3, "image": 1e9}))  # finite input: normal
    onnx_export.export(
        str(tiny[1]), str(tmp_path / "model.onnx"), thresholds=str(path), verify=False
    )
    images = np.full((4, *SHAPE), 0.5, np.float32)
    images[1, 3, 3] = np.nan
    images[2, 5, 5] = np.inf
    images[3, 7, 7] = -np.inf
    session = ort.InferenceSession(
        str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    names = [output.name for output in session.get_outputs()]
    outputs = dict(zip(names, session.run(None, {"images": images})))
    assert outputs["pred_label"].tolist() == [False, True, True, True]
    # the same function in TensorFlow (what the SavedModel signatures compute) ...
    run = load_run(str(tiny[1]))
    decided = anomaly_outputs(
        run.model, tf.constant(images), run.options, load_thresholds(str(path))
    )
    assert decided["pred_label"].numpy().tolist() == [False, True, True, True]
    assert decided["pred_score"].numpy()[1:].tolist() == [1.0, 1.0, 1.0]
    # ... whose graphs refuse such input outright
    served = tf.saved_model.load(str(tiny[0] / "serving" / "model" / "1"))
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"in \[0, 1\]"):
        served.signatures["serving_default"](images=tf.constant(images))


# --- issue 26, 7: the ONNX self-check judges real disagreement ----------------------


def test_the_self_check_passes_a_kink_at_round_off_and_fails_a_wrong_graph():
    from export import onnx as onnx_export

    rng = np.random.default_rng(0)
    want = rng.random((2, 32, 32)).astype(np.float32)
    kinked = want.copy()
    kinked[0, 5, 5] += 6.8e-3  # the resumed run's noise batch
    kinked[1, 20, 7:9] -= 3e-3
    found = onnx_export.agreement(kinked, want)
    assert found.ok and found.largest > onnx_export.PARITY_TOLERANCE
    assert found.quantile <= onnx_export.PARITY_TOLERANCE
    for wrong in (
        want * 1.002,  # small but everywhere
        np.where(np.arange(32) < 2, want + 0.05, want),  # two columns, by a lot
        np.where(rng.random(want.shape) < 0.5, np.nan, want),
    ):
        assert not onnx_export.agreement(wrong.astype(np.float32), want).ok


def perturbed(model_proto, factor):
    """``model_proto`` with its heatmap output multiplied by ``factor`` (a wrong graph)."""
    from onnx import helper, numpy_helper

    for node in model_proto.graph.node:
        for field in (node.input, node.output):
            for i, name in enumerate(field):
                if name == "heatmap":
                    field[i] = "heatmap_unscaled"
    model_proto.graph.initializer.append(
        numpy_helper.from_array(np.array(factor, np.float32), "heatmap_factor")
    )
    model_proto.graph.node.append(
        helper.make_node("Mul", ["heatmap_unscaled", "heatmap_factor"], ["heatmap"])
    )
    return model_proto


@pytest.mark.slow
def test_the_self_check_runs_the_runs_own_images_and_fails_a_perturbed_graph(tiny, tmp_path):
    from export import ExportError, load_run
    from export import onnx as onnx_export
    from keras_vae_attn.data.synthetic import write_mvtec_category

    run_dir = tmp_path / "run"
    shutil.copytree(tiny[1], run_dir)
    write_mvtec_category(str(tmp_path / "data"), "demo", size=28, n_train=4, n_test_good=1)
    config = json.loads((run_dir / "config.json").read_text())
    config.update(data_dir=str(tmp_path / "data"), category="demo")
    (run_dir / "config.json").write_text(json.dumps(config))
    run = load_run(str(run_dir))
    own = onnx_export.run_images(run)
    assert own.shape == (onnx_export.CHECK_IMAGES, *SHAPE) and own.dtype == np.float32
    proto = onnx_export.convert(run.model, run.options)
    assert onnx_export.verify_graph(run, None, proto) <= onnx_export.PARITY_CEILING
    with pytest.raises(
        ExportError,
        match=r"disagrees with the model's on noise: .* of an "
        r"image's pixels differ by more than 1e-04",
    ):
        onnx_export.verify_graph(run, None, perturbed(proto, 1.002))


@pytest.mark.slow
def test_ctrl_c_in_an_export_is_one_line_and_writes_nothing(tiny, tmp_path):
    """The pipeline's export stage forwards Ctrl-C to its exporter, which printed a
    KeyboardInterrupt traceback."""
    import signal

    out = tmp_path / "model.onnx"
    # SIGINT sent by the exporter to itself as the conversion starts (tests/scripts/
    # fault_at.py): the tiny model converts in about a second, so a signal from outside
    # raced the export's end on a loaded machine.
    result = subprocess.run(
        [
            sys.executable,
            "tests/scripts/fault_at.py",
            "onnx_convert",
            "1",
            "INT",
            "export.onnx",
            "--run",
            str(tiny[1]),
            "--out",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        # a pytest-xdist worker ignores SIGINT, and children inherit that: Python then
        # never raises KeyboardInterrupt, as in a user's shell it does
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    assert "export.onnx 2/4" in result.stderr, result.stderr[-2000:]
    assert result.returncode == 130, result.stderr[-2000:]
    stderr = result.stderr
    assert (
        stderr.strip().splitlines()[-1] == f"export.onnx: interrupted; {out} was not written"
    )
    assert "Traceback" not in stderr and not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("model.onnx")]
