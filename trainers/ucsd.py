"""UCSD pedestrian anomaly localization with the paper's layer ablation (its Table 1):
train one VAE on the normal clips, then compare the anomaly attention (Eq. 5) at each
requested encoder layer with the reconstruction difference, pixel by pixel.

    python -m trainers.ucsd --subset ped1 --data-dir path/to/UCSD_Anomaly_Dataset.v1p2
    python -m trainers.ucsd --demo        # a generated UCSD-style dataset, runs on CPU

--data-dir is the folder holding UCSDped1/UCSDped2 (or one of them); it defaults to
$UCSD_ROOT. --demo writes the generated dataset into --data-dir, or <runs-root>/data.

The anomaly attention is made as --attribution/--form/--deviation/--layer say (the
default was chosen over several datasets, bench/RESULTS.md; --attribution paper is the
paper's Grad-CAM form). It is reported beside the reconstruction difference, the VAE's
feature deviation without gradient, the mean-frame difference |frame - mean training
frame| and the per-pixel z-score, at the same smoothing levels; --layers adds one
attention row per layer (the paper's Table 1 ablation).
"""

from __future__ import annotations

import argparse
import os

import numpy as np

from keras_vae_attn import console
from keras_vae_attn.data.registry import UCSD_DEMO_DATA
from trainers import cli, guard, localization
from trainers.localization import Evaluation, LocalizationSplit, prediction_notes

# The paper's Table 1 (UCSD Ped1, 100x100): pixel AUROC per method.
PAPER_PED1 = {
    "recon_error": 0.86,
    "attention_conv1": 0.89,
    "attention_conv2": 0.92,
    "attention_conv3": 0.91,
}
RECON = "recon_error"
MEAN_FRAME = "mean_image_difference"  # no model: |frame - mean training frame|
FIGURE_ROWS = 4


#: The experiment's defaults of the flags every trainer has (trainers/cli.py); --layer
#: conv1: the layer set chosen with the default attribution (bench/RESULTS.md).
DEFAULTS = dict(epochs=30, batch_size=64, lr=1e-3, latent_dim=32, layer="conv1")


def build_parser() -> argparse.ArgumentParser:
    parser = cli.base_parser(__doc__, prog="python -m trainers.ucsd", **DEFAULTS)
    parser.add_argument(
        "--subset",
        choices=("ped1", "ped2"),
        default="ped1",
        help="which UCSD pedestrian scene (UCSDped1 or UCSDped2 under --data-dir)",
    )
    parser.add_argument(
        "--demo", action="store_true", help="generate a small UCSD-style dataset and run on it"
    )
    parser.add_argument(
        "--image-size",
        type=int,
        default=100,
        help="frames and masks are resized to this square size",
    )
    parser.add_argument(
        "--layers",
        default="conv1,conv2,conv3",
        help="comma-separated encoder layers for the per-layer ablation rows "
        "(the same attribution at each layer alone); the exported and "
        "headline map is --layer",
    )
    parser.add_argument(
        "--backbone",
        choices=("small", "resnet18"),
        default="small",
        help="encoder: a small stack of stride-2 convolutions (conv1, "
        "conv2, conv3 at 100 px: the layers of the paper's ablation), "
        "or ResNet18",
    )
    parser.add_argument(
        "--beta",
        type=float,
        default=1.0,
        help="weight of the KL term (below 1 keeps more of the latent in use)",
    )
    parser.add_argument(
        "--frame-step", type=int, default=1, help="train on every k-th frame of each clip"
    )
    parser.add_argument(
        "--test-frame-step",
        type=int,
        default=1,
        help="evaluate every k-th frame of each test clip",
    )
    parser.add_argument(
        "--max-train-clips",
        type=int,
        default=None,
        help="cap on the normal training clips (default: all)",
    )
    parser.add_argument(
        "--max-test-clips",
        type=int,
        default=None,
        help="cap on the test clips with masks that are evaluated",
    )
    parser.add_argument(
        "--eval-batch-size",
        type=int,
        default=32,
        help="test frames scored per batch (lower it if memory runs out)",
    )
    parser.add_argument(
        "--figure-frames",
        type=int,
        default=FIGURE_ROWS,
        help="anomalous frames shown in examples.png",
    )
    cli.add_localization_flags(parser, "frames")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = cli.parse(parser, argv)
    cli.require_counts(
        parser,
        args,
        (
            "frame_step",
            "test_frame_step",
            "eval_batch_size",
            "figure_frames",
            "max_train_clips",
            "max_test_clips",
        ),
    )
    if args.image_size < 16:
        parser.error(f"--image-size must be at least 16, got {args.image_size}")
    if args.smooth < 0:
        parser.error(f"--smooth must be >= 0, got {args.smooth}")
    if not args.beta > 0:
        parser.error(f"--beta must be a positive number, got {args.beta}")
    args.layers = [name.strip() for name in args.layers.split(",") if name.strip()]
    if not args.layers:
        parser.error("--layers names no layer; give e.g. --layers conv1,conv2,conv3")
    if len(set(args.layers)) != len(args.layers):
        parser.error(f"--layers repeats a layer: {','.join(args.layers)}")
    options = cli.explain_options(parser, args)
    args.explain = options.as_config()
    message = cli.unknown_layer_message(
        args.layers + list(options.layers),
        args.backbone,
        model_shape(args),
        args.latent_dim,
        flag="--layer/--layers",
    )
    if message:
        parser.error(message)
    if args.data_dir is None:
        args.data_dir = (
            os.path.join(args.runs_root, "data") if args.demo else os.environ.get("UCSD_ROOT")
        )
        if args.data_dir is None:
            parser.error(
                "no dataset root: pass --data-dir (the folder holding UCSDped1 "
                "and UCSDped2), set $UCSD_ROOT, or run --demo"
            )
    return args


