"""Generated datasets are written once, atomically, and reused while their spec matches."""

from __future__ import annotations

import json
import os
import shutil
import tempfile

SPEC_FILE = "generator.json"


def read_spec(folder):
    """The spec a generated folder was written with (None if absent or unreadable)."""
    try:
        with open(os.path.join(folder, SPEC_FILE), encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def write_once(root, name, spec, write_into, exist_ok=True):
    """``<root>/<name>`` written by ``write_into(folder, spec)``, with the spec beside it,
    into a staging folder and renamed into place, so a reader never sees half a dataset.
    An existing folder with the same spec is reused; another spec is replaced (or refused
    without ``exist_ok``). A concurrent writer of the same spec that renamed first wins
    quietly."""
    target = os.path.join(root, name)
    if os.path.exists(target):
        if not exist_ok:
            raise FileExistsError(f"{target!r} already exists")
        if read_spec(target) == spec:
            return target
    os.makedirs(root, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{name}-", dir=root)
    os.chmod(staging, 0o755)
    try:
        write_into(staging, spec)
        with open(os.path.join(staging, SPEC_FILE), "w", encoding="utf-8") as handle:
            json.dump(spec, handle, indent=2)
        if os.path.exists(target):
            retired = tempfile.mkdtemp(prefix=f".{name}-old-", dir=root)
            os.replace(target, os.path.join(retired, "old"))
            shutil.rmtree(retired, ignore_errors=True)
        try:
            os.replace(staging, target)
        except OSError:
            if read_spec(target) != spec:
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
