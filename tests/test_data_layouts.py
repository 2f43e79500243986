"""The readers on the official release layouts, quirks included, with real files on disk.

The official UCSD Ped2 names the masks of three test clips ``frame001.bmp`` beside frames
``001.tif``; copies made on macOS or Windows carry ``.DS_Store``, ``._*`` resource forks
and ``Thumbs.db``; MVTec-style masks may be stored 0/1 or drawn at another size.
"""

import logging
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from keras_vae_attn.data import DataError, is_hidden, mvtec, ucsd
from keras_vae_attn.data.synthetic import write_official_ped2_layout

PED2 = dict(width=48, height=32, frames=8, n_train=2, n_test=6, walkers=2)
GARBAGE = b"\x00\x05\x16\x07 not an image"
RGB = (32, 32, 3)


def hidden_skips(caplog):
    """{folder: count} from the reader's "skipped N hidden files in <folder>" lines."""
    skips = {}
    for record in caplog.records:
        words = record.getMessage().split(" ", 5)
        if record.name == "keras_vae_attn.data" and words[0] == "skipped":
            assert words[2:5] in (["hidden", "files", "in"], ["hidden", "file", "in"])
            skips[words[5]] = int(words[1])
    return skips


@pytest.fixture(scope="module")
def ped2(tmp_path_factory):
    root = tmp_path_factory.mktemp("ped2")
    write_official_ped2_layout(str(root), **PED2)
    return root


@pytest.fixture
def ped2_copy(ped2, tmp_path):
    shutil.copytree(ped2, tmp_path / "root")
    return tmp_path / "root"


@pytest.mark.parametrize(
    "name, hidden",
    [
        (".DS_Store", True),
        ("._001.tif", True),
        ("Thumbs.db", True),
        ("desktop.ini", True),
        ("001.tif", False),
        ("frame001.bmp", False),
    ],
)
def test_hidden_and_system_files_are_recognised_by_name(name, hidden):
    assert is_hidden(name) is hidden


def test_official_ped2_layout_is_written_with_its_quirks(ped2):
    test_dir = ped2 / "UCSDped2" / "Test"
    assert sorted(os.listdir(ped2 / "UCSDped2" / "Train" / "Train001"))[:4] == [
        ".DS_Store",
        "._001.tif",
        "001.tif",
        "002.tif",
    ]
    clips = [f"Test{n:03d}" for n in range(1, 7)]
    assert sorted(os.listdir(test_dir)) == sorted(
        clips + [c + "_gt" for c in clips] + ["UCSDped2.m"]
    )
    assert sorted(os.listdir(test_dir / "Test001_gt"))[2:4] == ["001.bmp", "002.bmp"]
    assert sorted(os.listdir(test_dir / "Test006_gt"))[:3] == [
        ".DS_Store",
        "._frame001.bmp",
        "frame001.bmp",
    ]
    with pytest.raises(OSError):  # the junk really is not an image
        Image.open(test_dir / "Test006" / "._001.tif")


def test_official_ped2_layout_loads_end_to_end(ped2, caplog):
    caplog.set_level(logging.INFO, logger="keras_vae_attn.data")
    train = ucsd.load_train(str(ped2), "ped2", size=32)
    assert train.shape == (2 * PED2["frames"], 32, 32, 1)
    test = ucsd.load_test(str(ped2), "ped2", size=32)
    assert test.images.shape == (6 * PED2["frames"], 32, 32, 1)
    assert test.clips == [f"Test{n:03d}" for n in range(1, 7) for _ in range(PED2["frames"])]
    assert 0 < test.labels.sum() < len(test.labels)
    for clip in ucsd.list_clips(str(ped2), "ped2", "Test"):
        prefix = "frame" if clip.name == "Test006" else ""
        assert [os.path.basename(m) for m in clip.masks] == [
            f"{prefix}{n:03d}.bmp" for n in range(1, PED2["frames"] + 1)
        ]
        assert [ucsd.frame_number(m) for m in clip.masks] == [
            ucsd.frame_number(f) for f in clip.frames
        ]
    skips = hidden_skips(caplog)
    base = ped2 / "UCSDped2"
    folders = [base / "Train" / f"Train{n:03d}" for n in (1, 2)] + [
        base / "Test" / f"Test{n:03d}{gt}" for n in range(1, 7) for gt in ("", "_gt")
    ]
    assert {str(folder): 2 for folder in folders}.items() <= skips.items()


