"""Every attribution form the trainers can choose is served by both exports: a loaded
SavedModel and an ONNX Runtime session give the in-memory model's heatmap (<= 1e-4 of
its range) at batch 1 and 7, with the normal feature distribution carried in the graph."""

import json

import numpy as np
import pytest

from keras_vae_attn.explain.options import ExplainOptions

from conftest import HIRESCAM_EXPLAIN, train_tiny_run

pytestmark = pytest.mark.slow  # trains and exports one model per attribution form


def total_energy(deviation, layers, form="gradient-weighted-deviation", **rest):
    """Options of a gradient form whose target is the reconstruction's total energy."""
    return dict(form=form, target="total-energy", deviation=deviation, layers=layers, **rest)


VARIANTS = {
    "hirescam": dict(HIRESCAM_EXPLAIN),
    "integrated": total_energy(
        "centered", ["conv2"], form="integrated", sign="signed", steps=4
    ),
    "gradient-weighted-deviation": total_energy("standardized", ["conv1"]),
    "whitened": total_energy("whitened", ["conv2"]),
    "multi-layer": total_energy(
        "standardized", ["conv1", "conv2"], combine="mean", smooth=1.0
    ),
    "feature-residual": dict(form="feature-residual", layers=["conv1"]),
    "recon-deviation": dict(form="recon-deviation", layers=["conv1"], smooth=1.0),
    "gated": total_energy("whitened", ["conv2"], gate="recon"),
}


def images(count, seed=0):
    """Random images with flat regions (a constant square, a saturated stripe)."""
    rng = np.random.default_rng(seed)
    x = rng.random((count, 28, 28, 1), dtype=np.float32)
    x[:, 4:12, 4:12] = 0.5
    x[:, 20:, :] = 1.0
    return x


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def exported(request, tmp_path_factory):
    from export import onnx as onnx_export
    from export import saved_model

    folder = tmp_path_factory.mktemp(request.param)
    run = train_tiny_run(
        folder / "run", images(24, seed=1), {"explain": VARIANTS[request.param]}
    )
    saved_model.export(str(run), str(folder / "serving"), "model")
    onnx_export.export(str(run), str(folder / "model.onnx"), verify=False)
    return request.param, run, folder


@pytest.mark.parametrize("batch", [1, 7])
def test_saved_model_and_onnx_serve_the_models_heatmap(exported, batch):
    import onnxruntime as ort
    import tensorflow as tf

    from keras_vae_attn.explain import pipeline
    from keras_vae_attn.models import load_vae
    from keras_vae_attn.runs import RunFolder

    name, run, folder = exported
    options = RunFolder(run).options()
    if name == "multi-layer":
        assert options.layer_scales is not None and len(options.layer_scales) == 2
    model = load_vae(str(run / "model"))
    x = images(batch, seed=2)
    want = pipeline.explain_anomaly(model, x, options, keys=("heatmap", "score"))
    heat = want["heatmap"].numpy()
    scale = float(heat.max() - heat.min())
    assert scale > 0 and np.isfinite(heat).all()
    served = tf.saved_model.load(str(folder / "serving" / "model" / "1"))
    got = served.signatures["serving_default"](images=tf.constant(x))
    session = ort.InferenceSession(
        str(folder / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    names = [o.name for o in session.get_outputs()]
    onnx_out = dict(zip(names, session.run(None, {"images": x})))
    for label, out in (("SavedModel", got), ("ONNX", onnx_out)):
        difference = np.abs(np.asarray(out["heatmap"]) - heat).max() / scale
        assert difference <= 1e-4, f"{label} {name} batch {batch}: {difference:.2e}"
        np.testing.assert_allclose(
            np.asarray(out["score"]), want["score"].numpy(), rtol=1e-4, atol=1e-4 * scale
        )


def test_an_export_without_the_distribution_its_options_need_is_refused(tmp_path):
    from export import ExportError, saved_model

    plain = {"explain": ExplainOptions(layers=("conv1",)).as_config()}
    run = train_tiny_run(tmp_path / "run", images(8), plain)  # no distribution
    config = {"explain": HIRESCAM_EXPLAIN}
    (run / "config.json").write_text(json.dumps(config))
    with pytest.raises(ExportError, match="no normal feature distribution for layer 'conv1'"):
        saved_model.export(str(run), str(tmp_path / "serving"), "model")
    assert not (tmp_path / "serving").exists()  # nothing written
