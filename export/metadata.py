"""What an exported model records about its making: the run, the data, the packages.

The SavedModel's ``assets/export.json`` and the ONNX ``metadata_props`` hold the same
:func:`model_metadata`; the pipeline's manifest records the same :func:`package_versions`
and :func:`fingerprint_files` of its data, so a served model and its lineage agree.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import platform
from typing import Any

from export.graph import PREPROCESSING, input_shape

#: The packages that shape a model's numbers.
PACKAGES = ("tensorflow", "keras", "numpy", "tf2onnx", "onnxruntime", "keras-vae-attn")


class FingerprintError(ValueError):
    """A data folder that cannot be fingerprinted; the message names the file."""


def package_versions() -> dict[str, str | None]:
    """Versions of :data:`PACKAGES` and of Python (None: not installed)."""
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def fingerprint_files(root: str) -> dict[str, Any]:
    """A cheap fingerprint of a data folder: its file list with sizes (not contents).

    A link that leads nowhere (dangling, or a loop) is a FingerprintError naming it: the
    trainer could not read it either, and saying so here costs nothing.
    """
    digest = hashlib.sha256()
    count = 0
    for folder, _, names in sorted(os.walk(root)):
        for name in sorted(names):
            full = os.path.join(folder, name)
            try:
                size = os.path.getsize(full)
            except OSError as error:
                kind = "a dangling or looping link" if os.path.islink(full) else "unreadable"
                raise FingerprintError(
                    f"data file {full!r} is {kind}: {error.strerror or error}"
                ) from None
            digest.update(f"{os.path.relpath(full, root)}:{size}\n".encode())
            count += 1
    return {"sha256": digest.hexdigest(), "files": count}


def training_data(config: dict[str, Any]) -> dict[str, Any] | None:
    """The fingerprint of the normal training images a run read (file names and sizes,
    as the pipeline's manifest fingerprints data): for runs whose ``config.json`` names
    ``data_dir`` and ``category`` (MVTec layout, ``<data_dir>/<category>/train``) while
    that folder exists; None where it is not known."""
    data_dir, category = config.get("data_dir"), config.get("category")
    if not isinstance(data_dir, str) or not isinstance(category, str):
        return None
    folder = os.path.join(data_dir, category, "train")
    if not os.path.isdir(folder):
        return None
    return {
        "folder": os.path.abspath(folder),
        "hashed": "file names and sizes",
        **fingerprint_files(folder),
    }


def model_metadata(run: Any, thresholds: Any) -> dict[str, Any]:
    """What an exported model was made from and how to feed it: the part the
    SavedModel's ``assets/export.json`` and the ONNX ``metadata_props`` share (read
    back by ``export.saved_model.read_metadata`` and ``export.onnx.read_metadata``).
    ``run``: an :class:`export.Run`; ``thresholds``: a Thresholds or None."""
    height, width, channels = input_shape(run.model)
    return {
        "input_shape": [height, width, channels],
        "image_size": [height, width],
        "preprocessing": PREPROCESSING,
        "options": run.options.as_config(),
        "latent_dim": int(run.model.latent_dim),
        "thresholds": thresholds.as_dict() if thresholds is not None else None,
        "training_data": training_data(run.config),
        "source_run": os.path.abspath(run.path),
        "run_complete": run.complete,
        "versions": package_versions(),
    }
