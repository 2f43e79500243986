"""Training speed against what this machine can do: each model's train step in GFLOP/s,
beside the rate of plain conv2d and matmul ops of the model's own sizes.

    python -m bench.speed_limit                 # the four models, float32/bf16 x XLA off/on
    python -m bench.speed_limit --quick         # tiny sizes, XLA off, the small VAE and
                                                # AD-FactorVAE only (used by the tests)
    python -m bench.speed_limit --models factorvae --jit off

Models: the ResNet18 VAE of trainers.mvtec (256 px, batch 16), the small VAE of
trainers.ucsd (100 px, batch 64), and the FactorVAE / AD-FactorVAE of trainers.dsprites
(64 px, batch 64), built and compiled as the trainers do under ``--precision`` and
``--jit-compile``.

The limit. Every distinct conv (transposed too) and dense layer of the step is run as a
plain ``tf.nn.conv2d`` / ``conv2d_transpose`` / ``tf.matmul`` of its shapes at the batch,
in float32 and in bfloat16, the two timed in turns. The model's limit is its step's FLOPs
divided by the time those plain ops take, each weighted by its passes in the step (below):
the rate the step would reach if every layer ran as fast as its own op alone, forward.

The FLOP count of one train step, from the layer shapes (``layer_flops``): a conv or dense
layer's forward pass is 2 x its multiply-adds; BatchNorm, activations, losses and the
optimizer update are left out (a few percent). Backward is counted as 2 x forward
(gradients of the inputs and of the weights), so a layer trained by a pass costs 3 x its
forward. Per model:
  - VAE: 3 x (encoder + decoder).
  - FactorVAE: the VAE's 3 x (encoder + decoder), plus the discriminator: in the VAE
    update once forward with the gradient to z but not to its weights (2 x), in its own
    update on z and on the permuted z, forward and weight gradients (2 x 2 x): 6 x in all.
  - AD-FactorVAE: as FactorVAE, but the encoder after the L_AD layer (the head: flatten
    and dense) runs on D stacked copies of the feature map (one per latent) with an
    inner gradient to the features (~1 x forward); the outer backward then goes through
    both (~2 x): 6 x the head at D x the batch, in place of 3 x the head at the batch.
"""

from __future__ import annotations

import os

from bench import add_timing_flags, cli_parser, parse_args
from keras_vae_attn.console import start_tensorflow

start_tensorflow()  # before keras and TensorFlow load: without their C++ banners

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from bench.factor_step import images as dsprites_images  # noqa: E402
from bench.timing import interleaved_medians, print_table  # noqa: E402
from trainers import devices  # noqa: E402

MODELS = ("resnet18", "ucsd", "factorvae", "adfactorvae")
PRECISION_DTYPES = {"float32": tf.float32, "mixed_bfloat16": tf.bfloat16}


def _leaf_layers(model):
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from _leaf_layers(layer)
        else:
            yield layer


def layer_flops(layer):
    """Forward FLOPs per example (2 x multiply-adds) of a conv or dense layer, else 0."""
    if isinstance(layer, keras.layers.Conv2DTranspose):
        _, height, width, channels = layer.input.shape
        return (
            2
            * height
            * width
            * channels
            * int(np.prod(layer.kernel.shape[:2]))
            * layer.filters
        )
    if isinstance(layer, keras.layers.Conv2D):
        _, height, width, filters = layer.output.shape
        return 2 * height * width * filters * int(np.prod(layer.kernel.shape[:3]))
    if isinstance(layer, keras.layers.Dense):
        positions = int(np.prod(layer.input.shape[1:-1]))
        return 2 * positions * layer.input.shape[-1] * layer.units
    return 0


def forward_flops(model):
    """{"conv": FLOPs, "dense": FLOPs} per example of one forward pass of ``model``."""
    counts = {"conv": 0, "dense": 0}
    for layer in _leaf_layers(model):
        kind = "dense" if isinstance(layer, keras.layers.Dense) else "conv"
        counts[kind] += layer_flops(layer)
    return counts


def step_layers(model):
    """[(layer, passes per example)] of one train step (see the module docstring)."""
    parts = []
    if getattr(model, "lambda_ad", 0):
        split = model.explainer(model.ad_layer)
        parts += [(split.front, 3), (split.head, 6 * model.latent_dim)]
    else:
        parts.append((model.encoder, 3))
    parts.append((model.decoder, 3))
    if getattr(model, "discriminator", None) is not None:
        parts.append((model.discriminator, 6))
    return [
        (layer, passes)
        for part, passes in parts
        for layer in _leaf_layers(part)
        if layer_flops(layer)
    ]


def step_flops(model, batch):
    """{"conv", "dense"} FLOPs of one train step at ``batch`` (see the module docstring)."""
    total = {"conv": 0, "dense": 0}
    for layer, passes in step_layers(model):
        kind = "dense" if isinstance(layer, keras.layers.Dense) else "conv"
        total[kind] += passes * batch * layer_flops(layer)
    return total


