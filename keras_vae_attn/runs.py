"""Run folders and the explain options: the one place where a CLI flag, ``config.json``,
scoring, re-scoring and every exporter agree on how a heatmap is made.

Pure Python (no TensorFlow import), so trainers can parse flags before TensorFlow loads.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np

RUN_COMPLETE = "metrics.json"
CONFIG = "config.json"


def to_jsonable(value):
    """Plain JSON values; non-finite floats become None (bare NaN is not JSON)."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, (np.floating, np.integer)):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def write_json(path, data):
    """Write JSON atomically (temp file + rename), with non-finite numbers as null."""
    partial = f"{path}.partial-{os.getpid()}"
    with open(partial, "w", encoding="utf-8") as handle:
        json.dump(to_jsonable(data), handle, indent=2, sort_keys=True, allow_nan=False)
    os.replace(partial, path)


def read_config(run_dir):
    """A run folder's config.json as a dict ({} when it has none)."""
    path = os.path.join(run_dir, CONFIG)
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as handle:
        config = json.load(handle)
    if not isinstance(config, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(config).__name__}")
    return config


class DiskFull(OSError):
    """No room for a file the run must write; the message names it and the way on."""


def require_space(folder, needed, what):
    """Raise DiskFull before writing ``what`` into ``folder`` when the disk has less
    than ``needed`` bytes free: HDF5 fails on a full disk with a crash or a file that
    never loads, so the write is not tried (the previous state stays as it is)."""
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise DiskFull(
            f"no space left for {what} in {folder}: {needed / 2**20:.1f} MiB "
            f"needed, {free / 2**20:.1f} MiB free"
        )


class ModelLoadError(ValueError):
    """A saved model folder whose files are there but do not load (not JSON, a spec no
    builder takes, truncated weights); the message names the folder, on one line."""
