"""Shared test fixtures: the real datasets beside the project and small models."""

import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest

REPO = Path(__file__).resolve().parents[1]

#: Warnings from code this project cannot change, each with its reason; any other warning
#: still shows in the summary of `make test`.
UNCONTROLLED_WARNINGS = [
    # TensorFlow 2.21's tensors and variables implement __array__ without NumPy 2's `copy`
    # keyword, so NumPy warns on each np.array(tensor), most inside Keras' convert_to_numpy
    # (keras/src/backend/tensorflow/core.py); only a TensorFlow release can fix it.
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning",
]


def pytest_configure(config):
    for line in UNCONTROLLED_WARNINGS:
        config.addinivalue_line("filterwarnings", line)


SHARED_DATA = REPO.parent / "shared" / "data"

# --- flags and settings shared by several test files ---------------------------------

#: One quiet epoch of two batches of 8: the shortest training after which a trainer has
#: written a complete run folder (each test adds its image size, model and limits).
QUICK_RUN_FLAGS = ("--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "8", "--quiet")

#: The dSprites trainer's FactorVAE score from a few votes of a few samples on 16 images
#: (each test adds its --metric-variance-samples).
QUICK_METRIC_FLAGS = (
    "--metric-train-votes",
    "4",
    "--metric-eval-votes",
    "4",
    "--metric-samples",
    "4",
    "--eval-images",
    "16",
)

#: The user-facing command lines: trainers, exporters and the pipeline.
MAIN_COMMANDS = (
    "trainers.mvtec",
    "trainers.ucsd",
    "trainers.mnist",
    "trainers.dsprites",
    "export.saved_model",
    "export.onnx",
    "export.infer",
    "pipeline",
)

#: An attribution that needs the normal feature distribution of layer conv1.
HIRESCAM_EXPLAIN = dict(
    form="hirescam",
    target="total-energy",
    deviation="standardized",
    sign="abs",
    layers=["conv1"],
)

#: The fields every stage record of a pipeline manifest holds.
MANIFEST_RECORD_FIELDS = (
    "inputs",
    "outputs",
    "config",
    "versions",
    "data_fingerprint",
    "started",
    "ended",
    "status",
)


def run_python(*args, env=None, timeout=300, **kwargs):
    """``python *args`` in the repository, importable from it and with TensorFlow's info
    logs off (``env`` adds to or overrides the environment); output captured as text."""
    import subprocess
    import sys

    full_env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.run(
        [sys.executable, *map(str, args)],
        cwd=REPO,
        env={**full_env, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        **kwargs,
    )


def assert_same_map(got, want, label):
    """max |got - want| <= 1e-4 of want's range (the parity target of every export)."""
    import numpy as np

    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, label
    scale = max(float(want.max() - want.min()), 1e-12)
    assert np.abs(got - want).max() <= 1e-4 * scale, (label, np.abs(got - want).max(), scale)


@pytest.fixture(scope="session")
def shared_data():
    """Root of the read-only real datasets (MNIST, MVTec bottle, dSprites frames)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder {SHARED_DATA} not present")
    return SHARED_DATA


# --- trained runs and their exports, built once per test session --------------------
# Exporting a ResNet18 takes tens of seconds, so the export tests share their run folders
# and exported models; with pytest-xdist the workers share them through a lock file.


@pytest.fixture(scope="session")
def build_once(tmp_path_factory):
    """``build(name, make)``: the folder ``make(folder)`` fills, made once per session."""
    import fcntl
    import shutil

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # shared by all workers of this session
    cache = root / "built-once"
    cache.mkdir(exist_ok=True)

    def build(name, make):
        target = cache / name
        with open(cache / f"{name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not target.exists():
                staging = cache / f".{name}.partial"
                shutil.rmtree(staging, ignore_errors=True)
                staging.mkdir()
                make(staging)
                os.rename(staging, target)
        return target

    return build


def _train_run(folder, model, images, config, batch_size):
    """Train ``model`` one short epoch on ``images``, fit its normal statistics and
    write a run folder the way the trainers do (metrics.json last)."""
    import json

    import keras
    import tensorflow as tf

    from keras_vae_attn.explain import pipeline
    from keras_vae_attn.explain.options import ExplainOptions
    from keras_vae_attn.models import save_vae

    keras.utils.set_random_seed(0)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), run_eagerly=True)  # no tracing
    model.fit(images, epochs=1, batch_size=batch_size, shuffle=False, verbose=0)
    model.fit_normal_stats(tf.data.Dataset.from_tensor_slices(images).batch(64))
    options = ExplainOptions.from_config(config)
    if options.needs_distribution or options.needs_residuals or options.form == "deviation":
        model.fit_feature_distributions(
            tf.data.Dataset.from_tensor_slices(images).batch(64),
            list(options.layers),
            options.needs_covariance,
        )
    if options.needs_scales:
        options = pipeline.fit_layer_scales(model, images, options)
        config = {**config, "explain": options.as_config()}
    save_vae(model, str(folder / "model"))
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "metrics.json").write_text("{}")


def train_tiny_run(run, images, config):
    """The run folder ``run`` (made here) of a tiny VAE (28x28x1, latent 4, filters 8 and
    16) trained one short epoch on ``images`` with ``config``."""
    from keras_vae_attn.models import build_vae

    run.mkdir()
    model = build_vae("small", (28, 28, 1), 4, filters=(8, 16), dense_units=32)
    _train_run(run, model, images, config, batch_size=8)
    return run


@pytest.fixture(scope="session")
def mnist_images(shared_data):
    """(train ones float32 (64, 28, 28, 1), test digits float32 (16, 28, 28, 1))."""
    from keras_vae_attn.data import mnist

    train, labels = mnist.load(str(shared_data / "mnist"), "train")
    test, _ = mnist.load(str(shared_data / "mnist"), "test")
    return mnist.to_float(train[labels == 1][:64]), mnist.to_float(test[:16])


@pytest.fixture(scope="session")
def mnist_run(build_once, mnist_images):
    """A run folder of a small VAE trained a few steps on MNIST ones (28x28x1), with the
    paper's attention at the last encoder layer (ExplainOptions' defaults)."""
    from keras_vae_attn.explain.options import ExplainOptions
    from keras_vae_attn.models import build_vae

    def make(folder):
        _train_run(
            folder,
            build_vae("small", (28, 28, 1), 16),
            mnist_images[0],
            {"layer": "last", "normal_digit": 1, "explain": ExplainOptions().as_config()},
            batch_size=16,
        )

    return build_once("mnist-run", make)


@pytest.fixture(scope="session")
def mvtec_images(shared_data):
    """MVTec bottle at 64x64: (train float32 (16, 64, 64, 3), test Split of 7 images)."""
    from keras_vae_attn.data import mvtec

    root = str(shared_data / "mvtec_ad")
    return (
        mvtec.to_float(mvtec.load_train(root, "bottle", 64, limit=16)),
        mvtec.load_test(root, "bottle", 64, limit=7),
    )


@pytest.fixture(scope="session")
def mvtec_run(build_once, mvtec_images):
    """A run folder of the MVTec model (ResNet18, latent 32) trained two steps at 64x64,
    with the trainer's default attribution (recon-deviation; its per-latent maps at the
    default layer conv1, whose gradient passes the stem max-pool, on real images with
    flat regions) and maps smoothed by sigma 1 px (--smooth 1). The gradient forms are
    served by tests/test_export_forms.py."""
    from keras_vae_attn.explain.options import ExplainOptions
    from keras_vae_attn.models import build_vae

    explain = ExplainOptions.preset("default", layers=("conv1",), smooth=1.0).as_config()

    def make(folder):
        _train_run(
            folder,
            build_vae("resnet18", (64, 64, 3), 32, recon_loss="mse"),
            mvtec_images[0],
            {
                "layer": "conv1",
                "image_size": 64,
                "channels": 3,
                "category": "bottle",
                "explain": explain,
            },
            batch_size=8,
        )

    return build_once("mvtec-run", make)


def _export_both(folder, run, thresholds=None):
    """SavedModel (version picked automatically) and ONNX of ``run`` into ``folder``."""
    from export import onnx as onnx_export
    from export import saved_model

    saved_model.export(str(run), str(folder / "serving"), "model", thresholds=thresholds)
    onnx_export.export(
        str(run), str(folder / "model.onnx"), thresholds=thresholds, verify=False
    )


@pytest.fixture(scope="session")
def mnist_export(build_once, mnist_run):
    """``mnist_run`` exported: serving/model/1/ (SavedModel) and model.onnx."""
    return build_once("mnist-export", lambda folder: _export_both(folder, mnist_run))


@pytest.fixture(scope="session")
def mvtec_export(build_once, mvtec_run, mvtec_images):
    """``mvtec_run`` exported with thresholds calibrated on its training images:
    thresholds.json, serving/model/1/ (SavedModel) and model.onnx."""

    def make(folder):
        import json

        from keras_vae_attn import calibration
        from keras_vae_attn.explain import pipeline
        from keras_vae_attn.explain.options import ExplainOptions
        from keras_vae_attn.models import load_vae

        model = load_vae(str(mvtec_run / "model"))
        options = ExplainOptions.from_config(
            json.loads((mvtec_run / "config.json").read_text())
        )
        out = pipeline.batched(model, mvtec_images[0], 16, options, keys=("heatmap", "score"))
        thresholds = calibration.from_normal(out["heatmap"], out["score"])
        (folder / "thresholds.json").write_text(json.dumps(thresholds.as_dict()))
        _export_both(folder, mvtec_run, str(folder / "thresholds.json"))

    return build_once("mvtec-export", make)


# --- fixtures of two test files each -------------------------------------------------


@pytest.fixture(scope="module")
def category_root(tmp_path_factory):
    """A generated MVTec-style category "demo" at 32 px (the pipeline tests' data)."""
    from keras_vae_attn.data.synthetic import write_mvtec_category

    root = tmp_path_factory.mktemp("mvtec")
    write_mvtec_category(str(root), "demo", size=32, n_train=20, n_test_good=4)
    return root


@pytest.fixture
def mount_point(tmp_path):
    """``mount(options)``: a fresh tmpfs under tmp_path (e.g. "size=8m" or "ro"),
    unmounted after the test; skipped where this process may not mount."""
    import subprocess

    mounted = []

    def mount(options):
        target = tmp_path / f"mnt{len(mounted)}"
        target.mkdir()
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)],
            capture_output=True,
            text=True,
        )
        if result.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
        mounted.append(target)
        return target

    yield mount
    for target in mounted:
        subprocess.run(["umount", "-l", str(target)], capture_output=True)
