"""Export a trained run as an ONNX graph that emits the heatmaps itself.

    python -m export.onnx --run <run folder> --out model.onnx [--opset 17]

The graph is the serving_default signature of :mod:`export.saved_model` (the same
:func:`export.graph.anomaly_outputs`, gradients included; the latent dimensions batched
as "stack", see :func:`onnx_options`), frozen and converted by tf2onnx with the
gradient-op handlers of :mod:`export.onnx_handlers`.
Input ``images`` float32 (batch, H, W, C) in [0, 1], any batch size; outputs heatmap
and score (+ pred_score, pred_label, pred_mask with --thresholds), as serving_default.
The per-latent maps are left out: they take a second backward pass (D maps per image),
which the heatmap does not need; the SavedModel's ``explain_latents`` signature has them.
What the model was made from and how to feed it is in its ``metadata_props`` (every
value JSON: ``input_shape``, ``preprocessing``, ``options``, ``thresholds``,
``training_data``, ...; :func:`read_metadata`). Before the file is written, the converted
graph is run on a small batch and compared with the in-memory model (``--no-verify``
skips it).

Input checks: unlike the SavedModel signatures, the ONNX graph does not check its
input. tf2onnx drops TensorFlow's assert ops, and ONNX has no operator that fails with
a message, so ONNX Runtime runs NaN, 0..255, negative or empty batches without an error
(plausible-looking or NaN maps, or an opaque Reshape error for 0 images). The check is
in Python instead: :func:`export.graph.validated_images` (``validated_images(array,
input_shape)``, raises :class:`export.InputError` naming ``images`` and the allowed
range) before ``session.run``; :mod:`export.infer` calls it before every run.

    from export.graph import validated_images
    from export.onnx import session
    runner = session("model.onnx")
    images = validated_images(images, runner.get_inputs()[0].shape[1:])
    outputs = runner.run(None, {"images": images})
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
from typing import Any, NamedTuple

import numpy as np

from export import (
    ExportError,
    Progress,
    Run,
    check_options,
    load_inputs,
    no_stages,
    refuse_existing,
)
from export.cli import add_output_flags, export_parser, run_export
from export.graph import DECISION_OUTPUTS, SERVING_OUTPUTS, anomaly_outputs, input_shape
from export.metadata import model_metadata
from keras_vae_attn.runs import staged

MIN_OPSET = 13
DEFAULT_OPSET = 17
#: The self-check's rule (:func:`agreement`): a pixel agrees when it is within
#: PARITY_TOLERANCE of the map's range; the graph passes when, on every image, at most
#: PARITY_SHARE of the pixels disagree and none by more than PARITY_CEILING. A ReLU whose
#: input sits at round-off flips in a few pixels by a little (the 6.8e-3 of a resumed
#: run's noise batch); a wrong graph moves many pixels or some by a lot.
PARITY_TOLERANCE = 1e-4
PARITY_SHARE = 0.01
PARITY_CEILING = 1e-2
#: Images of each kind the self-check runs: noise, and the run's own training images.
CHECK_IMAGES = 2


def serving_function(model: Any, options: Any, thresholds: Any = None) -> tuple[Any, Any]:
    """The float-image endpoint as a ``tf.function`` (dynamic batch), and its input spec."""
    import tensorflow as tf

    height, width, channels = input_shape(model)
    spec = tf.TensorSpec((None, height, width, channels), tf.float32, name="images")

    def images_to_maps(images):
        return anomaly_outputs(model, images, options, thresholds)

    return tf.function(images_to_maps, input_signature=[spec], autograph=False), spec


def unsupported_nodes(model_proto: Any) -> dict[str, int]:
    """{op type: count} of nodes that are no ONNX operator (tf2onnx found no handler)."""
    import onnx

    found = {}
    for node in model_proto.graph.node:
        if not onnx.defs.has(node.op_type, node.domain or ""):
            found[node.op_type] = found.get(node.op_type, 0) + 1
    return found


def onnx_options(options: Any) -> Any:
    """``options`` with the attention batched as "stack" (D copies of the head, one plain
    backward pass): its gradient ops all have handlers, while the vectorized Jacobian
    (pfor) leaves ops tf2onnx cannot convert. The maps are the same."""
    return options.replace(method="stack")


def convert(
    model: Any, options: Any, thresholds: Any = None, opset: int = DEFAULT_OPSET
) -> Any:
    """An ``onnx.ModelProto`` computing ``anomaly_outputs`` for ``model``."""
    import tensorflow as tf

    from export import onnx_handlers

    options = onnx_options(options)
    function, spec = serving_function(model, options, thresholds)
    with tf.device("/cpu:0"):
        try:
            model_proto = function_to_onnx(function, spec, opset, catch_errors=False)
        except Exception:  # an optimizer pass failed: redo with tf2onnx's rollbacks on
            model_proto = function_to_onnx(function, spec, opset, catch_errors=True)
    missing = unsupported_nodes(model_proto)
    if missing:
        listed = ", ".join(f"{op} (x{count})" for op, count in sorted(missing.items()))
        raise ExportError(
            f"the attention graph at layer(s) {'+'.join(options.layers)!r} needs "
            f"TensorFlow ops that have no ONNX handler at opset {opset}: "
            f"{listed}. export.onnx_handlers covers "
            f"{', '.join(onnx_handlers.HANDLED_OPS)}"
        )
    return model_proto


def function_to_onnx(
    function: Any, spec: Any, opset: int = DEFAULT_OPSET, catch_errors: bool = True
) -> Any:
    """tf2onnx's ``from_function`` for a ``tf.function`` of one input ``spec``.

    Without ``catch_errors`` tf2onnx's optimizer passes skip the deep copy of the whole
    graph (weights included) each makes to roll back a failure: a third of the
    conversion time of a ResNet18.
    """
    import tf2onnx
    from tf2onnx import constants

    importlib.import_module("export.onnx_handlers")  # registers the gradient-op handlers

    key = constants.ENV_TF2ONNX_CATCH_ERRORS
    previous = os.environ.get(key)
    os.environ[key] = "TRUE" if catch_errors else "FALSE"
    try:
        return tf2onnx.convert.from_function(function, input_signature=[spec], opset=opset)[0]
    finally:
        if previous is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = previous


def session(model_bytes_or_path: bytes | str, threads: int = 0) -> Any:
    """An onnxruntime CPU ``InferenceSession`` (``threads`` intra-op threads, 0: all)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return onnxruntime.InferenceSession(
        model_bytes_or_path, options, providers=["CPUExecutionProvider"]
    )


