"""MVTec AD in its official folder layout, any category, any image size.

    <root>/<category>/train/good/*.png
    <root>/<category>/test/<defect>/*.png            ("good" = normal test images)
    <root>/<category>/ground_truth/<defect>/<name>_mask.png

Images are decoded in parallel by a tf.data pipeline, resized to ``size`` x ``size``
(bilinear, antialiased; masks nearest-neighbour) and held in memory as uint8, which is the
cache every epoch reads from. Hidden and system files (``.DS_Store``, ``._000.png``,
``Thumbs.db``) are skipped unread. A mask marks its non-zero pixels (0/1 and 0/255 masks
both work) and must have its image's size. Channels: every category loads as RGB by
default, grey ones (grid, screw, zipper) with the grey value copied into all three
channels, so one backbone and one set of figures fit all 15; ``channels=1`` loads grey
instead.
"""

from __future__ import annotations

import os
import warnings
from typing import NamedTuple

import numpy as np

from keras_vae_attn.data import DataError, visible_names
from keras_vae_attn.data import to_float as to_float  # re-exported: mvtec.to_float

CATEGORIES = (
    "bottle",
    "cable",
    "capsule",
    "carpet",
    "grid",
    "hazelnut",
    "leather",
    "metal_nut",
    "pill",
    "screw",
    "tile",
    "toothbrush",
    "transistor",
    "wood",
    "zipper",
)
GRAYSCALE = ("grid", "screw", "zipper")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp")
GOOD = "good"


class Split(NamedTuple):
    """Decoded images of one split.

    images  uint8 (N, size, size, channels)
    masks   bool  (N, size, size); all False for normal images
    labels  int   (N,) 1 = anomalous
    defects list of N defect-type names ("good" for normal images)
    paths   list of N image paths
    """

    images: np.ndarray
    masks: np.ndarray
    labels: np.ndarray
    defects: list
    paths: list


def _image_files(folder):
    return sorted(
        os.path.join(folder, name)
        for name in visible_names(folder)
        if name.lower().endswith(IMAGE_EXTENSIONS)
    )


def find_categories(root):
    """Names of the folders under ``root`` that hold a ``train/good`` folder."""
    if not os.path.isdir(root):
        raise DataError(f"MVTec AD root {root!r} does not exist or is not a folder")
    return sorted(
        name
        for name in visible_names(root)
        if os.path.isdir(os.path.join(root, name, "train", GOOD))
    )


def category_dir(root, category):
    """``<root>/<category>``, or a DataError listing the categories that are there."""
    found = find_categories(root)
    if category not in found:
        listed = ", ".join(found) if found else "none (no <category>/train/good folders)"
        raise DataError(
            f"category {category!r} not found under MVTec AD root {root!r}; "
            f"categories found: {listed}"
        )
    return os.path.join(root, category)


def train_files(root, category):
    """Sorted paths of the normal training images; a DataError when there are none."""
    folder = os.path.join(category_dir(root, category), "train", GOOD)
    files = _image_files(folder)
    if not files:
        raise DataError(
            f"training folder {folder!r} holds no images ({', '.join(IMAGE_EXTENSIONS)})"
        )
    return files


def test_files(root, category):
    """[(image path, defect name, mask path or None)] over ``test/<defect>`` folders.

    Every defect image must have ``ground_truth/<defect>/<name>_mask.png``.
    """
    base = category_dir(root, category)
    test_dir = os.path.join(base, "test")
    if not os.path.isdir(test_dir):
        raise DataError(f"test folder {test_dir!r} does not exist")
    entries = []
    for defect in sorted(visible_names(test_dir)):
        folder = os.path.join(test_dir, defect)
        if not os.path.isdir(folder):
            continue
        for path in _image_files(folder):
            mask = None
            if defect != GOOD:
                stem = os.path.splitext(os.path.basename(path))[0]
                mask = os.path.join(base, "ground_truth", defect, f"{stem}_mask.png")
                if not os.path.isfile(mask):
                    raise DataError(
                        f"defect image {path!r} has no ground-truth mask: expected {mask!r}"
                    )
            entries.append((path, defect, mask))
    if not entries:
        raise DataError(f"test folder {test_dir!r} holds no images")
    return entries


def _spread_pick(entries, limit):
    """Up to ``limit`` entries taken round-robin across defect types (keeps every type)."""
    if limit is None or limit >= len(entries):
        return entries
    groups = {}
    for entry in entries:
        groups.setdefault(entry[1], []).append(entry)
    picked, queues = [], [list(group) for group in groups.values()]
    while len(picked) < limit:
        for queue in queues:
            if queue and len(picked) < limit:
                picked.append(queue.pop(0))
    return sorted(picked, key=entries.index)


def _decode_reason(path, channels):
    """Why TensorFlow cannot decode ``path`` (re-decoded eagerly for the message)."""
    import tensorflow as tf

    try:
        tf.io.decode_image(tf.io.read_file(path), channels=channels, expand_animations=False)
    except (tf.errors.OpError, ValueError) as error:
        return getattr(error, "message", str(error)).strip().splitlines()[0]
    return "unreadable"


def decode_files(paths, size, channels=3, nearest=False, skip_corrupt=False):
    """Decode and resize image files in parallel; uint8 (N, size, size, channels) out.

    A file that cannot be decoded (corrupt, truncated, not an image) is a DataError
    naming it, or with ``skip_corrupt`` a warning; the second value returned is the
    indices of the files kept.
    """
    images, kept, _ = _decode(paths, size, channels, nearest, skip_corrupt)
    return images, kept


