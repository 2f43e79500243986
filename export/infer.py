"""Run an exported model on image files: the user's check of a deployed model.

    python -m export.infer --model <saved model dir | model.onnx> IMAGES... --out <dir>

``--model`` is a SavedModel version folder, a TF Serving model folder (its highest
numeric version is used) or an ``.onnx`` file. A SavedModel receives the encoded files
through its ``serve_bytes`` signature, exactly as a TF Serving REST client would send
them; an ONNX model receives them decoded by the same in-graph preprocessing.

Writes into the ``--out`` folder one figure per image, named by the image's path
relative to the images' common folder (``a/000.png`` and ``b/000.png`` stay apart; a
name gets ``.png`` added unless it ends so): the input, and the anomaly attention on
one labelled colour scale with the predicted mask's contour, the image score, label and
file name in the title, and ``scores.json`` (per image: score, and pred_score,
pred_label and pred_mask_fraction when the model has thresholds; written before the
figures, so it lists every file this command writes). A non-empty ``--out`` is refused
unless ``--force``, which first removes what an earlier run wrote there (the files its
``scores.json`` lists, nothing else); an ``--out`` that is a file is refused unless
``--force`` too. Images are checked (:func:`export.graph.validated_images`: float32 in
[0, 1], at least one) before either backend runs: ONNX Runtime does not check them.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from typing import Any

import numpy as np

from export import ExportError, InputError
from export.graph import decode_images, validated_images

SCORES = "scores.json"


def read_files(
    paths: list[str], shape: tuple[int, int, int]
) -> tuple[list[bytes], np.ndarray]:
    """Encoded bytes of each file and the images decoded as the graphs decode them.

    Returns (list of bytes, float32 (N, H, W, C)); a file that is missing or not an
    image is a DataError naming it.
    """
    import tensorflow as tf

    from keras_vae_attn.data import DataError

    encoded = []
    for path in paths:
        try:
            with open(path, "rb") as handle:
                data = handle.read()
            tf.io.decode_image(data, expand_animations=False)
        except OSError as error:
            raise DataError(
                f"cannot read image file {path!r}: {error.strerror or error}"
            ) from None
        except (tf.errors.OpError, ValueError) as error:
            reason = getattr(error, "message", str(error)).strip().splitlines()[0]
            raise DataError(f"cannot decode image file {path!r}: {reason}") from None
        encoded.append(data)
    images = decode_images(tf.constant(encoded), *shape).numpy()
    return encoded, images


class SavedModelBackend:
    """A SavedModel served the way TF Serving serves it: through its signatures."""

    kind = "saved_model"

    def __init__(self, path: str) -> None:
        import tensorflow as tf

        from export.saved_model import read_metadata

        self.path = path
        self.loaded = tf.saved_model.load(path)
        missing = [
            name
            for name in ("serving_default", "serve_bytes")
            if name not in self.loaded.signatures
        ]
        if missing:
            raise ExportError(
                f"SavedModel {path!r} lacks the signature(s) {missing}: it "
                "was not written by export.saved_model"
            )
        spec = self.loaded.signatures["serving_default"].structured_input_signature[1]
        self.input_shape = tuple(int(d) for d in spec["images"].shape[1:])
        try:
            self.info = read_metadata(path)
        except ExportError:  # not written by export.saved_model: no metadata
            self.info = {}

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Outputs of ``serving_default`` for float images; numpy dict."""
        import tensorflow as tf

        images = validated_images(images, self.input_shape)
        out = self.loaded.signatures["serving_default"](images=tf.constant(images))
        return {name: value.numpy() for name, value in out.items()}

    def run_encoded(self, encoded: list[bytes]) -> dict[str, np.ndarray]:
        """Outputs of ``serve_bytes`` for a list of encoded image files; numpy dict."""
        import tensorflow as tf

        out = self.loaded.signatures["serve_bytes"](image_bytes=tf.constant(encoded))
        return {name: value.numpy() for name, value in out.items()}


