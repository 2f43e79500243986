"""The evaluate stage's numbers: thresholds calibrated on data the model was not
trained on, and the test-set decisions the exported model makes at them."""

from __future__ import annotations

import os
from typing import Any

BATCH = 16


def calibrate_run(
    model: Any,
    options: Any,
    train_config: dict[str, Any],
    held_out: list[str],
    category: str,
    validation_dir: str | None,
    pixel_percentile: float,
    image_percentile: float,
) -> tuple[Any, str]:
    """Thresholds for a trained run: F1-optimal on the labelled test split of
    ``validation_dir`` when given, else the percentiles of the ``held_out`` normal
    images' heatmaps and scores. Returns (Thresholds, which images, in words)."""
    from keras_vae_attn import calibration
    from keras_vae_attn.data import mvtec
    from keras_vae_attn.explain import pipeline as explain_pipeline

    size, channels = train_config["image_size"], train_config.get("channels", 3)
    keys = ("heatmap", "score")
    if validation_dir:
        split = mvtec.load_test(validation_dir, category, size, channels)
        out = explain_pipeline.batched(
            model, mvtec.to_float(split.images), BATCH, options, keys=keys
        )
        return calibration.from_labelled(
            out["heatmap"], split.masks, out["score"], split.labels
        ), f"the labelled test split of {validation_dir}"
    images, _ = mvtec.decode_files(held_out, size, channels)
    thresholds = calibration.from_model(
        model, mvtec.to_float(images), options, BATCH, pixel_percentile, image_percentile
    )[0]
    return thresholds, (
        f"the {len(held_out)} normal training images the pipeline held "
        "out (--holdout), not trained on"
    )


def served_predictions(
    model: Any,
    options: Any,
    train_config: dict[str, Any],
    data_dir: str,
    category: str,
    thresholds: Any,
    source: str,
    out_dir: str,
) -> dict[str, Any]:
    """predictions.csv and thresholds.json into ``out_dir``: the decisions at
    ``thresholds`` on the test images the trainer evaluated (its image size and
    --max-test), i.e. what the exported model answers for them. Returns the metrics.json
    entry (counts at the threshold)."""
    from keras_vae_attn import predictions
    from keras_vae_attn.data import mvtec
    from keras_vae_attn.explain import pipeline as explain_pipeline

    test = mvtec.load_test(
        data_dir,
        category,
        train_config["image_size"],
        train_config.get("channels", 3),
        limit=train_config.get("max_test"),
        skip_corrupt=bool(train_config.get("skip_corrupt")),
    )
    maps = explain_pipeline.batched(
        model, mvtec.to_float(test.images), BATCH, options, keys=("heatmap",)
    )["heatmap"]
    decided = predictions.predict(maps, thresholds)
    files = [os.path.relpath(path, data_dir) for path in test.paths]
    calibrated = predictions.Calibration(thresholds, {}, source)
    return predictions.write(
        out_dir, files, test.defects, "defect_type", test.labels, decided, calibrated
    )
