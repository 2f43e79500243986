"""Figures: heatmap overlays, image grids, ROC curves, written as PNG."""

from __future__ import annotations

import os
import textwrap
from typing import NamedTuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from keras_vae_attn import runs
from keras_vae_attn.attention import normalize_maps


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
        raise ValueError(
            f"maps of size {heat.shape[1:3]} do not match images of size "
            f"{images.shape[1:3]}; upsample the maps first"
        )
    return np.round(255 * ((1 - alpha) * images + alpha * heat)).astype(np.uint8)


class Heatmaps(NamedTuple):
    """One heatmap column of :func:`heatmap_figure`: ``maps`` (N, H, W) drawn on the one
    colour scale [0, ``vmax``] that every image of the figure shares.

    ``scale``: what ``vmax`` is, for the colorbar label; consecutive columns with the same
    ``vmax`` and ``scale`` share one colorbar. ``mark``: a value drawn on the colorbar
    (the threshold). ``notes``: a text per image written on its cell (e.g. its score).
    ``overlay``: blend over the images (else the colour map alone).
    """

    title: str
    maps: np.ndarray
    vmax: float
    scale: str
    mark: float | None = None
    notes: list | None = None
    overlay: bool = True


def heatmap_figure(images, columns, row_titles=None, title=None, cell_inches=1.6):
    """A figure that reads on its own: one row per image, one column per entry of
    ``columns``, each a (title, (N, ...) images) pair shown as it is or a
    :class:`Heatmaps` column with its colorbar (a labelled, shared scale) underneath.

    ``images`` (N, H, W, C) in [0, 1] are what heatmaps are blended over. Returns the
    matplotlib Figure (:func:`save_figure` writes it).
    """
    cells = [[] for _ in range(len(images))]
    notes, bars = {}, []
    for index, column in enumerate(columns):
        if isinstance(column, Heatmaps):
            vmax = max(float(column.vmax), 1e-12)
            shown = (
                overlay(images, column.maps, vmax=vmax)
                if column.overlay
                else colorize(column.maps, vmax=vmax)
            )
            for row, text in enumerate(column.notes or []):
                if text:
                    notes[(row, index)] = text
            key = (vmax, column.scale, column.mark)
            if bars and bars[-1][0] == key and bars[-1][1][-1] == index - 1:
                bars[-1][1].append(index)
            else:
                bars.append((key, [index]))
        else:
            shown = column[1]
        for row in range(len(images)):
            cells[row].append(shown[row])
    titles = [c.title if isinstance(c, Heatmaps) else c[0] for c in columns]
    return grid_figure(
        cells,
        column_titles=titles,
        row_titles=row_titles,
        title=title,
        cell_inches=cell_inches,
        notes=notes,
        colorbars=[(cols, *key) for key, cols in bars],
    )


