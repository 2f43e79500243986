"""One-class MNIST: train a VAE on one digit, explain what differs in the others.

    python -m trainers.mnist --normal-digit 1 --data-dir path/to/mnist-idx
"""
from __future__ import annotations

import os
import sys

import numpy as np

from trainers import common


def build_parser():
    parser = common.base_parser(__doc__, epochs=10, batch_size=128, lr=1e-3, latent_dim=16)
    parser.add_argument("--normal-digit", type=int, default=1, help="the normal class, 0-9")
    parser.add_argument("--max-train", type=int, default=None, help="cap on training images")
    parser.add_argument("--max-test", type=int, default=None, help="cap on test images")
    common.add_attention_flags(parser)
    parser.set_defaults(layer="conv1")
    return parser


SCORES = ("recon_score", "kl", "latent_distance", "attention_energy", "score")
REFERENCES = ("mean_image_difference", "pixel_deviation")   # model-free, mean of the map


def evaluate(model, images, labels, normal_digit, options, batch_size, quiet, pixels):
    """Image-level AUROC (normal digit vs all others) for each score: the model's, and
    the model-free references (``pixels``: the normal images' PixelDistribution)."""
    from sklearn.metrics import roc_auc_score, roc_curve

    from keras_vae_attn import references, scoring

    out = scoring.batched(model, images, batch_size, options, keys=SCORES,
                          progress=lambda it: common.progress(it, quiet, desc="evaluate"))
    out["attention_max"] = out.pop("score")
    out.update({name: m.mean(axis=(1, 2))
                for name, m in references.reference_maps(images, pixels).items()})
    is_anomaly = (labels != normal_digit).astype(int)
    metrics, curves = {}, {}
    if len(set(is_anomaly)) < 2:
        return {"image_auroc": {name: None for name in out},
                "image_auroc_undefined": "the test images hold only one class (normal "
                                         "digit vs the rest): raise --max-test",
                "test_images": int(len(images)), "anomalous": int(is_anomaly.sum())}, {}
    for name in out:
        auc = float(roc_auc_score(is_anomaly, out[name]))
        fpr, tpr, _ = roc_curve(is_anomaly, out[name])
        metrics[name] = auc
        curves[name] = (fpr, tpr, auc)
    best = max(metrics, key=metrics.get)
    return {"image_auroc": metrics, "best_score": best, "best_auroc": metrics[best],
            "test_images": int(len(images)), "anomalous": int(is_anomaly.sum())}, curves


def write_figures(model, run_dir, images, labels, options):
    """gallery.png (Fig. 4 of the paper) and latent_maps.png (Fig. 1)."""
    from keras_vae_attn import scoring, viz
    from keras_vae_attn.attention import upsample

    picks = [int(np.flatnonzero(labels == d)[0]) for d in range(10) if (labels == d).any()]
    batch = images[picks]
    out = {k: v.numpy() for k, v in scoring.explain_anomaly(model, batch, options).items()}
    overlays = viz.overlay(batch, out["heatmap"], vmax=out["heatmap"].max())  # one scale
    rows = [[batch[i], out["reconstruction"][i], overlays[i]] for i in range(len(picks))]
    viz.save_grid(rows, os.path.join(run_dir, "gallery.png"),
                  column_titles=["input", "reconstruction", "anomaly attention"],
                  row_titles=[f"digit {labels[i]}" for i in picks])
    per_latent = upsample(tf_reshape_maps(out["per_latent"]), batch.shape[1:3]).numpy()
    per_latent = per_latent.reshape(len(picks), -1, *batch.shape[1:3])
    shown = picks[:4]
    rows = []
    for row, index in enumerate(shown):
        dims = viz.overlay(np.repeat(batch[row:row + 1], per_latent.shape[1], 0),
                           per_latent[row])
        rows.append([batch[row]] + list(dims))
    viz.save_grid(rows, os.path.join(run_dir, "latent_maps.png"),
                  column_titles=["input"] + [f"z{d}" for d in range(per_latent.shape[1])],
                  row_titles=[f"digit {labels[i]}" for i in shown], cell_inches=1.0)


def tf_reshape_maps(maps):
    """(B, D, h, w) -> (B*D, h, w) for resizing."""
    return np.reshape(maps, (-1, *maps.shape[2:]))


def main(argv=None):
    parser = build_parser()
    args = common.parse(parser, argv)
    common.require_counts(parser, args, ("max_train", "max_test"))
    options = common.explain_options(parser, args)
    args.explain = options.as_config()
    try:
        from keras_vae_attn.data import mnist
        mnist.check_digit(args.normal_digit)
    except ValueError as error:
        parser.error(f"--normal-digit {error}")
    common.setup_devices(args)
    import tensorflow as tf

    from keras_vae_attn import callbacks as kva_callbacks
    from keras_vae_attn import viz
    from keras_vae_attn.models import build_vae

    train_images, train_labels = mnist.load(args.data_dir, "train")
    test_images, test_labels = mnist.load(args.data_dir, "test")
    normal = mnist.to_float(train_images[train_labels == args.normal_digit][:args.max_train])
    test_x = mnist.to_float(test_images[:args.max_test])
    test_y = test_labels[:args.max_test]

    run_dir = common.run_dir_for(args, "mnist")
    print(f"run folder: {run_dir}", file=sys.stderr)
    dataset = (tf.data.Dataset.from_tensor_slices(normal)
               .shuffle(len(normal), seed=args.seed).batch(args.batch_size)
               .prefetch(tf.data.AUTOTUNE))
    watch = kva_callbacks.AttentionImages(test_x[:4], os.path.join(run_dir, "tensorboard"),
                                          options.layer)
    model, history, _ = common.fit_one_class(
        args, lambda: build_vae("small", (28, 28, 1), args.latent_dim, recon_loss=args.loss,
                                seed=args.seed),
        dataset, tf.data.Dataset.from_tensor_slices(normal).batch(256), run_dir, watch,
        options.layers, covariance=options.needs_covariance)
    options = common.fit_and_record_options(model, normal, options, 256, run_dir)

    from keras_vae_attn import references

    metrics, curves = evaluate(model, test_x, test_y, args.normal_digit, options, 256,
                               args.quiet, references.fit_pixel_distribution(normal))
    metrics.update(normal_digit=args.normal_digit, layer=args.layer,
                   explain=options.as_config(), attribution=options.describe(),
                   final_losses={k: float(v[-1]) for k, v in history.items()})
    if curves:
        viz.save_roc(curves, os.path.join(run_dir, "roc.png"),
                     title=f"digit {args.normal_digit} vs rest")
    viz.save_curves(history, os.path.join(run_dir, "curves.png"))
    write_figures(model, run_dir, test_x, test_y, options)
    common.write_json(os.path.join(run_dir, common.RUN_COMPLETE), metrics)
    print(f"anomaly attention = {options.describe()}")
    if "image_auroc_undefined" in metrics:
        print(f"image AUROC not computed: {metrics['image_auroc_undefined']} "
              f"(metrics.json holds null)", file=sys.stderr)
    print("image AUROC: " + ", ".join(f"{k} {'n/a' if v is None else f'{v:.3f}'}"
                                      for k, v in metrics["image_auroc"].items()))
    print(f"figures and metrics in {run_dir}")
    return run_dir


if __name__ == "__main__":
    common.main_guard(main)