def model_shape(args: argparse.Namespace) -> tuple[int, int, int]:
    return (args.image_size, args.image_size, 1)


def load_data(args: argparse.Namespace) -> tuple[np.ndarray, LocalizationSplit]:
    """(train uint8 frames (N, S, S, 1), test split: clips as groups); writes the demo
    data if asked."""
    from keras_vae_attn.data import ucsd

    if args.demo:
        from keras_vae_attn.data.synthetic import write_ucsd_dataset

        write_ucsd_dataset(args.data_dir, args.subset, seed=args.seed, **UCSD_DEMO_DATA)
    scene = (args.data_dir, args.subset, args.image_size)
    train = ucsd.load_train(*scene, max_clips=args.max_train_clips, frame_step=args.frame_step)
    test = ucsd.load_test(
        *scene, max_clips=args.max_test_clips, frame_step=args.test_frame_step
    )
    return train, LocalizationSplit(
        test.images, test.masks, test.labels, test.clips, test.paths
    )


def layer_options(options, layer):
    """The options of the ablation row of ``layer``: the run's attribution at that layer
    alone, or the paper's form there when the run's map reads no layer (recon-deviation),
    so Table 1 still compares layers."""
    from keras_vae_attn.explain.forms import get_form
    from keras_vae_attn.explain.options import ExplainOptions

    if get_form(options.form).pixels:
        return ExplainOptions.preset("paper", layers=(layer,))
    return options.replace(layers=(layer,))


def method_name(layer):
    return f"attention_{layer}"