def test_masks_pair_with_frames_by_number_not_by_name(tmp_path):
    """Frame k is grey 20k and its mask marks k rows, so a wrong pairing shows; the mask
    names are unpadded ("frame10.bmp" sorts before "frame2.bmp") and stored 0/1."""
    base = tmp_path / "UCSDped2"
    for folder in ("Train/Train001", "Test/Test001", "Test/Test001_gt"):
        (base / folder).mkdir(parents=True)
    for k in range(1, 11):
        frame = np.full((20, 20), 20 * k, np.uint8)
        Image.fromarray(frame).save(base / "Train" / "Train001" / f"{k:03d}.tif")
        Image.fromarray(frame).save(base / "Test" / "Test001" / f"{k:03d}.tif")
        mask = np.zeros((20, 20), np.uint8)
        mask[:k] = 1
        Image.fromarray(mask).save(base / "Test" / "Test001_gt" / f"frame{k}.bmp")
    test = ucsd.load_test(str(tmp_path), "ped2", size=20)
    assert [int(image.mean()) for image in test.images] == [20 * k for k in range(1, 11)]
    assert [int(mask.sum()) for mask in test.masks] == [20 * k for k in range(1, 11)]
    assert test.labels.all()


@pytest.mark.parametrize(
    "damage, message",
    [
        (
            lambda clip, gt: os.remove(gt / "frame005.bmp"),
            r"Test006_gt.*frames without a mask: 005\.tif",
        ),
        (
            lambda clip, gt: shutil.copy(gt / "frame008.bmp", gt / "frame009.bmp"),
            r"Test006_gt.*masks without a frame: frame009\.bmp",
        ),
        (
            lambda clip, gt: shutil.copy(gt / "frame001.bmp", gt / "001.bmp"),
            r"Test006_gt.*more than one file for frame number\(s\) 1 "
            r"\(001\.bmp, frame001\.bmp\)",
        ),
        (
            lambda clip, gt: shutil.copy(clip / "003.tif", clip / "3.tif"),
            r"Test006'.*more than one file for frame number\(s\) 3 \(003\.tif, 3\.tif\)",
        ),
    ],
    ids=["missing-mask", "mask-without-frame", "duplicate-mask", "duplicate-frame"],
)
def test_real_mismatches_are_refused_naming_folder_and_number(ped2_copy, damage, message):
    test_dir = ped2_copy / "UCSDped2" / "Test"
    damage(test_dir / "Test006", test_dir / "Test006_gt")
    with pytest.raises(DataError, match=message):
        ucsd.load_test(str(ped2_copy), "ped2", size=16)


# --- MVTec ------------------------------------------------------------------------------


def write_image(path, pixels):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(pixels, np.uint8)).save(path)


def junk(folder, names=("._000.png", ".DS_Store", "Thumbs.db", "desktop.ini")):
    for name in names:
        (folder / name).write_bytes(GARBAGE)


@pytest.fixture
def mvtec_root(tmp_path):
    """A hand-made category: 3 normal training images, one good and two cracked test
    images, one crack mask stored 0/1 and one 0/255, junk beside every file."""
    base = tmp_path / "part"
    rng = np.random.default_rng(0)
    for n in range(3):
        write_image(base / "train" / "good" / f"{n:03d}.png", rng.integers(0, 255, RGB))
    write_image(base / "test" / "good" / "000.png", rng.integers(0, 255, RGB))
    for n, high in ((0, 1), (1, 255)):
        write_image(base / "test" / "crack" / f"{n:03d}.png", rng.integers(0, 255, RGB))
        mask = np.zeros((32, 32))
        mask[4 : 10 + 4 * n, 8:20] = high
        write_image(base / "ground_truth" / "crack" / f"{n:03d}_mask.png", mask)
    for folder in ("train/good", "test/good", "test/crack", "ground_truth/crack", "test", ""):
        junk(base / folder)
    return tmp_path


def test_mvtec_masks_stored_0_1_or_0_255_are_anomalous(mvtec_root):
    test = mvtec.load_test(str(mvtec_root), "part", size=32)
    assert test.defects == ["crack", "crack", "good"]
    assert test.labels.tolist() == [1, 1, 0]
    assert [int(mask.sum()) for mask in test.masks] == [6 * 12, 10 * 12, 0]


def test_mvtec_hidden_files_are_skipped_unread_and_counted(mvtec_root, caplog):
    caplog.set_level(logging.INFO, logger="keras_vae_attn.data")
    assert len(mvtec.load_train(str(mvtec_root), "part", size=16)) == 3
    assert len(mvtec.load_test(str(mvtec_root), "part", size=16).labels) == 3
    skips = hidden_skips(caplog)
    base = mvtec_root / "part"
    for folder in ("train/good", "test/good", "test/crack", "test"):
        assert skips[str(base / folder)] == 4, folder


def test_mvtec_mask_of_another_size_is_refused_naming_both(mvtec_root):
    crack = mvtec_root / "part" / "test" / "crack"
    write_image(crack / "001.png", np.zeros((256, 256, 3)))
    write_image(
        mvtec_root / "part" / "ground_truth" / "crack" / "001_mask.png",
        np.full((60, 100), 255),
    )
    with pytest.raises(
        DataError,
        match=r"mask '.*crack[/\\]001_mask\.png' is 100x60 but "
        r"its image '.*crack[/\\]001\.png' is 256x256",
    ):
        mvtec.load_test(str(mvtec_root), "part", size=32)
