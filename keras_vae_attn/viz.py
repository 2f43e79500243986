"""Figures: heatmap overlays, image grids, ROC curves, written as PNG."""
from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from keras_vae_attn.attention import normalize_maps  # noqa: E402


def colorize(maps, cmap="jet", vmax=None):
    """(..., H, W) maps -> (..., H, W, 3) float RGB in [0, 1].

    Each map is min-max scaled on its own unless ``vmax`` is given; then all maps share
    the scale [0, vmax], so a quiet map stays cool next to a hot one.
    """
    if vmax is None:
        scaled = normalize_maps(maps)
    else:
        scaled = np.clip(np.asarray(maps, np.float32) / max(float(vmax), 1e-12), 0.0, 1.0)
    return matplotlib.colormaps[cmap](scaled)[..., :3].astype(np.float32)


def to_rgb(images):
    """(B, H, W[, 1 or 3]) images in [0, 1] -> (B, H, W, 3) float RGB."""
    images = np.asarray(images, np.float32)
    if images.ndim == 3:
        images = images[..., None]
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    return np.clip(images, 0.0, 1.0)


def overlay(images, maps, alpha=0.5, cmap="jet", vmax=None):
    """Blend a colour heatmap over each image: (B, H, W, C) + (B, H, W) -> uint8 RGB.

    By default each map is scaled to [0, 1] on its own, so the overlay shows where a
    map is high; pass ``vmax`` to put all maps on one scale and compare images.
    """
    images = to_rgb(images)
    heat = colorize(maps, cmap, vmax)
    if heat.shape[1:3] != images.shape[1:3]:
        raise ValueError(f"maps of size {heat.shape[1:3]} do not match images of size "
                         f"{images.shape[1:3]}; upsample the maps first")
    return np.round(255 * ((1 - alpha) * images + alpha * heat)).astype(np.uint8)


def save_grid(rows, path, column_titles=None, row_titles=None, cell_inches=1.6, dpi=100):
    """Write a grid of images (each (H, W), (H, W, 1) or (H, W, 3)) as one PNG."""
    n_rows, n_cols = len(rows), max(len(row) for row in rows)
    fig, axes = plt.subplots(n_rows, n_cols, squeeze=False,
                             figsize=(cell_inches * n_cols, cell_inches * n_rows))
    for r, row in enumerate(rows):
        for c in range(n_cols):
            axis = axes[r][c]
            axis.set_xticks([])
            axis.set_yticks([])
            if c < len(row) and row[c] is not None:
                image = np.asarray(row[c])
                if image.ndim == 3 and image.shape[-1] == 1:
                    image = image[..., 0]
                axis.imshow(image, cmap="gray" if image.ndim == 2 else None,
                            vmin=0 if image.ndim == 2 else None,
                            vmax=1 if image.ndim == 2 and image.dtype != np.uint8 else None)
            else:
                axis.axis("off")
            if r == 0 and column_titles and c < len(column_titles):
                axis.set_title(column_titles[c], fontsize=8)
            if c == 0 and row_titles and r < len(row_titles):
                axis.set_ylabel(row_titles[r], fontsize=8)
    fig.tight_layout()
    _save(fig, path, dpi)


def save_roc(curves, path, title="ROC"):
    """``curves``: {label: (fpr, tpr, auc)}; one line each, chance diagonal dashed."""
    fig, axis = plt.subplots(figsize=(4.5, 4.5))
    for label, (fpr, tpr, auc) in curves.items():
        axis.plot(fpr, tpr, label=f"{label} (AUROC {auc:.3f})")
    axis.plot([0, 1], [0, 1], "k--", linewidth=0.8)
    axis.set_xlabel("false positive rate")
    axis.set_ylabel("true positive rate")
    axis.set_title(title)
    axis.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    _save(fig, path, 100)


def save_curves(history, path, title="training"):
    """Each series of a ``History.history``-like dict against its epoch, one panel per
    series: the loss (~1e4) and the KL (~1e1) do not share a readable axis."""
    names = list(history)
    fig, axes = plt.subplots(1, max(len(names), 1), figsize=(3.2 * max(len(names), 1), 3),
                             squeeze=False)
    for axis, name in zip(axes[0], names):
        values = history[name]
        axis.plot(np.arange(1, len(values) + 1), values, marker="." if len(values) < 30 else None)
        axis.set_xlabel("epoch")
        axis.set_title(name, fontsize=9)
        axis.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    _save(fig, path, 100)


def save_score_curve(steps, scores, final, path, title, ylabel):
    """A score measured during training against the step, with the final (step, score)
    as a star: shows whether a longer run would have helped."""
    fig, axis = plt.subplots(figsize=(6, 4))
    axis.plot(steps, scores, marker="o", label="during training")
    axis.plot([final[0]], [final[1]], marker="*", markersize=14, linestyle="",
              label="final")
    axis.set_xlabel("training step")
    axis.set_ylabel(ylabel)
    axis.set_ylim(0, 1)
    axis.set_title(title)
    axis.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path, 100)


def save_seed_scores(rows, path, title, ylabel):
    """One bar per method at its mean score (sample std as the error bar) with each seed
    as a dot: how far apart methods are against how much seeds scatter.

    ``rows``: {method: list of per-seed scores}.
    """
    fig, axis = plt.subplots(figsize=(7, 3.6))
    for position, (method, scores) in enumerate(rows.items()):
        scores = np.asarray(scores, np.float64)
        spread = scores.std(ddof=1) if len(scores) > 1 else 0.0
        axis.bar(position, scores.mean(), color="#9ecae1", width=0.6)
        axis.errorbar(position, scores.mean(), yerr=spread, color="k", capsize=6)
        axis.scatter(np.full(len(scores), position), scores, color="#08519c", zorder=3,
                     label="one seed" if position == 0 else None)
    axis.set_xticks(range(len(rows)), [m.replace(" (", "\n(") for m in rows], fontsize=8)
    axis.set_ylim(0, 1)
    axis.set_ylabel(ylabel)
    axis.set_title(title)
    axis.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    _save(fig, path, 100)


def _save(fig, path, dpi):
    """Write to a temporary name and rename, so a reader never sees half a PNG."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    partial = path + ".partial.png"
    fig.savefig(partial, dpi=dpi)
    plt.close(fig)
    os.replace(partial, path)