def plain_op(layer, batch, dtype):
    """``layer``'s own op (conv2d, conv2d_transpose or matmul) on random inputs of its
    shapes at ``batch``, as a function that blocks until the result is ready."""
    rng = np.random.default_rng(0)
    kernel = tf.constant(rng.random(tuple(layer.kernel.shape)), dtype)
    if isinstance(layer, keras.layers.Dense):
        rows = batch * int(np.prod(layer.input.shape[1:-1]))
        x = tf.constant(rng.random((rows, layer.input.shape[-1])), dtype)
        op = tf.function(lambda: tf.matmul(x, kernel))
    elif isinstance(layer, keras.layers.Conv2DTranspose):
        x = tf.constant(rng.random((batch, *layer.input.shape[1:])), dtype)
        shape = (batch, *layer.output.shape[1:])
        op = tf.function(
            lambda: tf.nn.conv2d_transpose(
                x, kernel, shape, layer.strides, layer.padding.upper()
            )
        )
    else:
        x = tf.constant(rng.random((batch, *layer.input.shape[1:])), dtype)
        op = tf.function(lambda: tf.nn.conv2d(x, kernel, layer.strides, layer.padding.upper()))
    return lambda: op().numpy()


def signature(layer):
    return (
        type(layer).__name__,
        tuple(layer.input.shape),
        tuple(layer.kernel.shape),
        tuple(getattr(layer, "strides", ())),
        getattr(layer, "padding", ""),
    )


def limit_rows(model, batch, label, precisions, repeats, budget):
    """Every distinct conv and dense layer of the step run as a plain op, each precision
    in turn: rows of the FLOP-weighted conv and matmul rates, and the model's limit
    {precision: GFLOP/s} = step FLOPs / the time its layers take as plain ops."""
    layers, seconds = step_layers(model), {}
    for layer in {signature(layer): layer for layer, _ in layers}.values():
        ops = [plain_op(layer, batch, PRECISION_DTYPES[p]) for p in precisions]
        seconds[signature(layer)] = dict(
            zip(precisions, interleaved_medians(ops, repeats, budget / 10))
        )
    rows, limits = [], {}
    for kind, matches in (
        ("conv2d", lambda op: not isinstance(op, keras.layers.Dense)),
        ("matmul", lambda op: isinstance(op, keras.layers.Dense)),
    ):
        chosen = [(layer, passes) for layer, passes in layers if matches(layer)]
        if not chosen:
            continue
        row = {
            "model": label,
            "op": f"{kind}, {len({signature(op) for op, _ in chosen})} shapes",
        }
        for precision in precisions:
            flops = sum(passes * layer_flops(layer) * batch for layer, passes in chosen)
            spent = sum(
                passes * seconds[signature(layer)][precision] for layer, passes in chosen
            )
            row[f"{precision} GFLOP/s"] = flops / spent / 1e9
        rows.append(row)
    for precision in precisions:
        flops = sum(passes * layer_flops(layer) * batch for layer, passes in layers)
        spent = sum(passes * seconds[signature(layer)][precision] for layer, passes in layers)
        limits[precision] = flops / spent / 1e9
    return rows, limits


def cases(quick):
    """{name: (label, batch, images, build() -> the model, uncompiled, in the current
    dtype policy)}: the trainers' nets at their sizes, or tiny ones for ``quick``."""
    from keras_vae_attn.models import build_vae
    from keras_vae_attn.models.factor_vae import build_factor_vae

    rng = np.random.default_rng(0)
    if quick:
        vae = {"resnet18": ((32, 32, 3), 2), "ucsd": ((28, 28, 1), 4)}
        factor_shape, factor_batch = (16, 16, 1), 4
        net = dict(filters=(8, 8), dense_units=16, d_units=32, d_depth=2)
    else:
        vae = {"resnet18": ((256, 256, 3), 16), "ucsd": ((100, 100, 1), 64)}
        factor_shape, factor_batch = (64, 64, 1), 64
        net = {}
    built = {}
    for name, backbone in (("resnet18", "resnet18"), ("ucsd", "small")):
        shape, batch = vae[name]
        built[name] = (
            f"VAE {backbone} {shape[0]} px",
            batch,
            rng.random((batch, *shape)).astype("f4"),
            lambda shape=shape, backbone=backbone: build_vae(backbone, shape, 32),
        )
    frames = dsprites_images(factor_batch, factor_shape[0])
    for name, label, lambda_ad in (
        ("factorvae", "FactorVAE", 0.0),
        ("adfactorvae", "AD-FactorVAE", 1.0),
    ):
        built[name] = (
            f"{label} {factor_shape[0]} px",
            factor_batch,
            frames,
            lambda lambda_ad=lambda_ad: build_factor_vae(
                input_shape=factor_shape, lambda_ad=lambda_ad, **net
            ),
        )
    return built


