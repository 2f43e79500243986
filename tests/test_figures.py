"""Figures that read on their own: colorbars with a labelled shared scale, per-image
scores, titles with the method and its AUROC, inverted scores named in the ROC legend."""

import matplotlib.pyplot as plt
import numpy as np
import pytest

from keras_vae_attn import viz


def colorbars(fig):
    return [axis for axis in fig.axes if axis.get_label() == "<colorbar>"]


def texts(fig):
    return [t.get_text() for axis in fig.axes for t in axis.texts]


@pytest.fixture
def images():
    return np.random.default_rng(0).random((3, 8, 8, 3)).astype(np.float32)


def test_heatmap_columns_get_one_labelled_colorbar_each_and_cells_their_scores(images):
    attention = np.zeros((3, 8, 8), np.float32)
    attention[0, 2:4, 2:4] = 2.0  # half the scale: per-map scaling would make it 1
    title = viz.method_title("bottle, hole", "gradcam/energy/none/relu @ conv1", 0.912, 0.801)
    fig = viz.heatmap_figure(
        images,
        [
            ("image", images),
            viz.Heatmaps(
                "anomaly attention",
                attention,
                4.0,
                "one scale for all images: 0 to 4",
                mark=2.0,
                notes=["score 5", "score 0", "score 0"],
            ),
            viz.Heatmaps(
                "recon difference", attention / 10, 0.3, "recon scale 0 to 0.3", overlay=False
            ),
        ],
        row_titles=["a", "b", "c"],
        title=title,
    )
    bars = colorbars(fig)
    assert len(bars) == 2
    assert [bar.xaxis.label.get_text().replace("\n", " ") for bar in bars] == [
        "one scale for all images: 0 to 4",
        "recon scale 0 to 0.3",
    ]
    assert [bar.get_xlim() for bar in bars] == [(0.0, 4.0), (0.0, 0.3)]
    assert len(bars[0].lines) == 1 and bars[0].lines[0].get_xdata()[0] == 2.0  # threshold
    assert sorted(t for t in texts(fig) if t.startswith("score")) == [
        "score 0",
        "score 0",
        "score 5",
    ]
    headline = fig._suptitle.get_text().replace("\n", " ")
    assert "gradcam/energy/none/relu @ conv1" in headline
    assert "pixel AUROC 0.912" in headline and "image AUROC 0.801" in headline
    # cells are drawn on the column's scale (0 to 4), not each scaled by itself
    cells = [fig.axes[3 * row + 1].images[0].get_array() for row in range(3)]
    np.testing.assert_array_equal(cells, viz.overlay(images, attention, vmax=4.0))
    plt.close(fig)


def test_latent_maps_share_one_scale_and_empty_maps_are_marked(images):
    maps = np.zeros((2, 3, 8, 8), np.float32)
    maps[:, 0] = 1.0
    maps[:, 1, 0, 0] = 1e-4  # near-empty: must not become a solid square
    fig = viz.latent_figure(images[:2], maps, row_titles=["x", "y"])
    (bar,) = colorbars(fig)
    assert bar.get_xlim() == (0.0, 1.0)
    assert "one scale for every map" in bar.xaxis.label.get_text().replace("\n", " ")
    assert texts(fig).count("empty") == 4  # z1 and z2 of both rows
    grid = [axis for axis in fig.axes if axis.get_label() != "<colorbar>"]
    near_empty = grid[2].images[0].get_array()
    zero = viz.overlay(images[:1], np.zeros((1, 8, 8)), vmax=1.0)[0]
    np.testing.assert_array_equal(near_empty, zero)
    plt.close(fig)


def test_roc_legend_names_an_inverted_score():
    fpr = tpr = np.linspace(0, 1, 5)
    fig = viz.roc_figure({"KL": (fpr, tpr, 0.019), "attention": (fpr, tpr, 0.9)})
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert legend == ["KL (AUROC 0.019; inverted: 1-AUROC = 0.981)", "attention (AUROC 0.900)"]
    plt.close(fig)


def test_dsprites_attention_pairs_share_one_labelled_scale_and_have_a_title():
    """attention_pairs.png (the paper's Fig. 8): both latents' maps on one scale with its
    colorbar, the model and layer in the title, each row's pair and L_AD."""
    from trainers.dsprites import attention_pairs_figure

    images = np.random.default_rng(0).random((2, 16, 16, 1)).astype(np.float32)
    maps = np.zeros((2, 4, 4, 4), np.float32)
    maps[:, 1] = 2.0  # the strong first map
    maps[:, 3, 0, 0] = 0.5  # a weak second one: must stay weak beside it
    pair = np.array([[1, 3], [1, 3]])
    fig = attention_pairs_figure(
        images,
        maps,
        pair,
        np.array([0.25, 0.5]),
        "ad_factor_vae: two highest-response latents at last",
    )
    (bar,) = colorbars(fig)
    assert bar.get_xlim() == (
        0.0,
        2.0,
    ) and "one scale for both columns" in bar.xaxis.label.get_text().replace("\n", " ")
    assert fig._suptitle.get_text().startswith("ad_factor_vae")
    labels = [axis.get_ylabel() for axis in fig.axes if axis.get_ylabel()]
    assert labels == ["z1 vs z3: L_AD 0.25", "z1 vs z3: L_AD 0.50"]
    plt.close(fig)


def test_explain_mnist_maps_have_one_scale_and_a_title():
    """docs/explain_mnist.py's maps.png: the per-latent maps on one colour scale."""
    import importlib.util

    from conftest import REPO

    spec = importlib.util.spec_from_file_location(
        "explain_mnist", REPO / "docs" / "explain_mnist.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    images = np.random.default_rng(0).random((2, 28, 28, 1)).astype(np.float32)
    maps = np.random.default_rng(1).random((2, 3, 28, 28)).astype(np.float32)
    fig = module.maps_figure(images, maps, [0, 2], steps=300)
    (bar,) = colorbars(fig)
    assert bar.get_xlim()[1] == pytest.approx(float(maps.max()))
    assert "per-latent attention" in fig._suptitle.get_text()
    assert "300 steps" in fig._suptitle.get_text().replace("\n", " ")
    plt.close(fig)
    assert (
        module.build_parser().format_help().startswith("usage: python docs/explain_mnist.py")
    )