class OnnxBackend:
    """An ONNX model in an onnxruntime CPU session; inputs are checked before running."""

    kind = "onnx"

    def __init__(self, path: str) -> None:
        from export.onnx import parse_metadata, session
        from keras_vae_attn.extras import needs_extra

        with needs_extra("export", "running an .onnx model"):
            importlib.import_module("onnxruntime")
        self.path = path
        try:
            self.session = session(path)
        except Exception as error:  # onnxruntime raises its own exception types
            raise ExportError(f"onnxruntime cannot load {path!r}: {error}") from None
        inputs = self.session.get_inputs()
        if len(inputs) != 1 or inputs[0].name != "images":
            raise ExportError(
                f"ONNX model {path!r} does not take one 'images' input: it "
                "was not written by export.onnx"
            )
        self.input_shape = tuple(int(d) for d in inputs[0].shape[1:])
        self.info = parse_metadata(self.session.get_modelmeta().custom_metadata_map)
        self.names = [output.name for output in self.session.get_outputs()]

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """The graph's outputs for float images, checked first; numpy dict."""
        images = validated_images(images, self.input_shape)
        return dict(zip(self.names, self.session.run(None, {"images": images})))

    def run_encoded(self, encoded: list[bytes]) -> dict[str, np.ndarray]:
        """The outputs for encoded image files, decoded as serve_bytes decodes them."""
        import tensorflow as tf

        return self.run(decode_images(tf.constant(encoded), *self.input_shape).numpy())


def open_model(path: str) -> SavedModelBackend | OnnxBackend:
    """The backend for ``path``: an .onnx file, a SavedModel, or a TF Serving model
    folder (its highest numeric version)."""
    if not os.path.exists(path):
        raise ExportError(f"--model {path!r} does not exist")
    if os.path.isfile(path):
        if not path.endswith(".onnx"):
            raise ExportError(
                f"--model {path!r} is a file but not an .onnx model; give an "
                ".onnx file or a SavedModel folder"
            )
        return OnnxBackend(path)
    if not os.path.isfile(os.path.join(path, "saved_model.pb")):
        versions = sorted(
            int(name)
            for name in os.listdir(path)
            if name.isdigit() and os.path.isfile(os.path.join(path, name, "saved_model.pb"))
        )
        if not versions:
            raise ExportError(
                f"--model {path!r} holds no saved_model.pb and no numeric "
                "version folder with one"
            )
        path = os.path.join(path, str(versions[-1]))
    return SavedModelBackend(path)


def output_names(paths: list[str]) -> list[str]:
    """Each image's figure name in ``--out``: its path relative to the images' common
    folder (``a/000.png`` and ``b/000.png`` stay apart), ``.png`` added unless it ends
    so. InputError for a file given twice (its figure would be written twice)."""
    full = [os.path.abspath(path) for path in paths]
    seen = set()
    for path, absolute in zip(paths, full):
        if absolute in seen:
            raise InputError(f"image file {path!r} is given twice")
        seen.add(absolute)
    common = os.path.commonpath([os.path.dirname(path) for path in full])
    names = []
    for absolute in full:
        name = os.path.relpath(absolute, common)
        names.append(name if name.lower().endswith(".png") else name + ".png")
    return names


def decision_title(
    name: str, score: float, thresholds: dict | None, decided: dict | None = None
) -> str:
    """The figure title: file name, score, and the decision at the image threshold."""
    if thresholds is None:
        return f"{name}: score {score:.3g} (the model holds no thresholds: no decision)"
    label = decided["pred_label"]
    return (
        f"{name}: score {score:.3g} {'>' if label else '<='} image threshold "
        f"{thresholds['image']:.3g}: {'anomalous' if label else 'normal'} "
        f"(pred_score {decided['pred_score']:.2f})"
    )


