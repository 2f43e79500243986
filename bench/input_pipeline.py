"""Input pipeline vs training step: can tf.data keep the model fed?

    python -m bench.input_pipeline [--data-dir <mvtec root> --category bottle]
    python -m bench.input_pipeline --quick          # tiny generated category

Measures, in one run: decoding + resizing image files (images/s, once per run, then
cached in memory), the augmented training stream (images/s delivered by
``augment.train_dataset`` with random mirror + rotation), and the images/s one VAE
training step consumes at the same size and batch. The ratio stream / step is what
must stay well above 1 (target >= 3).
"""

from __future__ import annotations

import tempfile
import time

from bench import cli_parser
from keras_vae_attn.console import start_tensorflow

start_tensorflow()  # before keras and TensorFlow load: without their C++ banners

import keras  # noqa: E402

from bench.timing import median_seconds, print_table  # noqa: E402
from keras_vae_attn.data import augment, mvtec  # noqa: E402
from keras_vae_attn.models import build_vae  # noqa: E402


def stream_images_per_second(images, batch, batches):
    dataset = augment.train_dataset(images, batch, augment.augmenter(), seed=0).repeat()
    iterator = iter(dataset)
    next(iterator)  # build the pipeline
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return batches * batch / (time.perf_counter() - start)


def build_parser():
    """Its flags, apart from main: the README test parses its documented commands."""
    parser = cli_parser("input_pipeline", __doc__)
    parser.add_argument(
        "--data-dir", default=None, help="MVTec AD root (default: a generated category)"
    )
    parser.add_argument("--category", default="bottle", help="category under --data-dir")
    parser.add_argument(
        "--image-size", type=int, default=256, help="images are resized to this square size"
    )
    parser.add_argument("--batch-size", type=int, default=16, help="images per step")
    parser.add_argument(
        "--backbone", default="resnet18", help="VAE encoder: resnet18 or small"
    )
    parser.add_argument(
        "--quick", action="store_true", help="a tiny generated category at 32 px (a smoke run)"
    )
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    scratch = None
    if args.quick or not args.data_dir:
        from keras_vae_attn.data.synthetic import write_mvtec_category

        scratch = tempfile.mkdtemp()
        size = 64 if args.quick else args.image_size
        write_mvtec_category(scratch, "demo", size=size, n_train=24 if args.quick else 60)
        args.data_dir, args.category = scratch, "demo"
        if args.quick:
            args.image_size, args.batch_size, args.backbone = 32, 4, "small"
    files = mvtec.train_files(args.data_dir, args.category)
    start = time.perf_counter()
    images, _ = mvtec.decode_files(files, args.image_size)
    decode_rate = len(files) / (time.perf_counter() - start)
    stream_rate = stream_images_per_second(images, args.batch_size, 3 if args.quick else 20)
    model = build_vae(args.backbone, (args.image_size, args.image_size, 3), 32)
    model.compile(optimizer=keras.optimizers.Adam(1e-4))
    batch = images[: args.batch_size].astype("float32") / 255.0
    model.train_on_batch(batch)
    step = median_seconds(lambda: model.train_on_batch(batch), 2 if args.quick else 5)
    step_rate = args.batch_size / step
    print(
        f"{args.category}: {len(files)} files at {args.image_size}px, batch "
        f"{args.batch_size}, {args.backbone} VAE\n"
    )
    print_table(
        [
            {"stage": "decode + resize files (once, then cached)", "images/s": decode_rate},
            {"stage": "augmented training stream", "images/s": stream_rate},
            {"stage": "training step consumes", "images/s": step_rate},
            {"stage": "stream / step", "images/s": stream_rate / step_rate},
        ],
        ["stage", "images/s"],
    )
    return stream_rate / step_rate


if __name__ == "__main__":
    main()