class UCSD(localization.LocalizationExperiment):
    """UCSD pedestrian frames with the paper's layer ablation (its Table 1): one
    attention row per --layers entry, the table printed and stored, examples.png."""

    unit = "frames"
    group_column = "clip"
    stats_batch = 256

    dataset = "ucsd"

    def load(self, args):
        return load_data(args)

    def folder(self, args):
        return f"ucsd-{args.subset}" + ("-demo" if args.demo else "")

    def title(self, args):
        return f"UCSD {args.subset}, {args.image_size}x{args.image_size}"

    def roc_title(self, args):
        return f"UCSD {args.subset}: pixel ROC"

    def model_shape(self, args):
        return model_shape(args)

    def feature_layers(self, args, options):
        """The exported layers and every ablation layer."""
        return sorted(set(args.layers) | set(options.layers))

    def watch_picks(self, test):
        return pick_frames(test, 4)

    def other_maps(self, args, options):
        return {method_name(layer): layer_options(options, layer) for layer in args.layers}

    def evaluate(self, args, model, normal, test, options, pixels, twin):
        """The anomaly attention beside every reference (keras_vae_attn/evaluate.py),
        plus one ablation row per --layers entry (same attribution, that layer alone);
        maps: the headline attention, the recon difference and the ablation rows."""
        from keras_vae_attn import evaluate as kva_evaluate
        from keras_vae_attn.data import to_float
        from keras_vae_attn.explain import pipeline
        from keras_vae_attn.metrics import localization as metrics_of

        images = to_float(test.images)

        def wrap(it, desc=""):
            return guard.progress(it, args.quiet, desc=desc)

        result = self.localize(args, model, normal, test, options, pixels, twin)
        ablation = {}
        for layer in args.layers:
            heat = pipeline.batched(
                model,
                images,
                args.eval_batch_size,
                layer_options(options, layer),
                keys=("heatmap",),
                progress=lambda it, layer=layer: wrap(it, f"layer {layer}"),
            )
            ablation[method_name(layer)] = heat["heatmap"]
        rows = metrics_of.evaluate_methods(ablation, test.masks, test.labels)
        methods = {**result.methods, **rows}
        title = (
            f"UCSD {args.subset}, {args.image_size}x{args.image_size}: "
            f"{len(test.labels)} test frames, {int(test.labels.sum())} anomalous; "
            f"anomaly attention = {options.describe()}"
        )
        lines = (
            kva_evaluate.summary(result, title)
            + [""]
            + table(methods, args.subset, options.smooth)
        )
        metrics = {
            **kva_evaluate.as_metrics(result, options),
            "methods": methods,
            "attention_beats_recon": attention_beats(methods, RECON, args.layers),
            "attention_beats_mean_frame": attention_beats(methods, MEAN_FRAME, args.layers),
        }
        roc = {
            label(name): (*result.curves[name], result.methods[name]["pixel_auroc"])
            for name in result.methods
            if result.curves[name] is not None
        }
        maps = {
            RECON: result.maps[RECON],
            kva_evaluate.ATTENTION: result.maps[kva_evaluate.ATTENTION],
            **ablation,
        }
        return Evaluation(metrics, roc, maps, lines, result)

    def run_metrics(self, args, trained, test, options, evaluation):
        return {
            "table": evaluation.lines,
            "paper_pixel_auroc_ped1": PAPER_PED1,
            "best_iou_is_test_set_tuned": True,
            "subset": args.subset,
            "demo": args.demo,
            "image_size": args.image_size,
            "layers": args.layers,
            "exported_layers": list(options.layers),
            "train_frames": len(trained.normal),
            "precision": None if args.model_dir else args.precision,  # auto resolved
            "test_frames": len(test.labels),
            "anomalous_frames": int(test.labels.sum()),
            "test_clips": sorted(set(test.groups)),
            "final_losses": {k: float(v[-1]) for k, v in trained.history.items()},
        }

    def figures(self, args, model, test, evaluation, metrics, run_dir, options, calibrated,
                predicted):  # fmt: skip
        path = os.path.join(run_dir, "examples.png")
        write_figure(
            test,
            evaluation.maps,
            pick_frames(test, args.figure_frames),
            path,
            metrics,
            options,
            calibrated,
            predicted,
        )
        return [path]

    def report(self, args, run_dir, metrics, evaluation, figures, trained):
        return [
            *evaluation.lines,
            "",
            *console.decision_lines(metrics["predictions"], "frames"),
            f"figures (examples.png, roc.png{', curves.png' if trained.history else ''}), "
            f"metrics.json, predictions.csv and thresholds.json in {run_dir}",
        ]


def label(method):
    from keras_vae_attn import evaluate as kva_evaluate

    return kva_evaluate.LABELS.get(method, method.replace("attention_", "attention "))