def grid_figure(
    rows,
    column_titles=None,
    row_titles=None,
    cell_inches=1.6,
    title=None,
    notes=None,
    colorbars=(),
):
    """A grid of images (each (H, W), (H, W, 1) or (H, W, 3)) as a Figure.

    ``notes``: {(row, column): text} written on a cell. ``colorbars``: (columns, vmax,
    label, mark) per colour scale, drawn under those columns from 0 to vmax, with
    ``mark`` (or None) as a white line.
    """
    n_rows, n_cols = len(rows), max(len(row) for row in rows)
    extra = (0.5 if title else 0) + (0.7 if colorbars else 0)
    fig, axes = plt.subplots(
        n_rows,
        n_cols,
        squeeze=False,
        layout="constrained",
        figsize=(cell_inches * n_cols, cell_inches * n_rows + extra),
    )
    for r, row in enumerate(rows):
        for c in range(n_cols):
            axis = axes[r][c]
            axis.set_xticks([])
            axis.set_yticks([])
            if c < len(row) and row[c] is not None:
                image = np.asarray(row[c])
                if image.ndim == 3 and image.shape[-1] == 1:
                    image = image[..., 0]
                axis.imshow(
                    image,
                    cmap="gray" if image.ndim == 2 else None,
                    vmin=0 if image.ndim == 2 else None,
                    vmax=1 if image.ndim == 2 and image.dtype != np.uint8 else None,
                )
            else:
                axis.axis("off")
            if (r, c) in (notes or {}):
                axis.text(
                    0.03,
                    0.97,
                    notes[(r, c)],
                    transform=axis.transAxes,
                    fontsize=6,
                    va="top",
                    ha="left",
                    color="white",
                    bbox=dict(facecolor="black", alpha=0.6, pad=1.0, linewidth=0),
                )
            if r == 0 and column_titles and c < len(column_titles):
                axis.set_title(column_titles[c], fontsize=8)
            if c == 0 and row_titles and r < len(row_titles):
                axis.set_ylabel(row_titles[r], fontsize=7)
    width = cell_inches * n_cols
    for columns, vmax, label, mark in colorbars:
        mappable = matplotlib.cm.ScalarMappable(matplotlib.colors.Normalize(0, vmax), "jet")
        bar = fig.colorbar(
            mappable,
            ax=list(axes[:, columns].ravel()),
            location="bottom",
            shrink=0.95,
            aspect=12 * len(columns),
            pad=0.01,
        )
        chars = max(int(22 * cell_inches * len(columns)), 24)
        bar.set_label(textwrap.fill(label, chars), fontsize=6)
        ticks = [0.0, vmax / 2, vmax]  # three ticks: readable at any width
        bar.set_ticks(ticks, labels=[f"{t:.3g}" for t in ticks])
        bar.ax.tick_params(labelsize=6)
        if mark is not None and 0 < mark < vmax:
            bar.ax.axvline(mark, color="white", linewidth=1.5)
    if title:
        fig.suptitle(textwrap.fill(title, max(int(15 * width), 40)), fontsize=8)
    return fig


def save_grid(
    rows, path, column_titles=None, row_titles=None, cell_inches=1.6, dpi=100, **kwargs
):
    """Write a grid of images as one PNG (:func:`grid_figure`, same arguments)."""
    save_figure(grid_figure(rows, column_titles, row_titles, cell_inches, **kwargs), path, dpi)


EMPTY = 0.01  # a latent map whose peak is below this share of the figure's scale


def latent_figure(images, maps, row_titles=None, title=None, cell_inches=1.0):
    """Per-latent maps (B, D, H, W) beside their images (B, H, W, C), all on one colour
    scale, 0 to the largest value shown: scaled by itself, a near-empty map would turn
    into a solid square. Maps peaking below 1% of that scale are marked "empty"."""
    maps = np.asarray(maps, np.float32)
    vmax = float(maps.max()) if maps.size and maps.max() > 0 else 1.0
    peaks = maps.max(axis=(2, 3))
    scale = (
        f"one scale for every map of the figure: 0 to its largest value {vmax:.3g}; "
        f"'empty': the map peaks below {EMPTY:.0%} of that"
    )
    columns = [("input", to_rgb(images))] + [
        Heatmaps(
            f"z{d}",
            maps[:, d],
            vmax,
            scale,
            notes=["empty" if peak < EMPTY * vmax else "" for peak in peaks[:, d]],
        )
        for d in range(maps.shape[1])
    ]
    return heatmap_figure(images, columns, row_titles, title, cell_inches)


def method_title(what, description, pixel_auroc=None, image_auroc=None):
    """The headline of a run's figure: the data, the method and its AUROC, e.g.
    "bottle, broken_large: anomaly attention = gradcam/... @ conv1; pixel AUROC 0.912,
    image AUROC 0.801" (an AUROC left out when None)."""
    scores = [
        f"{name} AUROC {value:.3f}"
        for name, value in (("pixel", pixel_auroc), ("image", image_auroc))
        if value is not None
    ]
    return f"{what}: anomaly attention = {description}" + (
        "; " + ", ".join(scores) if scores else ""
    )