def _decode(paths, size, channels, nearest, skip_corrupt):
    """:func:`decode_files`, plus each kept file's (height, width) before resizing, so
    masks can be checked against their images."""
    import tensorflow as tf

    method = "nearest" if nearest else "bilinear"

    def load(index, path):
        image = tf.io.decode_image(
            tf.io.read_file(path), channels=channels, expand_animations=False
        )
        shape = tf.shape(image)[:2]
        image = tf.image.resize(image, (size, size), method=method, antialias=not nearest)
        return index, tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8), shape

    dataset = (
        tf.data.Dataset.from_tensor_slices((np.arange(len(paths)), list(paths)))
        .map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        .ignore_errors()
        .prefetch(tf.data.AUTOTUNE)
    )
    out = np.zeros((len(paths), size, size, channels), np.uint8)
    shapes = np.zeros((len(paths), 2), np.int64)
    kept = np.zeros(len(paths), bool)
    for index, image, shape in dataset:
        out[int(index)] = image.numpy()
        shapes[int(index)] = shape.numpy()
        kept[int(index)] = True
    bad = [paths[i] for i in np.flatnonzero(~kept)]
    if bad:
        reasons = "; ".join(f"{path!r} ({_decode_reason(path, channels)})" for path in bad[:5])
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        if not skip_corrupt:
            raise DataError(
                f"cannot decode {len(bad)} image file(s): {reasons}{more}. "
                "Replace them, or leave them out (skip_corrupt)",
                option="skip_corrupt",
            )
        warnings.warn(
            f"skipping {len(bad)} undecodable image file(s): {reasons}{more}", stacklevel=3
        )
    return out[kept], np.flatnonzero(kept), shapes[kept]


def _check_mask_sizes(entries, rows, image_shapes, mask_shapes):
    """A DataError naming both files when a mask's size is not its image's: resizing both
    to ``size`` would hide it, and the mask would mark the wrong pixels."""
    wrong = [
        (entries[row], tuple(image_shapes[row]), tuple(mask_shape))
        for row, mask_shape in zip(rows, mask_shapes)
        if tuple(mask_shape) != tuple(image_shapes[row])
    ]
    if wrong:
        (image, _, mask), (height, width), (mask_height, mask_width) = wrong[0]
        more = (
            f" ({len(wrong) - 1} more masks differ from their images)"
            if len(wrong) > 1
            else ""
        )
        raise DataError(
            f"mask {mask!r} is {mask_width}x{mask_height} but its image "
            f"{image!r} is {width}x{height}{more}"
        )


def load_train(root, category, size=256, channels=3, limit=None, skip_corrupt=False):
    """Normal training images of ``category``: uint8 (N, size, size, channels)."""
    files = train_files(root, category)[:limit]
    images, _ = decode_files(files, size, channels, skip_corrupt=skip_corrupt)
    if not len(images):
        raise DataError(f"no training image of {category!r} under {root!r} could be decoded")
    if images.min() == images.max():
        # nothing to learn, and every per-pixel spread of the normal data is 0
        raise DataError(
            f"the {len(images)} training images of {category!r} under {root!r} "
            f"are all one flat colour (every pixel {int(images.min())}): there "
            "is no normal appearance to learn"
        )
    return images


def binary_masks(decoded, paths):
    """Bool masks from decoded uint8 masks (resized nearest, so their values are the
    files'). A binary mask (0 and one other value: 0/1, 0/255) marks its non-zero
    pixels; a mask with more levels (a grey photo, an anti-aliased drawing) would mark
    every non-black pixel, so those are thresholded at 128 with a warning naming one."""
    masks = decoded > 0
    grey = [i for i, mask in enumerate(decoded) if len(np.unique(mask[mask > 0])) > 1]
    if grey:
        levels = len(np.unique(decoded[grey[0]]))
        warnings.warn(
            f"{len(grey)} of {len(decoded)} masks are not binary (e.g. "
            f"{paths[grey[0]]!r} holds {levels} grey levels); a pixel of those "
            "is a defect where the mask is at least 128",
            stacklevel=3,
        )
        masks[grey] = decoded[grey] >= 128
    return masks


def load_test(root, category, size=256, channels=3, limit=None, skip_corrupt=False):
    """The test split of ``category`` with its masks; see :class:`Split`."""
    entries = _spread_pick(test_files(root, category), limit)
    images, kept, shapes = _decode(
        [e[0] for e in entries], size, channels, False, skip_corrupt
    )
    entries = [entries[i] for i in kept]
    with_mask = [i for i, entry in enumerate(entries) if entry[2] is not None]
    masks = np.zeros(images.shape[:3], bool)
    if with_mask:
        decoded, kept_masks, mask_shapes = _decode(
            [entries[i][2] for i in with_mask], size, 1, True, skip_corrupt
        )
        rows = [with_mask[i] for i in kept_masks]
        _check_mask_sizes(entries, rows, shapes, mask_shapes)
        masks[rows] = binary_masks(decoded[..., 0], [entries[i][2] for i in rows])
        # An image whose mask was skipped cannot be scored: leave it out as well.
        keep = sorted(set(range(len(entries))) - (set(with_mask) - set(rows)))
        images, masks, entries = images[keep], masks[keep], [entries[i] for i in keep]
    return Split(
        images=images,
        masks=masks,
        labels=np.array([int(e[1] != GOOD) for e in entries], np.int64),
        defects=[e[1] for e in entries],
        paths=[e[0] for e in entries],
    )
