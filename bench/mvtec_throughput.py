"""MVTec-sized throughput: training and evaluation images/s, and peak memory.

    python -m bench.mvtec_throughput                 # 256x256, batch 16 (the paper's size)
    python -m bench.mvtec_throughput --quick         # tiny sizes (used by the test suite)

Each measurement runs in a fresh Python process, so its peak resident memory
(ru_maxrss: TensorFlow itself, the model, optimizer state, activations, the input
pipeline) belongs to that phase alone. Training runs the trainer's own pipeline
(augmentation in tf.data, ``model.fit``); evaluation runs ``pipeline.batched``, the call the
trainer evaluates with (anomaly attention + reconstruction difference).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

from bench import cli_parser, parse_args

MEMORY_TARGET_GIB = 6.0


def _peak_gib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _model_and_images(size, batch):
    import keras
    import numpy as np

    from keras_vae_attn.models import build_vae

    keras.utils.set_random_seed(0)
    model = build_vae("resnet18", (size, size, 3), 32)
    model.compile(optimizer=keras.optimizers.Adam(1e-4))
    images = np.random.default_rng(0).integers(0, 256, (2 * batch, size, size, 3), np.uint8)
    return model, images


def measure_train(size, batch, steps):
    """Seconds per image of ``model.fit`` on augmented batches, after one warm-up step."""
    from keras_vae_attn.data.augment import augmenter, train_dataset

    model, images = _model_and_images(size, batch)
    dataset = train_dataset(images, batch, augmenter(seed=0), seed=0).repeat()
    model.fit(dataset, epochs=1, steps_per_epoch=1, verbose=0, shuffle=False)  # compile
    start = time.perf_counter()
    model.fit(dataset, epochs=1, steps_per_epoch=steps, verbose=0, shuffle=False)
    return steps * batch / (time.perf_counter() - start)


def measure_eval(size, batch, steps, layer):
    """Images/s of the trainer's evaluation call, after one warm-up batch."""
    from keras_vae_attn.explain import pipeline
    from keras_vae_attn.explain.options import ExplainOptions

    model, images = _model_and_images(size, batch)
    options = ExplainOptions(layers=(layer,))
    floats = images.astype("float32") / 255.0
    keys = ("heatmap", "recon_error")
    pipeline.batched(model, floats[:batch], batch, options, keys=keys)
    batches = [floats[(i % 2) * batch : (i % 2 + 1) * batch] for i in range(steps)]
    start = time.perf_counter()
    for chunk in batches:
        pipeline.batched(model, chunk, batch, options, keys=keys)
    return steps * batch / (time.perf_counter() - start)


def worker(args):
    """Run one phase in this process and print its result as one JSON line."""
    if args.phase == "train":
        rate = measure_train(args.size, args.batch_size, args.steps)
    else:
        rate = measure_eval(args.size, args.batch_size, args.steps, args.layer)
    print(json.dumps({"images_per_s": rate, "peak_gib": _peak_gib()}))


def run_phase(phase, args):
    command = [
        sys.executable,
        "-m",
        "bench.mvtec_throughput",
        "--phase",
        phase,
        "--size",
        str(args.size),
        "--batch-size",
        str(args.batch_size),
        "--steps",
        str(args.steps),
        "--layer",
        args.layer,
    ]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise SystemExit(f"{phase} measurement failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def build_parser():
    """Its flags, apart from main: the README test parses its documented commands."""
    parser = cli_parser("mvtec_throughput", __doc__)
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    parser.add_argument("--batch-size", type=int, default=16, help="images per step")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per phase")
    parser.add_argument("--layer", default="last", help="attention layer for evaluation")
    parser.add_argument("--quick", action="store_true", help="64x64, batch 4, 1 step")
    parser.add_argument("--phase", choices=("train", "eval"), help=argparse.SUPPRESS)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parse_args(parser, argv, size=64, batch_size=4, steps=1)
    for flag in ("size", "batch_size", "steps"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1")
    if args.phase:
        return worker(args)
    from bench.timing import print_table

    print(
        f"ResNet18 VAE, latent 32, {args.size}x{args.size}x3, batch {args.batch_size}, "
        f"{args.steps} timed steps, {os.cpu_count()} CPU cores\n"
    )
    rows = []
    for phase in ("train", "eval"):
        result = run_phase(phase, args)
        rows.append(
            {
                "phase": phase,
                "images/s": result["images_per_s"],
                "peak memory GiB": result["peak_gib"],
            }
        )
    print_table(rows, ["phase", "images/s", "peak memory GiB"])
    peak = rows[0]["peak memory GiB"]
    verdict = "meets" if peak <= MEMORY_TARGET_GIB else "misses"
    print(
        f"\ntraining peak memory {peak:.2f} GiB {verdict} the {MEMORY_TARGET_GIB:g} GiB target"
    )
    return rows


if __name__ == "__main__":
    main()
