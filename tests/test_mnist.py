"""MNIST IDX reading, its errors, and the one-class trainer end to end on real MNIST."""

import gzip
import json
import shutil

import numpy as np
import pytest

from keras_vae_attn.data import DataError, mnist

from conftest import run_python


def test_reads_the_real_files(shared_data):
    images, labels = mnist.load_split(str(shared_data / "mnist"), "test")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10000,) and set(np.unique(labels)) == set(range(10))


def copy_mnist(shared_data, tmp_path):
    folder = tmp_path / "mnist"
    shutil.copytree(shared_data / "mnist", folder)
    return folder


def test_missing_file_is_named(shared_data, tmp_path):
    folder = copy_mnist(shared_data, tmp_path)
    (folder / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte"):
        mnist.load_split(str(folder), "test")


def test_truncated_file_is_named(shared_data, tmp_path):
    folder = copy_mnist(shared_data, tmp_path)
    path = folder / "t10k-images-idx3-ubyte.gz"
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[:5000]))
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz.*truncated"):
        mnist.load_split(str(folder), "test")


def test_corrupt_file_is_named(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(b"this is not gzip data at all")
    with pytest.raises(DataError, match="cannot read IDX file.*train-images"):
        mnist.read_idx(str(path))
    path = tmp_path / "raw-idx"
    path.write_bytes(b"\x00\x00\x09\x99" + b"\x00" * 20)
    with pytest.raises(DataError, match="not an MNIST IDX file"):
        mnist.read_idx(str(path))


def run_trainer(*args):
    return run_python("-m", "trainers.mnist", *args, timeout=600)


def train_on_mnist(shared_data, tmp_path, flags):
    """The trainer on the real MNIST files with ``flags`` (one string), quiet, its run
    folders under ``tmp_path``."""
    where = ["--data-dir", shared_data / "mnist", "--runs-root", tmp_path, "--quiet"]
    return run_trainer(*where, *flags.split())


@pytest.mark.slow
@pytest.mark.parametrize("digit", ["10", "-1"])
def test_digit_outside_range_is_a_flag_error(digit, tmp_path):
    result = run_trainer("--normal-digit", digit, "--runs-root", str(tmp_path))
    assert result.returncode == 2
    assert "--normal-digit must be an integer from 0 to 9" in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize(
    "flags, message",
    [
        (["--max-train", "0"], "--max-train must be at least 1, got 0"),
        (["--max-train", "-1"], "--max-train must be at least 1, got -1"),
        (["--max-test", "-9990"], "--max-test must be at least 1, got -9990"),
    ],
)
def test_bad_counts_are_flag_errors(flags, message, tmp_path):
    result = run_trainer(*flags, "--runs-root", str(tmp_path))
    assert result.returncode == 2 and message in result.stderr
    assert not (tmp_path / "mnist").exists()


@pytest.mark.slow
def test_missing_data_dir_is_a_clear_error(tmp_path):
    result = run_trainer("--data-dir", str(tmp_path / "nowhere"), "--runs-root", str(tmp_path))
    assert result.returncode == 2
    assert "MNIST directory" in result.stderr and "does not exist" in result.stderr


@pytest.mark.slow
def test_trainer_end_to_end_on_real_mnist(shared_data, tmp_path):
    result = train_on_mnist(
        shared_data,
        tmp_path,
        "--epochs 2 --steps-per-epoch 8 --batch-size 32 --max-test 600 --latent-dim 8",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = (tmp_path / "mnist").iterdir()
    for name in (
        "gallery.png",
        "latent_maps.png",
        "roc.png",
        "curves.png",
        "metrics.json",
        "config.json",
        "model/model.json",
        "model/model.weights.h5",
    ):
        assert (run_dir / name).is_file(), name
    assert (run_dir / "gallery.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics["image_auroc"]) == {
        "recon_score",
        "kl",
        "latent_distance",
        "attention_energy",
        "attention_max",
        "mean_image_difference",
        "pixel_deviation",
    }
    assert all(0.0 <= v <= 1.0 for v in metrics["image_auroc"].values())
    assert metrics["test_images"] == 600 and metrics["normal_digit"] == 1
    counts = metrics["predictions"]["at_threshold"]
    flagged = counts["true_positive"] + counts["false_positive"]
    assert f"{flagged} of 600 test images flagged anomalous" in result.stdout
    for name, auc in metrics["image_auroc"].items():  # inverted scores said so
        assert (f"{name} {auc:.3f} (inverted" in result.stdout) == (auc < 0.5), name
    assert list((run_dir / "tensorboard").rglob("events.out.tfevents*"))


@pytest.mark.slow
def test_metrics_that_cannot_be_computed_are_null_with_a_reason(shared_data, tmp_path):
    result = train_on_mnist(
        shared_data, tmp_path, "--max-train 64 --max-test 1 --epochs 1 --batch-size 32"
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "image AUROC not computed" in result.stderr
    (run_dir,) = (tmp_path / "mnist").iterdir()

    def refuse(constant):
        raise ValueError(f"metrics.json holds a bare {constant}")

    metrics = json.loads((run_dir / "metrics.json").read_text(), parse_constant=refuse)
    assert set(metrics["image_auroc"].values()) == {None}
    assert "only one class" in metrics["image_auroc_undefined"]
