"""export.infer: a deployed model checked on image files, either backend."""

import json
import os

import matplotlib.pyplot as plt
import numpy as np
import pytest
from PIL import Image

from export import infer
from export.graph import validated_images
from keras_vae_attn.data import mvtec
from keras_vae_attn.explain import pipeline
from keras_vae_attn.models import load_vae
from keras_vae_attn.runs import RunFolder

pytestmark = pytest.mark.slow  # trains a run and exports it (shared session fixtures)


def test_both_backends_score_files_like_the_trained_model(
    mvtec_run, mvtec_export, mvtec_images, tmp_path, capsys
):
    """Three MVTec files, two of them named 000.png in different defect folders."""
    paths = mvtec_images[1].paths
    files = [paths[0], paths[2], paths[6]]
    results = {}
    for name, model in (
        ("saved_model", mvtec_export / "serving" / "model"),  # base folder
        ("onnx", mvtec_export / "model.onnx"),
    ):
        out = tmp_path / name
        infer.main(["--model", str(model), *files, "--out", str(out), "--batch-size", "2"])
        scores = json.loads((out / "scores.json").read_text())
        assert scores["backend"] == name and scores["input_shape"] == [64, 64, 3]
        assert [row["file"] for row in scores["images"]] == [os.path.abspath(f) for f in files]
        assert [row["overlay"] for row in scores["images"]] == [
            "broken_large/000.png",
            "broken_small/000.png",
            "good/000.png",
        ]  # no collision
        for row in scores["images"]:
            with Image.open(out / row["overlay"]) as image:
                assert image.format == "PNG" and image.width > image.height
            assert isinstance(row["pred_label"], bool)
            assert (
                0 <= row["pred_score"] <= 1 and (row["pred_score"] > 0.5) == row["pred_label"]
            )
            assert 0 <= row["pred_mask_fraction"] <= 1
        assert scores["thresholds"]["pixel"] > 0
        results[name] = np.array([row["score"] for row in scores["images"]])
    assert files[0] in capsys.readouterr().out

    model = load_vae(str(mvtec_run / "model"))
    options = RunFolder(mvtec_run).options()
    decoded, _ = mvtec.decode_files(files, 64, 3)
    want = pipeline.explain_anomaly(model, mvtec.to_float(decoded), options)["score"].numpy()
    for name, got in results.items():
        np.testing.assert_allclose(got, want, rtol=1e-4, err_msg=name)


def test_refuses_missing_models_and_unreadable_images(
    mnist_export, mnist_images, tmp_path, capsys
):
    image = tmp_path / "digit.png"
    Image.fromarray((mnist_images[1][0, ..., 0] * 255).astype(np.uint8)).save(image)
    not_image = tmp_path / "notes.png"
    not_image.write_text("not an image")
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = {
        "does not exist": (str(tmp_path / "missing"), image),
        "not an .onnx model": (str(not_image), image),
        "no saved_model.pb": (str(empty), image),
        f"cannot decode image file '{not_image}'": (
            str(mnist_export / "model.onnx"),
            not_image,
        ),
        "cannot read image file": (str(mnist_export / "model.onnx"), tmp_path / "absent.png"),
    }
    for message, (model, path) in cases.items():
        with pytest.raises(SystemExit) as exit_info:
            infer.main(["--model", model, str(path), "--out", str(tmp_path / "out")])
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_validated_images_says_what_is_wrong():
    good = np.zeros((1, 8, 8, 3), np.float32)
    assert validated_images(good, (8, 8, 3)) is not None
    with pytest.raises(infer.InputError, match="have 1 channels but the model takes 3"):
        validated_images(np.zeros((1, 8, 8, 1), np.float32), (8, 8, 3))
    with pytest.raises(infer.InputError, match=r"must be float32 in \[0, 1\].*NaN"):
        validated_images(np.full((1, 8, 8, 3), np.nan, np.float32), (8, 8, 3))


def test_figure_shows_scale_decision_mask_contour_and_file_name():
    """What a user reads off one figure: the title (file, score, threshold, label,
    pred_score), the labelled colorbar and the predicted mask's outline."""
    image = np.full((16, 16, 3), 0.5, np.float32)
    heatmap = np.zeros((16, 16), np.float32)
    heatmap[4:9, 4:9] = 0.3
    thresholds = {"pixel": 0.1, "image": 0.2}
    decided = {"pred_score": 0.75, "pred_label": True, "pred_mask": heatmap > 0.1}
    figure = infer.overlay_figure(
        image, "good/000.png", heatmap, 0.3, 0.2, thresholds, decided
    )
    title = figure._suptitle.get_text().replace("\n", " ")
    assert title == (
        "good/000.png: score 0.3 > image threshold 0.2: anomalous (pred_score 0.75)"
    )
    bars = [
        axis
        for axis in figure.axes
        if "2x the pixel threshold" in axis.get_xlabel().replace("\n", " ")
    ]
    assert len(bars) == 1 and "0.1" in bars[0].get_xlabel()
    assert len(figure.axes[1].collections) == 1  # the mask's contour on the map
    assert "score 0.3" in [text.get_text() for text in figure.axes[1].texts]
    plain = infer.overlay_figure(image, "x.png", heatmap, 0.3, 0.3, None)
    assert "no thresholds" in plain._suptitle.get_text()
    assert not plain.axes[1].collections
    for shown in (figure, plain):
        plt.close(shown)


def digit_files(folder, images, names):
    """MNIST digits as PNG files at ``folder/<name>``."""
    paths = []
    for image, name in zip(images, names):
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((image[..., 0] * 255).astype(np.uint8)).save(path)
        paths.append(str(path))
    return paths


def test_a_non_empty_out_is_refused_and_force_removes_only_what_infer_wrote(
    mnist_export, mnist_images, tmp_path, capsys
):
    files = digit_files(
        tmp_path / "in", mnist_images[1][:3], ["a/000.png", "b/000.png", "b/001.jpg"]
    )
    model = str(mnist_export / "model.onnx")
    out = tmp_path / "out"
    infer.main(["--model", model, *files, "--out", str(out)])
    first = json.loads((out / "scores.json").read_text())
    assert [row["overlay"] for row in first["images"]] == [
        "a/000.png",
        "b/000.png",
        "b/001.jpg.png",
    ]
    assert "pred_score" not in first["images"][0]  # this model holds no thresholds

    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    with pytest.raises(SystemExit) as exit_info:
        infer.main(["--model", model, files[0], "--out", str(out)])
    assert exit_info.value.code == 2
    assert "is not empty" in capsys.readouterr().err
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before

    (out / "notes.txt").write_text("mine")  # the user's own files
    outside = tmp_path / "outside.png"
    outside.write_bytes(b"keep")
    record = json.loads((out / "scores.json").read_text())  # and a listed file that
    record["images"].append({"overlay": "../outside.png"})  # lies outside --out
    (out / "scores.json").write_text(json.dumps(record))
    infer.main(["--model", model, files[0], "--out", str(out), "--force"])
    left = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    assert left == ["000.png", "notes.txt", "scores.json"]  # a/ and b/ were infer's
    assert (out / "notes.txt").read_text() == "mine" and outside.read_bytes() == b"keep"
    assert [
        row["overlay"] for row in json.loads((out / "scores.json").read_text())["images"]
    ] == ["000.png"]
