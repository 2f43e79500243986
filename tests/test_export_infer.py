"""export.infer: a deployed model checked on image files, either backend."""
import json

import numpy as np
import pytest
from PIL import Image

from export import explain_options, infer
from keras_vae_attn import scoring
from keras_vae_attn.data import mvtec
from keras_vae_attn.models import load_vae


def test_both_backends_score_files_like_the_trained_model(mvtec_run, mvtec_export,
                                                          mvtec_images, tmp_path, capsys):
    files = list(mvtec_images[1].paths[:3])
    results = {}
    for name, model in (("saved_model", mvtec_export / "serving" / "model"),   # base folder
                        ("onnx", mvtec_export / "model.onnx")):
        out = tmp_path / name
        infer.main(["--model", str(model), *files, "--out", str(out), "--batch-size", "2"])
        scores = json.loads((out / "scores.json").read_text())
        assert scores["backend"] == name and scores["input_shape"] == [64, 64, 3]
        assert [row["file"] for row in scores["images"]] == files
        for row in scores["images"]:
            with Image.open(out / row["overlay"]) as image:
                assert image.format == "PNG" and image.width > image.height
            assert isinstance(row["pred_label"], bool)
        results[name] = np.array([row["score"] for row in scores["images"]])
    assert files[0] in capsys.readouterr().out

    model = load_vae(str(mvtec_run / "model"))
    options = explain_options(json.loads((mvtec_run / "config.json").read_text()))
    decoded, _ = mvtec.decode_files(files, 64, 3)
    want = scoring.explain_anomaly(model, mvtec.to_float(decoded), options)["score"].numpy()
    for name, got in results.items():
        np.testing.assert_allclose(got, want, rtol=1e-4, err_msg=name)


def test_refuses_missing_models_and_unreadable_images(mnist_export, mnist_images, tmp_path,
                                                      capsys):
    image = tmp_path / "digit.png"
    Image.fromarray((mnist_images[1][0, ..., 0] * 255).astype(np.uint8)).save(image)
    not_image = tmp_path / "notes.png"
    not_image.write_text("not an image")
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = {"does not exist": (str(tmp_path / "missing"), image),
             "not an .onnx model": (str(not_image), image),
             "no saved_model.pb": (str(empty), image),
             f"cannot decode image file '{not_image}'":
                 (str(mnist_export / "model.onnx"), not_image),
             "cannot read image file": (str(mnist_export / "model.onnx"),
                                        tmp_path / "absent.png")}
    for message, (model, path) in cases.items():
        with pytest.raises(SystemExit) as exit_info:
            infer.main(["--model", model, str(path), "--out", str(tmp_path / "out")])
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_check_images_says_what_is_wrong():
    good = np.zeros((1, 8, 8, 3), np.float32)
    assert infer.check_images(good, (8, 8, 3)) is not None
    with pytest.raises(infer.InputError, match="have 1 channels but the model takes 3"):
        infer.check_images(np.zeros((1, 8, 8, 1), np.float32), (8, 8, 3))
    with pytest.raises(infer.InputError, match=r"must be float32 in \[0, 1\].*NaN"):
        infer.check_images(np.full((1, 8, 8, 3), np.nan, np.float32), (8, 8, 3))
