"""Training-step time of AD-FactorVAE against FactorVAE, side by side in one process.

    python -m bench.factor_step            # the FactorVAE dSprites net, 64x64, batch 64
    python -m bench.factor_step --quick    # tiny sizes (a smoke run)

Rows: FactorVAE, then AD-FactorVAE with L_AD on the top-response pair (second order, the
default), first order only, and random pairs. Each is the median seconds of one compiled
optimizer step (VAE and discriminator updates) on fixed real dSprites images; the
"vs FactorVAE" column is the ratio the issue's target (<= 2.0) is about.
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
from keras_vae_attn.data import dsprites  # noqa: E402
from keras_vae_attn.models.factor_vae import build_factor_vae  # noqa: E402

VARIANTS = (
    ("FactorVAE", dict(lambda_ad=0.0)),
    ("AD-FactorVAE (top pair, 2nd order)", dict(lambda_ad=1.0)),
    ("AD-FactorVAE (top pair, 1st order)", dict(lambda_ad=1.0, ad_second_order=False)),
    ("AD-FactorVAE (random pair, 2nd order)", dict(lambda_ad=1.0, ad_pairs="random")),
)


def images(batch, size, seed=0):
    """Real dSprites images float32 (batch, size, size, 1), area-resized if size != 64."""
    data = dsprites.DSprites()
    out = data.images_from_factors(data.sample_factors(batch, np.random.default_rng(seed)))
    if size != 64:
        out = tf.image.resize(out, (size, size), method="area").numpy()
    return out


def step_seconds(model, batch, repeats, budget):
    model.train_on_batch(batch)  # trace, compile, build state
    return median_seconds(lambda: model.train_on_batch(batch), repeats, budget_s=budget)


def build_parser():
    """Its flags, apart from main: the README test parses its documented commands."""
    parser = cli_parser("factor_step", __doc__, quick="tiny sizes (a smoke run)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per step")
    add_timing_flags(parser, 20, "timed steps per variant", 60.0, "seconds per variant")
    return parser


def main(argv=None):
    args = parse_args(build_parser(), argv, batch_size=8, repeats=3, budget=5.0)
    size, net = 64, {}
    if args.quick:
        size = 16
        net = dict(filters=(8, 8), dense_units=16, d_units=32, d_depth=2)
    batch = images(args.batch_size, size)
    print(
        f"TensorFlow {tf.__version__}, Keras {keras.__version__}, {os.cpu_count()} CPU "
        f"cores; {size}x{size}x1 images, batch {args.batch_size}\n"
    )
    rows = []
    for name, options in VARIANTS:
        keras.utils.set_random_seed(0)
        model = build_factor_vae(input_shape=(size, size, 1), **net, **options)
        model.compile()
        seconds = step_seconds(model, batch, args.repeats, args.budget)
        rows.append(
            {
                "model": name,
                "step s": seconds,
                "images/s": args.batch_size / seconds,
                "vs FactorVAE": seconds / rows[0]["step s"] if rows else 1.0,
            }
        )
    print_table(rows, ["model", "step s", "images/s", "vs FactorVAE"])


if __name__ == "__main__":
    main()
