"""Training-step cost: the VAE step with and without XLA, AD-FactorVAE vs FactorVAE, and
the ResNet decoder's stage widths below 256 px (first stages, as before, vs last stages).

    python -m bench.training            # full table
    python -m bench.training --quick    # tiny sizes (used by the test suite)

Each row is the median seconds of one optimizer step (after compilation) and the
images/s it implies; FactorVAE rows appear when keras_vae_attn.models.factor_vae exists.
"""

from __future__ import annotations

import os

from bench import add_timing_flags, cli_parser, parse_args
from keras_vae_attn.console import start_tensorflow

start_tensorflow()  # before keras and TensorFlow load: without their C++ banners

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from bench.timing import median_seconds, print_table  # noqa: E402
from keras_vae_attn.models import build_vae  # noqa: E402


def step_seconds(model, images, repeats, budget):
    """Median time of one `train_on_batch` call (the compiled train step)."""
    model.train_on_batch(images)  # compile and build optimizer state
    return median_seconds(lambda: model.train_on_batch(images), repeats, budget_s=budget)


def vae_rows(cases, repeats, budget):
    rows = []
    for backbone, size, channels, batch in cases:
        images = np.random.default_rng(0).random((batch, size, size, channels)).astype("f4")
        for jit in (False, True):
            keras.utils.set_random_seed(0)
            model = build_vae(backbone, (size, size, channels), 32)
            model.compile(optimizer=keras.optimizers.Adam(1e-4), jit_compile=jit)
            seconds = step_seconds(model, images, repeats, budget)
            rows.append(
                {
                    "model": f"VAE {backbone}",
                    "image": f"{size}x{size}x{channels}",
                    "batch": batch,
                    "XLA": jit,
                    "step s": seconds,
                    "images/s": batch / seconds,
                }
            )
    return rows


def decoder_rows(cases, repeats, budget):
    """ResNet18 VAE below 256 px: decoder built from the first stages of the 256-px widths
    (the old default) vs from the last stages (the current one)."""
    from keras_vae_attn.backbones import resnet18_encoder, resnet_decoder
    from keras_vae_attn.models.vae import VAE

    full = (256, 128, 64, 32, 32)
    rows = []
    for size, batch in cases:
        shape = (size, size, 3)
        steps = max(1, round(np.log2(size / 8)))  # as resnet_decoder counts them
        images = np.random.default_rng(0).random((batch, *shape)).astype("f4")
        for label, widths in (("first stages (before)", full[:steps]), ("last stages", full)):
            keras.utils.set_random_seed(0)
            model = VAE(resnet18_encoder(shape, 32), resnet_decoder(shape, 32, widths=widths))
            model.compile(optimizer=keras.optimizers.Adam(1e-4))
            seconds = step_seconds(model, images, repeats, budget)
            rows.append(
                {
                    "model": f"VAE resnet18, decoder {label}",
                    "image": f"{size}x{size}x3",
                    "batch": batch,
                    "XLA": False,
                    "step s": seconds,
                    "images/s": batch / seconds,
                }
            )
        rows[-1]["vs before"] = rows[-1]["step s"] / rows[-2]["step s"]
    return rows


def factor_rows(size, batch, repeats, budget):
    try:
        from keras_vae_attn.models import factor_vae
    except ImportError:
        return []
    images = np.random.default_rng(0).random((batch, size, size, 1)).astype("f4")
    rows = []
    for name, lambda_ad in (("FactorVAE", 0.0), ("AD-FactorVAE", 1.0)):
        keras.utils.set_random_seed(0)
        model = factor_vae.build_factor_vae(input_shape=(size, size, 1), lambda_ad=lambda_ad)
        model.compile()
        seconds = step_seconds(model, images, repeats, budget)
        rows.append(
            {
                "model": name,
                "image": f"{size}x{size}x1",
                "batch": batch,
                "XLA": False,
                "step s": seconds,
                "images/s": batch / seconds,
            }
        )
    rows[-1]["vs FactorVAE"] = rows[-1]["step s"] / rows[0]["step s"]
    return rows


def build_parser():
    """Its flags, apart from main: the README test parses its documented commands."""
    parser = cli_parser("training", __doc__, quick="tiny sizes (a smoke run)")
    add_timing_flags(
        parser, 10, "timed steps per row", 60.0, "seconds of timed steps per row at most"
    )
    return parser


def main(argv=None):
    args = parse_args(build_parser(), argv, repeats=2, budget=5.0)
    if args.quick:
        cases, factor_size, factor_batch = [("small", 28, 1, 8)], 64, 4
        decoder_cases = [(32, 2)]
    else:
        cases = [("small", 64, 1, 64), ("resnet18", 128, 3, 16), ("resnet18", 256, 3, 16)]
        factor_size, factor_batch = 64, 64
        decoder_cases = [(64, 16), (128, 16)]
    print(
        f"TensorFlow {tf.__version__}, Keras {keras.__version__}, {os.cpu_count()} CPU cores\n"
    )
    rows = vae_rows(cases, args.repeats, args.budget)
    rows += factor_rows(factor_size, factor_batch, args.repeats, args.budget)
    rows += decoder_rows(decoder_cases, args.repeats, args.budget)
    print_table(
        rows,
        ["model", "image", "batch", "XLA", "step s", "images/s", "vs FactorVAE", "vs before"],
    )


if __name__ == "__main__":
    main()