def parity(
    model: Any, options: Any, thresholds: Any, model_proto: Any, images: np.ndarray
) -> float:
    """max |onnx - keras| / range of the Keras heatmap, for float ``images`` (B, H, W, C)."""
    expected = {
        k: np.asarray(v)
        for k, v in anomaly_outputs(model, images, options, thresholds).items()
    }
    runner = session(model_proto.SerializeToString())
    names = [output.name for output in runner.get_outputs()]
    got = dict(zip(names, runner.run(None, {"images": images})))
    heat = expected["heatmap"]
    scale = max(float(heat.max() - heat.min()), 1e-12)
    return float(np.abs(got["heatmap"] - heat).max()) / scale


class Agreement(NamedTuple):
    """How far a converted graph's heatmaps are from the model's (fractions of the
    model's heatmap range): ``share`` the largest share of one image's pixels that
    differ by more than PARITY_TOLERANCE, ``quantile`` the 99th percentile of the
    difference, ``largest`` its maximum (NaN counts as infinitely far)."""

    share: float
    quantile: float
    largest: float

    @property
    def ok(self) -> bool:
        return self.share <= PARITY_SHARE and self.largest <= PARITY_CEILING


def agreement(got: Any, want: Any) -> Agreement:
    """The :class:`Agreement` of heatmaps ``got`` (B, H, W) with ``want``."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    scale = max(float(want.max() - want.min()), 1e-12)
    diff = np.abs(got - want) / scale
    diff[~np.isfinite(diff)] = np.inf
    per_image = (diff > PARITY_TOLERANCE).reshape(len(diff), -1).mean(axis=1)
    high = float(np.quantile(diff, 0.99, method="higher"))  # no inf - inf with NaN maps
    return Agreement(float(per_image.max()), high, float(diff.max()))


def onnx_heatmaps(model_proto: Any, images: np.ndarray) -> np.ndarray:
    """The ``heatmap`` output of ``model_proto`` run by ONNX Runtime on ``images``."""
    runner = session(model_proto.SerializeToString())
    names = [output.name for output in runner.get_outputs()]
    return dict(zip(names, runner.run(None, {"images": images})))["heatmap"]


def run_images(run: Run, count: int = CHECK_IMAGES) -> np.ndarray | None:
    """Up to ``count`` of the run's own training images as float32 (N, H, W, C), from
    the data folder its config.json names (MVTec layout); None when it names none or
    they cannot be read (the check then runs on noise alone)."""
    from keras_vae_attn.data import DataError, mvtec

    config = run.config
    if not all(isinstance(config.get(k), str) for k in ("data_dir", "category")):
        return None
    height, width, channels = input_shape(run.model)
    try:
        files = mvtec.train_files(config["data_dir"], config["category"])[:count]
        images, _ = mvtec.decode_files(files, height, channels)
    except (DataError, OSError, ValueError):
        return None
    return mvtec.to_float(images) if images.shape[1:3] == (height, width) else None


def verify_graph(run: Run, thresholds: Any, model_proto: Any, seed: int = 0) -> float:
    """Run the converted graph beside the model on noise and on the run's own images;
    ExportError naming the batch unless every image passes :func:`agreement`'s rule.
    Returns the largest difference seen (a fraction of the heatmap's range)."""
    batches = {
        "noise": np.random.default_rng(seed).random(
            (CHECK_IMAGES, *input_shape(run.model)), dtype=np.float32
        )
    }
    own = run_images(run)
    if own is not None:
        batches["the run's training images"] = own
    largest = 0.0
    for label, images in batches.items():
        want = np.asarray(
            anomaly_outputs(run.model, images, run.options, thresholds)["heatmap"]
        )
        found = agreement(onnx_heatmaps(model_proto, images), want)
        if not found.ok:
            raise ExportError(
                f"the converted graph's heatmap disagrees with the model's on {label}: "
                f"{found.share:.1%} of an image's pixels differ by more than "
                f"{PARITY_TOLERANCE:.0e} of the map's range (allowed {PARITY_SHARE:.0%}), "
                f"the largest by {found.largest:.2e} (allowed {PARITY_CEILING:.0e}); "
                "nothing was written (--no-verify skips this check)"
            )
        largest = max(largest, found.largest)
    return largest


def add_metadata(model_proto: Any, run: Run, thresholds: Any) -> None:
    """Record :func:`export.metadata.model_metadata` in the model's metadata_props,
    each value as JSON (:func:`read_metadata` reads them back)."""
    for key, value in model_metadata(run, thresholds).items():
        entry = model_proto.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value)
    outputs = ", ".join([*SERVING_OUTPUTS, *(DECISION_OUTPUTS if thresholds else ())])
    model_proto.doc_string = (
        f"keras-vae-attn anomaly attention: images float32 (B, H, W, C) in [0, 1] -> {outputs}"
    )


