"""Figures of the explanation checks: trained beside randomized maps (Adebayo et al.'s
figure), the cascading randomization, and deletion/insertion curves."""

from __future__ import annotations

import numpy as np

from keras_vae_attn import viz


def _scale(maps):
    """A shared display scale: the 99.5th percentile of the maps shown (> 0)."""
    return max(float(np.percentile(maps, 99.5)), 1e-12)


def sanity_figure(images, masks, trained, randomized, labels, title):
    """One row per image: image, ground truth, then for each map (``trained`` and
    ``randomized``: {name: (n, H, W)}) the trained map beside the same map on the
    randomized VAE. Each column is scaled to its own 99.5th percentile, as in Adebayo et
    al.'s figure: the check is about where a map points (its ranks), and a twin's maps
    can differ from the trained ones by a constant factor alone."""
    columns = [("image", viz.to_rgb(images))]
    if masks is not None:
        columns.append(("ground truth", np.asarray(masks, np.float32)))
    for name in trained:
        for heading, maps in (
            (f"{labels.get(name, name)}\ntrained", trained[name]),
            ("randomized VAE", randomized[name]),
        ):
            columns.append(
                viz.Heatmaps(heading, maps, _scale(maps), "0 to its own 99.5th pct")
            )
    return viz.heatmap_figure(images, columns, title=title)


def cascade_figure(images, masks, stages, rho, title):
    """Rows: images; columns: image, ground truth, then the map after each cumulative
    re-initialization step ("trained", "decoder", "head", ... "conv1"), each scaled by
    itself (the shape is what is compared), with the mean Spearman correlation to the
    trained map in the column title."""
    columns = [("image", viz.to_rgb(images))]
    if masks is not None:
        columns.append(("ground truth", np.asarray(masks, np.float32)))
    for (label, maps), value in zip(stages, rho):
        heading = label if label == "trained" else f"up to {label}\nSpearman {value:.2f}"
        columns.append(
            viz.Heatmaps(heading, maps, _scale(maps), f"{label}: 0 to its 99.5th percentile")
        )
    return viz.heatmap_figure(images, columns, title=title, cell_inches=1.3)


def curves_figure(curves, title):
    """Deletion and insertion curves: {map label: Curves} (faithfulness.Curves), one
    panel each, the normalized area in the legend."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), layout="constrained")
    for axis, kind in zip(axes, ("deletion", "insertion")):
        for label, curve in curves.items():
            values = getattr(curve, kind)
            area = getattr(curve, f"{kind}_auc")
            axis.plot(
                100 * curve.fractions,
                values,
                marker=".",
                label=f"{label} (area {area:.3f})",
                linestyle="--" if label == "random order" else "-",
            )
        better = "lower" if kind == "deletion" else "higher"
        axis.set_title(
            f"{kind}: pixels ranked by each map replaced "
            f"{'by' if kind == 'deletion' else 'from'} the normal mean image "
            f"({better} is better)",
            fontsize=8,
        )
        axis.set_xlabel("% of pixels, top of the map first")
        axis.set_ylabel("latent energy (Eq. 5), share of the original")
        axis.legend(fontsize=6)
    fig.suptitle(title, fontsize=9)
    return fig
