"""One-class MNIST: train a VAE on one digit, explain what differs in the others.

    python -m trainers.mnist --normal-digit 1 --data-dir path/to/mnist-idx

--data-dir is the folder of MNIST's four IDX files; without it the digits come from
tensorflow-datasets (the [datasets] extra; downloads once).
"""

from __future__ import annotations

import os
import sys

import numpy as np

from keras_vae_attn import console
from trainers import cli, devices, guard, localization, run_dirs, sanity


def build_parser():
    parser = cli.base_parser(
        __doc__,
        epochs=10,
        batch_size=128,
        lr=1e-3,
        latent_dim=16,
        prog="python -m trainers.mnist",
    )
    parser.add_argument("--normal-digit", type=int, default=1, help="the normal class, 0-9")
    parser.add_argument("--max-train", type=int, default=None, help="cap on training images")
    parser.add_argument("--max-test", type=int, default=None, help="cap on test images")
    cli.add_attention_flags(parser)
    cli.add_prediction_flags(parser, png=False)
    sanity.add_flags(parser)
    parser.set_defaults(layer="conv1")
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
    notes = [
        f"score {predicted['image_score'][i]:.3g}\n"
        f"{'anomalous' if predicted['pred_label'][i] else 'normal'}"
        for i in picks
    ]
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


def write_predictions(args, test_y, heatmaps, held_out, model, options, run_dir):
    """predictions.csv and thresholds.json at thresholds calibrated on the held-out
    normal training digits. Returns (metrics.json entry, Calibration, predictions)."""
    from keras_vae_attn import predictions

    source = predictions.describe_source(args.calibration_holdout, len(held_out))
    calibrated = predictions.calibrate(model, held_out, options, 256, source)
    predicted = predictions.predict(heatmaps, calibrated.thresholds)
    files = [f"test/{index:05d}" for index in range(len(test_y))]
    entry = predictions.write(
        run_dir,
        files,
        [int(d) for d in test_y],
        "digit",
        test_y != args.normal_digit,
        predicted,
        calibrated,
    )
    entry["calibration_images"] = len(held_out)
    return entry, calibrated, predicted


def tf_reshape_maps(maps):
    """(B, D, h, w) -> (B*D, h, w) for resizing."""
    return np.reshape(maps, (-1, *maps.shape[2:]))


def main(argv=None):
    parser = build_parser()
    args = cli.parse(parser, argv)
    cli.require_counts(parser, args, ("max_train", "max_test"))
    options = cli.explain_options(parser, args)
    args.explain = options.as_config()
    try:
        from keras_vae_attn.data import mnist

        mnist.check_digit(args.normal_digit)
    except ValueError as error:
        parser.error(f"--normal-digit {error}")
    devices.setup_devices(args)
    import tensorflow as tf

    from keras_vae_attn import callbacks as kva_callbacks
    from keras_vae_attn import viz
    from keras_vae_attn.models import build_vae
    from trainers import fit

    train_images, train_labels = mnist.load(args.data_dir, "train")
    test_images, test_labels = mnist.load(args.data_dir, "test")
    normal = mnist.to_float(train_images[train_labels == args.normal_digit][: args.max_train])
    from keras_vae_attn.predictions import split_held_out

    try:
        normal, held_out = split_held_out(normal, args.calibration_holdout)
    except ValueError as error:
        raise SystemExit(
            f"error: --calibration-holdout {args.calibration_holdout}: {error}"
        ) from None
    test_x = mnist.to_float(test_images[: args.max_test])
    test_y = test_labels[: args.max_test]

    run_dir = run_dirs.run_dir_for(args, "mnist")
    print(f"run folder: {run_dir}", file=sys.stderr)
    dataset = (
        tf.data.Dataset.from_tensor_slices(normal)
        .shuffle(len(normal), seed=args.seed)
        .batch(args.batch_size)
        .prefetch(tf.data.AUTOTUNE)
    )
    watch = kva_callbacks.AttentionImages(
        test_x[:4], os.path.join(run_dir, "tensorboard"), options.layer
    )
    model, history, _ = fit.fit_one_class(
        args,
        lambda: build_vae(
            "small", (28, 28, 1), args.latent_dim, recon_loss=args.loss, seed=args.seed
        ),
        dataset,
        tf.data.Dataset.from_tensor_slices(normal).batch(256),
        run_dir,
        watch,
        options.layers,
        covariance=options.needs_covariance,
    )
    options = localization.fit_and_record_options(model, normal, options, 256, run_dir)

    from keras_vae_attn import references

    pixels = references.fit_pixel_distribution(normal)
    metrics, curves, heatmaps = evaluate(
        model, test_x, test_y, args.normal_digit, options, 256, args.quiet, pixels
    )
    twin = sanity.twin_for(args, model, normal, options)
    checked, check_lines = sanity.image_level(
        args,
        model,
        twin,
        test_x,
        (test_y != args.normal_digit).astype(int),
        heatmaps,
        options,
        pixels,
        run_dir,
        f"MNIST, digit {args.normal_digit} vs the rest",
    )
    metrics.update(checked)
    metrics.update(
        normal_digit=args.normal_digit,
        layer=args.layer,
        precision=args.precision,  # --precision auto resolved
        explain=options.as_config(),
        attribution=options.describe(),
        final_losses={k: float(v[-1]) for k, v in history.items()},
    )
    if curves:
        viz.save_roc(
            curves,
            os.path.join(run_dir, "roc.png"),
            title=f"digit {args.normal_digit} vs rest",
        )
    viz.save_curves(history, os.path.join(run_dir, "curves.png"))
    metrics["train_images"] = len(normal)
    metrics["predictions"], calibrated, predicted = write_predictions(
        args, test_y, heatmaps, held_out, model, options, run_dir
    )
    write_figures(model, run_dir, test_x, test_y, options, metrics, calibrated, predicted)
    run_dirs.complete_run(run_dir, metrics)
    print(f"anomaly attention = {options.describe()}")
    if "image_auroc_undefined" in metrics:
        print(
            f"image AUROC not computed: {metrics['image_auroc_undefined']} "
            f"(metrics.json holds null)",
            file=sys.stderr,
        )
    print(
        "image AUROC: "
        + ", ".join(console.auroc_text(k, v) for k, v in metrics["image_auroc"].items())
    )
    print("\n".join(console.decision_lines(metrics["predictions"], "images")))
    print("\n".join(check_lines))
    print(f"figures, metrics.json, predictions.csv and thresholds.json in {run_dir}")
    return run_dir


if __name__ == "__main__":
    guard.main_guard(main)
