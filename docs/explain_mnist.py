"""Render the per-latent attention maps of a small VAE trained on MNIST as one PNG.

    python docs/explain_mnist.py --data-dir path/to/mnist-idx --out maps.png

Rows are test digits; the first column is the input, then one overlay per latent
dimension: which part of the digit each latent dimension looks at. Every map is drawn on
one colour scale (the colorbar underneath), so a latent that looks at nothing stays dark.
"""

import argparse
import os

import numpy as np

from keras_vae_attn.console import start_tensorflow
from trainers.guard import main_guard

LAYER = "conv2"


def build_parser():
    parser = argparse.ArgumentParser(
        prog="python docs/explain_mnist.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--data-dir", default=None, help="MNIST IDX folder (default: TFDS)")
    parser.add_argument(
        "--out", default="latent_maps.png", help="the PNG to write (default: %(default)s)"
    )
    for flag, default, meaning in (
        ("--steps", 300, "training steps of the VAE"),
        ("--latent-dim", 8, "latent dimensions: one map column each"),
    ):
        parser.add_argument(
            flag, type=int, default=default, help=f"{meaning} (default: %(default)s)"
        )
    return parser


def maps_figure(images, maps, digits, steps):
    """The figure: ``images`` (B, 28, 28, 1), their per-latent maps at input size
    (B, D, 28, 28) on one shared scale (keras_vae_attn.viz.latent_figure), titled with
    what is shown."""
    from keras_vae_attn.viz import latent_figure

    return latent_figure(
        images,
        maps,
        row_titles=[f"digit {d}" for d in digits],
        title=f"per-latent attention M_i at {LAYER} (Eq. 3-4) of a VAE "
        f"trained {steps} steps on MNIST: where each latent z_i looks",
    )


def main(argv=None):
    args = build_parser().parse_args(argv)
    tf = start_tensorflow()
    import keras

    from keras_vae_attn.data import mnist
    from keras_vae_attn.explain.pipeline import upsample
    from keras_vae_attn.models import build_vae
    from keras_vae_attn.viz import save_figure

    images, _ = mnist.load(args.data_dir, "train")
    test_images, test_labels = mnist.load(args.data_dir, "test")
    keras.utils.set_random_seed(0)
    model = build_vae("small", (28, 28, 1), args.latent_dim)
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    data = tf.data.Dataset.from_tensor_slices(mnist.to_float(images)).shuffle(10000).batch(128)
    model.fit(
        data.repeat(), steps_per_epoch=args.steps, epochs=1, verbose=2, shuffle=False
    )  # the dataset shuffles itself

    picks = [int(np.flatnonzero(test_labels == d)[0]) for d in range(0, 10, 2)]
    batch = mnist.to_float(test_images[picks])
    maps = model.explainer(LAYER).latent_maps(batch)  # (5, D, 7, 7)
    flat = tf.reshape(maps, (-1, *maps.shape[2:]))
    big = upsample(flat, batch.shape[1:3]).numpy().reshape(len(picks), args.latent_dim, 28, 28)
    save_figure(
        maps_figure(batch, big, [int(test_labels[i]) for i in picks], args.steps), args.out
    )
    print(f"wrote {os.path.abspath(args.out)}")


if __name__ == "__main__":
    main_guard(main)
