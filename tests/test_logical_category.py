"""The generated logical category: its layout, its rules, and that its defects are
invisible to per-position statistics (every part of a defect is a normal part there)."""

import filecmp
import os

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from keras_vae_attn import references
from keras_vae_attn.data import mvtec
from keras_vae_attn.data.synthetic import write_logical_category
from keras_vae_attn.data.synthetic.logical import DEFECTS
from keras_vae_attn.metrics.localization import image_auroc

SIZE = 64


@pytest.fixture(scope="module")
def category(tmp_path_factory):
    """(root, train images, test Split) of the category at its default settings."""
    root = str(tmp_path_factory.mktemp("logical"))
    write_logical_category(root)
    return (
        root,
        mvtec.load_train(root, "logical", size=SIZE),
        mvtec.load_test(root, "logical", size=SIZE),
    )


def _parts(image):
    """[(half, kind, dominant channel, bool footprint)] of the coloured parts of a uint8
    image: pixels far from grey, split into connected blobs."""
    pixels = image.astype(np.float32) / 255.0
    coloured = pixels.max(-1) - pixels.min(-1) > 0.3
    blobs, count = ndimage.label(coloured)
    found = []
    for label in range(1, count + 1):
        footprint = blobs == label
        rows, cols = np.nonzero(footprint)
        box = (np.ptp(rows) + 1) * (np.ptp(cols) + 1)
        kind = "disc" if footprint.sum() / box < 0.87 else "square"
        channel = int(np.argmax(pixels[footprint].mean(0)))
        found.append((int(cols.mean() >= SIZE / 2), kind, channel, footprint))
    return found


def _rules_hold(parts):
    """True when ``parts`` make a normal image: as many on both halves, one kind per
    half and another kind on the other, one colour."""
    halves = [[p for p in parts if p[0] == side] for side in (0, 1)]
    kinds = [{p[1] for p in half} for half in halves]
    return (
        len(halves[0]) == len(halves[1]) >= 1
        and len(kinds[0]) == len(kinds[1]) == 1
        and kinds[0] != kinds[1]
        and len({p[2] for p in parts}) == 1
    )


def test_layout_loads_with_the_official_counts_and_binary_masks(category):
    root, train, test = category
    assert train.shape == (200, SIZE, SIZE, 3) and train.dtype == np.uint8
    assert test.defects.count("good") == 20
    assert all(test.defects.count(kind) == 15 for kind in DEFECTS)
    assert len(test.defects) == 20 + 15 * len(DEFECTS)
    assert not test.masks[test.labels == 0].any()
    assert all(mask.any() for mask in test.masks[test.labels == 1])
    for kind in DEFECTS:
        folder = os.path.join(root, "logical", "ground_truth", kind)
        assert sorted(os.listdir(folder)) == [f"{i:03d}_mask.png" for i in range(15)]
        for name in os.listdir(folder):
            assert set(np.unique(np.asarray(Image.open(os.path.join(folder, name))))) == {
                0,
                255,
            }


def test_normal_images_follow_the_rules_and_each_defect_breaks_one(category):
    _, train, test = category
    assert all(_rules_hold(_parts(image)) for image in train)
    for image, mask, defect in zip(test.images, test.masks, test.defects):
        parts = _parts(image)
        inside = [p for p in parts if (p[3] & mask).any()]
        # the mask covers whole parts: no part is cut by its edge
        assert all(not (p[3] & ~mask).any() for p in inside), defect
        counts = [sum(p[0] == side for p in parts) for side in (0, 1)]
        if defect == "good":
            assert _rules_hold(parts)
        elif defect == "count":
            assert abs(counts[0] - counts[1]) == 1
            assert len(inside) <= 1  # the extra part, or the missing one's slot
        elif defect == "swap":
            assert counts[0] == counts[1] and len(inside) == 2
            for side in (0, 1):  # the swapped part is the odd one of its half
                odd = [p for p in inside if p[0] == side]
                rest = [p for p in parts if p[0] == side and all(p is not q for q in inside)]
                assert len(odd) == 1 and rest and all(p[1] != odd[0][1] for p in rest)
        else:
            assert defect == "colour" and len(inside) == 1
            assert all(p[2] != inside[0][2] for p in parts if p is not inside[0])


