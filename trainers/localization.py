"""The localization experiment every image trainer runs, once: load, hold out the
calibration images, options, train (or load --model-dir), fit the statistics, evaluate
with the references and the randomization check, predictions, figures, complete.

A dataset's trainer fills in a :class:`LocalizationExperiment`: its loader (a
LocalizationSplit of test images), its model, its evaluation rows, its figure and its
report; ``main`` is ``localization.run(experiment, args)``.
"""

from __future__ import annotations

import os
import sys
import time
from argparse import Namespace
from typing import Any, NamedTuple

import numpy as np

from keras_vae_attn.data import LocalizationSplit, to_float
from keras_vae_attn.explain.options import ExplainOptions
from trainers import guard, run_dirs, sanity


class Evaluation(NamedTuple):
    """What an experiment's evaluation gives the flow: ``metrics`` (metrics.json entries),
    ``roc`` {label: (fpr, tpr, auc)}, ``maps`` {method: (N, H, W)} (the headline
    attention under evaluate.ATTENTION), printable ``lines`` and the
    evaluate.Localization ``result`` (None for image-level experiments)."""

    metrics: dict
    roc: dict
    maps: dict
    lines: list
    result: Any = None


class Trained(NamedTuple):
    """The run's model and its training: {loss: [per epoch]} ({} when loaded), the
    training seconds, the normal images it was trained on (uint8) and those held out."""

    model: Any
    history: dict
    seconds: float
    normal: np.ndarray
    held_out: np.ndarray


class LocalizationExperiment:
    """What a localization trainer fills in; the defaults are the MVTec/UCSD ones."""

    #: the dataset's name in keras_vae_attn/data/registry.py, written into config.json
    #: so the run's data are reopened by name
    dataset = ""
    #: the word of the console lines and predictions ("images", "frames")
    unit = "images"
    #: predictions.csv's column holding LocalizationSplit.groups
    group_column = "group"
    #: batch of the un-augmented normal images the statistics are fitted on
    stats_batch = 64
    #: the run's evaluation logged into TensorBoard with a few test heatmaps
    tensorboard_examples = True

    # --- filled in by each dataset ------------------------------------------------
    def load(self, args: Namespace) -> tuple[np.ndarray, LocalizationSplit]:
        """(normal training images uint8 (N, H, W, C), the test split, images uint8)."""
        raise NotImplementedError

    def folder(self, args: Namespace) -> str:
        """The run folders' parent under --runs-root (e.g. ``mvtec-bottle``)."""
        raise NotImplementedError

    def evaluate(
        self,
        args: Namespace,
        model: Any,
        normal: np.ndarray,
        test: LocalizationSplit,
        options: ExplainOptions,
        pixels: Any,
        twin: Any,
    ) -> Evaluation:
        """The test split scored by every method (``normal`` uint8, ``pixels`` their
        PixelDistribution, ``twin`` the randomized VAE or None)."""
        raise NotImplementedError

    def run_metrics(
        self,
        args: Namespace,
        trained: Trained,
        test: LocalizationSplit,
        options: ExplainOptions,
        evaluation: Evaluation,
    ) -> dict:
        """The run's own metrics.json entries beside the evaluation's."""
        raise NotImplementedError

    def figures(
        self,
        args: Namespace,
        model: Any,
        test: LocalizationSplit,
        evaluation: Evaluation,
        metrics: dict,
        run_dir: str,
        options: ExplainOptions,
        calibrated: Any,
        predicted: dict,
    ) -> list[str]:
        """Write the experiment's figures into ``run_dir``; their file names."""
        raise NotImplementedError

    def report(
        self,
        args: Namespace,
        run_dir: str,
        metrics: dict,
        evaluation: Evaluation,
        figures: list[str],
        trained: Trained,
    ) -> list[str]:
        """The lines printed on stdout at the end of the run."""
        raise NotImplementedError

    # --- defaults a dataset may change -------------------------------------------
    def title(self, args: Namespace) -> str:
        """What the check figures are titled with (dataset and size)."""
        return f"{args.image_size}x{args.image_size}"

    def check(self, args: Namespace, options: ExplainOptions) -> None:
        """Refuse what the flags ask and the model cannot do, before any run folder."""

    def load_model(self, args: Namespace) -> Any:
        """The saved model of --model-dir, checked against the flags' image shape."""
        from keras_vae_attn.models import load_vae

        model = load_vae(args.model_dir)
        expected = list(self.model_shape(args))
        if list(model.spec["input_shape"]) != expected:
            raise SystemExit(
                f"error: the model in {args.model_dir!r} takes "
                f"{model.spec['input_shape']} {self.unit}; {self.shape_hint(args, expected)}"
            )
        return model

    def model_shape(self, args: Namespace) -> tuple[int, int, int]:
        return (args.image_size, args.image_size, getattr(args, "channels", 1))

    def build_model(self, args: Namespace) -> Any:
        """The untrained VAE of these flags (--backbone, default the small one)."""
        from keras_vae_attn.models import build_vae

        return build_vae(
            getattr(args, "backbone", "small"),
            self.model_shape(args),
            args.latent_dim,
            recon_loss=args.loss,
            beta=getattr(args, "beta", 1.0),
            seed=args.seed,
        )

    def shape_hint(self, args: Namespace, expected: list) -> str:
        return f"pass the matching --image-size (got {args.image_size})"

    def feature_layers(self, args: Namespace, options: ExplainOptions) -> list[str]:
        """The layers whose normal feature distributions the run fits."""
        return list(options.layers)

    def watch_picks(self, test: LocalizationSplit) -> list[int]:
        """The test images shown in TensorBoard while training."""
        return list(range(min(4, len(test.labels))))

    def train_batches(self, args: Namespace, normal: np.ndarray) -> Any:
        """The (augmented, shuffled, seeded) training stream."""
        from keras_vae_attn.data import augment

        return augment.train_dataset(normal, args.batch_size, None, args.seed)

    def stats_batches(self, normal: np.ndarray) -> Any:
        """Un-augmented normal batches (float) the statistics are fitted on."""
        from keras_vae_attn.data import augment

        return augment.train_dataset(normal, self.stats_batch, shuffle=False)

    def batch_norm_batches(self, args: Namespace, normal: np.ndarray) -> Any:
        """The batches BatchNorm's statistics are re-estimated over (None: stats_batches)."""
        from keras_vae_attn.data import augment

        return augment.train_dataset(normal, args.batch_size, shuffle=False)

    def eval_batch(self, args: Namespace) -> int:
        return args.eval_batch_size

    def localize(
        self,
        args: Namespace,
        model: Any,
        normal: np.ndarray,
        test: LocalizationSplit,
        options: ExplainOptions,
        pixels: Any,
        twin: Any,
    ) -> Any:
        """The anomaly attention beside every reference on the test split
        (keras_vae_attn/evaluate.localize): an evaluate.Localization."""
        from keras_vae_attn import evaluate

        return evaluate.localize(
            model,
            to_float(test.images),
            test.masks,
            test.labels,
            options,
            pixels,
            to_float(normal),
            self.eval_batch(args),
            progress=lambda it, desc="": guard.progress(it, args.quiet, desc=desc),
            twin=twin,
        )

    def checks(
        self,
        args: Namespace,
        run_dir: str,
        model: Any,
        evaluation: Evaluation,
        test: LocalizationSplit,
        options: ExplainOptions,
        normal: np.ndarray,
        pixels: Any,
        twin: Any,
    ) -> tuple[dict, list[str]]:
        """The explanation checks (trainers/sanity.py): (metrics entries, lines)."""
        return sanity.run(
            args,
            run_dir,
            model,
            evaluation.result,
            to_float(test.images),
            test.masks,
            test.labels,
            options,
            to_float(normal),
            pixels,
            self.title(args),
        )

    def other_maps(self, args: Namespace, options: ExplainOptions) -> dict | None:
        """{method: ExplainOptions} of further maps that get a calibrated colour scale."""
        return None

    def prediction_files(self, args: Namespace, test: LocalizationSplit) -> list:
        """The test images' names in predictions.csv (relative to the dataset root)."""
        return [os.path.relpath(path, args.data_dir) for path in test.paths]

    def roc_title(self, args: Namespace) -> str:
        raise NotImplementedError