def attention_beats(methods, other, layers):
    """{layer: that layer's attention's pixel AUROC > method ``other``'s} (None when
    either is n/a); the headline attention is under "anomaly_attention"."""
    theirs = methods[other]["pixel_auroc"]
    names = {
        "anomaly_attention": "anomaly_attention",
        **{layer: method_name(layer) for layer in layers},
    }
    return {
        key: None
        if theirs is None or methods[name]["pixel_auroc"] is None
        else methods[name]["pixel_auroc"] > theirs
        for key, name in names.items()
    }


def table(methods, subset, sigma=0.0):
    """The paper's Table 1 as text lines: the headline attention, the reconstruction
    difference and one row per --layers entry, every metric at the run's smoothing
    ``sigma`` (labelled: the side-by-side table above reports several sigmas), the
    paper's AUROC beside. The other references are in that table only."""
    shown_rows = ["anomaly_attention", RECON] + [
        name for name in methods if name.startswith("attention_")
    ]
    lines = [
        f"the paper's Table 1: every metric at sigma {sigma:g} px (the run's --smooth)",
        f"{'method':<34} {'pixel AUROC':>11} {'AUPRO':>7} {'best IoU':>9} "
        f"{'frame AUROC':>11} {'paper (Ped1)':>12}",
    ]
    for name, values in ((n, methods[n]) for n in shown_rows if n in methods):
        paper = PAPER_PED1.get(name) if subset == "ped1" else None
        cells = [values[key] for key in ("pixel_auroc", "aupro", "best_iou", "image_auroc")]
        shown = [f"{v:.3f}" if v is not None else "n/a" for v in cells]
        lines.append(
            f"{label(name)[:34]:<34} {shown[0]:>11} {shown[1]:>7} {shown[2]:>9} "
            f"{shown[3]:>11} {(f'{paper:.2f}' if paper else '-'):>12}"
        )
    return lines


def pick_frames(test, count):
    """Up to ``count`` anomalous frames, one per clip first: each clip's largest anomaly
    (the first frames when none is anomalous)."""
    area = test.masks.sum(axis=(1, 2))
    best = {}
    for index, clip in enumerate(test.groups):
        if area[index] and (clip not in best or area[index] > area[best[clip]]):
            best[clip] = index
    picks = list(best.values())[:count]
    extra = [i for i in np.argsort(-area, kind="stable") if area[i] and i not in picks]
    return (picks + extra[: count - len(picks)]) or list(range(min(count, len(area))))


def write_figure(test, maps, picks, path, metrics, options, calibrated, predicted):
    """The paper's Fig. 5: frame, ground truth, attention per layer, recon difference,
    titled with the subset, the method and its AUROC. Each map has one colour scale for
    the whole test set, from the held-out normal frames (keras_vae_attn/predictions.py),
    with its colorbar; the attention cells show the frame's score and predicted label."""
    from keras_vae_attn import viz
    from keras_vae_attn.data import to_float
    from keras_vae_attn.evaluate import ATTENTION
    from keras_vae_attn.predictions import scale_label

    frames = to_float(test.images[picks])
    notes = prediction_notes(predicted, picks)
    order = [name for name in maps if name != RECON] + [RECON]  # attention maps, recon
    columns = [("frame", viz.to_rgb(frames)), ("ground truth", test.masks[picks])]
    for name in order:
        auroc = metrics["methods"][name]["pixel_auroc"]
        columns.append(
            viz.Heatmaps(
                label(name) + (f"\n(pixel AUROC {auroc:.3f})" if auroc is not None else ""),
                maps[name][picks],
                calibrated.scales[name],
                scale_label(name, calibrated),
                calibrated.thresholds.pixel if name == ATTENTION else None,
                notes if name == ATTENTION else None,
                overlay=name != RECON,
            )
        )
    method = metrics["methods"][ATTENTION]
    title = viz.method_title(
        f"UCSD {metrics['subset']}",
        options.describe(),
        method["pixel_auroc"],
        method["image_auroc"],
    )
    viz.save_figure(
        viz.heatmap_figure(
            frames,
            columns,
            title=title,
            row_titles=[f"{test.groups[i]}/{os.path.basename(test.paths[i])}" for i in picks],
        ),
        path,
    )


def main(argv: list[str] | None = None) -> str:
    return localization.run(UCSD(), parse_args(argv))


if __name__ == "__main__":
    guard.main_guard(main)
