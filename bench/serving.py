"""Serving throughput: heatmaps/s of the in-memory Keras model, the exported SavedModel
and the ONNX model in onnxruntime, side by side in one process.

    python -m bench.serving                  # ResNet18 at 256x256, batches 1 and 16
    python -m bench.serving --threads 1      # each runtime on one thread
    python -m bench.serving --quick          # 64x64, batches 1 and 2, seconds

The model (ResNet18 encoder, latent 32, the MVTec setting) is exported with the real
exporters into a temporary run folder, so the timed graphs are the shipped ones: all
three compute the outputs of the serving_default signature (heatmap and score; the
per-latent maps of explain_latents are not timed). "keras" is
``pipeline.explain_anomaly`` for the same outputs in a ``tf.function``, as the trainers
and ``pipeline.batched`` run it. The table also gives each backend's heatmap difference
from the Keras model, as a fraction of the map's range.
"""

from __future__ import annotations

import os
import tempfile
import time

from bench import add_timing_flags, cli_parser, parse_args
from keras_vae_attn.console import start_tensorflow

start_tensorflow()  # before keras and TensorFlow load: without their C++ banners

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from bench.timing import print_table  # noqa: E402


def make_run(folder, size, latent, options):
    """A run folder holding an (untrained) MVTec-style model and the ExplainOptions its
    exports serve: speed does not depend on the weights."""
    from keras_vae_attn.models import build_vae, save_vae
    from keras_vae_attn.runs import RunFolder

    model = build_vae("resnet18", (size, size, 3), latent, recon_loss="mse")
    run = RunFolder(folder)
    save_vae(model, run.model_dir)
    run.write_config({"image_size": size, "channels": 3, "explain": options.as_config()})
    return model


def interleaved_seconds(runners, images, repeats, budget_s):
    """{name: list of seconds}: one warm-up call each, then rounds of one call per
    runner until ``repeats`` rounds or ``budget_s`` seconds have passed."""
    for run in runners.values():
        run(images)
    times = {name: [] for name in runners}
    start = time.perf_counter()
    for _ in range(repeats):
        for name, run in runners.items():
            begin = time.perf_counter()
            run(images)
            times[name].append(time.perf_counter() - begin)
        if time.perf_counter() - start > budget_s:
            break
    return times


def backends(folder, model, options, threads=0):
    """{name: callable(images) -> heatmap numpy} for the three ways of serving."""
    from export import onnx as onnx_export
    from export import saved_model
    from export.graph import SERVING_OUTPUTS
    from keras_vae_attn.explain import pipeline

    started = time.perf_counter()
    version = saved_model.export(folder, os.path.join(folder, "serving"), "bench")
    saved_s = time.perf_counter() - started
    started = time.perf_counter()
    onnx_path = os.path.join(folder, "model.onnx")
    onnx_export.export(folder, onnx_path, verify=False)
    onnx_s = time.perf_counter() - started

    keras_fn = tf.function(
        lambda x: pipeline.explain_anomaly(model, x, options, keys=SERVING_OUTPUTS),
        reduce_retracing=True,
    )
    signature = tf.saved_model.load(version).signatures["serving_default"]
    session = onnx_export.session(onnx_path, threads)
    names = [output.name for output in session.get_outputs()]
    runners = {
        "keras (in memory)": lambda x: keras_fn(tf.constant(x))["heatmap"].numpy(),
        "SavedModel": lambda x: signature(images=tf.constant(x))["heatmap"].numpy(),
        "ONNX Runtime": lambda x: session.run(None, {"images": x})[names.index("heatmap")],
    }
    return runners, {"SavedModel": saved_s, "ONNX Runtime": onnx_s}


def build_parser():
    """Its flags, apart from main: the README test parses its documented commands."""
    parser = cli_parser("serving", __doc__)
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    parser.add_argument("--batches", default="1,16", help="comma-separated batch sizes")
    parser.add_argument("--latent", type=int, default=32, help="latent size of the served VAE")
    parser.add_argument("--layer", default="last", help="encoder layer of the attention")
    add_timing_flags(
        parser, 7, "timed rounds per batch", 120.0, "seconds of timing per batch size at most"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="intra-op threads of TensorFlow and onnxruntime (0: their defaults, all cores)",
    )
    parser.add_argument("--quick", action="store_true", help="64x64, batches 1 and 2")
    return parser


def main(argv=None):
    parser = build_parser()
    args = parse_args(parser, argv, size=64, batches="1,2", repeats=2)
    try:
        batches = [int(b) for b in args.batches.split(",") if b.strip()]
    except ValueError:
        parser.error(f"--batches must be comma-separated integers, got {args.batches!r}")
    if not batches or min(batches) < 1:
        parser.error(f"--batches needs positive batch sizes, got {args.batches!r}")

    if args.threads:
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    from keras_vae_attn.explain.options import ExplainOptions

    options = ExplainOptions(layers=(args.layer,))
    rng = np.random.default_rng(0)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        model = make_run(folder, args.size, args.latent, options)
        runners, export_s = backends(folder, model, options, args.threads)
        for batch in batches:
            images = rng.random((batch, args.size, args.size, 3), dtype=np.float32)
            reference = runners["keras (in memory)"](images)
            scale = max(float(reference.max() - reference.min()), 1e-12)
            times = interleaved_seconds(runners, images, args.repeats, args.budget)
            for name, run in runners.items():
                median, best = float(np.median(times[name])), min(times[name])
                difference = float(np.abs(run(images) - reference).max()) / scale
                rows.append(
                    {
                        "backend": name,
                        "batch": batch,
                        "ms/batch": 1e3 * median,
                        "heatmaps/s": batch / median,
                        "best heatmaps/s": batch / best,
                        "rounds": len(times[name]),
                        "max diff / range": difference,
                        "export s": export_s.get(name),
                    }
                )
    threads = args.threads or "default"
    print(
        f"ResNet18 VAE, {args.size}x{args.size}x3, latent {args.latent}, layer "
        f"{args.layer}, {os.cpu_count()} CPU cores visible, intra-op threads {threads}"
    )
    print_table(
        rows,
        [
            "backend",
            "batch",
            "ms/batch",
            "heatmaps/s",
            "best heatmaps/s",
            "rounds",
            "max diff / range",
            "export s",
        ],
    )
    for batch in batches:
        rate = {r["backend"]: r["heatmaps/s"] for r in rows if r["batch"] == batch}
        print(
            f"batch {batch}: ONNX Runtime / SavedModel = "
            f"{rate['ONNX Runtime'] / rate['SavedModel']:.2f}x, "
            f"SavedModel / keras = {rate['SavedModel'] / rate['keras (in memory)']:.2f}x"
        )
    return rows


if __name__ == "__main__":
    main()
