"""The TF Serving SavedModel: same heatmaps as the trained model, three signatures, the
REST bytes path, and clear refusals."""

import base64
import functools
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from export import load_thresholds
from export import saved_model as sm
from export.graph import DECISION_OUTPUTS, SERVING_OUTPUTS
from export.metadata import training_data
from keras_vae_attn import calibration
from keras_vae_attn.data import mvtec
from keras_vae_attn.explain import pipeline
from keras_vae_attn.models import load_vae
from keras_vae_attn.runs import RunFolder

from conftest import assert_same_map

pytestmark = pytest.mark.slow  # trains a run and exports it (shared session fixtures)

OUTPUTS = ("heatmap", "per_latent", "recon_error", "score", "mu", "logvar")


@functools.cache
def trained_model(run):
    return load_vae(str(run / "model"))


@functools.cache
def load_saved(folder):
    """tf.saved_model.load, once per folder for this module."""
    return tf.saved_model.load(str(folder))


def in_memory(run, images):
    """What the trainer computes for ``images`` with the run's options (numpy dict)."""
    out = pipeline.explain_anomaly(trained_model(run), images, RunFolder(run).options())
    return {key: value.numpy() for key, value in out.items()}


@pytest.fixture(scope="module")
def cases(mnist_run, mnist_export, mnist_images, mvtec_run, mvtec_export, mvtec_images):
    return {
        "mnist": (mnist_run, mnist_export, mnist_images[1], None),
        "mvtec": (
            mvtec_run,
            mvtec_export,
            mvtec.to_float(mvtec_images[1].images),
            load_thresholds(str(mvtec_export / "thresholds.json")),
        ),
    }


@pytest.mark.parametrize("name", ["mnist", "mvtec"])
def test_loaded_saved_model_gives_the_trained_models_heatmaps(cases, name):
    run, exported, images, thresholds = cases[name]
    loaded = load_saved(exported / "serving" / "model" / "1")
    lean = set(SERVING_OUTPUTS) | (set(DECISION_OUTPUTS) if thresholds else set())
    for batch in (1, 7):
        x = images[:batch]
        want = in_memory(run, x)
        got = loaded.signatures["serving_default"](images=tf.constant(x))
        assert set(got) == lean, f"{name}: serving_default is lean"
        full = loaded.signatures["explain_latents"](images=tf.constant(x))
        assert set(OUTPUTS) <= set(full)
        for out, label in ((got, "serving_default"), (full, "explain_latents")):
            assert_same_map(out["heatmap"], want["heatmap"], f"{name} {label}, batch {batch}")
            np.testing.assert_allclose(out["score"], want["score"], rtol=1e-4, atol=1e-6)
        for key in OUTPUTS[1:]:
            np.testing.assert_allclose(
                full[key].numpy(),
                want[key],
                rtol=1e-4,
                atol=1e-6,
                err_msg=f"{name} {key}, batch {batch}",
            )
        assert got["heatmap"].shape == (batch, *x.shape[1:3])
        if thresholds is not None:
            decided = calibration.decide(want["heatmap"], want["score"], thresholds)
            for out in (got, full):
                np.testing.assert_array_equal(out["pred_label"].numpy(), decided["pred_label"])
                np.testing.assert_array_equal(
                    out["pred_mask"].numpy(), out["heatmap"].numpy() > thresholds.pixel
                )
            np.testing.assert_allclose(
                full["heatmap_normalized"],
                np.clip(0.5 * full["heatmap"] / thresholds.pixel, 0, 1),
                atol=1e-6,
            )


def rest_response_bytes(outputs):
    """The size of TF Serving's REST (row format) JSON response for these outputs."""
    rows = [
        {key: np.asarray(value)[i].tolist() for key, value in outputs.items()}
        for i in range(len(np.asarray(outputs["score"])))
    ]
    return len(json.dumps({"predictions": rows}))


