"""One-class MNIST: train a VAE on one digit, explain what differs in the others.

    python -m trainers.mnist --normal-digit 1 --data-dir path/to/mnist-idx

--data-dir is the folder of MNIST's four IDX files; without it the digits come from
tensorflow-datasets (the [datasets] extra; downloads once).
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from keras_vae_attn import console
from trainers import cli, guard, localization, sanity
from trainers.localization import Evaluation, LocalizationSplit, prediction_notes

#: The experiment's defaults of the flags every trainer has (trainers/cli.py).
DEFAULTS = dict(epochs=10, batch_size=128, lr=1e-3, latent_dim=16, layer="conv1")


def build_parser() -> argparse.ArgumentParser:
    parser = cli.base_parser(__doc__, prog="python -m trainers.mnist", **DEFAULTS)
    parser.add_argument("--normal-digit", type=int, default=1, help="the normal class, 0-9")
    parser.add_argument("--max-train", type=int, default=None, help="cap on training images")
    parser.add_argument("--max-test", type=int, default=None, help="cap on test images")
    cli.add_localization_flags(parser, png=False, model_dir=False)
    return parser


SCORES = ("recon_score", "kl", "latent_distance", "attention_energy", "score")
REFERENCES = ("mean_image_difference", "pixel_deviation")  # model-free, mean of the map


def evaluate(model, images, labels, normal_digit, options, batch_size, quiet, pixels):
    """Image-level AUROC (normal digit vs all others) for each score: the model's, and
    the model-free references (``pixels``: the normal images' PixelDistribution).
    Returns (metrics, ROC curves, the method's heatmaps)."""
    from sklearn.metrics import roc_auc_score, roc_curve

    from keras_vae_attn import references
    from keras_vae_attn.explain import pipeline

    out = pipeline.batched(
        model,
        images,
        batch_size,
        options,
        keys=SCORES + ("heatmap",),
        progress=lambda it: guard.progress(it, quiet, desc="evaluate"),
    )
    heatmaps = out.pop("heatmap")
    out["attention_max"] = out.pop("score")
    out.update(
        {
            name: m.mean(axis=(1, 2))
            for name, m in references.reference_maps(images, pixels).items()
        }
    )
    is_anomaly = (labels != normal_digit).astype(int)
    metrics, curves = {}, {}
    if len(set(is_anomaly)) < 2:
        return (
            {
                "image_auroc": {name: None for name in out},
                "image_auroc_undefined": "the test images hold only one class (normal "
                "digit vs the rest): raise --max-test",
                "test_images": int(len(images)),
                "anomalous": int(is_anomaly.sum()),
            },
            {},
            heatmaps,
        )
    for name in out:
        auc = float(roc_auc_score(is_anomaly, out[name]))
        fpr, tpr, _ = roc_curve(is_anomaly, out[name])
        metrics[name] = auc
        curves[name] = (fpr, tpr, auc)
    best = max(metrics, key=metrics.get)
    return (
        {
            "image_auroc": metrics,
            "best_score": best,
            "best_auroc": metrics[best],
            "test_images": int(len(images)),
            "anomalous": int(is_anomaly.sum()),
        },
        curves,
        heatmaps,
    )


def write_figures(model, run_dir, images, labels, options, metrics, calibrated, predicted):
    """gallery.png (Fig. 4 of the paper) and latent_maps.png (Fig. 1), titled with the
    method and its image AUROC; the gallery's maps on one colour scale from the held-out
    normal images (with its colorbar, each cell's score and predicted label), the latent
    maps on one scale for the whole figure."""
    from keras_vae_attn import viz
    from keras_vae_attn.evaluate import ATTENTION
    from keras_vae_attn.explain import pipeline
    from keras_vae_attn.explain.pipeline import upsample
    from keras_vae_attn.predictions import scale_label

    picks = [int(np.flatnonzero(labels == d)[0]) for d in range(10) if (labels == d).any()]
    batch = images[picks]
    out = {k: v.numpy() for k, v in pipeline.explain_anomaly(model, batch, options).items()}
    notes = prediction_notes(predicted, picks)
    title = viz.method_title(
        f"MNIST, digit {metrics['normal_digit']} vs the rest",
        options.describe(),
        image_auroc=metrics["image_auroc"].get("attention_max"),
    )
    columns = [
        ("input", viz.to_rgb(batch)),
        ("reconstruction", viz.to_rgb(out["reconstruction"])),
        viz.Heatmaps(
            "anomaly attention",
            out["heatmap"],
            calibrated.scales[ATTENTION],
            scale_label(ATTENTION, calibrated),
            calibrated.thresholds.pixel,
            notes,
        ),
    ]
    viz.save_figure(
        viz.heatmap_figure(
            batch, columns, title=title, row_titles=[f"digit {labels[i]}" for i in picks]
        ),
        os.path.join(run_dir, "gallery.png"),
    )
    per_latent = upsample(tf_reshape_maps(out["per_latent"]), batch.shape[1:3]).numpy()
    per_latent = per_latent.reshape(len(picks), -1, *batch.shape[1:3])
    shown = picks[:4]
    figure = viz.latent_figure(
        batch[: len(shown)],
        per_latent[: len(shown)],
        row_titles=[f"digit {labels[i]}" for i in shown],
        title=f"per-latent attention M_i at {options.layer} "
        f"(Eq. 3-4), digit {metrics['normal_digit']} normal",
    )
    viz.save_figure(figure, os.path.join(run_dir, "latent_maps.png"))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = cli.parse(parser, argv)
    cli.require_counts(parser, args, ("max_train", "max_test"))
    args.explain = cli.explain_options(parser, args).as_config()
    from keras_vae_attn.data import mnist

    try:
        mnist.check_digit(args.normal_digit)
    except ValueError as error:
        parser.error(f"--normal-digit {error}")
    return args


def load_data(args: argparse.Namespace) -> tuple[np.ndarray, LocalizationSplit]:
    """(the normal digit's training images uint8 (N, 28, 28, 1), the test split: every
    digit, anomalous unless the normal one, digits as groups)."""
    from keras_vae_attn.data import mnist

    train_images, train_labels = mnist.load(args.data_dir, "train")
    test_images, test_labels = mnist.load(args.data_dir, "test")
    normal = train_images[train_labels == args.normal_digit][: args.max_train, ..., None]
    digits = test_labels[: args.max_test]
    return normal, LocalizationSplit(
        test_images[: args.max_test, ..., None],
        None,
        (digits != args.normal_digit).astype(int),
        [int(d) for d in digits],
        [f"test/{index:05d}" for index in range(len(digits))],
    )


class MNIST(localization.LocalizationExperiment):
    """One digit normal, the nine others anomalous: image-level AUROC per score (no
    masks), gallery.png and latent_maps.png."""

    group_column = "digit"
    stats_batch = 256
    tensorboard_examples = False

    dataset = "mnist"

    def load(self, args):
        return load_data(args)

    def folder(self, args):
        return "mnist"

    def title(self, args):
        return f"MNIST, digit {args.normal_digit} vs the rest"

    def roc_title(self, args):
        return f"digit {args.normal_digit} vs rest"

    def eval_batch(self, args):
        return 256

    def model_shape(self, args):
        return (28, 28, 1)

    def train_batches(self, args, normal):
        import tensorflow as tf

        from keras_vae_attn.data import to_float

        return (
            tf.data.Dataset.from_tensor_slices(to_float(normal))
            .shuffle(len(normal), seed=args.seed)
            .batch(args.batch_size)
            .prefetch(tf.data.AUTOTUNE)
        )

    def stats_batches(self, normal):
        import tensorflow as tf

        from keras_vae_attn.data import to_float

        return tf.data.Dataset.from_tensor_slices(to_float(normal)).batch(self.stats_batch)

    def batch_norm_batches(self, args, normal):
        return None

    def prediction_files(self, args, test):
        return list(test.paths)

    def evaluate(self, args, model, normal, test, options, pixels, twin):
        from keras_vae_attn.data import to_float
        from keras_vae_attn.evaluate import ATTENTION

        metrics, curves, heatmaps = evaluate(
            model,
            to_float(test.images),
            np.asarray(test.groups),
            args.normal_digit,
            options,
            self.eval_batch(args),
            args.quiet,
            pixels,
        )
        return Evaluation(metrics, curves, {ATTENTION: heatmaps}, [])

    def checks(self, args, run_dir, model, evaluation, test, options, normal, pixels, twin):
        from keras_vae_attn.data import to_float
        from keras_vae_attn.evaluate import ATTENTION

        return sanity.image_level(
            args,
            model,
            twin,
            to_float(test.images),
            test.labels,
            evaluation.maps[ATTENTION],
            options,
            pixels,
            run_dir,
            self.title(args),
        )

    def run_metrics(self, args, trained, test, options, evaluation):
        return dict(
            normal_digit=args.normal_digit,
            layer=args.layer,
            precision=args.precision,  # --precision auto resolved
            explain=options.as_config(),
            attribution=options.describe(),
            final_losses={k: float(v[-1]) for k, v in trained.history.items()},
            train_images=len(trained.normal),
        )

    def figures(self, args, model, test, evaluation, metrics, run_dir, options, calibrated,
                predicted):  # fmt: skip
        from keras_vae_attn.data import to_float

        write_figures(
            model,
            run_dir,
            to_float(test.images),
            np.asarray(test.groups),
            options,
            metrics,
            calibrated,
            predicted,
        )
        return [os.path.join(run_dir, name) for name in ("gallery.png", "latent_maps.png")]

    def report(self, args, run_dir, metrics, evaluation, figures, trained):
        if "image_auroc_undefined" in metrics:
            print(
                f"image AUROC not computed: {metrics['image_auroc_undefined']} "
                f"(metrics.json holds null)",
                file=sys.stderr,
            )
        return [
            f"anomaly attention = {metrics['attribution']}",
            "image AUROC: "
            + ", ".join(console.auroc_text(k, v) for k, v in metrics["image_auroc"].items()),
            *console.decision_lines(metrics["predictions"], "images"),
            *evaluation.lines,
            f"figures, metrics.json, predictions.csv and thresholds.json in {run_dir}",
        ]


def tf_reshape_maps(maps):
    """(B, D, h, w) -> (B*D, h, w) for resizing."""
    return np.reshape(maps, (-1, *maps.shape[2:]))


def main(argv: list[str] | None = None) -> str:
    return localization.run(MNIST(), parse_args(argv))


if __name__ == "__main__":
    guard.main_guard(main)
