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

from export import explain_options, load_thresholds
from export import saved_model as sm
from keras_vae_attn import calibration, scoring
from keras_vae_attn.data import mvtec
from keras_vae_attn.models import load_vae

from conftest import assert_same_map

OUTPUTS = ("heatmap", "per_latent", "recon_error", "score", "mu", "logvar")


@functools.lru_cache(maxsize=None)
def trained_model(run):
    return load_vae(str(run / "model"))


@functools.lru_cache(maxsize=None)
def load_saved(folder):
    """tf.saved_model.load, once per folder for this module."""
    return tf.saved_model.load(str(folder))


def in_memory(run, images):
    """What the trainer computes for ``images`` with the run's options (numpy dict)."""
    config = json.loads((run / "config.json").read_text())
    out = scoring.explain_anomaly(trained_model(run), images, explain_options(config))
    return {key: value.numpy() for key, value in out.items()}


@pytest.fixture(scope="module")
def cases(mnist_run, mnist_export, mnist_images, mvtec_run, mvtec_export, mvtec_images):
    return {"mnist": (mnist_run, mnist_export, mnist_images[1], None),
            "mvtec": (mvtec_run, mvtec_export, mvtec.to_float(mvtec_images[1].images),
                      load_thresholds(str(mvtec_export / "thresholds.json")))}


@pytest.mark.parametrize("name", ["mnist", "mvtec"])
def test_loaded_saved_model_gives_the_trained_models_heatmaps(cases, name):
    run, exported, images, thresholds = cases[name]
    loaded = load_saved(exported / "serving" / "model" / "1")
    for batch in (1, 7):
        x = images[:batch]
        want = in_memory(run, x)
        got = loaded.signatures["serving_default"](images=tf.constant(x))
        assert_same_map(got["heatmap"], want["heatmap"], f"{name} heatmap, batch {batch}")
        for key in OUTPUTS[1:]:
            np.testing.assert_allclose(got[key].numpy(), want[key], rtol=1e-4, atol=1e-6,
                                       err_msg=f"{name} {key}, batch {batch}")
        assert got["heatmap"].shape == (batch, *x.shape[1:3])
        if thresholds is not None:
            decided = calibration.decide(want["heatmap"], want["score"], thresholds)
            np.testing.assert_array_equal(got["pred_label"].numpy(), decided["pred_label"])
            np.testing.assert_array_equal(got["pred_mask"].numpy(),
                                          got["heatmap"].numpy() > thresholds.pixel)


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
    shown = subprocess.run([cli, "show", "--all", "--dir",
                            str(mnist_export / "serving" / "model" / "1")],
                           capture_output=True, text=True, check=True).stdout
    for name in sm.SIGNATURES:
        assert f"signature_def['{name}']" in shown
    default = shown.split("signature_def['serving_default']")[1]
    assert "shape: (-1, 28, 28, 1)" in default and "outputs['heatmap']" in default
    assert "DT_STRING" in shown.split("signature_def['serve_bytes']")[1].split(
        "signature_def[")[0]


def rest_request(signature, files):
    """A TF Serving REST predict body with each file as {"b64": ...}."""
    return json.dumps({"signature_name": signature, "instances": [
        {"b64": base64.b64encode(open(path, "rb").read()).decode("ascii")} for path in files]})


def serve_rest(loaded, body):
    """What TF Serving does with a row-format request on a single-input signature:
    decode each {"b64": ...} to bytes, stack the instances, call the signature."""
    request = json.loads(body)
    signature = loaded.signatures[request["signature_name"]]
    name = list(signature.structured_input_signature[1])[0]
    values = [base64.b64decode(item["b64"]) for item in request["instances"]]
    return signature(**{name: tf.constant(values)})


def test_rest_b64_request_gives_the_float_endpoints_heatmap(mvtec_export, mvtec_images,
                                                            tmp_path):
    files = list(mvtec_images[1].paths[:4])
    jpeg = tmp_path / "as_jpeg.jpg"             # clients send JPEG too
    jpeg.write_bytes(tf.io.encode_jpeg(tf.io.decode_png(open(files[0], "rb").read()),
                                       quality=90).numpy())
    files.append(str(jpeg))
    loaded = load_saved(mvtec_export / "serving" / "model" / "1")
    got = serve_rest(loaded, rest_request("serve_bytes", files))
    # the float endpoint fed the way the MVTec trainer loads these files
    decoded, _ = mvtec.decode_files(files, 64, 3)
    want = loaded.signatures["serving_default"](images=tf.constant(mvtec.to_float(decoded)))
    assert_same_map(got["heatmap"], want["heatmap"], "serve_bytes heatmap")
    np.testing.assert_allclose(got["score"], want["score"], rtol=1e-4)


def test_wrong_rank_channels_dtype_or_range_fail_clearly(mnist_export):
    serve = load_saved(mnist_export / "serving" / "model" / "1").signatures["serving_default"]
    bad = {"not compatible with expected shape [?,28,28,1]": np.zeros((2, 28, 28),
                                                                       np.float32),
           "Shape of tensor images [2,28,28,3]": np.zeros((2, 28, 28, 3), np.float32),
           "expected to be a float tensor but is a uint8 tensor": np.zeros((1, 28, 28, 1),
                                                                            np.uint8),
           "images must be float32 in [0, 1]": np.full((1, 28, 28, 1), 255.0, np.float32)}
    for message, images in bad.items():
        with pytest.raises((tf.errors.InvalidArgumentError, TypeError, ValueError),
                           match=message.replace("[", r"\[").replace("?", r"\?")):
            serve(images=tf.constant(images))


def listing(folder):
    return sorted((str(p.relative_to(folder)), p.stat().st_mtime_ns)
                  for p in folder.rglob("*"))


def test_refuses_untrained_runs_existing_versions_and_bad_flags_untouched(
        mnist_run, tmp_path, capsys):
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
    for flags, message in ((["--version", "3"], "already exists"),
                           (["--version", "0"], "--version"),
                           (["--model-name", "../up"], "--model-name")):
        with pytest.raises(SystemExit):
            sm.main(["--run", str(mnist_run), "--out", str(out), *flags])
        assert message in capsys.readouterr().err
    assert listing(out) == before
    assert sm.next_version(str(out / "vae")) == 4


def test_force_replaces_a_version_whole(mnist_run, mnist_export, tmp_path, capsys):
    out = tmp_path / "serving"
    (out / "model" / "1").mkdir(parents=True)
    (out / "model" / "1" / "stale.txt").write_text("old")
    target = sm.main(["--run", str(mnist_run), "--out", str(out), "--model-name", "model",
                      "--version", "1", "--force"])
    assert target == str(out / "model" / "1")
    stages = [line.split(":")[0] for line in capsys.readouterr().err.splitlines()
              if line.startswith("export.saved_model ")]
    assert stages == [f"export.saved_model {k}/3" for k in (1, 2, 3)]   # progress shown
    assert not os.path.exists(os.path.join(target, "stale.txt"))
    assert sorted(os.listdir(out / "model")) == ["1"]        # no staging left behind
    info = json.loads((out / "model" / "1" / "assets" / "export.json").read_text())
    assert info["options"]["layers"] == ["last"] and info["input_shape"] == [28, 28, 1]
    x = tf.constant(np.random.default_rng(0).random((2, 28, 28, 1), dtype=np.float32))
    new = tf.saved_model.load(target).signatures["serving_default"](images=x)
    old = load_saved(mnist_export / "serving" / "model" / "1"
                     ).signatures["serving_default"](images=x)
    np.testing.assert_array_equal(new["heatmap"], old["heatmap"])