def run(experiment: LocalizationExperiment, args: Namespace) -> str:
    """The experiment's run on flags ``args`` (checked by its parser); its run folder."""
    from keras_vae_attn import references, viz
    from keras_vae_attn.evaluate import ATTENTION
    from keras_vae_attn.explain.options import ExplainOptions

    normal, test = experiment.load(args)
    normal, held_out = hold_out(normal, args.calibration_holdout)
    options = ExplainOptions.from_config({"explain": args.explain})
    experiment.check(args, options)
    model = experiment.load_model(args) if getattr(args, "model_dir", None) else None
    args.dataset = experiment.dataset
    run_dir = run_dirs.run_dir_for(args, experiment.folder(args))
    print(f"run folder: {run_dir}", file=sys.stderr)
    trained = train_or_load(experiment, args, model, normal, held_out, test, options, run_dir)
    model = trained.model
    options = fit_and_record_options(
        model, to_float(normal), options, experiment.eval_batch(args), run_dir
    )
    started = time.perf_counter()
    pixels = references.fit_pixel_distribution(normal)
    twin = sanity.twin_for(args, model, to_float(normal), options)
    evaluation = experiment.evaluate(args, model, normal, test, options, pixels, twin)
    checked, check_lines = experiment.checks(
        args, run_dir, model, evaluation, test, options, normal, pixels, twin
    )
    metrics = evaluation.metrics
    metrics.update(checked)
    evaluation.lines.extend(check_lines)
    metrics.update(experiment.run_metrics(args, trained, test, options, evaluation))
    metrics["seconds"] = {"train": trained.seconds, "evaluate": time.perf_counter() - started}
    if trained.history:
        viz.save_curves(trained.history, os.path.join(run_dir, "curves.png"))
    if evaluation.roc or test.masks is not None:
        viz.save_roc(
            evaluation.roc, os.path.join(run_dir, "roc.png"), title=experiment.roc_title(args)
        )
    metrics["predictions"], calibrated, predicted = write_predictions(
        experiment, args, run_dir, model, options, held_out, test, evaluation.maps[ATTENTION]
    )
    figures = experiment.figures(
        args, model, test, evaluation, metrics, run_dir, options, calibrated, predicted
    )
    examples = (test.images, evaluation.maps[ATTENTION], test.labels)
    run_dirs.complete_run(
        run_dir, metrics, examples if experiment.tensorboard_examples else None
    )
    print("\n".join(experiment.report(args, run_dir, metrics, evaluation, figures, trained)))
    return run_dir


