"""The pipeline's views of the data: the normal images it holds out for calibration,
and the training folder without them.

The view is a folder of links in the pipeline folder (which never overlaps the data,
see :func:`pipeline.folder.check_apart`), so rebuilding it deletes links, never an
image.
"""

from __future__ import annotations

import os

from pipeline.folder import PipelineError, remove_entry


def hold_out(files: list[str], fraction: float) -> tuple[list[str], list[str]]:
    """(trained on, held out) of the normal training ``files``: the library's one
    hold-out scheme (:func:`keras_vae_attn.data.split_held_out`: the last ``fraction``
    of them, at least one), as the trainers hold out theirs."""
    from keras_vae_attn.data import split_held_out

    try:
        trained, held = split_held_out(list(files), fraction)
    except ValueError as error:
        raise PipelineError(f"--holdout {fraction}: {error}") from None
    return list(trained), list(held)


def training_view(root: str, data_dir: str, category: str, held: list[str]) -> str:
    """A data root at ``<root>/data`` that links to ``<data_dir>/<category>``, minus the
    ``held`` normal training images; returns it (the trainer's --data-dir)."""
    from keras_vae_attn.data import mvtec

    source = os.path.join(os.path.abspath(data_dir), category)
    view = os.path.join(root, "data")
    remove_entry(root, "data")
    good = os.path.join(view, category, "train", mvtec.GOOD)
    os.makedirs(good)
    for name in os.listdir(source):
        if name != "train":
            os.symlink(os.path.join(source, name), os.path.join(view, category, name))
    held = set(held)
    for path in mvtec.train_files(data_dir, category):
        if path not in held:
            os.symlink(os.path.abspath(path), os.path.join(good, os.path.basename(path)))
    return view
