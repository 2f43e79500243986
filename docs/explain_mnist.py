"""Render the per-latent attention maps of a small VAE trained on MNIST as one PNG.

    python docs/explain_mnist.py --data-dir path/to/mnist-idx --out maps.png

Rows are test digits; the first column is the input, then one overlay per latent
dimension: which part of the digit each latent dimension looks at.
"""
import argparse
import os

import numpy as np

from keras_vae_attn.console import start_tensorflow
from trainers.common import main_guard


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=None, help="MNIST IDX folder (default: TFDS)")
    parser.add_argument("--out", default="latent_maps.png")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--latent-dim", type=int, default=8)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    tf = start_tensorflow()
    import keras

    from keras_vae_attn import overlay
    from keras_vae_attn.attention import upsample
    from keras_vae_attn.data import mnist
    from keras_vae_attn.models import build_vae
    from keras_vae_attn.viz import save_grid

    images, _ = mnist.load(args.data_dir, "train")
    test_images, test_labels = mnist.load(args.data_dir, "test")
    keras.utils.set_random_seed(0)
    model = build_vae("small", (28, 28, 1), args.latent_dim)
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    data = tf.data.Dataset.from_tensor_slices(mnist.to_float(images)).shuffle(10000).batch(128)
    model.fit(data.repeat(), steps_per_epoch=args.steps, epochs=1, verbose=2,
              shuffle=False)                    # the dataset shuffles itself

    picks = [int(np.flatnonzero(test_labels == d)[0]) for d in range(0, 10, 2)]
    batch = mnist.to_float(test_images[picks])
    maps = model.explainer("conv2").latent_maps(batch)                  # (5, D, 7, 7)
    flat = tf.reshape(maps, (-1, *maps.shape[2:]))
    big = upsample(flat, batch.shape[1:3]).numpy().reshape(len(picks), args.latent_dim, 28, 28)
    rows = [[batch[r]] + list(overlay(np.repeat(batch[r:r + 1], args.latent_dim, 0), big[r]))
            for r in range(len(picks))]
    save_grid(rows, args.out, column_titles=["input"] + [f"z{d}" for d in range(args.latent_dim)],
              row_titles=[f"digit {test_labels[i]}" for i in picks], cell_inches=1.0)
    print(f"wrote {os.path.abspath(args.out)}")


if __name__ == "__main__":
    main_guard(main)
