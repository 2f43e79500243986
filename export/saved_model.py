"""Export a trained run as a TF Serving SavedModel whose signatures emit heatmaps.

    python -m export.saved_model --run <run folder> --out <serving dir> [--version N]

writes ``<out>/<model name>/<version>/`` (TF Serving's model base path layout). The
folder appears in one rename, so a server polling ``<out>/<model name>`` never loads a
half-written version; an existing version is refused unless ``--force``.

Signatures (all compute :func:`keras_vae_attn.scoring.explain_anomaly`, gradients
included, with the normal-data latent statistics baked in as model variables):

    serving_default  images float32 (B, H, W, C) in [0, 1] -> heatmap (B, H, W),
                     per_latent (B, D, h, w), recon_error (B, H, W), score (B,), mu (B, D),
                     logvar (B, D) [+ pred_mask, pred_label, heatmap_normalized with
                     --thresholds]
    explain          images -> per_latent (B, D, h, w), attention (B, H, W), mu (B, D):
                     the plain per-latent attention (Eq. 3-4) at --explain-layer
    serve_bytes      image_bytes string (B,) PNG/JPEG -> as serving_default; decoded and
                     resized in the graph exactly as the trainers load images

Every signature checks its input in the graph and fails with a message naming it:
the shape, float images in [0, 1] (NaN and inf fail too), and at least one image.
Staging folders left by a killed export (``.incoming-<version>-<pid>``, dead pid) are
removed by the next export into the same model folder.
"""
from __future__ import annotations

import argparse
import datetime
import os
import shutil
import sys

from export import (RUN_COMPLETE, ExportError, Stages, check_options, load_run,
                    load_thresholds, model_name_problem, no_stages, remove_stale_staging)

ANOMALY_OUTPUTS = ("heatmap", "per_latent", "recon_error", "score", "mu", "logvar")
ATTENTION_OUTPUTS = ("per_latent", "attention", "mu")
SIGNATURES = ("serving_default", "explain", "serve_bytes")
EXPORT_INFO = "export.json"


def input_shape(model):
    """(H, W, C) the model was built for."""
    return tuple(int(d) for d in model.encoder.inputs[0].shape[1:])


def anomaly_outputs(model, images, options, thresholds=None):
    """The serving outputs for float images (B, H, W, C): a dict of tensors.

    ``options``: the run's :class:`~keras_vae_attn.runs.ExplainOptions`;
    with ``thresholds`` the calibrated decisions of
    :func:`keras_vae_attn.calibration.decide` are added.
    """
    from keras_vae_attn import calibration, scoring

    out = scoring.explain_anomaly(model, images, options)
    result = {name: out[name] for name in ANOMALY_OUTPUTS}
    if thresholds is not None:
        result.update(calibration.decide(out["heatmap"], out["score"], thresholds))
    return result


def attention_outputs(model, images, layer, gradient_relu=False):
    """Per-latent maps M_i (B, D, h, w), their mean upsampled (B, H, W), and mu."""
    from keras_vae_attn import scoring

    out = scoring.explain_anomaly(model, images, layer=layer, gradient_relu=gradient_relu)
    return {name: out[name] for name in ATTENTION_OUTPUTS}


def decode_images(encoded, height, width, channels):
    """PNG/JPEG/BMP/GIF strings (B,) -> float32 (B, height, width, channels) in [0, 1].

    The trainers' loading, in graph: decode, bilinear antialiased resize, round to 8-bit,
    divide by 255. An image already of the model's size passes through unchanged.
    """
    import tensorflow as tf

    def one(data):
        image = tf.io.decode_image(data, channels=channels, expand_animations=False)
        image = tf.image.resize(image, (height, width), method="bilinear", antialias=True)
        return tf.clip_by_value(tf.round(image), 0.0, 255.0) / 255.0

    return tf.map_fn(one, encoded, fn_output_signature=tf.TensorSpec(
        (height, width, channels), tf.float32))


def assert_not_empty(tensor, name):
    """An assert op failing on a batch of 0 (the model's reshapes would fail on it with
    "input depth must be evenly divisible ..." instead)."""
    import tensorflow as tf

    return tf.debugging.assert_positive(tf.shape(tensor)[0],
                                        message=f"{name} must hold at least one image")


def check_images(images, height, width, channels):
    """Fail clearly on images of the wrong shape, an empty batch, or values outside
    [0, 1] (NaN and inf included: both comparisons are false for NaN).

    A signature's declared shape is not enforced when it is called (TF Serving and
    ``tf.saved_model.load`` check the dtype only), so the shape is checked at run time:
    "Shape of tensor images [...] is not compatible with expected shape [?,H,W,C]".
    """
    import tensorflow as tf

    images = tf.ensure_shape(images, (None, height, width, channels), name="images")
    message = ("images must be float32 in [0, 1] (divide 8-bit pixels by 255, or send "
               "encoded files to the serve_bytes signature)")
    with tf.control_dependencies([
            assert_not_empty(images, "images"),
            tf.debugging.assert_greater_equal(images, tf.constant(0.0), message=message),
            tf.debugging.assert_less_equal(images, tf.constant(1.0), message=message)]):
        return tf.identity(images)


