"""Per-image predictions of a run, at thresholds calibrated on held-out normal images.

Beside ``metrics.json`` a run writes:
  predictions.csv  one row per test image: file, its group (defect type, clip or digit),
                   label (1 = anomalous), image_score (the raw score an exported graph
                   returns: the max of the heatmap), pred_score (the score on [0, 1] with
                   the image threshold at 0.5), pred_label (1 = above the threshold) and
                   pred_mask_fraction (share of pixels above the pixel threshold)
  thresholds.json  those thresholds, as ``export.saved_model --thresholds`` reads them, so
                   an exported graph decides as predictions.csv does

The thresholds are :func:`keras_vae_attn.calibration.from_model` on normal training
images the model was not trained on (:func:`keras_vae_attn.data.split_held_out`, the
export pipeline's hold-out too); the decisions are
:func:`keras_vae_attn.calibration.decide`, as in an exported graph.
"""

from __future__ import annotations

import csv
import os
from typing import Any, NamedTuple

import numpy as np

from keras_vae_attn import calibration
from keras_vae_attn.data import split_held_out as split_held_out  # the one hold-out scheme
from keras_vae_attn.evaluate import ATTENTION, RECON
from keras_vae_attn.explain import pipeline
from keras_vae_attn.runs import PREDICTIONS, THRESHOLDS, staged, write_json

FOLDER = "predictions"  # the optional per-image PNGs


class Calibration(NamedTuple):
    """Thresholds, and the colour scale of each map in the figures (module doc)."""

    thresholds: calibration.Thresholds
    scales: dict  # {map name: vmax}: twice the 99.5th percentile on the normal images
    source: str  # which normal images, in words


def describe_source(fraction: float, held_out: int) -> str:
    """The words predictions.csv's metrics use for the calibration images."""
    if fraction > 0:
        return (
            f"the last {fraction:.0%} of the normal training images ({held_out}), "
            "not trained on"
        )
    return f"the {held_out} normal training images (no held-out split)"


def display_scale(maps: Any) -> float:
    """The colour-scale top of a figure's maps: twice their 99.5th percentile on normal
    images (for the method, where ``heatmap_normalized`` reaches 1)."""
    return max(2.0 * float(np.percentile(maps, calibration.PIXEL_PERCENTILE)), 1e-12)


def calibrate(
    model: Any,
    normal_images: Any,
    options: Any,
    batch_size: int,
    source: str,
    others: dict | None = None,
) -> Calibration:
    """Thresholds from held-out ``normal_images`` (float (N, H, W, C)) and the colour
    scale of the method's map, the reconstruction difference and each of ``others``
    ({name: ExplainOptions}, e.g. single-layer ablations)."""
    thresholds, out = calibration.from_model(
        model, normal_images, options, batch_size, keys=(RECON,)
    )
    scales = {ATTENTION: 2.0 * max(thresholds.pixel, 1e-12), RECON: display_scale(out[RECON])}
    for name, other in (others or {}).items():
        maps = pipeline.batched(model, normal_images, batch_size, other, keys=("heatmap",))
        scales[name] = display_scale(maps["heatmap"])
    return Calibration(thresholds, scales, source)


def scale_label(name: str, calibrated: Calibration) -> str:
    """A colorbar label: the scale is shared by all images, and what its top is."""
    top = calibrated.scales[name]
    if name == ATTENTION:
        pixel = calibrated.thresholds.pixel
        return (
            f"one scale for all images: 0 to {top:.3g} = 2x the pixel threshold "
            f"{pixel:.3g} (white line), the {calibration.PIXEL_PERCENTILE}th "
            f"percentile of the map on {calibrated.source}"
        )
    return (
        f"one scale for all images: 0 to {top:.3g} = 2x the "
        f"{calibration.PIXEL_PERCENTILE}th percentile of the map on {calibrated.source}"
    )


