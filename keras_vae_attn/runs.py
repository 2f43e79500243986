"""Run folders and the explain options: the one place where a CLI flag, ``config.json``,
scoring, re-scoring and every exporter agree on how a heatmap is made.

Pure Python (no TensorFlow import), so trainers can parse flags before TensorFlow loads.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from typing import Any

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


#: A staging copy of ``X`` is written as ``X.partial-<pid>`` beside it; an interrupted
#: replace leaves the old ``X`` as ``X.replaced-<pid>``. Both carry the writer's pid, so
#: the next writer removes those of dead processes and leaves a live one's alone.
PARTIAL = ".partial-"
REPLACED = ".replaced-"


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (one of another user counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def staging_path(final: str) -> str:
    """Where this process stages ``final`` (a file or a folder): ``final.partial-<pid>``,
    beside it, so the rename that publishes it stays on one file system."""
    return f"{os.path.normpath(final)}{PARTIAL}{os.getpid()}"


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


def remove_stale(final: str) -> list[str]:
    """Clear what dead writers of ``final`` left beside it: their staging copies are
    removed, and the old ``final`` that a writer killed mid-replace had moved aside is
    put back when nothing took its place. Returns the paths removed or restored."""
    folder, name = os.path.split(os.path.abspath(final))
    touched = []
    if not os.path.isdir(folder):
        return touched
    for entry in sorted(os.listdir(folder)):
        for marker in (PARTIAL, REPLACED):
            pid = entry[len(name) + len(marker) :]
            if not (entry.startswith(name + marker) and pid.isdigit()):
                continue
            if pid_alive(int(pid)):
                continue
            path = os.path.join(folder, entry)
            if marker == REPLACED and not os.path.lexists(final):
                os.rename(path, final)
            else:
                _remove(path)
            touched.append(path)
    return touched


def sync_tree(path: str) -> None:
    """fsync a file, or every file and folder under a folder, so that a rename which
    follows publishes complete data even after a power cut."""
    if os.path.isdir(path):
        for root, _, files in os.walk(path):
            for name in files:
                _fsync(os.path.join(root, name), os.O_RDONLY)
            _fsync(root, os.O_RDONLY)
    else:
        _fsync(path, os.O_RDONLY)


def _link_new(staging: str, final: str) -> None:
    """Move a file to a ``final`` that must not exist: a hard link fails when ``final``
    appeared meanwhile, so nothing is overwritten (a file system without hard links
    gets a check and a rename)."""
    try:
        os.link(staging, final)
    except FileExistsError:
        raise FileExistsError(f"{final} already exists; not replaced") from None
    except OSError:
        if os.path.lexists(final):
            raise FileExistsError(f"{final} already exists; not replaced") from None
        os.rename(staging, final)
        return
    os.remove(staging)


def _fsync(path: str, flags: int) -> None:
    descriptor = os.open(path, flags)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def publish(staging: str, final: str, replace: bool = False) -> str:
    """Move the fully written ``staging`` (a file or a folder) to ``final`` in one
    rename, after syncing it; returns ``final``.

    A reader of ``final`` sees the old content, or the new one, never a mix. Without
    ``replace`` an existing ``final`` is a FileExistsError and ``staging`` is kept for
    the caller to remove. With it, a file is swapped in one ``os.replace``; a folder (a
    rename cannot replace a non-empty one) is first moved aside to
    ``final.replaced-<pid>``, removed once the new one is in place; a kill between the
    two renames leaves that old folder, which :func:`remove_stale` puts back.
    """
    staging, final = os.fspath(staging), os.fspath(final)
    sync_tree(staging)
    exists = os.path.lexists(final)
    if exists and not replace:
        raise FileExistsError(f"{final} already exists; not replaced")
    if not os.path.isdir(staging):
        if replace:
            os.replace(staging, final)
        else:
            _link_new(staging, final)
    elif exists:
        old = f"{final}{REPLACED}{os.getpid()}"
        _remove(old)
        os.rename(final, old)
        os.rename(staging, final)
        _remove(old)
    else:
        os.rename(staging, final)  # fails on a non-empty folder that appeared meanwhile
    _fsync(os.path.dirname(os.path.abspath(final)), os.O_RDONLY)
    return final


@contextlib.contextmanager
def staged(final: str, replace: bool = False) -> Iterator[str]:
    """``with staged(final) as path:`` write a file or a folder at ``path``; it is
    published to ``final`` (:func:`publish`) when the block ends, and removed if the
    block raises. Stale staging copies of dead writers are cleared first."""
    final = os.path.normpath(final)
    remove_stale(final)
    path = staging_path(final)
    _remove(path)  # this pid's own leftover (a pid reused after a kill)
    try:
        yield path
        publish(path, final, replace)
    finally:
        _remove(path)


def write_json(path: str, data: Any) -> None:
    """Write JSON atomically (a synced staging file renamed over ``path``), with
    non-finite numbers as null."""
    with staged(path, replace=True) as partial:
        with open(partial, "w", encoding="utf-8") as handle:
            json.dump(to_jsonable(data), handle, indent=2, sort_keys=True, allow_nan=False)


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