def hold_out(normal: np.ndarray, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(trained on, held out for calibration); a fraction that leaves nothing to train
    on ends the run with one line naming --calibration-holdout."""
    from keras_vae_attn.data import split_held_out

    try:
        return split_held_out(normal, fraction)
    except ValueError as error:
        raise SystemExit(f"error: --calibration-holdout {fraction}: {error}") from None


def train_or_load(
    experiment: LocalizationExperiment,
    args: Namespace,
    model: Any,
    normal: np.ndarray,
    held_out: np.ndarray,
    test: LocalizationSplit,
    options: ExplainOptions,
    run_dir: str,
) -> Trained:
    """Train the experiment's VAE (trainers/fit.fit_one_class), or give the loaded
    --model-dir ``model`` the statistics the run's maps need and it lacks."""
    layers = experiment.feature_layers(args, options)
    if model is not None:
        from keras_vae_attn.explain import pipeline

        pipeline.fit_missing_statistics(
            model, experiment.stats_batches(normal), options.replace(layers=tuple(layers))
        )
        return Trained(model, {}, 0.0, normal, held_out)
    from keras_vae_attn.callbacks import AttentionImages
    from trainers import fit

    watch = AttentionImages(
        to_float(test.images[experiment.watch_picks(test)]),
        os.path.join(run_dir, run_dirs.TENSORBOARD),
        options.layer,
    )
    model, history, seconds = fit.fit_one_class(
        args,
        lambda: experiment.build_model(args),
        experiment.train_batches(args, normal),
        experiment.stats_batches(normal),
        run_dir,
        watch,
        layers,
        batch_norm_batches=experiment.batch_norm_batches(args, normal),
        covariance=options.needs_covariance,
    )
    return Trained(model, history, seconds, normal, held_out)


def fit_and_record_options(
    model: Any,
    normal_images: np.ndarray,
    options: ExplainOptions,
    batch_size: int,
    run_dir: str,
) -> ExplainOptions:
    """The options a run is evaluated and exported with: the per-layer scales a
    multi-layer --layer needs fitted on ``normal_images`` (float, the normal training
    images), then stored in config.json for the exporters. Returns them."""
    if options.needs_scales:
        from keras_vae_attn.explain import pipeline

        options = pipeline.fit_layer_scales(model, normal_images, options, batch_size)
    run_dirs.record_options(run_dir, options)
    return options


def write_predictions(
    experiment: LocalizationExperiment,
    args: Namespace,
    run_dir: str,
    model: Any,
    options: ExplainOptions,
    held_out: np.ndarray,
    test: LocalizationSplit,
    attention: np.ndarray,
) -> tuple[dict, Any, dict]:
    """predictions.csv and thresholds.json (with --save-predictions-png one PNG per test
    image), calibrated on the held-out normal training images. Returns (metrics.json
    entry, Calibration, predictions)."""
    from keras_vae_attn import predictions

    source = predictions.describe_source(args.calibration_holdout, len(held_out))
    calibrated = predictions.calibrate(
        model,
        to_float(held_out),
        options,
        experiment.eval_batch(args),
        source,
        experiment.other_maps(args, options),
    )
    predicted = predictions.predict(attention, calibrated.thresholds)
    files = experiment.prediction_files(args, test)
    entry = predictions.write(
        run_dir,
        files,
        test.groups,
        experiment.group_column,
        test.labels,
        predicted,
        calibrated,
    )
    entry["calibration_images"] = len(held_out)
    if getattr(args, "save_predictions_png", False):
        entry["png_folder"] = os.path.basename(
            predictions.save_images(
                run_dir,
                files,
                to_float(test.images),
                attention,
                test.masks,
                predicted,
                calibrated,
            )
        )
    return entry, calibrated, predicted


def prediction_notes(predicted: dict, picks: list[int]) -> list[str]:
    """Each picked image's score and predicted label, as the figures' cells show them."""
    return [
        f"score {predicted['image_score'][i]:.3g}\n"
        f"{'anomalous' if predicted['pred_label'][i] else 'normal'}"
        for i in picks
    ]
