"""Export a trained run as a TF Serving SavedModel whose signatures emit heatmaps.

    python -m export.saved_model --run <run folder> --out <serving dir> [--version N]

writes ``<out>/<model name>/<version>/`` (TF Serving's model base path layout). The
folder appears in one rename, so a server polling ``<out>/<model name>`` never loads a
half-written version; an existing version is refused unless ``--force``.

Signatures (all compute :func:`keras_vae_attn.explain.pipeline.explain_anomaly`, gradients
included, with the normal-data latent statistics baked in as model variables):

    serving_default  images float32 (B, H, W, C) in [0, 1] -> heatmap (B, H, W),
                     score (B,) [+ with --thresholds: pred_score (B,) on [0, 1] with the
                     image threshold at 0.5, pred_label (B,), pred_mask (B, H, W)]
    serve_bytes      image_bytes string (B,) PNG/JPEG -> as serving_default; decoded and
                     resized in the graph exactly as the trainers load images
    explain_latents  images -> every output: heatmap, per_latent (B, D, h, w),
                     recon_error (B, H, W), score, mu (B, D), logvar (B, D) [+ the
                     decisions and heatmap_normalized with --thresholds]
    explain          images -> per_latent (B, D, h, w), attention (B, H, W), mu (B, D):
                     the plain per-latent attention (Eq. 3-4) at --explain-layer

The two serving signatures are lean (a REST response of 2 images at 64 px: 0.24 MB
instead of 1.4 MB with per_latent), and they skip the per-latent and reconstruction
passes. ``assets/export.json`` holds the model's metadata (:func:`read_metadata`), and
``assets.extra/tf_serving_warmup_requests`` one request per signature, which TF Serving
replays when it loads the version.

Every signature checks its input in the graph and fails with a message naming it:
the shape, float images in [0, 1] (NaN and inf fail too), and at least one image.
The version is written as ``<version>.partial-<pid>`` (not a number: TF Serving ignores
it) and renamed into place (:func:`keras_vae_attn.runs.staged`); what a killed export
left there (dead pid) is removed by the next export into the same model folder.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
from typing import Any

import numpy as np

from export import (
    ExportError,
    Progress,
    Run,
    check_options,
    load_inputs,
    model_name_problem,
    no_stages,
)
from export.cli import add_output_flags, export_parser, run_export
from export.graph import (
    anomaly_outputs,
    assert_valid_bytes,
    assert_valid_images,
    attention_outputs,
    decode_images,
    input_shape,
    signature_outputs,
)
from export.metadata import model_metadata
from export.versions import claim_version, release_version
from keras_vae_attn.runs import staged

SIGNATURES = ("serving_default", "explain", "serve_bytes", "explain_latents")
EXPORT_INFO = "export.json"
WARMUP = os.path.join("assets.extra", "tf_serving_warmup_requests")


def build_archive(
    model: Any, options: Any, thresholds: Any = None, explain_layer: str | None = None
) -> Any:
    """A ``keras.export.ExportArchive`` with the signatures of :data:`SIGNATURES` (see
    the module's docstring)."""
    import keras
    import tensorflow as tf

    height, width, channels = input_shape(model)
    images_spec = tf.TensorSpec((None, height, width, channels), tf.float32, name="images")
    bytes_spec = tf.TensorSpec((None,), tf.string, name="image_bytes")
    explain_layer = explain_layer or options.layer
    for layer in (*options.layers, explain_layer):  # an unknown layer fails before tracing
        model.explainer(layer, options.gradient_relu)

    def serve(images):
        images = assert_valid_images(images, height, width, channels)
        return anomaly_outputs(model, images, options, thresholds)

    def explain_latents(images):
        images = assert_valid_images(images, height, width, channels)
        return anomaly_outputs(model, images, options, thresholds, full=True)

    def explain(images):
        images = assert_valid_images(images, height, width, channels)
        return attention_outputs(model, images, explain_layer, options.gradient_relu)

    def serve_bytes(image_bytes):
        images = decode_images(assert_valid_bytes(image_bytes), height, width, channels)
        return anomaly_outputs(model, images, options, thresholds)

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint("serving_default", serve, input_signature=[images_spec])
    archive.add_endpoint("explain", explain, input_signature=[images_spec])
    archive.add_endpoint("serve_bytes", serve_bytes, input_signature=[bytes_spec])
    archive.add_endpoint("explain_latents", explain_latents, input_signature=[images_spec])
    return archive


def export_info(run: Run, thresholds: Any, explain_layer: str | None) -> dict[str, Any]:
    """What the export was made from and with (written to ``assets/export.json``)."""
    return {
        **model_metadata(run, thresholds),
        "explain_layer": explain_layer or run.options.layer,
        "signatures": signature_outputs(thresholds is not None),
        "warmup_requests": WARMUP,
        "exported_at": datetime.datetime.now().isoformat(timespec="seconds"),
    }


def read_metadata(path: str) -> dict[str, Any]:
    """The metadata of a SavedModel written by :func:`export` (``assets/export.json``):
    input_shape, image_size, preprocessing, options, thresholds, training_data,
    signatures, ... ``path``: a version folder, or a TF Serving model folder (its
    newest version). ExportError when there is none."""
    versions = (
        sorted((int(name) for name in os.listdir(path) if name.isdigit()), reverse=True)
        if os.path.isdir(path)
        else []
    )
    if not os.path.isfile(os.path.join(path, "saved_model.pb")) and versions:
        path = os.path.join(path, str(versions[0]))
    info = os.path.join(path, "assets", EXPORT_INFO)
    try:
        with open(info, encoding="utf-8") as handle:
            return json.load(handle)
    except OSError as error:
        raise ExportError(
            f"cannot read the metadata of {path!r}: {info} "
            f"({error.strerror or error}); was it written by "
            "export.saved_model?"
        ) from None


def warmup_image(shape: tuple[int, int, int]) -> np.ndarray:
    """A deterministic image (1, H, W, C) of 8-bit values / 255 (a smooth gradient):
    what the warm-up requests send, valid for every signature."""
    height, width, channels = shape
    rows = np.linspace(0.2, 0.8, height, dtype=np.float32)[:, None, None]
    cols = np.linspace(0.0, 0.2, width, dtype=np.float32)[None, :, None]
    image = np.broadcast_to(rows + cols, (height, width, channels))
    return (np.round(image * 255) / 255).astype(np.float32)[None]


def warmup_requests(shape: tuple[int, int, int], model_name: str) -> list[bytes]:
    """Serialized ``tensorflow.serving.PredictionLog`` records, one PredictRequest of one
    image per signature (serve_bytes gets the image as a PNG), as TF Serving replays
    them from ``assets.extra/tf_serving_warmup_requests`` when it loads a version: the
    first client request then finds every signature's graph initialized."""
    import tensorflow as tf

    image = warmup_image(shape)
    png = tf.io.encode_png(tf.constant(np.round(image[0] * 255).astype(np.uint8))).numpy()
    records = []
    for signature in SIGNATURES:
        if signature == "serve_bytes":
            name, value = "image_bytes", tf.make_tensor_proto([png], dtype=tf.string)
        else:
            name, value = "images", tf.make_tensor_proto(image)
        records.append(prediction_log(model_name, signature, name, value))
    return records


def prediction_log(
    model_name: str, signature: str, input_name: str, tensor_proto: Any
) -> bytes:
    """A PredictionLog holding one PredictRequest, encoded field by field.

    Field numbers of tensorflow_serving/apis: PredictionLog.predict_log = 6,
    PredictLog.request = 1, PredictRequest.model_spec = 1 and .inputs = 2 (a map: entries
    of key = 1, value = 2), ModelSpec.name = 1 and .signature_name = 3. Encoded here so
    that exporting needs no tensorflow-serving-api package (the tests parse the records
    with it).
    """
    spec = _field(1, model_name.encode()) + _field(3, signature.encode())
    entry = _field(1, input_name.encode()) + _field(2, tensor_proto.SerializeToString())
    request = _field(1, spec) + _field(2, entry)
    return _field(6, _field(1, request))


def _field(number: int, payload: bytes) -> bytes:
    """One length-delimited protobuf field: tag (wire type 2), length, bytes."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _varint(value: int) -> bytes:
    """A non-negative int as a protobuf varint (7 bits a byte, low bits first)."""
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def write_assets(
    folder: str, run: Run, thresholds: Any, explain_layer: str | None, model_name: str
) -> None:
    """``assets/export.json`` (the metadata) and the TF Serving warm-up requests into the
    SavedModel ``folder``."""
    import tensorflow as tf

    from keras_vae_attn.runs import write_json

    os.makedirs(os.path.join(folder, "assets"), exist_ok=True)
    write_json(
        os.path.join(folder, "assets", EXPORT_INFO),
        export_info(run, thresholds, explain_layer),
    )
    os.makedirs(os.path.join(folder, os.path.dirname(WARMUP)), exist_ok=True)
    with tf.io.TFRecordWriter(os.path.join(folder, WARMUP)) as writer:
        for record in warmup_requests(input_shape(run.model), model_name):
            writer.write(record)


def next_version(base: str) -> int:
    """1 + the largest numeric version folder under ``base`` (1 when there is none)."""
    if not os.path.isdir(base):
        return 1
    return max((int(name) for name in os.listdir(base) if name.isdigit()), default=0) + 1


STAGES = 3  # load, build, trace and write


def export(
    run_dir: str,
    out: str,
    model_name: str = "vae",
    version: int | None = None,
    force: bool = False,
    thresholds: str | None = None,
    explain_layer: str | None = None,
    progress: Progress = no_stages,
) -> str:
    """Write ``<out>/<model_name>/<version>/`` atomically; returns that path.

    The SavedModel is written under a dot-name TF Serving ignores, then renamed into
    place. ``thresholds`` is a path to a ``thresholds.json``. Refusals (no trained
    model, existing version without ``force``, bad thresholds) touch nothing.
    ``progress`` is called with each of the :data:`STAGES` stages (an export.Stages).
    """
    if model_name_problem(model_name):
        raise ExportError(f"model name {model_name_problem(model_name)}")
    base = os.path.join(out, model_name)
    if version is not None:
        refuse_version(base, version, model_name, force)
    run, values = load_inputs(run_dir, thresholds, progress)
    try:
        check_options(run)
        progress("building the signatures " + ", ".join(SIGNATURES))
        archive = build_archive(run.model, run.options, values, explain_layer)
    except ValueError as error:  # an unknown --layer / --explain-layer
        raise ExportError(f"cannot build the serving graph of {run_dir!r}: {error}") from None
    # the number is claimed only now, so a refusal above leaves nothing behind, and two
    # exports started together never write the same version (export.versions)
    version, claim = claim_version(base, version)
    target = os.path.join(base, str(version))
    try:
        refuse_version(base, version, model_name, force)
        progress(f"tracing the signatures and writing {target}")
        with staged(target, replace=force) as staging:  # <version>.partial-<pid>
            archive.write_out(staging, verbose=False)
            write_assets(staging, run, values, explain_layer, model_name)
    finally:
        release_version(claim)
    return target


def refuse_version(base: str, version: int, model_name: str, force: bool) -> None:
    """ExportError if version ``version`` exists under ``base`` and ``force`` is unset."""
    target = os.path.join(base, str(version))
    if os.path.lexists(target) and not force:
        raise ExportError(
            f"version {version} of model {model_name!r} already exists at "
            f"{target!r}; pass another --version, or --force to replace it"
        )


def build_parser() -> argparse.ArgumentParser:
    parser = export_parser("python -m export.saved_model", __doc__, "TF Serving base folder")
    parser.add_argument(
        "--model-name",
        default="vae",
        help="model name: the version goes to <out>/<model name>/<version>",
    )
    parser.add_argument(
        "--version",
        type=int,
        default=None,
        help="version number (default: one more than the latest there)",
    )
    add_output_flags(parser, "replace an existing version")
    parser.add_argument(
        "--explain-layer",
        default=None,
        help="encoder layer of the explain signature (default: the run's)",
    )
    return parser


def main(argv: list[str] | None = None) -> str:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version is not None and args.version < 1:
        parser.error(f"--version must be a positive integer, got {args.version}")
    name = args.model_name
    if model_name_problem(name):
        parser.error(f"--model-name {model_name_problem(name)}")
    from keras_vae_attn.console import start_tensorflow

    start_tensorflow()
    target = run_export(
        "export.saved_model",
        STAGES,
        lambda progress: export(
            args.run,
            args.out,
            name,
            args.version,
            args.force,
            args.thresholds,
            args.explain_layer,
            progress,
        ),
        args.run,
        "no version was written",
    )
    print(f"SavedModel written to {target}")
    return target


if __name__ == "__main__":
    main()
