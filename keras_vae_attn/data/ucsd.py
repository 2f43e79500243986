"""The UCSD Anomaly Dataset (pedestrian walkways, Ped1 and Ped2) in its official layout.

    <root>/UCSDped1/Train/Train001/001.tif ...     normal clips, one file per frame
    <root>/UCSDped1/Test/Test001/001.tif ...       test clips
    <root>/UCSDped1/Test/Test003_gt/001.bmp ...    pixel masks, for some test clips only

``root`` may also be the ``UCSDped1`` (``UCSDped2``) folder itself. Frames and masks may
be tif, bmp, png or jpg; a mask pairs with the frame of the same frame number, the last
integer in the name, because the official Ped2 names the masks of Test006, Test009 and
Test012 ``frame001.bmp`` where the others are ``001.bmp``. Hidden and system files
(``.DS_Store``, ``._001.tif``, ``Thumbs.db``) are skipped unread. Frames load as grey,
resized to ``size`` x ``size`` (Pillow, antialiased bilinear); masks are made binary at
their own resolution (any non-zero pixel is anomalous, so 0/1 and 0/255 masks both work),
then resized (bilinear, kept where >= 0.5), so a mask marks the pixels at least half
covered by the anomaly. Only test clips with masks are evaluated; their frames without
an anomaly count with empty masks.
"""

from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np
from PIL import Image, UnidentifiedImageError

from keras_vae_attn.data import DataError, visible_names
from keras_vae_attn.data import to_float as to_float  # re-exported: ucsd.to_float

SUBSETS = {"ped1": "UCSDped1", "ped2": "UCSDped2"}
FRAME_EXTENSIONS = (".tif", ".tiff", ".bmp", ".png", ".jpg", ".jpeg")
GT_SUFFIX = "_gt"
SPLITS = ("Train", "Test")


class Clip(NamedTuple):
    """One clip: its folder name, frame paths in order, and mask paths (paired with the
    frames by number, same order) or None."""

    name: str
    frames: list
    masks: list | None


class TestFrames(NamedTuple):
    """Decoded frames of the test clips that have masks.

    images  uint8 (N, size, size, 1)
    masks   bool  (N, size, size)
    labels  int   (N,) 1 = the frame holds an anomalous pixel
    clips   list of N clip names ("Test003", ...)
    paths   list of N frame paths
    """

    images: np.ndarray
    masks: np.ndarray
    labels: np.ndarray
    clips: list
    paths: list


