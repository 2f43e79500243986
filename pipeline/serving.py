"""The TF Serving folder as the pipeline sees it: which versions are served, which of
them a pipeline pushed, and the atomic push of a new version.

A version the pipeline exports carries ``assets/lineage.json`` (:data:`LINEAGE`) naming
its candidate, so a re-run recognises its own model and compares a new candidate with
the newest served model that is not itself.
"""

from __future__ import annotations

import json
import os
import shutil

from export.versions import claim_version, release_version, remove_stale_staging
from keras_vae_attn.runs import staged

LINEAGE = "lineage.json"


def served_versions(serving_dir: str, model_name: str) -> list[str]:
    """Version folders under ``<serving_dir>/<model_name>/``, oldest first."""
    folder = os.path.join(serving_dir, model_name)
    if not os.path.isdir(folder):
        return []
    return [
        os.path.join(folder, str(v))
        for v in sorted(int(n) for n in os.listdir(folder) if n.isdigit())
    ]


def read_candidate(version_dir: str) -> str | None:
    """The candidate id a pipeline wrote into a SavedModel's assets (None: not ours)."""
    path = os.path.join(version_dir, "assets", LINEAGE)
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as handle:
        return json.load(handle).get("candidate")


def served_baseline(serving_dir: str, model_name: str, candidate: str) -> str | None:
    """metrics.json of the model to beat: the newest served version that is not this
    candidate (so re-running after a push compares against the same model as before)."""
    for version_dir in reversed(served_versions(serving_dir, model_name)):
        if read_candidate(version_dir) != candidate:
            path = os.path.join(version_dir, "assets", "metrics.json")
            return path if os.path.exists(path) else None
    return None


def push_version(version_dir: str, serving_dir: str, model_name: str) -> str:
    """Copy a SavedModel to ``<serving_dir>/<model_name>/<next version>/`` atomically.

    The number is claimed as exporters claim theirs (:mod:`export.versions`), so a push
    and an export never take the same one; the copy is staged beside the target under a
    name TF Serving ignores and published in one rename
    (:func:`keras_vae_attn.runs.staged`). Staging left by killed pushes and exports
    (their pid dead) is removed first. Returns the new version folder.
    """
    base = os.path.join(serving_dir, model_name)
    os.makedirs(base, exist_ok=True)
    remove_stale_staging(base)
    version, claim = claim_version(base)
    target = os.path.join(base, str(version))
    try:
        with staged(target) as staging:
            shutil.copytree(version_dir, staging)
    finally:
        release_version(claim)
    return target
