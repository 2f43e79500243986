"""Run an exported model on image files: the user's check of a deployed model.

    python -m export.infer --model <saved model dir | model.onnx> IMAGES... --out <dir>

``--model`` is a SavedModel version folder, a TF Serving model folder (its highest
numeric version is used) or an ``.onnx`` file. A SavedModel receives the encoded files
through its ``serve_bytes`` signature, exactly as a TF Serving REST client would send
them; an ONNX model receives them decoded by the same in-graph preprocessing. Writes
one ``<index>_<name>.png`` per image (input, anomaly attention, reconstruction error)
and ``scores.json`` (image scores, decisions when the model has thresholds) into the
``--out`` folder; an ``--out`` that exists and is not a folder is refused before any
work unless ``--force``. Images are checked (:func:`export.check_images`: float32 in
[0, 1], at least one) before either backend runs: ONNX Runtime does not check them.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from export import ExportError, InputError, check_images  # noqa: F401  (re-exported)

OVERLAY_OUTPUTS = ("heatmap", "recon_error")


def read_files(paths, shape):
    """Encoded bytes of each file and the images decoded as the graphs decode them.

    Returns (list of bytes, float32 (N, H, W, C)); a file that is missing or not an
    image is a DataError naming it.
    """
    import tensorflow as tf

    from export.saved_model import decode_images
    from keras_vae_attn.data import DataError

    encoded = []
    for path in paths:
        try:
            with open(path, "rb") as handle:
                data = handle.read()
            tf.io.decode_image(data, expand_animations=False)
        except OSError as error:
            raise DataError(f"cannot read image file {path!r}: {error.strerror or error}") \
                from None
        except (tf.errors.OpError, ValueError) as error:
            reason = getattr(error, "message", str(error)).strip().splitlines()[0]
            raise DataError(f"cannot decode image file {path!r}: {reason}") from None
        encoded.append(data)
    images = decode_images(tf.constant(encoded), *shape).numpy()
    return encoded, images


class SavedModelBackend:
    """A SavedModel served the way TF Serving serves it: through its signatures."""

    kind = "saved_model"

    def __init__(self, path):
        import tensorflow as tf

        self.path = path
        self.loaded = tf.saved_model.load(path)
        missing = [name for name in ("serving_default", "serve_bytes")
                   if name not in self.loaded.signatures]
        if missing:
            raise ExportError(f"SavedModel {path!r} lacks the signature(s) {missing}: it "
                              "was not written by export.saved_model")
        spec = self.loaded.signatures["serving_default"].structured_input_signature[1]
        self.input_shape = tuple(int(d) for d in spec["images"].shape[1:])
        info = os.path.join(path, "assets", "export.json")
        self.info = {}
        if os.path.isfile(info):
            with open(info, encoding="utf-8") as handle:
                self.info = json.load(handle)

    def run(self, images):
        """Outputs of ``serving_default`` for float images; numpy dict."""
        import tensorflow as tf

        images = check_images(images, self.input_shape)
        out = self.loaded.signatures["serving_default"](images=tf.constant(images))
        return {name: value.numpy() for name, value in out.items()}

    def run_encoded(self, encoded):
        """Outputs of ``serve_bytes`` for a list of encoded image files; numpy dict."""
        import tensorflow as tf

        out = self.loaded.signatures["serve_bytes"](image_bytes=tf.constant(encoded))
        return {name: value.numpy() for name, value in out.items()}


class OnnxBackend:
    """An ONNX model in an onnxruntime CPU session; inputs are checked before running."""

    kind = "onnx"

    def __init__(self, path):
        from export.onnx import session
        from keras_vae_attn.extras import needs_extra

        with needs_extra("export", "running an .onnx model"):
            import onnxruntime  # noqa: F401
        self.path = path
        try:
            self.session = session(path)
        except Exception as error:   # onnxruntime raises its own exception types
            raise ExportError(f"onnxruntime cannot load {path!r}: {error}") from None
        inputs = self.session.get_inputs()
        if len(inputs) != 1 or inputs[0].name != "images":
            raise ExportError(f"ONNX model {path!r} does not take one 'images' input: it "
                              "was not written by export.onnx")
        self.input_shape = tuple(int(d) for d in inputs[0].shape[1:])
        meta = self.session.get_modelmeta().custom_metadata_map
        self.info = {key: json.loads(value) if key in ("input_shape", "options",
                                                       "thresholds") else value
                     for key, value in meta.items()}
        self.names = [output.name for output in self.session.get_outputs()]

    def run(self, images):
        images = check_images(images, self.input_shape)
        return dict(zip(self.names, self.session.run(None, {"images": images})))

    def run_encoded(self, encoded):
        from export.saved_model import decode_images
        import tensorflow as tf

        return self.run(decode_images(tf.constant(encoded), *self.input_shape).numpy())


def open_model(path):
    """The backend for ``path``: an .onnx file, a SavedModel, or a TF Serving model
    folder (its highest numeric version)."""
    if not os.path.exists(path):
        raise ExportError(f"--model {path!r} does not exist")
    if os.path.isfile(path):
        if not path.endswith(".onnx"):
            raise ExportError(f"--model {path!r} is a file but not an .onnx model; give an "
                              ".onnx file or a SavedModel folder")
        return OnnxBackend(path)
    if not os.path.isfile(os.path.join(path, "saved_model.pb")):
        versions = sorted(int(name) for name in os.listdir(path) if name.isdigit()
                          and os.path.isfile(os.path.join(path, name, "saved_model.pb")))
        if not versions:
            raise ExportError(f"--model {path!r} holds no saved_model.pb and no numeric "
                              "version folder with one")
        path = os.path.join(path, str(versions[-1]))
    return SavedModelBackend(path)


def write_overlays(paths, images, outputs, out_dir, vmax=None):
    """One PNG per image: input | anomaly attention | reconstruction error; their names."""
    from keras_vae_attn import viz

    written = []
    scales = {name: vmax if name == "heatmap" and vmax else float(outputs[name].max())
              for name in OVERLAY_OUTPUTS}
    overlays = {name: viz.overlay(images, outputs[name], vmax=scales[name])
                for name in OVERLAY_OUTPUTS}
    for index, path in enumerate(paths):
        stem = os.path.splitext(os.path.basename(path))[0]
        name = f"{index:03d}_{stem}.png"
        viz.save_grid([[images[index], overlays["heatmap"][index],
                        overlays["recon_error"][index]]], os.path.join(out_dir, name),
                      column_titles=["input", "anomaly attention", "reconstruction error"])
        written.append(name)
    return written


def check_out(out_dir, force=False):
    """ExportError if ``out_dir`` exists and is not a folder, unless ``force`` (then it
    is replaced): found before the model is loaded, not after inference ran."""
    if os.path.lexists(out_dir) and not os.path.isdir(out_dir) and not force:
        raise ExportError(f"--out {out_dir!r} already exists and is not a folder; choose "
                          "another path or pass --force to replace it")


def make_out(out_dir):
    """Create the ``out_dir`` folder, replacing a file there (allowed by check_out)."""
    if os.path.lexists(out_dir) and not os.path.isdir(out_dir):
        os.remove(out_dir)
    os.makedirs(out_dir, exist_ok=True)


def infer(model_path, image_paths, out_dir, batch_size=16, force=False):
    """Run ``model_path`` on ``image_paths``; writes overlays and scores.json into
    ``out_dir`` and returns the scores dict."""
    from keras_vae_attn.runs import write_json

    check_out(out_dir, force)
    if not image_paths:
        raise InputError("images must hold at least one image; no image files given")
    backend = open_model(model_path)
    chunks = []
    for start in range(0, len(image_paths), batch_size):
        paths = image_paths[start:start + batch_size]
        encoded, images = read_files(paths, backend.input_shape)
        chunks.append((images, backend.run_encoded(encoded)))
    images = np.concatenate([c[0] for c in chunks])
    outputs = {key: np.concatenate([c[1][key] for c in chunks]) for key in chunks[0][1]}
    thresholds = backend.info.get("thresholds")
    vmax = 2.0 * thresholds["pixel"] if thresholds else None
    make_out(out_dir)
    names = write_overlays(image_paths, images, outputs, out_dir, vmax)
    rows = []
    for index, path in enumerate(image_paths):
        row = {"file": os.path.abspath(path), "overlay": names[index],
               "score": float(outputs["score"][index]),
               "heatmap_max": float(outputs["heatmap"][index].max()),
               "recon_error_mean": float(outputs["recon_error"][index].mean())}
        if "pred_label" in outputs:
            row["pred_label"] = bool(outputs["pred_label"][index])
        rows.append(row)
    scores = {"backend": backend.kind, "model": os.path.abspath(backend.path),
              "input_shape": list(backend.input_shape), "thresholds": thresholds,
              "images": rows}
    write_json(os.path.join(out_dir, "scores.json"), scores)
    return scores


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True,
                        help="SavedModel folder, TF Serving model folder, or .onnx file")
    parser.add_argument("images", nargs="+", help="image files (PNG, JPEG, BMP, GIF)")
    parser.add_argument("--out", required=True, help="folder for overlays and scores.json")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--force", action="store_true",
                        help="replace an --out that exists and is not a folder")
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch-size must be at least 1, got {args.batch_size}")
    try:
        check_out(args.out, args.force)     # before TensorFlow is even imported
    except ExportError as error:
        parser.exit(2, f"error: {error}\n")
    from keras_vae_attn.console import start_tensorflow

    start_tensorflow()                            # after the flags, without its banners
    from keras_vae_attn.data import DataError
    from keras_vae_attn.extras import MissingExtra

    try:
        scores = infer(args.model, args.images, args.out, args.batch_size, args.force)
    except (ExportError, DataError, InputError, MissingExtra) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    for row in scores["images"]:
        label = "" if "pred_label" not in row else \
            ("  anomalous" if row["pred_label"] else "  normal")
        print(f"{row['score']:.6g}{label}  {row['file']}")
    print(f"overlays and scores.json in {args.out}")
    return scores


if __name__ == "__main__":
    main()
