"""The ONNX export: onnxruntime gives the trained model's heatmaps at any batch size, the
gradient-op handlers match TensorFlow, and bad inputs or paths are refused clearly."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tensorflow as tf

from export import load_thresholds, saved_model
from export import onnx as onnx_export
from export.infer import InputError, OnnxBackend
from keras_vae_attn import calibration
from keras_vae_attn.data import mvtec
from keras_vae_attn.explain import pipeline
from keras_vae_attn.explain.options import ExplainOptions
from keras_vae_attn.models import load_vae
from keras_vae_attn.runs import RunFolder

from conftest import assert_same_map

pytestmark = pytest.mark.slow  # trains a run and exports it (shared session fixtures)

LEAN = ("heatmap", "score")
DECISIONS = ("pred_score", "pred_label", "pred_mask")


def run_session(path, images):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    return dict(zip(names, session.run(None, {"images": images})))


@pytest.mark.parametrize("name", ["mnist", "mvtec"])
def test_onnxruntime_gives_the_trained_models_heatmaps(name, request):
    run = request.getfixturevalue(f"{name}_run")
    exported = request.getfixturevalue(f"{name}_export")
    if name == "mnist":
        images, thresholds = request.getfixturevalue("mnist_images")[1], None
    else:
        images = mvtec.to_float(request.getfixturevalue("mvtec_images")[1].images)
        thresholds = load_thresholds(str(exported / "thresholds.json"))
    model = load_vae(str(run / "model"))
    options = RunFolder(run).options()
    for batch in (1, 7):
        x = images[:batch]
        want = {k: v.numpy() for k, v in pipeline.explain_anomaly(model, x, options).items()}
        got = run_session(exported / "model.onnx", x)
        assert set(got) == set(LEAN + (DECISIONS if thresholds else ())), name  # lean
        assert_same_map(got["heatmap"], want["heatmap"], f"{name} heatmap, batch {batch}")
        np.testing.assert_allclose(
            got["score"],
            want["score"],
            rtol=1e-4,
            atol=1e-6,
            err_msg=f"{name} score, batch {batch}",
        )
        if thresholds is not None:
            decided = calibration.decide(want["heatmap"], want["score"], thresholds)
            np.testing.assert_array_equal(got["pred_label"], decided["pred_label"])
            np.testing.assert_array_equal(got["pred_mask"], got["heatmap"] > thresholds.pixel)


def test_batch_is_dynamic_and_metadata_says_what_was_exported(mvtec_export, mvtec_run):
    model = onnx.load(str(mvtec_export / "model.onnx"))
    onnx.checker.check_model(model)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert model.graph.input[0].name == "images"
    assert not dims[0].HasField("dim_value") and [d.dim_value for d in dims[1:]] == [64, 64, 3]
    meta = {p.key: json.loads(p.value) for p in model.metadata_props}  # every value JSON
    assert meta["input_shape"] == [64, 64, 3] and meta["image_size"] == [64, 64]
    options = meta["options"]
    assert options["smooth"] == 1.0 and options["layers"] == ["conv1"]
    # the run's own options, whatever the default preset is
    run_options = RunFolder(mvtec_run).options()
    assert options == run_options.as_config()
    assert (
        meta["thresholds"] == load_thresholds(str(mvtec_export / "thresholds.json")).as_dict()
    )
    assert meta["training_data"] is None and meta["latent_dim"] == 32
    assert onnx_export.read_metadata(str(mvtec_export / "model.onnx")) == meta
    # the SavedModel of the same run says the same
    served = saved_model.read_metadata(str(mvtec_export / "serving" / "model" / "1"))
    assert {key: served[key] for key in meta if key != "versions"} == {
        key: value for key, value in meta.items() if key != "versions"
    }
    with pytest.raises(onnx_export.ExportError, match="cannot read the ONNX model"):
        onnx_export.read_metadata(str(mvtec_export / "thresholds.json"))


def test_an_early_layer_with_convolutions_after_it_converts(mnist_run, mnist_images):
    """conv1: the rest of the encoder (conv2, dense) is back-propagated in the graph:
    ReluGrad, ShapeN and the conv backward pass; in memory it runs as batch_jacobian."""
    model = load_vae(str(mnist_run / "model"))
    options = ExplainOptions(layers=("conv1",))
    proto = onnx_export.convert(model, options)
    assert not onnx_export.unsupported_nodes(proto)
    for batch in (1, 7):
        images = mnist_images[1][:batch]
        assert onnx_export.parity(model, options, None, proto, images) <= 1e-4


GRADIENT_CASES = {  # the gradient ops each body leaves, and the body
    "relu": ({"ReluGrad"}, lambda x, w: tf.nn.relu(x) * x),
    "conv": (
        {"ShapeN", "Conv2DBackpropInput"},
        lambda x, w: tf.square(tf.nn.conv2d(x, w, 1, "SAME")),
    ),
    "broadcast": (
        {"BroadcastGradientArgs", "DynamicStitch"},
        lambda x, w: (
            (x * tf.reduce_mean(x, axis=[1, 2], keepdims=True) + w[0, 0, 0, :4])
            * tf.reduce_sum(x, axis=[0])
        ),
    ),
    "maxpool_same": (
        {"MaxPoolGrad"},
        lambda x, w: tf.square(tf.nn.max_pool2d(x, 3, 2, "SAME")),
    ),
    "maxpool_valid": (
        {"MaxPoolGrad"},
        lambda x, w: tf.square(tf.nn.max_pool2d(x, 2, 2, "VALID")),
    ),
}


@pytest.mark.parametrize("case", sorted(GRADIENT_CASES))
def test_gradient_op_handlers_match_tensorflow(case):
    """Each handler on a tiny graph, dynamic batch, against TensorFlow's own gradient."""
    rng = np.random.default_rng(0)
    weights = tf.Variable(rng.normal(size=(3, 3, 4, 5)).astype(np.float32))
    spec = tf.TensorSpec((None, 9, 9, 4), tf.float32, name="x")
    expected_ops, body = GRADIENT_CASES[case]

    @tf.function(input_signature=[spec], autograph=False)
    def gradient(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = tf.reduce_sum(body(x, weights))
        return {"g": tape.gradient(y, x)}

    graph_ops = {op.type for op in gradient.get_concrete_function().graph.get_operations()}
    assert expected_ops <= graph_ops
    proto = onnx_export.function_to_onnx(gradient, spec)
    assert not onnx_export.unsupported_nodes(proto), case
    session = ort.InferenceSession(proto.SerializeToString())
    for batch in (1, 7):
        x = rng.normal(size=(batch, 9, 9, 4)).astype(np.float32)
        np.testing.assert_allclose(
            session.run(None, {"x": x})[0],
            gradient(x)["g"].numpy(),
            rtol=1e-5,
            atol=1e-4,
            err_msg=f"{case}, batch {batch}",
        )


def tied_windows(features, size=3, stride=2):
    """How many (window, channel) pairs of a SAME max-pool hold their max more than once."""
    count = 0
    for top in range(0, features.shape[1], stride):
        for left in range(0, features.shape[2], stride):
            window = features[:, top : top + size, left : left + size]
            peak = window.max(axis=(1, 2), keepdims=True)
            count += int(((window == peak).sum(axis=(1, 2)) > 1).sum())
    return count


@pytest.mark.parametrize("source", ["few-levels", "real-conv1"])
def test_max_pool_gradient_routes_ties_like_tensorflow(source, request):
    """Where a pooling window holds its max twice (flat or saturated image regions, zeros
    after a ReLU), ONNX's MaxPool indices must pick the element TensorFlow's MaxPoolGrad
    picks (the first in row-major order), or the map moves by a pixel there."""
    import keras

    rng = np.random.default_rng(0)
    if source == "few-levels":
        features = rng.integers(0, 3, size=(3, 32, 32, 8)).astype(np.float32)
    else:  # the stem max-pool of the MVTec model, on real bottle images
        run = request.getfixturevalue("mvtec_run")
        images = mvtec.to_float(request.getfixturevalue("mvtec_images")[1].images)
        encoder = load_vae(str(run / "model")).encoder
        conv1 = keras.Model(encoder.input, encoder.get_layer("conv1").output)
        features = conv1(images).numpy()
    assert tied_windows(features) > 100
    upstream = rng.normal(size=(1, 16, 16, features.shape[-1])).astype(np.float32)
    spec = tf.TensorSpec((None, *features.shape[1:]), tf.float32, name="a")

    @tf.function(input_signature=[spec], autograph=False)
    def gradient(a):
        with tf.GradientTape() as tape:
            tape.watch(a)
            pooled = tf.nn.max_pool2d(a, 3, 2, "SAME")
            y = tf.reduce_sum(pooled * tf.constant(upstream))
        return {"g": tape.gradient(y, a)}

    session = ort.InferenceSession(
        onnx_export.function_to_onnx(gradient, spec).SerializeToString()
    )
    got, want = session.run(None, {"a": features})[0], gradient(features)["g"].numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_unconvertible_ops_are_named():
    node = onnx.helper.make_node("ReluGrad", ["a", "b"], ["c"])
    graph = onnx.helper.make_graph([node], "g", [], [])
    assert onnx_export.unsupported_nodes(onnx.helper.make_model(graph)) == {"ReluGrad": 1}


def test_onnx_inputs_are_checked_before_running(mnist_export):
    backend = OnnxBackend(str(mnist_export / "model.onnx"))
    good = np.zeros((2, 28, 28, 1), np.float32)
    assert backend.run(good)["heatmap"].shape == (2, 28, 28)
    cases = {
        "4-D batch .*add a batch axis": good[0],
        "3 channels but the model takes 1": np.zeros((2, 28, 28, 3), np.float32),
        "dtype uint8 .*divide 8-bit pixels by 255": good.astype(np.uint8),
        "dtype float64": good.astype(np.float64),
        "are 32x32 but the model takes 28x28": np.zeros((1, 32, 32, 1), np.float32),
        r"must be float32 in \[0, 1\]; got values in \[2, 2\]": good + 2.0,
        r"must hold at least one image": good[:0],
    }
    for message, images in cases.items():
        with pytest.raises(InputError, match=message):
            backend.run(images)


def test_cli_refuses_bad_paths_and_flags_without_touching_them(mnist_run, tmp_path, capsys):
    existing = tmp_path / "model.onnx"
    existing.write_bytes(b"keep me")
    with pytest.raises(SystemExit) as exit_info:
        onnx_export.main(["--run", str(mnist_run), "--out", str(existing)])
    assert exit_info.value.code == 2 and "already exists" in capsys.readouterr().err
    assert existing.read_bytes() == b"keep me"

    untrained = tmp_path / "untrained"
    (untrained / "model").mkdir(parents=True)
    with pytest.raises(SystemExit):
        onnx_export.main(["--run", str(untrained), "--out", str(tmp_path / "new.onnx")])
    assert "holds no trained model" in capsys.readouterr().err
    for flags in (["--opset", "11"], ["--out", str(tmp_path / "model.txt")]):
        with pytest.raises(SystemExit):
            onnx_export.main(
                ["--run", str(mnist_run), "--out", str(tmp_path / "x.onnx"), *flags]
            )
        assert flags[0] in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "untrained"]
