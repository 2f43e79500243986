"""MNIST from the four canonical IDX files, or from tensorflow-datasets."""

from __future__ import annotations

import contextlib
import gzip
import io
import logging
import os
import struct
import sys

import numpy as np

from keras_vae_attn.data import DataError
from keras_vae_attn.data import to_float as _to_float

FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IMAGE_MAGIC, _LABEL_MAGIC = 2051, 2049


def _find(data_dir, stem):
    for name in (stem + ".gz", stem, stem.replace("-idx", ".idx")):
        path = os.path.join(data_dir, name)
        if os.path.isfile(path):
            return path
    raise DataError(f"MNIST file {stem}(.gz) not found in {data_dir!r}")


def read_idx(path):
    """Read one IDX file (optionally gzipped) into a uint8 array, validating its header."""
    try:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rb") as handle:
            raw = handle.read()
    except (OSError, EOFError) as error:
        raise DataError(f"cannot read IDX file {path!r}: {error}") from error
    if len(raw) < 8:
        raise DataError(f"IDX file {path!r} is truncated: {len(raw)} bytes")
    magic, count = struct.unpack(">II", raw[:8])
    if magic not in (_IMAGE_MAGIC, _LABEL_MAGIC):
        raise DataError(f"{path!r} is not an MNIST IDX file (magic number {magic:#010x})")
    dims = [count]
    offset = 8
    if magic == _IMAGE_MAGIC:
        if len(raw) < 16:
            raise DataError(f"IDX file {path!r} is truncated in its header")
        dims += list(struct.unpack(">II", raw[8:16]))
        offset = 16
    expected = int(np.prod(dims))
    if len(raw) - offset != expected:
        raise DataError(
            f"IDX file {path!r} is truncated or padded: header says {dims} "
            f"({expected} bytes of data), file has {len(raw) - offset}"
        )
    return np.frombuffer(raw, np.uint8, offset=offset).reshape(dims)


def load_split(data_dir, split):
    """(images uint8 (N, 28, 28), labels uint8 (N,)) of ``split`` in {'train', 'test'}."""
    if not os.path.isdir(data_dir):
        raise DataError(f"MNIST directory {data_dir!r} does not exist")
    image_stem, label_stem = FILES[split]
    images = read_idx(_find(data_dir, image_stem))
    labels = read_idx(_find(data_dir, label_stem))
    if images.ndim != 3 or labels.ndim != 1:
        raise DataError(f"MNIST {split} files in {data_dir!r} have swapped or wrong contents")
    if images.shape[1:] != (28, 28):
        raise DataError(
            f"MNIST {split} images in {data_dir!r}: the IDX header says "
            f"{images.shape[1]}x{images.shape[2]} pixels, MNIST's are 28x28"
        )
    if len(images) != len(labels):
        raise DataError(
            f"MNIST {split} in {data_dir!r}: {len(images)} images but {len(labels)} labels"
        )
    return images, labels


#: Download attempts of tensorflow-datasets (its own default, 10 with backoff, spends
#: over 3 minutes before it reports a machine without network).
TFDS_RETRIES = 2


def load_tfds(split):
    """The same arrays from tensorflow-datasets (downloads on first use).

    A missing package raises extras.MissingExtra, a failed download DataError; both in
    one line naming ``data_dir`` (the four IDX files need no network).
    """
    from keras_vae_attn.extras import needs_extra

    with needs_extra("datasets", "loading MNIST through tensorflow-datasets", "data_dir"):
        import tensorflow_datasets as tfds
        from absl import logging as absl_logging
        from tensorflow_datasets.core.download import downloader

        downloader.MAX_RETRIES = min(getattr(downloader, "MAX_RETRIES", 0), TFDS_RETRIES)
        logging.getLogger("urllib3").setLevel(logging.ERROR)  # one line per retry
        tfds.display_progress_bar(False)
        notes, verbosity = io.StringIO(), absl_logging.get_verbosity()
        absl_logging.set_verbosity(absl_logging.ERROR)  # "no dataset_info.json" and such
        try:
            with contextlib.redirect_stdout(notes):  # "Downloading and preparing ..."
                images, labels = tfds.as_numpy(
                    tfds.load("mnist", split=split, batch_size=-1, as_supervised=True)
                )
        except OSError as error:  # requests' errors included: no network, no host
            raise DataError(
                f"downloading MNIST through tensorflow-datasets failed "
                f"({type(error).__name__}); without network, load it from a "
                f"folder (data_dir) holding {', '.join(FILES['train'])} and "
                f"{', '.join(FILES['test'])} (.gz or not)",
                option="data_dir",
            ) from None
        finally:
            absl_logging.set_verbosity(verbosity)
    sys.stdout.write(notes.getvalue())  # a first download says where it went
    return images[..., 0], labels


def load(data_dir=None, split="train"):
    """MNIST ``split`` from ``data_dir`` (IDX files) or, without one, from TFDS."""
    return load_split(data_dir, split) if data_dir else load_tfds(split)


def check_digit(digit):
    """Validate a normal-class digit."""
    if not isinstance(digit, (int, np.integer)) or not 0 <= digit <= 9:
        raise ValueError(f"must be an integer from 0 to 9, got {digit!r}")
    return int(digit)


def to_float(images):
    """uint8 (N, 28, 28) -> float32 (N, 28, 28, 1) in [0, 1]."""
    return _to_float(images)[..., None]
