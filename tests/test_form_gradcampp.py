"""The Grad-CAM++ form against a slow numpy reference, and the places that read a new
form's name from the registry (CLI choices, describe, the grid)."""

import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from keras_vae_attn.explain import pipeline
from keras_vae_attn.explain.options import ExplainOptions

from conftest import REPO
from test_attribution import (
    assert_close,
    normal_images,
    odd_images,
    reference_deviation,
    reference_gradients,
    signed,
    small_vae,
)

NAME = "gradcam++"


@pytest.fixture(scope="module")
def vae():
    model = small_vae()
    normal = tf.data.Dataset.from_tensor_slices(normal_images(8)).batch(4)
    model.fit_normal_stats(normal)
    model.fit_feature_distributions(normal, ["conv1", "conv2"])
    return model


def reference_gradcampp(grads, dev):
    """Grad-CAM++ (Chattopadhay et al. 2018, Eq. 19 with the exponential's derivatives
    as powers of the first-order gradient), one channel and one target at a time:
    alpha_ij = g_ij^2 / (2 g_ij^2 + sum_ab dev_ab g_ij^3) (0 where that is 0),
    w = sum_ij alpha_ij max(g_ij, 0), map = sum_k w_k dev_k. (B, T, h, w) signed."""
    batch, targets, height, width, channels = grads.shape
    maps = np.zeros((batch, targets, height, width))
    for b in range(batch):
        for t in range(targets):
            for k in range(channels):
                g = grads[b, t, :, :, k].astype(np.float64)
                total = dev[b, :, :, k].astype(np.float64).sum()
                weight = 0.0
                for i in range(height):
                    for j in range(width):
                        denominator = 2 * g[i, j] ** 2 + total * g[i, j] ** 3
                        alpha = g[i, j] ** 2 / denominator if denominator != 0 else 0.0
                        weight += alpha * max(g[i, j], 0.0)
                maps[b, t] += weight * dev[b, :, :, k]
    return maps


@pytest.mark.parametrize(
    "target, deviation, sign, layer",
    [
        ("total-energy", "none", "relu", "conv2"),
        ("energy", "none", "relu", "conv1"),
        ("latent", "centered", "signed", "conv2"),
        ("total-energy", "standardized", "abs", "conv1"),
    ],
)
def test_gradcampp_matches_the_slow_reference(vae, target, deviation, sign, layer):
    x = odd_images(2)
    features, grads = reference_gradients(vae, layer, x, target)
    dev = reference_deviation(features, vae, layer, deviation)
    expected = signed(reference_gradcampp(grads, dev), sign).mean(1)
    options = ExplainOptions(
        layers=(layer,), form=NAME, target=target, deviation=deviation, sign=sign
    )
    small = pipeline.layer_map(vae, tf.constant(x), layer, options, vae.normal_stats())[0]
    assert_close(small.numpy(), expected)
    # not Grad-CAM under another name: the weights differ
    gradcam = pipeline.layer_map(
        vae, tf.constant(x), layer, options.replace(form="gradcam"), vae.normal_stats()
    )[0]
    assert not np.allclose(small.numpy(), gradcam.numpy(), rtol=1e-2)


def test_the_registry_names_it_everywhere():
    from bench.localization_grid import configurations

    options = ExplainOptions(form=NAME, layers=("conv2",))
    assert options.describe() == f"{NAME}/energy/none/relu @ conv2"
    assert (NAME, "whitened", "abs") in configurations()
    help_text = subprocess.run(
        [sys.executable, "-m", "trainers.mvtec", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert NAME in help_text


@pytest.mark.slow
def test_both_exports_serve_it(tmp_path):
    """A run with the form exports to SavedModel and ONNX, each serving its heatmap."""
    import onnxruntime as ort

    from export import onnx as onnx_export
    from export import saved_model
    from keras_vae_attn.models import build_vae, load_vae

    from conftest import _train_run
    from test_export_forms import images

    run = tmp_path / "run"
    run.mkdir()
    explain = dict(form=NAME, target="total-energy", deviation="standardized", sign="abs")
    model = build_vae("small", (28, 28, 1), 4, filters=(8, 16), dense_units=32)
    _train_run(
        run, model, images(24, seed=1), {"explain": {**explain, "layers": ["conv1"]}}, 8
    )
    saved_model.export(str(run), str(tmp_path / "serving"), "model")
    onnx_export.export(str(run), str(tmp_path / "model.onnx"), verify=False)
    x = images(7, seed=2)
    options = ExplainOptions(layers=("conv1",), **explain)
    want = pipeline.explain_anomaly(load_vae(str(run / "model")), x, options)["heatmap"]
    scale = float(np.ptp(want.numpy()))
    served = tf.saved_model.load(str(tmp_path / "serving" / "model" / "1"))
    session = ort.InferenceSession(
        str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    outputs = dict(
        zip([o.name for o in session.get_outputs()], session.run(None, {"images": x}))
    )
    for got in (served.signatures["serving_default"](images=tf.constant(x)), outputs):
        assert np.abs(np.asarray(got["heatmap"]) - want.numpy()).max() <= 1e-4 * scale
