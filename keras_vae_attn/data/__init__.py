"""Dataset readers and generated stand-ins; one module per dataset."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any, NamedTuple

log = logging.getLogger("keras_vae_attn.data")

SYSTEM_FILES = ("thumbs.db", "desktop.ini")


class DataError(ValueError):
    """A dataset file or folder is missing, corrupt or inconsistent; the message names it.

    ``option`` names the loader argument that would change the outcome (e.g.
    "skip_corrupt"); a command line turns it into its own flag hint, so the library's
    messages never name CLI flags.
    """

    def __init__(self, message: str, option: str | None = None) -> None:
        super().__init__(message)
        self.option = option


def is_hidden(name: str) -> bool:
    """True for the hidden and system files that copies made on macOS or Windows carry
    (".DS_Store", "._001.tif" resource forks, "Thumbs.db", "desktop.ini"): never data, and
    often not decodable, so every reader skips them by name."""
    return name.startswith(".") or name.lower() in SYSTEM_FILES


def visible_names(folder: str) -> list[str]:
    """The entries of ``folder`` that are not hidden or system files; logs how many were
    skipped, so a dataset that seems to be missing files can be explained."""
    names = os.listdir(folder)
    kept = [name for name in names if not is_hidden(name)]
    skipped = len(names) - len(kept)
    if skipped:
        log.info(
            "skipped %d hidden file%s in %s", skipped, "" if skipped == 1 else "s", folder
        )
    return kept


def to_float(images: Any) -> Any:
    """uint8 images -> float32 in [0, 1], same shape (what every model reads)."""
    import numpy as np

    return np.asarray(images, np.float32) / 255.0


class LocalizationSplit(NamedTuple):
    """Test images of a localization dataset with their ground truth, one type for every
    dataset: ``images`` (N, H, W, C), ``masks`` bool (N, H, W) or None where the dataset
    labels only whole images (MNIST), ``labels`` int (N,) 1 = anomalous, ``groups`` the
    N defect types, clip names or digits, ``paths`` the N source files (or names)."""

    images: Any
    masks: Any
    labels: Any
    groups: list
    paths: list


def split_held_out(items: Sequence, fraction: float) -> tuple[Sequence, Sequence]:
    """(trained on, held out): the last ``fraction`` of the normal training images (or
    their files; at least one) are held out to calibrate thresholds. The one hold-out
    scheme of the trainers and the export pipeline: a tail, not a random sample, so
    the held-out frames of a video are not neighbours of trained ones. ``fraction`` 0
    holds none out and calibrates on the training images themselves (lower thresholds:
    more false alarms)."""
    count = int(round(fraction * len(items)))
    if fraction > 0:
        count = max(1, count)
    if count >= len(items):
        raise ValueError(
            f"holding out {count} of {len(items)} normal training images "
            "for calibration leaves none to train on: lower the fraction"
        )
    if count == 0:
        return items, items
    return items[:-count], items[-count:]
