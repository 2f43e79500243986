"""What a user sees on the console: no TensorFlow banners, and one line (exit 2) for a
missing optional package or a TFDS download without network."""

import importlib.util
import os
import subprocess
import sys

import pytest

from conftest import REPO

BANNER_WORDS = (
    "oneDNN",
    "cuInit",
    "absl",
    "cudart",
    "cuda_",
    "port.cc",
    "I0000",
    "E0000",
    "Traceback",
)

#: Runs a CLI as `python -m` does, with some modules made unimportable first (a None in
#: sys.modules makes `import name` raise ModuleNotFoundError, as if not installed).
RUN_WITHOUT = """
import runpy, sys
for name in {blocked!r}:
    sys.modules[name] = None
sys.argv = {argv!r}
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


def run_cli(argv, blocked=(), env=None, timeout=120):
    """Run CLI ``argv`` (module first) in a fresh interpreter, as a user would: without
    TF_CPP_MIN_LOG_LEVEL (the Makefile sets it, a plain shell does not)."""
    environment = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    environment.update(env or {})
    return subprocess.run(
        [sys.executable, "-c", RUN_WITHOUT.format(blocked=list(blocked), argv=list(argv))],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=environment,
    )


def lines(text):
    return [line for line in text.splitlines() if line.strip()]


def error_line(result):
    """The one stderr line of a CLI that stopped with exit 2, checked to carry no
    TensorFlow banner (every CLI here has started TensorFlow before it stopped)."""
    assert result.returncode == 2, result.stderr[-2000:]
    assert not any(word in result.stderr + result.stdout for word in BANNER_WORDS), (
        result.stderr[-2000:]
    )
    (line,) = lines(result.stderr)
    return line


def test_the_filter_drops_the_banners_and_keeps_any_other_line():
    from keras_vae_attn import console

    kept = "WARNING: something the user must see"
    dropped = [
        "WARNING: All log messages before absl::InitializeLog() is called are "
        "written to STDERR",
        "I0000 00:00:1.0 1 port.cc:153] oneDNN custom operations are on. You may see",
        "E0000 00:00:1.0 1 cuda_platform.cc:52] failed call to cuInit: INTERNAL",
    ]
    assert not any(console.BANNERS.search(line) for line in [kept, "error: cuda is slow"])
    assert all(console.BANNERS.search(line) for line in dropped)


@pytest.mark.slow
def test_onnx_export_without_its_extra_names_the_extra(tmp_path):
    """TensorFlow starts first (without banners), then the missing tf2onnx is named."""
    result = run_cli(
        ["export.onnx", "--run", str(tmp_path), "--out", str(tmp_path / "m.onnx")],
        blocked=["tf2onnx"],
    )
    assert error_line(result) == (
        "error: ONNX export needs the Python module 'tf2onnx', which is not installed: "
        "pip install 'keras-vae-attn[export]'"
    )
    assert not (tmp_path / "m.onnx").exists()


needs_tfds = pytest.mark.skipif(
    importlib.util.find_spec("tensorflow_datasets") is None,
    reason="tensorflow-datasets (the [datasets] extra) missing",
)
#: A proxy on a closed local port: every download fails at once, network or not.
NO_NETWORK = {
    "HTTPS_PROXY": "http://127.0.0.1:9",
    "HTTP_PROXY": "http://127.0.0.1:9",
    "https_proxy": "http://127.0.0.1:9",
    "http_proxy": "http://127.0.0.1:9",
    "NO_PROXY": "",
    "no_proxy": "",
}


@pytest.mark.slow
@needs_tfds
def test_mnist_through_tfds_without_network_says_so_in_one_line(tmp_path):
    result = run_cli(
        ["trainers.mnist", "--normal-digit", "1", "--runs-root", str(tmp_path / "runs")],
        env={"TFDS_DATA_DIR": str(tmp_path / "tfds"), **NO_NETWORK},
        timeout=90,
    )
    line = error_line(result)
    assert line.startswith("error: downloading MNIST through tensorflow-datasets failed")
    assert "without network" in line and line.endswith("[see --data-dir]")
    assert lines(result.stdout) == [] and not (tmp_path / "runs").exists()


@pytest.mark.slow
@needs_tfds
def test_mnist_through_tfds_with_a_dependency_missing_names_the_extra(tmp_path):
    """The reported case: tensorflow-datasets installed, importlib_resources (which its
    etils needs when loading) not."""
    result = run_cli(
        ["trainers.mnist", "--normal-digit", "1", "--runs-root", str(tmp_path / "runs")],
        blocked=["importlib_resources"],
        env={"TFDS_DATA_DIR": str(tmp_path / "tfds"), **NO_NETWORK},
        timeout=90,
    )
    assert error_line(result) == (
        "error: loading MNIST through tensorflow-datasets needs the Python module "
        "'importlib_resources', which is not installed: pip install "
        "'keras-vae-attn[datasets]' [see --data-dir]"
    )


def entry(tp, fp, fn, tn, image=0.25, pixel=0.1):
    """A metrics.json "predictions" entry with these counts at the threshold."""
    return {
        "thresholds": {"image": image, "pixel": pixel},
        "at_threshold": {
            "true_positive": tp,
            "false_positive": fp,
            "false_negative": fn,
            "true_negative": tn,
        },
    }


def test_the_decisions_say_how_many_were_flagged_and_how_many_of_them_are_anomalous():
    from keras_vae_attn.console import decision_lines

    (line,) = decision_lines(entry(7, 3, 5, 68), "images")
    assert "image 0.25, pixel 0.1" in line
    assert "10 of 83 test images flagged anomalous, 7 of them anomalous" in line
    assert "7 of the 12 anomalous images caught, 3 false alarms" in line


def test_nothing_flagged_is_a_warning():
    """The reported case: UCSD --demo --epochs 2 flagged 0 of 111 anomalous frames."""
    from keras_vae_attn.console import decision_lines

    line, warning = decision_lines(entry(0, 0, 111, 9, image=0.5), "frames")
    assert "0 of 120 test frames flagged anomalous" in line
    assert warning.startswith("warning: no test frames scored above the image threshold 0.5")


def test_an_inverted_auroc_is_marked_as_in_the_roc_figure():
    from keras_vae_attn import viz
    from keras_vae_attn.console import auroc_text

    assert auroc_text("kl", 0.041) == "kl 0.041 (inverted: 1-AUROC = 0.959)"
    assert "inverted: 1-AUROC = 0.959" in viz.roc_label("kl", 0.041)
    assert auroc_text("recon_score", 0.93) == "recon_score 0.930"
    assert auroc_text("kl", None) == "kl n/a"


def test_the_comparison_table_says_at_which_sigma_each_method_is_reported():
    from keras_vae_attn.metrics.comparison import table_lines

    def scores(pixel, aupro):
        return {"pixel_auroc": pixel, "aupro": aupro, "best_iou": 0.1, "image_auroc": 0.5}

    results = {
        "a": {"0": scores(0.7, 0.2), "2": scores(0.8, 0.3)},
        "b": {"0": scores(0.9, 0.4), "2": scores(0.6, 0.1)},
    }
    title, head, row_a, row_b = table_lines(results, "a")
    assert "best s" in head and "'best s' column" in title
    assert row_a.split()[-4:] == ["s=2", "0.300", "0.100", "0.500"]
    assert row_b.split()[-4:] == ["s=0", "0.400", "0.100", "0.500"]