def _natural_key(name):
    """Sort "2.tif" before "10.tif" (the official names are zero-padded; others may not be)."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def subset_dir(root, subset):
    """``<root>/UCSDped1`` (or ``root`` itself when it is that folder); checks both splits."""
    if subset not in SUBSETS:
        raise ValueError(f"unknown UCSD subset {subset!r}; choose one of {', '.join(SUBSETS)}")
    if not os.path.isdir(root):
        raise DataError(f"UCSD root {root!r} does not exist or is not a folder")
    folder = SUBSETS[subset]
    base = (
        root
        if os.path.basename(os.path.normpath(root)) == folder
        else os.path.join(root, folder)
    )
    if not os.path.isdir(base):
        found = sorted(name for name in os.listdir(root) if name.startswith("UCSDped"))
        raise DataError(
            f"no {folder} folder under UCSD root {root!r}"
            + (f"; found {', '.join(found)}" if found else "")
        )
    for split in SPLITS:
        if not os.path.isdir(os.path.join(base, split)):
            raise DataError(
                f"{folder} has no {split} folder: expected {os.path.join(base, split)!r}"
            )
    return base


def frame_files(folder):
    """Image files of one clip folder, in frame order."""
    names = [
        name
        for name in visible_names(folder)
        if name.lower().endswith(FRAME_EXTENSIONS)
        and os.path.isfile(os.path.join(folder, name))
    ]
    return [os.path.join(folder, name) for name in sorted(names, key=_natural_key)]


def _stem(path):
    return os.path.splitext(os.path.basename(path))[0]


def frame_number(path):
    """The frame number in a file name, its last integer ("001.tif", "frame001.bmp" -> 1)."""
    digits = re.findall(r"\d+", _stem(path))
    return int(digits[-1]) if digits else None


def _by_number(paths, folder):
    """{frame number: path}; a DataError naming the folder for a name without a number or
    a number used twice ("001.bmp" beside "frame001.bmp"), which cannot be paired."""
    by_number, duplicates = {}, {}
    for path in paths:
        number = frame_number(path)
        if number is None:
            raise DataError(
                f"{os.path.basename(path)} in {folder!r} has no frame number in "
                "its name, so it cannot be paired"
            )
        if number in by_number:
            duplicates.setdefault(number, [os.path.basename(by_number[number])])
            duplicates[number].append(os.path.basename(path))
        by_number[number] = path
    if duplicates:
        listed = _listing(
            [
                f"{number} ({', '.join(sorted(names))})"
                for number, names in sorted(duplicates.items())
            ]
        )
        raise DataError(
            f"folder {folder!r} holds more than one file for frame number(s) "
            f"{listed}, so frames and masks cannot be paired"
        )
    return by_number


def _pair_masks(clip, frames, gt_folder):
    """Mask paths in frame order, paired by frame number; a DataError when the gt folder
    does not match the clip (a frame without a mask, a mask without a frame)."""
    masks = frame_files(gt_folder)
    frame_of = _by_number(frames, os.path.dirname(frames[0]))
    mask_of = _by_number(masks, gt_folder)
    missing = sorted(set(frame_of) - set(mask_of))
    extra = sorted(set(mask_of) - set(frame_of))
    if missing or extra:
        detail = []
        if missing:
            detail.append(
                "frames without a mask: "
                + _listing([os.path.basename(frame_of[n]) for n in missing])
            )
        if extra:
            detail.append(
                "masks without a frame: "
                + _listing([os.path.basename(mask_of[n]) for n in extra])
            )
        raise DataError(
            f"ground-truth folder {gt_folder!r} holds {len(masks)} masks but "
            f"clip {clip} has {len(frames)} frames ({'; '.join(detail)})"
        )
    return [mask_of[frame_number(path)] for path in frames]


def _listing(names, limit=5):
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def list_clips(root, subset, split):
    """The clips of ``split`` ("Train" or "Test") in order, masks paired for test clips."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
    folder = os.path.join(subset_dir(root, subset), split)
    entries = visible_names(folder)
    clip_names = sorted(
        (
            name
            for name in entries
            if not name.endswith(GT_SUFFIX) and os.path.isdir(os.path.join(folder, name))
        ),
        key=_natural_key,
    )
    gt_names = {
        name[: -len(GT_SUFFIX)]
        for name in entries
        if name.endswith(GT_SUFFIX) and os.path.isdir(os.path.join(folder, name))
    }
    orphans = sorted(gt_names - set(clip_names), key=_natural_key)
    if orphans:
        raise DataError(
            f"ground-truth folder {os.path.join(folder, orphans[0] + GT_SUFFIX)!r} "
            f"has no clip {orphans[0]!r} beside it"
        )
    if not clip_names:
        raise DataError(f"{split} folder {folder!r} holds no clip folders")
    clips = []
    for name in clip_names:
        frames = frame_files(os.path.join(folder, name))
        if not frames:
            raise DataError(
                f"clip {name} ({os.path.join(folder, name)!r}) holds no frames "
                f"({', '.join(FRAME_EXTENSIONS)})"
            )
        masks = (
            _pair_masks(name, frames, os.path.join(folder, name + GT_SUFFIX))
            if name in gt_names
            else None
        )
        clips.append(Clip(name, frames, masks))
    return clips