def read_metadata(path: str) -> dict[str, Any]:
    """The metadata an .onnx file written by :func:`export` holds (a dict: input_shape,
    image_size, preprocessing, options, thresholds, training_data, ...); ExportError if
    the file cannot be read."""
    import onnx

    try:
        model_proto = onnx.load(path, load_external_data=False)
    except Exception as error:  # OSError, or protobuf's DecodeError for a non-ONNX file
        raise ExportError(f"cannot read the ONNX model {path!r}: {error}") from None
    return parse_metadata({p.key: p.value for p in model_proto.metadata_props})


def parse_metadata(props: dict[str, str]) -> dict[str, Any]:
    """{key: JSON string} of metadata_props -> {key: value}; a value that is no JSON
    (an export of an earlier version) stays a string."""
    parsed = {}
    for key, value in props.items():
        try:
            parsed[key] = json.loads(value)
        except ValueError:
            parsed[key] = value
    return parsed


STAGES = 4  # load, trace and convert, parity check, write


def export(
    run_dir: str,
    out: str,
    opset: int = DEFAULT_OPSET,
    force: bool = False,
    thresholds: str | None = None,
    verify: bool = True,
    seed: int = 0,
    progress: Progress = no_stages,
) -> float | None:
    """Convert run ``run_dir`` and write ``out`` atomically; returns the parity (or None).

    Refusals (``out`` exists without ``force``, no trained model, a graph op without a
    handler, a parity check that fails) leave ``out`` untouched. ``progress`` is called
    with each of the :data:`STAGES` stages (an export.Stages).
    """
    require_onnx_packages()
    check_opset(opset)
    refuse_existing(out, force)
    run, values = load_inputs(run_dir, thresholds, progress)
    try:
        check_options(run)
    except ValueError as error:
        raise ExportError(
            f"cannot build the attention graph of {run_dir!r}: {error}"
        ) from None
    progress(f"tracing the attention graph and converting it to ONNX (opset {opset})")
    model_proto = convert(run.model, run.options, values, opset)
    add_metadata(model_proto, run, values)
    difference = None
    progress(
        "checking the ONNX heatmaps against the model's"
        if verify
        else "parity check skipped (--no-verify)"
    )
    if verify:
        difference = verify_graph(run, values, model_proto, seed)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    progress(f"writing {out}")
    with staged(out, replace=True) as partial:  # <out>.partial-<pid>, dead ones cleared
        with open(partial, "wb") as handle:
            handle.write(model_proto.SerializeToString())
    return difference


