"""MVTec AD reader on a generated category and on the real bottle category; its errors."""

import os
import warnings

import numpy as np
import pytest

from keras_vae_attn.data import DataError, mvtec
from keras_vae_attn.data.augment import augmenter, train_dataset
from keras_vae_attn.data.synthetic import write_mvtec_category
from keras_vae_attn.data.synthetic.mvtec_like import DEFECTS

SMALL = dict(size=48, n_train=6, n_test_good=2, n_test_defect=2)


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    root = tmp_path_factory.mktemp("mvtec")
    write_mvtec_category(str(root), "demo", **SMALL)
    write_mvtec_category(str(root), "greyish", grayscale=True, **SMALL)
    return root


def test_generated_category_loads_with_exact_masks(generated):
    train = mvtec.load_train(str(generated), "demo", size=32)
    assert train.shape == (6, 32, 32, 3) and train.dtype == np.uint8
    test = mvtec.load_test(str(generated), "demo", size=48)  # written size: no resize
    assert len(test.labels) == 2 + 2 * len(DEFECTS)
    assert test.defects.count("good") == 2 and test.labels.sum() == 2 * len(DEFECTS)
    assert not test.masks[test.labels == 0].any()
    assert all(m.any() for m in test.masks[test.labels == 1])
    # At the written size the masks are exact: every masked pixel of an opaque defect
    # has the defect's colour (holes are drawn (12, 10, 8), scratches (250, 250, 245)).
    for defect, colour in (("hole", (12, 10, 8)), ("scratch", (250, 250, 245))):
        rows = [i for i, d in enumerate(test.defects) if d == defect]
        for i in rows:
            assert (test.images[i][test.masks[i]] == colour).all()
    resized = mvtec.load_test(str(generated), "demo", size=24)
    assert resized.masks.shape == (len(test.labels), 24, 24)
    assert set(np.unique(resized.masks)) <= {False, True}


def test_grayscale_category_loads_as_three_equal_channels_or_one(generated):
    rgb = mvtec.load_train(str(generated), "greyish", size=32)
    assert rgb.shape[-1] == 3
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()
    grey = mvtec.load_train(str(generated), "greyish", size=32, channels=1)
    assert grey.shape == (6, 32, 32, 1)


def test_max_test_keeps_every_defect_type(generated):
    test = mvtec.load_test(str(generated), "demo", size=32, limit=len(DEFECTS) + 1)
    assert sorted(set(test.defects)) == sorted(DEFECTS + ("good",))


def test_real_bottle_counts(shared_data):
    root = str(shared_data / "mvtec_ad")
    assert "bottle" in mvtec.find_categories(root)
    assert len(mvtec.train_files(root, "bottle")) == 209
    entries = mvtec.test_files(root, "bottle")
    assert len(entries) == 83
    assert sum(mask is not None for _, _, mask in entries) == 63
    assert {defect for _, defect, _ in entries} == {
        "good",
        "broken_large",
        "broken_small",
        "contamination",
    }
    test = mvtec.load_test(root, "bottle", size=64, limit=4)  # decode a few only
    assert test.images.shape == (4, 64, 64, 3)
    assert test.masks[test.labels == 1].any(axis=(1, 2)).all()


def test_generator_reuses_or_replaces_its_cache(tmp_path):
    first = write_mvtec_category(str(tmp_path), "demo", **SMALL)
    stamp = os.path.getmtime(os.path.join(first, "train", "good", "000.png"))
    assert write_mvtec_category(str(tmp_path), "demo", **SMALL) == first
    assert os.path.getmtime(os.path.join(first, "train", "good", "000.png")) == stamp
    write_mvtec_category(str(tmp_path), "demo", **{**SMALL, "n_train": 3})
    assert len(os.listdir(os.path.join(first, "train", "good"))) == 3
    assert os.listdir(tmp_path) == ["demo"]  # no staging folders left behind
    with pytest.raises(FileExistsError):
        write_mvtec_category(str(tmp_path), "demo", exist_ok=False, **SMALL)


def test_augmentation_is_seeded_and_keeps_range(generated):
    images = mvtec.load_train(str(generated), "demo", size=32)
    batches = [
        next(iter(train_dataset(images, 4, augmenter(seed=3), seed=3))).numpy()
        for _ in range(2)
    ]
    assert batches[0].shape == (4, 32, 32, 3) and batches[0].dtype == np.float32
    assert np.array_equal(batches[0], batches[1])
    assert 0.0 <= batches[0].min() and batches[0].max() <= 1.0
    plain = next(iter(train_dataset(images, 6, None, shuffle=False))).numpy()
    assert np.allclose(plain, images / 255.0)
    with pytest.raises(ValueError, match="unknown mirror"):
        augmenter(mirror="diagonal")


# --- bad input --------------------------------------------------------------------------


def copy_category(generated, tmp_path, name="demo"):
    import shutil

    shutil.copytree(generated / name, tmp_path / name)
    return tmp_path


def test_missing_root_and_unknown_category(generated, tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        mvtec.load_train(str(tmp_path / "nowhere"), "bottle")
    with pytest.raises(
        DataError,
        match=r"'cable' not found.*categories found: demo, "
        r"greyish",
    ):
        mvtec.load_train(str(generated), "cable")


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_png_is_named_or_skipped_on_request(generated, tmp_path, damage):
    root = copy_category(generated, tmp_path)
    path = root / "demo" / "train" / "good" / "002.png"
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2] if damage == "truncated" else b"not a png" * 20)
    with pytest.raises(DataError, match=r"002\.png.*skip_corrupt"):
        mvtec.load_train(str(root), "demo", size=32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        images = mvtec.load_train(str(root), "demo", size=32, skip_corrupt=True)
    assert len(images) == 5
    assert any("002.png" in str(w.message) for w in caught)


def test_defect_image_without_mask(generated, tmp_path):
    root = copy_category(generated, tmp_path)
    (root / "demo" / "ground_truth" / "hole" / "001_mask.png").unlink()
    with pytest.raises(DataError, match=r"hole[/\\]001\.png.*no ground-truth mask"):
        mvtec.load_test(str(root), "demo", size=32)


def test_empty_train_folder(generated, tmp_path):
    root = copy_category(generated, tmp_path)
    for file in (root / "demo" / "train" / "good").iterdir():
        file.unlink()
    with pytest.raises(DataError, match=r"train[/\\]good.*holds no images"):
        mvtec.load_train(str(root), "demo")