def build_archive(model, options, thresholds=None, explain_layer=None):
    """A ``keras.export.ExportArchive`` with the three signatures (see module doc)."""
    import keras
    import tensorflow as tf

    height, width, channels = input_shape(model)
    images_spec = tf.TensorSpec((None, height, width, channels), tf.float32, name="images")
    bytes_spec = tf.TensorSpec((None,), tf.string, name="image_bytes")
    explain_layer = explain_layer or options.layer
    for layer in (*options.layers, explain_layer):    # an unknown layer fails before tracing
        model.explainer(layer, options.gradient_relu)

    def serve(images):
        images = check_images(images, height, width, channels)
        return anomaly_outputs(model, images, options, thresholds)

    def explain(images):
        images = check_images(images, height, width, channels)
        return attention_outputs(model, images, explain_layer, options.gradient_relu)

    def serve_bytes(image_bytes):
        image_bytes = tf.ensure_shape(image_bytes, (None,), name="image_bytes")
        with tf.control_dependencies([assert_not_empty(image_bytes, "image_bytes")]):
            image_bytes = tf.identity(image_bytes)
        images = decode_images(image_bytes, height, width, channels)
        return anomaly_outputs(model, images, options, thresholds)

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint("serving_default", serve, input_signature=[images_spec])
    archive.add_endpoint("explain", explain, input_signature=[images_spec])
    archive.add_endpoint("serve_bytes", serve_bytes, input_signature=[bytes_spec])
    return archive


def export_info(run, thresholds, explain_layer):
    """What the export was made from and with (written to ``assets/export.json``)."""
    from export import lineage

    height, width, channels = input_shape(run.model)
    return {"source_run": os.path.abspath(run.path), "run_complete": run.complete,
            "input_shape": [height, width, channels], "options": run.options.as_config(),
            "explain_layer": explain_layer or run.options.layer,
            "latent_dim": int(run.model.latent_dim),
            "thresholds": thresholds.as_dict() if thresholds is not None else None,
            "signatures": list(SIGNATURES),
            "exported_at": datetime.datetime.now().isoformat(timespec="seconds"),
            "versions": lineage.package_versions()}


def next_version(base):
    """1 + the largest numeric version folder under ``base`` (1 when there is none)."""
    if not os.path.isdir(base):
        return 1
    return max((int(name) for name in os.listdir(base) if name.isdigit()), default=0) + 1


STAGES = 3     # load, build, trace and write


def export(run_dir, out, model_name="vae", version=None, force=False, thresholds=None,
           explain_layer=None, progress=no_stages):
    """Write ``<out>/<model_name>/<version>/`` atomically; returns that path.

    The SavedModel is written under a dot-name TF Serving ignores, then renamed into
    place. ``thresholds`` is a path to a ``thresholds.json``. Refusals (no trained
    model, existing version without ``force``, bad thresholds) touch nothing.
    ``progress`` is called with each of the :data:`STAGES` stages (an export.Stages).
    """
    from keras_vae_attn.runs import write_json

    if model_name_problem(model_name):
        raise ExportError(f"model name {model_name_problem(model_name)}")
    base = os.path.join(out, model_name)
    if version is None:
        version = next_version(base)
    target = os.path.join(base, str(version))
    if os.path.lexists(target) and not force:
        raise ExportError(f"version {version} of model {model_name!r} already exists at "
                          f"{target!r}; pass another --version, or --force to replace it")
    values = load_thresholds(thresholds) if thresholds else None
    progress(f"loading the model of {run_dir}")
    run = load_run(run_dir)
    try:
        check_options(run)
        progress("building the signatures " + ", ".join(SIGNATURES))
        archive = build_archive(run.model, run.options, values, explain_layer)
    except ValueError as error:       # an unknown --layer / --explain-layer
        raise ExportError(f"cannot build the serving graph of {run_dir!r}: {error}") from None
    os.makedirs(base, exist_ok=True)
    remove_stale_staging(base)
    staging = os.path.join(base, f".incoming-{version}-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        progress(f"tracing the signatures and writing {target}")
        archive.write_out(staging, verbose=False)
        os.makedirs(os.path.join(staging, "assets"), exist_ok=True)
        write_json(os.path.join(staging, "assets", EXPORT_INFO),
                   export_info(run, values, explain_layer))
        replace_dir(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def replace_dir(source, target):
    """Rename ``source`` to ``target``; an existing ``target`` is swapped out first, so
    at every moment ``target`` is either the old folder, absent, or the new one."""
    if not os.path.lexists(target):
        os.rename(source, target)
        return
    old = f"{target}.replaced-{os.getpid()}"
    os.rename(target, old)
    os.rename(source, target)
    shutil.rmtree(old, ignore_errors=True)


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="trained run folder (holds model/)")
    parser.add_argument("--out", required=True, help="TF Serving base folder")
    parser.add_argument("--model-name", default="vae",
                        help="model name: the version goes to <out>/<model name>/<version>")
    parser.add_argument("--version", type=int, default=None,
                        help="version number (default: one more than the latest there)")
    parser.add_argument("--force", action="store_true", help="replace an existing version")
    parser.add_argument("--thresholds", default=None,
                        help="thresholds.json (pixel, image): adds pred_mask, pred_label "
                             "and heatmap_normalized outputs")
    parser.add_argument("--explain-layer", default=None,
                        help="encoder layer of the explain signature (default: the run's)")
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version is not None and args.version < 1:
        parser.error(f"--version must be a positive integer, got {args.version}")
    name = args.model_name
    if model_name_problem(name):
        parser.error(f"--model-name {model_name_problem(name)}")
    from keras_vae_attn.console import start_tensorflow

    start_tensorflow()
    try:
        target = export(args.run, args.out, name, args.version, args.force, args.thresholds,
                        args.explain_layer, Stages("export.saved_model", STAGES))
    except ExportError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    warn_incomplete(args.run)
    print(f"SavedModel written to {target}")
    return target


def warn_incomplete(run_dir):
    """Say so on stderr when the exported run never wrote ``metrics.json``."""
    if not os.path.isfile(os.path.join(run_dir, RUN_COMPLETE)):
        print(f"warning: {os.path.join(run_dir, RUN_COMPLETE)} is missing, so the run did not "
              "finish; the model it saved was exported", file=sys.stderr)


if __name__ == "__main__":
    main()