def overlay_figure(
    image: np.ndarray,
    name: str,
    heatmap: np.ndarray,
    score: float,
    vmax: float,
    thresholds: dict | None,
    decided: dict | None = None,
) -> Any:
    """One image's figure, as the trainers draw predictions: the input, the anomaly
    attention on the colour scale [0, ``vmax``] shared by every image of the run (with
    a colorbar; the pixel threshold marked on it and the predicted mask's contour drawn
    on the map when the model has thresholds), and the decision in the title. Returns
    the matplotlib Figure."""
    from keras_vae_attn import viz

    if thresholds is None:
        scale = (
            f"one scale for the images of this run: 0 to {vmax:.3g}, their largest "
            "value (no thresholds in the model)"
        )
        mark = None
    else:
        scale = (
            f"one scale for all images: 0 to {vmax:.3g} = 2x the pixel threshold "
            f"{thresholds['pixel']:.3g} (white line)"
        )
        mark = thresholds["pixel"]
    columns = [
        ("input", viz.to_rgb(image[None])),
        viz.Heatmaps(
            "anomaly attention", heatmap[None], vmax, scale, mark, notes=[f"score {score:.3g}"]
        ),
    ]
    figure = viz.heatmap_figure(
        image[None],
        columns,
        title=decision_title(name, score, thresholds, decided),
        cell_inches=2.0,
    )
    if decided is not None and 0 < decided["pred_mask"].mean() < 1:
        figure.axes[1].contour(
            decided["pred_mask"].astype(np.float32),
            levels=[0.5],
            colors="white",
            linewidths=1.0,
        )
    return figure


def write_overlays(
    images: np.ndarray,
    outputs: dict[str, np.ndarray],
    names: list[str],
    out_dir: str,
    thresholds: dict | None,
) -> None:
    """One figure per image (:func:`overlay_figure`) at ``out_dir/<its name>``."""
    from keras_vae_attn import viz

    vmax = (
        2.0 * thresholds["pixel"]
        if thresholds
        else max(float(outputs["heatmap"].max()), 1e-12)
    )
    for index, name in enumerate(names):
        decided = (
            None
            if thresholds is None
            else {
                key: outputs[key][index] for key in ("pred_score", "pred_label", "pred_mask")
            }
        )
        figure = overlay_figure(
            images[index],
            name,
            outputs["heatmap"][index],
            float(outputs["score"][index]),
            vmax,
            thresholds,
            decided,
        )
        viz.save_figure(figure, os.path.join(out_dir, name))


def check_out(out_dir: str, force: bool = False) -> None:
    """ExportError if ``out_dir`` is a file or a non-empty folder, unless ``force``:
    found before the model is loaded, not after inference ran."""
    if force or not os.path.lexists(out_dir):
        return
    if not os.path.isdir(out_dir):
        raise ExportError(
            f"--out {out_dir!r} already exists and is not a folder; choose "
            "another path or pass --force to replace it"
        )
    if os.listdir(out_dir):
        raise ExportError(
            f"--out {out_dir!r} is not empty; choose another folder, or pass "
            "--force to remove what an earlier export.infer wrote there (the "
            f"files its {SCORES} lists) first"
        )


def earlier_outputs(out_dir: str) -> list[str]:
    """The files an earlier run wrote into ``out_dir``: those its scores.json lists, when
    each lies inside ``out_dir`` (links followed), and scores.json itself."""
    record = os.path.join(out_dir, SCORES)
    try:
        with open(record, encoding="utf-8") as handle:
            rows = json.load(handle).get("images", [])
        names = [row["overlay"] for row in rows]
    except (OSError, ValueError, AttributeError, TypeError, KeyError):
        return []
    root = os.path.realpath(out_dir)
    found = []
    for name in names:
        path = os.path.join(out_dir, str(name))
        folder = os.path.realpath(os.path.dirname(path))
        if (
            (folder == root or folder.startswith(root + os.sep))
            and str(name).endswith(".png")
            and os.path.isfile(path)
        ):
            found.append(path)
    return found + [record]


def make_out(out_dir: str) -> None:
    """Create the ``out_dir`` folder, first removing a file there or an earlier run's
    figures and scores.json (allowed by check_out with --force), and the folders those
    leave empty. Nothing else in ``out_dir`` is touched."""
    if os.path.lexists(out_dir) and not os.path.isdir(out_dir):
        os.remove(out_dir)
    if os.path.isdir(out_dir):
        folders = set()
        for path in earlier_outputs(out_dir):
            os.remove(path)
            folders.add(os.path.dirname(path))
        for folder in sorted(folders, key=len, reverse=True):
            while os.path.abspath(folder) != os.path.abspath(out_dir):
                if os.listdir(folder):
                    break
                os.rmdir(folder)
                folder = os.path.dirname(folder)
    os.makedirs(out_dir, exist_ok=True)


