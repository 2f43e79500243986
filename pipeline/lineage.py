"""Stage bookkeeping for the pipeline: a manifest with lineage, and stage caching.

Each stage records its inputs, outputs (with content hashes), config, package versions,
data fingerprint, start/end time and status in ``manifest.json``. A stage whose cache key
(config + input hashes + data fingerprint) matches its last successful record, and whose
outputs are still on disk unchanged, is skipped and its artifacts reused.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
from collections.abc import Callable
from typing import Any

from export.metadata import package_versions
from keras_vae_attn.runs import staged

MANIFEST = "manifest.json"


def hash_path(path: str) -> str:
    """sha256 of a file, or of a folder's files (relative names and contents, sorted)."""
    digest = hashlib.sha256()
    if os.path.isfile(path):
        files = [(os.path.basename(path), path)]
    else:
        files = sorted(
            (os.path.relpath(os.path.join(root, name), path), os.path.join(root, name))
            for root, _, names in os.walk(path)
            for name in names
        )
    for relative, full in files:
        digest.update(relative.encode())
        with open(full, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


class LineageError(ValueError):
    """A manifest the bookkeeping cannot read; the message names the path and what is
    wrong."""


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


class Manifest:
    """``manifest.json`` of one pipeline folder, rewritten atomically after each change."""

    def __init__(self, folder: str) -> None:
        self.path = os.path.join(folder, MANIFEST)
        self.data = {"stages": {}}
        if os.path.exists(self.path):
            self.data = read_manifest(self.path)

    def record(self, stage: str) -> dict[str, Any] | None:
        return self.data["stages"].get(stage)

    def write(self, stage: str, record: dict[str, Any]) -> None:
        self.data["stages"][stage] = record
        with staged(self.path, replace=True) as partial:
            with open(partial, "w", encoding="utf-8") as handle:
                json.dump(self.data, handle, indent=2)  # stages stay in the order they ran


def read_manifest(path: str) -> dict[str, Any]:
    """The dict a ``manifest.json`` holds; LineageError (naming the file) when it is no
    pipeline manifest: not JSON, or no "stages" object of stage records."""
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError) as error:
        raise LineageError(
            f"{path} is not a pipeline manifest ({error}); move it away, "
            "or choose another --pipeline-dir"
        ) from None
    stages = data.get("stages") if isinstance(data, dict) else None
    if not isinstance(stages, dict) or not all(isinstance(r, dict) for r in stages.values()):
        raise LineageError(
            f'{path} is not a pipeline manifest (no "stages" object of '
            "stage records); move it away, or choose another --pipeline-dir"
        )
    return data


def cache_key(config: Any, inputs: dict[str, str], data_fingerprint: dict[str, Any]) -> str:
    """What a stage's result depends on, as one hash."""
    blob = json.dumps(
        {"config": config, "inputs": inputs, "data": data_fingerprint}, sort_keys=True
    )
    return hashlib.sha256(blob.encode()).hexdigest()


#: What a stage's action returns: (status, {output name: path}, details for the record).
StageResult = tuple[str, dict[str, str], dict[str, Any]]


def run_stage(
    manifest: Manifest,
    name: str,
    config: Any,
    inputs: dict[str, str],
    data_fingerprint: dict[str, Any],
    action: Callable[[], StageResult],
    force: bool = False,
) -> dict[str, Any]:
    """Run ``action()`` -> :data:`StageResult` unless cached.

    ``inputs`` maps names to paths whose content the stage reads. Returns the record,
    with ``cached`` true when the previous result was reused.
    """
    input_hashes = {key: hash_path(path) for key, path in inputs.items()}
    key = cache_key(config, input_hashes, data_fingerprint)
    previous = manifest.record(name)
    if (
        not force
        and previous
        and previous.get("cache_key") == key
        and previous.get("status") not in ("failed", "running")
        and all(
            os.path.exists(path) and hash_path(path) == digest
            for path, digest in previous.get("output_hashes", {}).items()
        )
    ):
        return {**previous, "cached": True}
    record = {
        "stage": name,
        "status": "running",
        "config": config,
        "inputs": inputs,
        "input_hashes": input_hashes,
        "data_fingerprint": data_fingerprint,
        "versions": package_versions(),
        "cache_key": key,
        "started": _now(),
    }
    manifest.write(name, record)
    try:
        status, outputs, details = action()
    except BaseException as error:
        manifest.write(
            name,
            {
                **record,
                "status": "failed",
                "ended": _now(),
                "error": f"{type(error).__name__}: {error}",
            },
        )
        raise
    record.update(
        status=status,
        outputs=outputs,
        details=details,
        ended=_now(),
        output_hashes={
            path: hash_path(path) for path in outputs.values() if os.path.exists(path)
        },
    )
    manifest.write(name, record)
    return {**record, "cached": False}