def test_serving_signatures_are_lean_and_the_latent_maps_have_their_own(cases):
    """2 images at 64 px: the default response is a fraction of the full one, which
    carries the per-latent maps (D of them per image)."""
    _, exported, images, _ = cases["mvtec"]
    loaded = load_saved(exported / "serving" / "model" / "1")
    x = tf.constant(images[:2])
    lean = loaded.signatures["serving_default"](images=x)
    full = loaded.signatures["explain_latents"](images=x)
    assert "per_latent" not in lean and full["per_latent"].shape == (2, 32, 32, 32)
    sizes = {
        "serving_default": rest_response_bytes(lean),
        "explain_latents": rest_response_bytes(full),
    }
    print("REST response bytes for 2 images at 64 px:", sizes)
    assert sizes["serving_default"] < 0.25 * sizes["explain_latents"], sizes
    assert sizes["serving_default"] < 300_000, sizes
    info = sm.read_metadata(str(exported / "serving" / "model"))
    assert set(info["signatures"]["serving_default"]) == set(lean)
    assert set(info["signatures"]["serve_bytes"]) == set(lean)
    assert set(info["signatures"]["explain_latents"]) == set(full)


def test_explain_signature_is_the_plain_per_latent_attention(cases):
    run, exported, images, _ = cases["mnist"]
    loaded = load_saved(exported / "serving" / "model" / "1")
    got = loaded.signatures["explain"](images=tf.constant(images[:3]))
    want = in_memory(run, images[:3])
    assert got["per_latent"].shape == want["per_latent"].shape == (3, 16, 7, 7)
    assert_same_map(got["per_latent"], want["per_latent"], "per_latent")
    assert_same_map(got["attention"], want["attention"], "attention")
    np.testing.assert_allclose(got["mu"], want["mu"], rtol=1e-5, atol=1e-6)


