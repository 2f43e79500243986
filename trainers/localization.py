"""The localization experiment every image trainer runs (MVTec, UCSD, MNIST)."""

from __future__ import annotations

import os

from trainers import run_dirs


def fit_and_record_options(model, normal_images, options, batch_size, run_dir):
    """The options a run is evaluated and exported with: the per-layer scales a
    multi-layer --layer needs fitted on ``normal_images`` (float, the normal training
    images), then stored in config.json for the exporters. Returns them."""
    if options.needs_scales:
        from keras_vae_attn.explain import pipeline

        options = pipeline.fit_layer_scales(model, normal_images, options, batch_size)
    run_dirs.record_options(run_dir, options)
    return options


def write_localization_predictions(
    args, run_dir, model, options, held_out, test, groups, group_column, attention, others=None
):
    """predictions.csv and thresholds.json of an MVTec or UCSD run (with
    --save-predictions-png one PNG per test image), calibrated on the held-out normal
    training images. ``groups``: the defect type or clip of each test image, written as
    ``group_column``; ``others``: {name: ExplainOptions} whose maps get a colour scale.
    Returns (metrics.json entry, Calibration, predictions)."""
    from keras_vae_attn import predictions
    from keras_vae_attn.data import to_float

    source = predictions.describe_source(args.calibration_holdout, len(held_out))
    calibrated = predictions.calibrate(
        model, to_float(held_out), options, args.eval_batch_size, source, others
    )
    predicted = predictions.predict(attention, calibrated.thresholds)
    files = [os.path.relpath(path, args.data_dir) for path in test.paths]
    entry = predictions.write(
        run_dir, files, groups, group_column, test.labels, predicted, calibrated
    )
    entry["calibration_images"] = len(held_out)
    if args.save_predictions_png:
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
