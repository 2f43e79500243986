"""The UCSD reader on generated datasets in the official layout, and its errors."""

import os
import shutil

import numpy as np
import pytest
from PIL import Image

from keras_vae_attn.data import DataError, ucsd
from keras_vae_attn.data.synthetic import write_ucsd_dataset
from keras_vae_attn.data.synthetic.ucsd_like import background

SMALL = dict(
    width=48, height=32, frames=8, n_train=2, n_test=3, n_test_without_gt=1, walkers=2
)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A tiny Ped1-style dataset: tif frames, bmp masks, one test clip without masks."""
    root = tmp_path_factory.mktemp("ucsd")
    write_ucsd_dataset(str(root), "ped1", **SMALL)
    return root


@pytest.fixture
def copy(dataset, tmp_path):
    """A private copy to damage."""
    shutil.copytree(dataset, tmp_path / "root")
    return tmp_path / "root"


def test_layout_is_the_official_one(dataset):
    base = dataset / "UCSDped1"
    assert sorted(os.listdir(base / "Train")) == ["Train001", "Train002"]
    assert sorted(os.listdir(base / "Test")) == [
        "Test001",
        "Test001_gt",
        "Test002",
        "Test002_gt",
        "Test003",
        "UCSDped1.m",
    ]
    assert sorted(os.listdir(base / "Test" / "Test001"))[:2] == ["001.tif", "002.tif"]
    assert sorted(os.listdir(base / "Test" / "Test001_gt"))[0] == "001.bmp"


def test_clips_pair_masks_by_frame_name(dataset):
    clips = ucsd.list_clips(str(dataset), "ped1", "Test")
    assert [clip.name for clip in clips] == ["Test001", "Test002", "Test003"]
    assert clips[2].masks is None  # a clip without _gt
    for clip in clips[:2]:
        assert len(clip.masks) == len(clip.frames) == SMALL["frames"]
        for frame, mask in zip(clip.frames, clip.masks):
            assert os.path.basename(os.path.dirname(mask)) == clip.name + "_gt"
            assert (
                os.path.splitext(os.path.basename(frame))[0]
                == os.path.splitext(os.path.basename(mask))[0]
            )
    assert all(clip.masks is None for clip in ucsd.list_clips(str(dataset), "ped1", "Train"))


def test_loads_frames_and_masks_at_the_requested_size(dataset):
    train = ucsd.load_train(str(dataset), "ped1", size=24)
    assert train.shape == (2 * SMALL["frames"], 24, 24, 1) and train.dtype == np.uint8
    test = ucsd.load_test(str(dataset), "ped1", size=24)
    count = 2 * SMALL["frames"]  # only the clips with masks
    assert test.images.shape == (count, 24, 24, 1)
    assert test.masks.shape == (count, 24, 24) and test.masks.dtype == bool
    assert test.clips == ["Test001"] * SMALL["frames"] + ["Test002"] * SMALL["frames"]
    np.testing.assert_array_equal(test.labels, test.masks.any(axis=(1, 2)))
    assert 0 < test.labels.sum() < count  # normal frames count too
    # Pixels match the files: the frame resized, the mask's covered fraction kept.
    first = test.paths[int(np.flatnonzero(test.labels)[0])]
    raw = np.asarray(Image.open(first))
    expected = np.asarray(Image.fromarray(raw).resize((24, 24), Image.Resampling.BILINEAR))
    index = test.paths.index(first)
    np.testing.assert_array_equal(test.images[index, ..., 0], expected)
    mask_of = {
        frame: mask
        for clip in ucsd.list_clips(str(dataset), "ped1", "Test")
        if clip.masks
        for frame, mask in zip(clip.frames, clip.masks)
    }
    raw_mask = np.asarray(Image.open(mask_of[first])) > 127
    assert abs(test.masks[index].mean() - raw_mask.mean()) < 0.05


def test_masks_mark_the_drawn_anomalies(dataset):
    """Masked pixels hold the intruder: darker than the walkway there, unlike the rest."""
    test = ucsd.load_test(str(dataset), "ped1", size=32)
    frames = test.images[..., 0].astype(np.float32) / 255
    clips = np.array(test.clips)
    walkway = np.stack([np.median(frames[clips == clip], axis=0) for clip in test.clips])
    darker = walkway - frames
    assert test.masks.any()
    assert darker[test.masks].mean() > 0.15
    assert abs(darker[~test.masks].mean()) < 0.05


def test_png_and_jpg_files_load_like_tif_and_bmp(dataset, tmp_path):
    write_ucsd_dataset(str(tmp_path), "ped1", frame_format="png", mask_format="png", **SMALL)
    tif = ucsd.load_test(str(dataset), "ped1", size=20)
    png = ucsd.load_test(str(tmp_path), "ped1", size=20)
    np.testing.assert_array_equal(png.images, tif.images)  # same seed, lossless formats
    np.testing.assert_array_equal(png.masks, tif.masks)
    jpg_root = tmp_path / "jpg"
    write_ucsd_dataset(str(jpg_root), "ped1", frame_format="jpg", mask_format="jpg", **SMALL)
    jpg = ucsd.load_test(str(jpg_root), "ped1", size=20)
    assert np.abs(jpg.images.astype(int) - tif.images).mean() < 3
    assert (jpg.masks != tif.masks).mean() < 0.01


def test_root_may_be_the_subset_folder_and_ped2_is_found(dataset, tmp_path):
    direct = ucsd.load_train(str(dataset / "UCSDped1"), "ped1", size=16)
    assert len(direct) == 2 * SMALL["frames"]
    write_ucsd_dataset(str(tmp_path), "ped2", **SMALL)
    assert len(ucsd.load_test(str(tmp_path), "ped2", size=16).labels) == 2 * SMALL["frames"]
    with pytest.raises(DataError, match="no UCSDped1 folder.*found UCSDped2"):
        ucsd.load_train(str(tmp_path), "ped1")


def test_natural_frame_order_and_hidden_files_ignored(copy):
    clip = copy / "UCSDped1" / "Train" / "Train003"
    clip.mkdir()
    for number in (10, 2, 1):
        Image.fromarray(np.full((8, 8), number, np.uint8)).save(clip / f"{number}.png")
    (clip / ".DS_Store").write_bytes(b"\0\1junk")
    (clip / "._1.png").write_bytes(b"not an image")
    (clip / "Thumbs.db").write_bytes(b"junk")
    clips = ucsd.list_clips(str(copy), "ped1", "Train")
    assert [os.path.basename(p) for p in clips[2].frames] == ["1.png", "2.png", "10.png"]
    frames = ucsd.load_train(str(copy), "ped1", size=8, max_clips=3)
    np.testing.assert_array_equal(frames[-3:, 0, 0, 0], [1, 2, 10])


def test_frame_step_and_clip_caps(dataset):
    train = ucsd.load_train(str(dataset), "ped1", size=16, frame_step=3, max_clips=1)
    assert len(train) == len(range(0, SMALL["frames"], 3))
    test = ucsd.load_test(str(dataset), "ped1", size=16, max_clips=1)
    assert set(test.clips) == {"Test001"}


@pytest.mark.parametrize("split", ["Train", "Test"])
def test_missing_split_folder_is_named(copy, split):
    shutil.rmtree(copy / "UCSDped1" / split)
    with pytest.raises(DataError, match=f"UCSDped1 has no {split} folder.*{split}"):
        ucsd.load_train(str(copy), "ped1")


def test_missing_root_is_named(tmp_path):
    with pytest.raises(DataError, match="does-not-exist"):
        ucsd.load_test(str(tmp_path / "does-not-exist"), "ped1")


def test_gt_folder_with_a_different_frame_count_names_clip_and_frame(copy):
    os.remove(copy / "UCSDped1" / "Test" / "Test002_gt" / "005.bmp")
    with pytest.raises(
        DataError,
        match=r"Test002_gt.*7 masks.*clip Test002 has 8 frames"
        r".*without a mask: 005",
    ):
        ucsd.list_clips(str(copy), "ped1", "Test")


def test_gt_folder_with_renamed_masks_is_refused(copy):
    gt = copy / "UCSDped1" / "Test" / "Test001_gt"
    os.replace(gt / "008.bmp", gt / "009.bmp")
    with pytest.raises(DataError, match="without a mask: 008.*without a frame: 009"):
        ucsd.load_test(str(copy), "ped1")


@pytest.mark.parametrize(
    "where, name",
    [
        ("Train/Train002", "003.tif"),
        ("Test/Test001", "006.tif"),
        ("Test/Test002_gt", "002.bmp"),
    ],
)
def test_unreadable_file_names_clip_and_frame(copy, where, name):
    (copy / "UCSDped1" / where / name).write_bytes(b"this is not an image")
    clip = where.split("/")[1].replace("_gt", "")
    role = "mask" if where.endswith("_gt") else "frame"
    load = ucsd.load_train if where.startswith("Train") else ucsd.load_test
    with pytest.raises(DataError, match=f"cannot read {role} {name} of clip {clip}"):
        load(str(copy), "ped1", size=16)


def test_truncated_frame_is_refused(copy):
    path = copy / "UCSDped1" / "Test" / "Test002" / "004.tif"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(DataError, match="frame 004.tif of clip Test002"):
        ucsd.load_test(str(copy), "ped1", size=16)


def test_other_inconsistencies_are_named(copy):
    test_dir = copy / "UCSDped1" / "Test"
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(test_dir / "Test001_gt" / "001.bmp")
    with pytest.raises(DataError, match="mask 001.bmp of clip Test001.*5x5.*48x32"):
        ucsd.load_test(str(copy), "ped1", size=16)
    shutil.copytree(test_dir / "Test002_gt", test_dir / "Test007_gt")
    with pytest.raises(DataError, match="Test007_gt.*has no clip 'Test007'"):
        ucsd.list_clips(str(copy), "ped1", "Test")
    shutil.rmtree(test_dir / "Test007_gt")
    (test_dir / "Test004").mkdir()
    with pytest.raises(DataError, match="clip Test004 .* holds no frames"):
        ucsd.list_clips(str(copy), "ped1", "Test")


def test_no_clip_with_masks_is_a_clear_error(copy):
    for name in ("Test001_gt", "Test002_gt"):
        shutil.rmtree(copy / "UCSDped1" / "Test" / name)
    with pytest.raises(DataError, match="none of the 3 test clips.*_gt"):
        ucsd.load_test(str(copy), "ped1")


def test_generator_reuses_or_replaces_by_settings(tmp_path):
    path = write_ucsd_dataset(str(tmp_path), "ped1", **SMALL)
    stamp = os.stat(os.path.join(path, "generator.json")).st_mtime_ns
    assert write_ucsd_dataset(str(tmp_path), "ped1", **SMALL) == path
    assert os.stat(os.path.join(path, "generator.json")).st_mtime_ns == stamp
    write_ucsd_dataset(str(tmp_path), "ped1", **{**SMALL, "n_train": 3})
    assert len(os.listdir(os.path.join(path, "Train"))) == 3
    assert sorted(os.listdir(tmp_path)) == ["UCSDped1"]  # no staging left behind
    with pytest.raises(FileExistsError):
        write_ucsd_dataset(str(tmp_path), "ped1", exist_ok=False, **SMALL)
    with pytest.raises(ValueError, match="frame_format"):
        write_ucsd_dataset(str(tmp_path), "ped1", frame_format="gif")


def test_background_is_a_fixed_textured_scene():
    first = background(np.random.default_rng(3), 32, 48)
    again = background(np.random.default_rng(3), 32, 48)
    np.testing.assert_array_equal(first, again)
    assert first.shape == (32, 48) and 0 <= first.min() and first.max() <= 1
    assert np.abs(np.diff(first, axis=1)).mean() > 0.005  # textured, not flat