def check_rows(label, build, images, steps, layer="last"):
    """Does bf16 train like float32? The same seeded model trained ``steps`` steps (Adam
    1e-3) on the same batch in each precision: the last loss of each and their relative
    difference; then the float32 weights in a bf16 model: its latent maps against
    float32's (largest difference over the largest map value)."""
    models = {}
    for precision in devices.PRECISIONS:
        keras.utils.set_random_seed(0)
        with devices.precision_scope(precision):
            models[precision] = build()
        models[precision].compile(optimizer=keras.optimizers.Adam(1e-3))
    losses = {
        p: [float(m.train_on_batch(images, return_dict=True)["loss"]) for _ in range(steps)][
            -1
        ]
        for p, m in models.items()
    }
    reference, low = models["float32"], models["mixed_bfloat16"]
    low.set_weights(reference.get_weights())
    sample = images[:8]
    want = reference.explainer(layer).latent_maps(sample).numpy()
    got = low.explainer(layer).latent_maps(sample)
    return {
        "model": label,
        "steps": steps,
        "float32 loss": losses["float32"],
        "bf16 loss": losses["mixed_bfloat16"],
        "loss rel. diff": abs(losses["mixed_bfloat16"] / losses["float32"] - 1),
        "maps dtype": got.dtype.name,
        "maps max diff / max": float(np.abs(got.numpy() - want).max() / np.abs(want).max()),
    }


def build_parser():
    """Its flags, apart from main: the README test parses its documented commands."""
    parser = cli_parser("speed_limit", __doc__, quick="tiny sizes, XLA off")
    parser.add_argument(
        "--models",
        nargs="+",
        choices=MODELS,
        default=None,
        help="default: all (--quick: ucsd adfactorvae)",
    )
    parser.add_argument(
        "--precisions",
        nargs="+",
        choices=devices.PRECISIONS,
        default=list(devices.PRECISIONS),
        help="dtype policies to time",
    )
    parser.add_argument(
        "--jit",
        nargs="+",
        choices=("off", "on"),
        default=None,
        help="XLA settings to time (default: both; --quick: off)",
    )
    parser.add_argument(
        "--check",
        type=int,
        default=0,
        metavar="N",
        help="also train N steps in each precision from the same weights "
        "and compare the losses and the maps (0: skip)",
    )
    add_timing_flags(
        parser, 5, "timed steps per row", 30.0, "seconds of timed steps per row, about"
    )
    return parser


def main(argv=None):
    args = parse_args(build_parser(), argv, repeats=2, budget=3.0)
    jits = args.jit or (["off"] if args.quick else ["off", "on"])
    models = args.models or (["ucsd", "adfactorvae"] if args.quick else list(MODELS))
    print(
        f"TensorFlow {tf.__version__}, Keras {keras.__version__}, {os.cpu_count()} CPU "
        f"cores, load average {os.getloadavg()[0]:.1f}\n"
    )
    built = cases(args.quick)
    op_table, step_table, checks = [], [], []
    for name in models:
        label, batch, images, build = built[name]
        keras.utils.set_random_seed(0)
        rows, limits = limit_rows(
            build(), batch, label, args.precisions, args.repeats, args.budget
        )
        op_table += rows
        configs, steps = [(p, jit) for p in args.precisions for jit in jits], []
        for precision, jit in configs:
            keras.utils.set_random_seed(0)
            with devices.precision_scope(precision):
                model = build()
            model.compile(optimizer=keras.optimizers.Adam(1e-4), jit_compile=jit == "on")
            steps.append(lambda model=model, images=images: model.train_on_batch(images))
        flops = sum(step_flops(model, batch).values())
        timed = interleaved_medians(steps, args.repeats, args.budget * len(configs))
        for (precision, jit), seconds in zip(configs, timed):
            achieved = flops / seconds / 1e9
            step_table.append(
                {
                    "model": label,
                    "batch": batch,
                    "precision": precision,
                    "XLA": jit,
                    "step s": seconds,
                    "images/s": batch / seconds,
                    "GFLOP/step": flops / 1e9,
                    "GFLOP/s": achieved,
                    "limit GFLOP/s": limits[precision],
                    "of limit": achieved / limits[precision],
                    "speed-up": timed[0] / seconds,
                }
            )
        if args.check:
            checks.append(
                check_rows(
                    label, build, images, args.check, "last" if "Factor" in label else "conv1"
                )
            )
        print(f"{label}: done, load average {os.getloadavg()[0]:.1f}", flush=True)
    print("\nEach model's conv and dense layers as plain ops (FLOP-weighted rates):")
    print_table(op_table, ["model", "op", *[f"{p} GFLOP/s" for p in args.precisions]])
    print(
        "\nTrain steps, timed in turns (limit: the step's FLOPs at its layers' plain-op "
        "rates in that precision; speed-up: against the model's first row):"
    )
    print_table(
        step_table,
        [
            "model",
            "batch",
            "precision",
            "XLA",
            "step s",
            "images/s",
            "GFLOP/step",
            "GFLOP/s",
            "limit GFLOP/s",
            "of limit",
            "speed-up",
        ],
    )
    if checks:
        print("\nmixed_bfloat16 against float32 (same seed, same batch):")
        print_table(checks, list(checks[0]))
    return {"ops": op_table, "steps": step_table, "checks": checks}


if __name__ == "__main__":
    main()