def test_saved_model_cli_lists_the_three_signatures(mnist_export):
    cli = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
    shown = subprocess.run(
        [cli, "show", "--all", "--dir", str(mnist_export / "serving" / "model" / "1")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for name in sm.SIGNATURES:
        assert f"signature_def['{name}']" in shown
    default = shown.split("signature_def['serving_default']")[1].split("signature_def[")[0]
    assert "shape: (-1, 28, 28, 1)" in default and "outputs['heatmap']" in default
    assert "outputs['per_latent']" not in default
    latents = shown.split("signature_def['explain_latents']")[1].split("signature_def[")[0]
    assert "outputs['per_latent']" in latents
    assert (
        "DT_STRING"
        in shown.split("signature_def['serve_bytes']")[1].split("signature_def[")[0]
    )


def rest_request(signature, files):
    """A TF Serving REST predict body with each file as {"b64": ...}."""
    return json.dumps(
        {
            "signature_name": signature,
            "instances": [
                {"b64": base64.b64encode(open(path, "rb").read()).decode("ascii")}
                for path in files
            ],
        }
    )


def serve_rest(loaded, body):
    """What TF Serving does with a row-format request on a single-input signature:
    decode each {"b64": ...} to bytes, stack the instances, call the signature."""
    request = json.loads(body)
    signature = loaded.signatures[request["signature_name"]]
    name = list(signature.structured_input_signature[1])[0]
    values = [base64.b64decode(item["b64"]) for item in request["instances"]]
    return signature(**{name: tf.constant(values)})


def test_rest_b64_request_gives_the_float_endpoints_heatmap(
    mvtec_export, mvtec_images, tmp_path
):
    files = list(mvtec_images[1].paths[:4])
    jpeg = tmp_path / "as_jpeg.jpg"  # clients send JPEG too
    jpeg.write_bytes(
        tf.io.encode_jpeg(tf.io.decode_png(open(files[0], "rb").read()), quality=90).numpy()
    )
    files.append(str(jpeg))
    loaded = load_saved(mvtec_export / "serving" / "model" / "1")
    got = serve_rest(loaded, rest_request("serve_bytes", files))
    # the float endpoint fed the way the MVTec trainer loads these files
    decoded, _ = mvtec.decode_files(files, 64, 3)
    want = loaded.signatures["serving_default"](images=tf.constant(mvtec.to_float(decoded)))
    assert_same_map(got["heatmap"], want["heatmap"], "serve_bytes heatmap")
    np.testing.assert_allclose(got["score"], want["score"], rtol=1e-4)


@pytest.mark.parametrize("signature", ["serving_default", "explain_latents"])
def test_wrong_rank_channels_dtype_or_range_fail_clearly(mnist_export, signature):
    serve = load_saved(mnist_export / "serving" / "model" / "1").signatures[signature]
    bad = {
        "not compatible with expected shape [?,28,28,1]": np.zeros((2, 28, 28), np.float32),
        "Shape of tensor images [2,28,28,3]": np.zeros((2, 28, 28, 3), np.float32),
        "expected to be a float tensor but is a uint8 tensor": np.zeros(
            (1, 28, 28, 1), np.uint8
        ),
        "images must be float32 in [0, 1]": np.full((1, 28, 28, 1), 255.0, np.float32),
    }
    for message, images in bad.items():
        with pytest.raises(
            (tf.errors.InvalidArgumentError, TypeError, ValueError),
            match=message.replace("[", r"\[").replace("?", r"\?"),
        ):
            serve(images=tf.constant(images))


def listing(folder):
    return sorted(
        (str(p.relative_to(folder)), p.stat().st_mtime_ns) for p in folder.rglob("*")
    )


def test_refuses_untrained_runs_existing_versions_and_bad_flags_untouched(
    mnist_run, tmp_path, capsys
):
    empty_run = tmp_path / "run"
    empty_run.mkdir()
    (empty_run / "config.json").write_text('{"layer": "last"}')
    out = tmp_path / "serving"
    with pytest.raises(SystemExit) as exit_info:
        sm.main(["--run", str(empty_run), "--out", str(out)])
    assert exit_info.value.code == 2
    assert "holds no trained model" in capsys.readouterr().err
    assert not out.exists()

    (out / "vae" / "3").mkdir(parents=True)
    (out / "vae" / "3" / "saved_model.pb").write_bytes(b"served")
    before = listing(out)
    for flags, message in (
        (["--version", "3"], "already exists"),
        (["--version", "0"], "--version"),
        (["--model-name", "../up"], "--model-name"),
    ):
        with pytest.raises(SystemExit):
            sm.main(["--run", str(mnist_run), "--out", str(out), *flags])
        assert message in capsys.readouterr().err
    assert listing(out) == before
    assert sm.next_version(str(out / "vae")) == 4


def test_force_replaces_a_version_whole(mnist_run, mnist_export, tmp_path, capsys):
    out = tmp_path / "serving"
    (out / "model" / "1").mkdir(parents=True)
    (out / "model" / "1" / "stale.txt").write_text("old")
    target = sm.main(
        [
            "--run",
            str(mnist_run),
            "--out",
            str(out),
            "--model-name",
            "model",
            "--version",
            "1",
            "--force",
        ]
    )
    assert target == str(out / "model" / "1")
    stages = [
        line.split(":")[0]
        for line in capsys.readouterr().err.splitlines()
        if line.startswith("export.saved_model ")
    ]
    assert stages == [f"export.saved_model {k}/3" for k in (1, 2, 3)]  # progress shown
    assert not os.path.exists(os.path.join(target, "stale.txt"))
    assert sorted(os.listdir(out / "model")) == ["1"]  # no staging left behind
    info = json.loads((out / "model" / "1" / "assets" / "export.json").read_text())
    assert info["options"]["layers"] == ["last"] and info["input_shape"] == [28, 28, 1]
    x = tf.constant(np.random.default_rng(0).random((2, 28, 28, 1), dtype=np.float32))
    new = tf.saved_model.load(target).signatures["serving_default"](images=x)
    old = load_saved(mnist_export / "serving" / "model" / "1").signatures["serving_default"](
        images=x
    )
    np.testing.assert_array_equal(new["heatmap"], old["heatmap"])


def test_warmup_requests_parse_as_tf_serving_reads_them_and_run(mnist_export, mvtec_export):
    """assets.extra/tf_serving_warmup_requests: a TFRecord of PredictionLog protos, one
    PredictRequest per signature, read back with TF Serving's own proto classes and run
    through the loaded SavedModel."""
    prediction_log_pb2 = pytest.importorskip("tensorflow_serving.apis.prediction_log_pb2")
    for exported in (mnist_export, mvtec_export):
        folder = exported / "serving" / "model" / "1"
        path = folder / "assets.extra" / "tf_serving_warmup_requests"
        loaded = load_saved(folder)
        shape = sm.read_metadata(str(folder))["input_shape"]
        signatures = []
        for record in tf.data.TFRecordDataset(str(path)):
            log = prediction_log_pb2.PredictionLog.FromString(record.numpy())
            assert log.WhichOneof("log_type") == "predict_log"
            request = log.predict_log.request
            assert request.model_spec.name == "model"
            signature = loaded.signatures[request.model_spec.signature_name]
            inputs = {
                name: tf.constant(tf.make_ndarray(proto))
                for name, proto in request.inputs.items()
            }
            assert set(inputs) == set(signature.structured_input_signature[1])
            out = signature(**inputs)
            first = out["heatmap"] if "heatmap" in out else out["per_latent"]
            assert first.shape[0] == 1 and np.isfinite(first.numpy()).all()
            if "images" in inputs:
                assert inputs["images"].shape == (1, *shape)
            signatures.append(request.model_spec.signature_name)
        assert sorted(signatures) == sorted(sm.SIGNATURES)


def test_metadata_says_how_the_model_was_made_and_is_fed(mvtec_run, mvtec_export):
    info = sm.read_metadata(str(mvtec_export / "serving" / "model"))  # newest version
    assert info["input_shape"] == [64, 64, 3] and info["image_size"] == [64, 64]
    assert info["options"] == RunFolder(mvtec_run).options().as_config()
    assert (
        info["thresholds"] == load_thresholds(str(mvtec_export / "thresholds.json")).as_dict()
    )
    assert "bilinear" in info["preprocessing"] and "antialias=True" in info["preprocessing"]
    assert info["training_data"] is None  # this run's config names no data folder
    assert info["latent_dim"] == 32 and info["source_run"] == str(mvtec_run)
    with pytest.raises(sm.ExportError, match="cannot read the metadata"):
        sm.read_metadata(str(mvtec_run))


def test_training_data_fingerprint_where_the_run_names_its_data(shared_data, tmp_path):
    config = {"data_dir": str(shared_data / "mvtec_ad"), "category": "bottle"}
    found = training_data(config)
    assert found["folder"] == str(shared_data / "mvtec_ad" / "bottle" / "train")
    assert found["files"] == len(
        list((shared_data / "mvtec_ad" / "bottle" / "train").rglob("*.png"))
    )
    assert len(found["sha256"]) == 64 and training_data(config) == found
    copy = tmp_path / "bottle" / "train" / "good"  # one image less: another hash
    copy.mkdir(parents=True)
    for path in sorted((shared_data / "mvtec_ad" / "bottle" / "train" / "good").glob("*"))[1:]:
        (copy / path.name).symlink_to(path)
    other = training_data({"data_dir": str(tmp_path), "category": "bottle"})
    assert other["files"] == found["files"] - 1 and other["sha256"] != found["sha256"]
    assert training_data({"category": "bottle"}) is None
    assert training_data({"data_dir": str(tmp_path), "category": "cable"}) is None


def readme_block(marker):
    """The README code block that contains ``marker``."""
    import re

    from conftest import REPO

    blocks = re.findall(
        r"^```python\n(.*?)^```", (REPO / "README.md").read_text(), re.S | re.M
    )
    found = [block for block in blocks if marker in block]
    assert len(found) == 1, f"one README python block holds {marker!r}"
    return found[0]


def test_readme_recipe_serve_bytes_and_the_trainer_give_the_same_score(
    mvtec_export, mvtec_images, tmp_path, monkeypatch
):
    """A 900x900 file three ways: the README's Python recipe into serving_default (as a
    TF Serving REST "inputs" body), the encoded file into serve_bytes, and the MVTec
    trainer's loader into serving_default."""
    source = mvtec_images[1].paths[0]
    (tmp_path / "img1.png").write_bytes(open(source, "rb").read())
    (tmp_path / "img2.jpg").write_bytes(
        tf.io.encode_jpeg(
            tf.io.decode_png(open(mvtec_images[1].paths[6], "rb").read()), quality=90
        ).numpy()
    )
    monkeypatch.chdir(tmp_path)
    exec(readme_block("def load_images"), {})  # writes request.json
    body = json.loads((tmp_path / "request.json").read_text())
    assert body["signature_name"] == "serving_default"
    loaded = load_saved(mvtec_export / "serving" / "model" / "1")
    recipe = loaded.signatures["serving_default"](
        images=tf.constant(np.array(body["inputs"]["images"], np.float32))
    )
    files = [str(tmp_path / "img1.png"), str(tmp_path / "img2.jpg")]
    served = serve_rest(loaded, rest_request("serve_bytes", files))
    decoded, _ = mvtec.decode_files(files, 64, 3)
    trainer = loaded.signatures["serving_default"](images=tf.constant(mvtec.to_float(decoded)))
    for label, got in (("README recipe", recipe), ("serve_bytes", served)):
        np.testing.assert_allclose(
            got["score"], trainer["score"], rtol=0, atol=1e-5, err_msg=label
        )
        np.testing.assert_allclose(got["pred_score"], trainer["pred_score"], atol=1e-5)