def check_opset(opset: int) -> None:
    """ExportError unless tf2onnx converts to ``opset``: checked before the model is
    loaded, not after the conversion has run for a minute."""
    import tf2onnx
    from tf2onnx import constants

    highest = max(constants.OPSET_TO_IR_VERSION)
    if not MIN_OPSET <= opset <= highest:
        raise ExportError(
            f"--opset must be between {MIN_OPSET} and {highest} (the "
            f"highest tf2onnx {tf2onnx.__version__} converts to), got {opset}"
        )


def require_onnx_packages() -> None:
    """MissingExtra (one line naming the ``[export]`` extra) unless tf2onnx, onnx and
    onnxruntime import; checked before the model is loaded."""
    from keras_vae_attn.extras import needs_extra

    with needs_extra("export", "ONNX export"):
        for name in ("onnx", "onnxruntime", "tf2onnx"):
            importlib.import_module(name)


def build_parser() -> argparse.ArgumentParser:
    parser = export_parser("python -m export.onnx", __doc__, "the .onnx file to write")
    parser.add_argument(
        "--opset",
        type=int,
        default=DEFAULT_OPSET,
        help=f"ONNX opset (>= {MIN_OPSET}; >= 16 for a max-pool after the attention layer)",
    )
    add_output_flags(parser, "replace an existing file")
    parser.add_argument(
        "--no-verify",
        dest="verify",
        action="store_false",
        help="skip running the converted graph against the model",
    )
    return parser


def main(argv: list[str] | None = None) -> str:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.opset < MIN_OPSET:
        parser.error(
            f"--opset must be at least {MIN_OPSET} (dynamic reduction axes), got {args.opset}"
        )
    if not args.out.endswith(".onnx"):
        parser.error(f"--out {args.out!r} must name a .onnx file")
    from keras_vae_attn.console import start_tensorflow
    from keras_vae_attn.extras import MissingExtra

    def start_and_export(progress: Progress) -> float | None:
        start_tensorflow()  # tf2onnx imports it: banners filtered first
        require_onnx_packages()
        return export(
            args.run,
            args.out,
            args.opset,
            args.force,
            args.thresholds,
            args.verify,
            progress=progress,
        )

    difference = run_export(
        "export.onnx",
        STAGES,
        start_and_export,
        args.run,
        f"{args.out} was not written",
        (MissingExtra,),
    )
    checked = (
        ""
        if difference is None
        else f" (heatmap parity with the model: {difference:.1e} of its range)"
    )
    print(f"ONNX model written to {args.out}{checked}")
    return args.out


if __name__ == "__main__":
    main()