def roc_label(label, auc):
    """A ROC legend entry; an AUROC below 0.5 says the score is inverted."""
    if auc < 0.5:
        return f"{label} (AUROC {auc:.3f}; inverted: 1-AUROC = {1 - auc:.3f})"
    return f"{label} (AUROC {auc:.3f})"


def roc_figure(curves, title="ROC"):
    """``curves``: {label: (fpr, tpr, auc)}; one line each, chance diagonal dashed."""
    fig, axis = plt.subplots(figsize=(5.5, 4.5))
    for label, (fpr, tpr, auc) in curves.items():
        axis.plot(fpr, tpr, label=roc_label(label, auc))
    axis.plot([0, 1], [0, 1], "k--", linewidth=0.8)
    axis.set_xlabel("false positive rate")
    axis.set_ylabel("true positive rate")
    axis.set_title(title)
    axis.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    return fig


def save_roc(curves, path, title="ROC"):
    """Write :func:`roc_figure` as a PNG."""
    save_figure(roc_figure(curves, title), path, 100)


def save_curves(history, path, title="training"):
    """Each series of a ``History.history``-like dict against its epoch, one panel per
    series: the loss (~1e4) and the KL (~1e1) do not share a readable axis."""
    names = list(history)
    fig, axes = plt.subplots(
        1, max(len(names), 1), figsize=(3.2 * max(len(names), 1), 3), squeeze=False
    )
    for axis, name in zip(axes[0], names):
        values = history[name]
        axis.plot(
            np.arange(1, len(values) + 1), values, marker="." if len(values) < 30 else None
        )
        axis.set_xlabel("epoch")
        axis.set_title(name, fontsize=9)
        axis.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, path, 100)


def save_score_curve(steps, scores, final, path, title, ylabel):
    """A score measured during training against the step, with the final (step, score)
    as a star: shows whether a longer run would have helped."""
    fig, axis = plt.subplots(figsize=(6, 4))
    axis.plot(steps, scores, marker="o", label="during training")
    axis.plot([final[0]], [final[1]], marker="*", markersize=14, linestyle="", label="final")
    axis.set_xlabel("training step")
    axis.set_ylabel(ylabel)
    axis.set_ylim(0, 1)
    axis.set_title(title)
    axis.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, 100)


def save_seed_scores(rows, path, title, ylabel):
    """One bar per method at its mean score (sample std as the error bar) with each seed
    as a dot: how far apart methods are against how much seeds scatter.

    ``rows``: {method: list of per-seed scores}.
    """
    fig, axis = plt.subplots(figsize=(7, 3.6))
    for position, scores in enumerate(rows.values()):
        scores = np.asarray(scores, np.float64)
        spread = scores.std(ddof=1) if len(scores) > 1 else 0.0
        axis.bar(position, scores.mean(), color="#9ecae1", width=0.6)
        axis.errorbar(position, scores.mean(), yerr=spread, color="k", capsize=6)
        axis.scatter(
            np.full(len(scores), position),
            scores,
            color="#08519c",
            zorder=3,
            label="one seed" if position == 0 else None,
        )
    axis.set_xticks(range(len(rows)), [m.replace(" (", "\n(") for m in rows], fontsize=8)
    axis.set_ylim(0, 1)
    axis.set_ylabel(ylabel)
    axis.set_title(title)
    axis.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, 100)


def save_figure(fig, path, dpi=100):
    """Write a PNG through the run folder's one atomic publish (:func:`runs.staged`), so
    a reader never sees half a PNG and a killed writer's copy is cleared."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        with runs.staged(path, replace=True) as partial:
            fig.savefig(partial, dpi=dpi, format="png")
    finally:
        plt.close(fig)