def score_rows(
    image_paths: list[str],
    names: list[str],
    outputs: dict[str, np.ndarray],
    thresholds: dict | None,
) -> list[dict[str, Any]]:
    """scores.json's rows: per image its file, figure, score, heatmap max, and with
    thresholds pred_score (on [0, 1], 0.5 at the image threshold, as predictions.csv),
    pred_label and pred_mask_fraction."""
    rows = []
    for index, path in enumerate(image_paths):
        row = {
            "file": os.path.abspath(path),
            "overlay": names[index],
            "score": float(outputs["score"][index]),
            "heatmap_max": float(outputs["heatmap"][index].max()),
        }
        if thresholds is not None:
            row.update(
                pred_score=float(outputs["pred_score"][index]),
                pred_label=bool(outputs["pred_label"][index]),
                pred_mask_fraction=float(outputs["pred_mask"][index].mean()),
            )
        rows.append(row)
    return rows


def infer(
    model_path: str,
    image_paths: list[str],
    out_dir: str,
    batch_size: int = 16,
    force: bool = False,
) -> dict[str, Any]:
    """Run ``model_path`` on ``image_paths``; writes figures and scores.json into
    ``out_dir`` and returns the scores dict."""
    from keras_vae_attn.runs import write_json

    check_out(out_dir, force)
    if not image_paths:
        raise InputError("images must hold at least one image; no image files given")
    names = output_names(image_paths)
    backend = open_model(model_path)
    chunks = []
    for start in range(0, len(image_paths), batch_size):
        paths = image_paths[start : start + batch_size]
        encoded, images = read_files(paths, backend.input_shape)
        chunks.append((images, backend.run_encoded(encoded)))
    images = np.concatenate([c[0] for c in chunks])
    outputs = {key: np.concatenate([c[1][key] for c in chunks]) for key in chunks[0][1]}
    thresholds = backend.info.get("thresholds")
    if thresholds is not None and "pred_score" not in outputs:
        thresholds = None  # an export of an earlier version: no decisions
    make_out(out_dir)
    scores = {
        "backend": backend.kind,
        "model": os.path.abspath(backend.path),
        "input_shape": list(backend.input_shape),
        "thresholds": thresholds,
        "images": score_rows(image_paths, names, outputs, thresholds),
    }
    write_json(os.path.join(out_dir, SCORES), scores)
    write_overlays(images, outputs, names, out_dir, thresholds)
    return scores


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m export.infer",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--model",
        required=True,
        help="SavedModel folder, TF Serving model folder, or .onnx file",
    )
    parser.add_argument("images", nargs="+", help="image files (PNG, JPEG, BMP, GIF)")
    parser.add_argument(
        "--out", required=True, help="folder for the figures and scores.json (new or empty)"
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=16,
        help="images per model call (default: %(default)s)",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="write into a non-empty --out after removing what an earlier "
        "export.infer wrote there (or replace an --out file)",
    )
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch-size must be at least 1, got {args.batch_size}")
    try:
        check_out(args.out, args.force)  # before TensorFlow is even imported
    except ExportError as error:
        parser.exit(2, f"error: {error}\n")
    from keras_vae_attn.console import start_tensorflow

    start_tensorflow()  # after the flags, without its banners
    from keras_vae_attn.data import DataError
    from keras_vae_attn.extras import MissingExtra

    try:
        scores = infer(args.model, args.images, args.out, args.batch_size, args.force)
    except (ExportError, DataError, InputError, MissingExtra) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    for row in scores["images"]:
        decision = (
            ""
            if "pred_label" not in row
            else f"  pred_score {row['pred_score']:.3f}  "
            + ("anomalous" if row["pred_label"] else "normal   ")
        )
        print(f"score {row['score']:.6g}{decision}  {row['file']}")
    print(f"figures and {SCORES} in {args.out}")
    return scores


if __name__ == "__main__":
    main()