def _read(path, clip, role):
    """One file as a uint8 grey array; a DataError naming the clip and the frame."""
    try:
        with Image.open(path) as picture:
            picture.load()
            return np.asarray(picture.convert("L") if picture.mode != "L" else picture)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as error:
        raise DataError(
            f"cannot read {role} {os.path.basename(path)} of clip {clip} ({path!r}): {error}"
        ) from error


def _resize(pixels, size):
    return np.asarray(Image.fromarray(pixels).resize((size, size), Image.Resampling.BILINEAR))


def read_frame(path, clip, size):
    """A frame resized to ``size``: uint8 (size, size)."""
    return _resize(_read(path, clip, "frame"), size)


def read_mask(path, clip, size, frame_shape=None):
    """A mask resized to ``size``: bool (size, size).

    Any non-zero pixel is anomalous, so masks stored as 0/1 and as 0/255 both work.
    ``frame_shape`` (height, width) checks the mask was drawn on a frame of that size.
    """
    pixels = _read(path, clip, "mask")
    if frame_shape is not None and pixels.shape != tuple(frame_shape):
        raise DataError(
            f"mask {os.path.basename(path)} of clip {clip} ({path!r}) is "
            f"{pixels.shape[1]}x{pixels.shape[0]} but its frame is "
            f"{frame_shape[1]}x{frame_shape[0]}"
        )
    binary = pixels > 0
    if binary.shape == (size, size):
        return binary
    scaled = Image.fromarray(binary.astype(np.float32)).resize(
        (size, size), Image.Resampling.BILINEAR
    )
    return np.asarray(scaled) >= 0.5


def _map(function, items, workers):
    if workers <= 1:
        return [function(item) for item in items]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(function, items))


def _pick(clips, max_clips, frame_step):
    if frame_step < 1:
        raise ValueError(f"frame_step must be at least 1, got {frame_step}")
    picked = clips[:max_clips]
    return [
        Clip(
            c.name, c.frames[::frame_step], None if c.masks is None else c.masks[::frame_step]
        )
        for c in picked
    ]


def load_train(root, subset="ped1", size=100, max_clips=None, frame_step=1, workers=4):
    """Normal training frames of every Train clip: uint8 (N, size, size, 1).

    ``frame_step`` keeps every k-th frame (neighbouring frames are near duplicates);
    ``max_clips`` caps the number of clips.
    """
    clips = _pick(list_clips(root, subset, "Train"), max_clips, frame_step)
    jobs = [(clip.name, path) for clip in clips for path in clip.frames]
    frames = _map(lambda job: read_frame(job[1], job[0], size), jobs, workers)
    return np.stack(frames)[..., None]


def load_test(root, subset="ped1", size=100, max_clips=None, frame_step=1, workers=4):
    """Frames and masks of the Test clips that have a ``_gt`` folder; see :class:`TestFrames`.

    ``max_clips`` caps the number of such clips; a DataError when there are none.
    """
    all_clips = list_clips(root, subset, "Test")
    clips = _pick(
        [clip for clip in all_clips if clip.masks is not None], max_clips, frame_step
    )
    if not clips:
        raise DataError(
            f"none of the {len(all_clips)} test clips of {SUBSETS[subset]} under "
            f"{root!r} has a ground-truth folder (TestNNN{GT_SUFFIX}), so pixel "
            "metrics cannot be computed"
        )

    def load(job):
        clip, frame, mask = job
        image = _read(frame, clip, "frame")
        return _resize(image, size), read_mask(mask, clip, size, image.shape)

    jobs = [
        (clip.name, frame, mask)
        for clip in clips
        for frame, mask in zip(clip.frames, clip.masks)
    ]
    pairs = _map(load, jobs, workers)
    masks = np.stack([mask for _, mask in pairs])
    return TestFrames(
        images=np.stack([image for image, _ in pairs])[..., None],
        masks=masks,
        labels=masks.any(axis=(1, 2)).astype(np.int64),
        clips=[job[0] for job in jobs],
        paths=[job[1] for job in jobs],
    )