def predict(
    heatmaps: Any, thresholds: calibration.Thresholds, batch_size: int = 256
) -> dict[str, np.ndarray]:
    """Per-image decisions from the method's maps (N, H, W) at the run's smoothing:
    image_score (their max, as the exported graph), pred_score, pred_label and
    pred_mask_fraction (numpy arrays), by :func:`calibration.decide`."""
    heatmaps = np.asarray(heatmaps, np.float32)
    scores = heatmaps.max(axis=(1, 2))
    labels, fractions = [], []
    for start in range(0, len(heatmaps), batch_size):
        decided = calibration.decide(
            heatmaps[start : start + batch_size],
            scores[start : start + batch_size],
            thresholds,
        )
        labels.append(decided["pred_label"].numpy())
        fractions.append(decided["pred_mask"].numpy().mean(axis=(1, 2)))
    return {
        "image_score": scores,
        "pred_score": calibration.normalize(scores, thresholds.image).numpy(),
        "pred_label": np.concatenate(labels),
        "pred_mask_fraction": np.concatenate(fractions),
    }


def write(
    run_dir: str,
    files: list,
    groups: list,
    group_name: str,
    labels: Any,
    predicted: dict,
    calibrated: Calibration,
) -> dict:
    """predictions.csv and thresholds.json into ``run_dir``; returns the metrics.json
    entry (the files, thresholds, calibration images and counts at the threshold)."""
    labels = np.asarray(labels).astype(int)
    columns = [
        "file",
        group_name,
        "label",
        "image_score",
        "pred_score",
        "pred_label",
        "pred_mask_fraction",
    ]
    with (
        staged(os.path.join(run_dir, PREDICTIONS), replace=True) as partial,
        open(partial, "w", newline="", encoding="utf-8") as handle,
    ):
        writer = csv.writer(handle)
        writer.writerow(columns)
        for i, name in enumerate(files):
            writer.writerow(
                [
                    name,
                    groups[i],
                    labels[i],
                    f"{predicted['image_score'][i]:.6g}",
                    f"{predicted['pred_score'][i]:.4f}",
                    int(predicted["pred_label"][i]),
                    f"{predicted['pred_mask_fraction'][i]:.4f}",
                ]
            )
    thresholds = {**calibrated.thresholds.as_dict(), "calibrated_on": calibrated.source}
    write_json(os.path.join(run_dir, THRESHOLDS), thresholds)
    pred = np.asarray(predicted["pred_label"], bool)
    truth = labels.astype(bool)
    return {
        "file": PREDICTIONS,
        "thresholds_file": THRESHOLDS,
        "thresholds": thresholds,
        "at_threshold": {
            "true_positive": int((pred & truth).sum()),
            "false_positive": int((pred & ~truth).sum()),
            "false_negative": int((~pred & truth).sum()),
            "true_negative": int((~pred & ~truth).sum()),
        },
    }


def save_images(
    run_dir: str,
    files: list,
    images: Any,
    heatmaps: Any,
    masks: Any,
    predicted: dict,
    calibrated: Calibration,
) -> str:
    """One PNG per test image into ``<run>/predictions/``: input, heatmap (colorbar on
    the run's shared scale), ground-truth mask and the mask predicted at the pixel
    threshold. Returns the folder."""
    from keras_vae_attn import viz

    folder = os.path.join(run_dir, FOLDER)
    os.makedirs(folder, exist_ok=True)
    thresholds = calibrated.thresholds
    for i, name in enumerate(files):
        score, label = predicted["image_score"][i], predicted["pred_label"][i]
        columns = [
            ("input", viz.to_rgb(images[i : i + 1])),
            viz.Heatmaps(
                "anomaly attention",
                heatmaps[i : i + 1],
                calibrated.scales[ATTENTION],
                scale_label(ATTENTION, calibrated),
                thresholds.pixel,
            ),
            ("ground truth", masks[i : i + 1]),
            ("predicted mask", heatmaps[i : i + 1] > thresholds.pixel),
        ]
        title = (
            f"{name}: score {score:.3g} {'>' if label else '<='} image threshold "
            f"{thresholds.image:.3g}: {'anomalous' if label else 'normal'}"
        )
        stem = os.path.splitext(name)[0].replace(os.sep, "__").replace("/", "__")
        viz.save_figure(
            viz.heatmap_figure(images[i : i + 1], columns, title=title, cell_inches=2.0),
            os.path.join(folder, f"{stem}.png"),
        )
    return folder
