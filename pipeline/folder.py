"""The pipeline folder: the pipeline owns only what it creates there.

The folder holds a marker file (:data:`MARKER`) naming the entries the pipeline writes
(:data:`OWNED`); a folder holding anything else, or overlapping the data or the serving
folder, is refused before anything is written, and nothing outside those entries is
ever deleted.
"""

from __future__ import annotations

import os
import shutil

from keras_vae_attn.runs import write_json
from pipeline import lineage

#: The file that marks a folder as a pipeline's, and the entries the pipeline writes
#: there (its own bookkeeping; nothing else in the folder is ever touched).
MARKER = ".export-pipeline.json"
OWNED = (
    MARKER,
    lineage.MANIFEST,
    "train",
    "evaluate",
    "export",
    "data",
    "holdout.json",
    "blessing.json",
)


class PipelineError(Exception):
    """A refused pipeline folder or data folder; the message names it and what is wrong."""


def default_folder(category: str) -> str:
    """The pipeline folder when --pipeline-dir is not given."""
    return os.path.join("runs", "pipeline", category)


def remove_entry(root: str, name: str) -> None:
    """Delete entry ``name`` of the pipeline folder ``root``: only one of the entries the
    pipeline writes itself (OWNED) is ever removed."""
    if name not in OWNED:
        raise ValueError(f"the pipeline removes only its own entries, not {name!r}")
    path = os.path.join(root, name)
    if os.path.islink(path) or os.path.isfile(path):
        os.remove(path)
    else:
        shutil.rmtree(path, ignore_errors=True)


def check_apart(root: str, category_dir: str) -> None:
    """PipelineError unless the pipeline folder and the category's data folder are
    apart (neither inside the other): the pipeline rebuilds folders of its own, and
    they must never be the user's images (nor may its outputs look like data)."""
    here, data = os.path.realpath(root), os.path.realpath(category_dir)
    if os.path.commonpath([here, data]) in (here, data):
        raise PipelineError(
            f"--pipeline-dir {root!r} and the data folder {category_dir!r} "
            "overlap (one holds the other); choose a --pipeline-dir "
            "outside the data"
        )


def check_serving_outside(root: str, serving_dir: str) -> None:
    """PipelineError if --serving-dir lies inside the pipeline folder: that folder holds
    only the pipeline's own entries, so the next run would refuse it."""
    here, serving = os.path.realpath(root), os.path.realpath(serving_dir)
    if os.path.commonpath([here, serving]) == here:
        raise PipelineError(
            f"--serving-dir {serving_dir!r} lies inside --pipeline-dir "
            f"{root!r}, which holds only the pipeline's own entries; "
            "choose a serving folder outside it"
        )


def owned(name: str) -> bool:
    """Whether ``name`` in a pipeline folder is one the pipeline writes (an entry of
    OWNED, or the staging file of one being rewritten)."""
    return name in OWNED or any(name.startswith(f"{entry}.partial") for entry in OWNED)


def claim_folder(root: str) -> None:
    """Make ``root`` the pipeline's folder, or PipelineError without touching it.

    A new or empty folder gets the marker file; a folder with the marker may hold only
    the entries the pipeline writes; one without it is taken only when it holds nothing
    but a pipeline's own entries and a readable manifest.json (a folder from before the
    marker). Anything else is the user's, and the pipeline would delete some of it.
    """
    if os.path.lexists(root) and not os.path.isdir(root):
        raise PipelineError(f"--pipeline-dir {root!r} exists and is not a folder")
    entries = sorted(os.listdir(root)) if os.path.isdir(root) else []
    foreign = [name for name in entries if not owned(name)]
    earlier = lineage.MANIFEST in entries
    if earlier and MARKER not in entries:
        lineage.read_manifest(os.path.join(root, lineage.MANIFEST))  # ours, or refused
    if foreign or (entries and MARKER not in entries and not earlier):
        names = foreign or entries
        listed = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        raise PipelineError(
            f"--pipeline-dir {root!r} holds files the pipeline did not "
            f"write ({listed}); choose a new or empty folder, or move them "
            "away (the pipeline deletes and rewrites its own entries "
            f"there: {', '.join(OWNED[1:])})"
        )
    os.makedirs(root, exist_ok=True)
    if MARKER not in entries:
        write_json(os.path.join(root, MARKER), {"written_by": "pipeline", "owns": list(OWNED)})