def test_same_seed_same_files_other_seed_other_files(tmp_path):
    small = dict(size=32, n_train=4, n_test_good=2, n_test_defect=2)
    first = write_logical_category(str(tmp_path / "a"), seed=3, **small)
    second = write_logical_category(str(tmp_path / "b"), seed=3, **small)
    other = write_logical_category(str(tmp_path / "c"), seed=4, **small)
    names = [os.path.join("test", kind, "001.png") for kind in DEFECTS] + [
        os.path.join("train", "good", "003.png"),
        os.path.join("ground_truth", "swap", "000_mask.png"),
    ]
    assert all(
        filecmp.cmp(os.path.join(first, n), os.path.join(second, n), shallow=False)
        for n in names
    )
    assert not all(
        filecmp.cmp(os.path.join(first, n), os.path.join(other, n), shallow=False)
        for n in names
    )
    with pytest.raises(ValueError, match="unknown defect kinds"):
        write_logical_category(str(tmp_path / "d"), defects=("count", "dent"))


def test_per_pixel_statistics_cannot_see_the_defects(tmp_path):
    """The per-pixel z-score fitted on the training images: its maximum ranks defective
    images of each type no better than chance, and inside the masks it stays at normal
    levels. A larger test split than the default, so the AUROCs are not noise (with
    discs always on the left, the swaps score 0.86 to 0.94 here over four seeds)."""
    write_logical_category(str(tmp_path), n_test_good=100, n_test_defect=50, seed=1)
    train = mvtec.load_train(str(tmp_path), "logical", size=SIZE)
    test = mvtec.load_test(str(tmp_path), "logical", size=SIZE)
    z = references.pixel_deviation(test.images, references.fit_pixel_distribution(train))
    peak = z.reshape(len(z), -1).max(axis=1)
    aurocs = {"all": image_auroc(peak, test.labels)}
    for kind in DEFECTS:
        rows = [i for i, defect in enumerate(test.defects) if defect in (kind, "good")]
        aurocs[kind] = image_auroc(peak[rows], test.labels[rows])
    print(
        "image AUROC of the max per-pixel z-score:",
        ", ".join(f"{k} {v:.3f}" for k, v in aurocs.items()),
    )
    assert all(value < 0.7 for value in aurocs.values()), aurocs
    in_mask = [z[i][test.masks[i]].max() for i in np.flatnonzero(test.labels)]
    assert np.median(in_mask) <= np.median(peak[test.labels == 0])


def test_every_defective_part_is_a_normal_part_at_its_place(category):
    """Each half of each mask finds a training image with nearly the same pixels there;
    the same part recoloured off the palette (red to yellow, green to cyan, blue to
    magenta) finds none, so the check can fail."""
    _, train, test = category
    train = train.astype(np.float32) / 255.0

    def nearest(image, region):
        return np.abs(train[:, region] - image[region]).mean(axis=(1, 2)).min()

    real, recoloured = [], []
    for i in np.flatnonzero(test.labels):
        image = test.images[i].astype(np.float32) / 255.0
        for side in (0, 1):
            region = test.masks[i].copy()
            region[:, slice(SIZE // 2, None) if side == 0 else slice(0, SIZE // 2)] = False
            if region.any():
                real.append(nearest(image, region))
        if test.defects[i] == "colour":
            channel = int(np.argmax(image[test.masks[i]].mean(0)))
            off = image.copy()
            off[..., (channel + 1) % 3] = image[..., channel]
            recoloured.append(nearest(off, test.masks[i]))
    assert max(real) < min(recoloured), (max(real), min(recoloured))


def test_trainer_generates_the_category_with_the_demo_sizes(tmp_path):
    """``--category logical`` without --data-dir: written under <runs-root>/data once,
    loaded at the demo's 64 pixels."""
    from trainers import mvtec as trainer

    args = trainer.parse_args(["--category", "logical", "--runs-root", str(tmp_path)])
    assert args.image_size == 64 and args.data_dir == str(tmp_path / "data")
    train, test = trainer.load_data(args)
    assert train.shape == (200, 64, 64, 3) and sorted(set(test.groups)) == sorted(
        DEFECTS + ("good",)
    )
    assert os.path.isfile(tmp_path / "data" / "logical" / "generator.json")
