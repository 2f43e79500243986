"""Version numbers under a TF Serving model folder (``<serving dir>/<model name>/``).

A version folder is written beside its final name (``<version>.partial-<pid>``, which
TF Serving ignores: not a number) and published in one rename by
:func:`keras_vae_attn.runs.staged`. The number is claimed first, so two exporters, or
an exporter and the pipeline's push, never write the same one; what a killed writer
left (its staging folder, its claim) is removed by the next writer.
"""

from __future__ import annotations

import os
import re

from export import ExportError
from keras_vae_attn.runs import pid_alive, remove_stale

#: Staging a writer leaves beside version ``<version>`` (keras_vae_attn.runs' names):
#: ``<version>.partial-<pid>``, and ``<version>.replaced-<pid>`` of a replace.
STAGING = re.compile(r"^(\d+)\.(?:partial|replaced)-\d+$")
#: A version number being written: ``.claim-<version>``, a symbolic link whose target
#: is the writer's pid (made in one system call, so a claim always names its owner).
CLAIM = re.compile(r"^\.claim-(\d+)$")


def remove_stale_staging(folder: str) -> list[str]:
    """Clear what dead writers left in the model folder ``folder``: their staging
    folders (:func:`keras_vae_attn.runs.remove_stale`, which also puts back a version a
    killed replace had moved aside) and their version claims. Those of a live writer
    (a concurrent export) are kept. Returns the paths removed or restored."""
    if not os.path.isdir(folder):
        return []
    names = sorted(os.listdir(folder))
    removed = []
    for version in sorted({m.group(1) for m in map(STAGING.match, names) if m}, key=int):
        removed += remove_stale(os.path.join(folder, version))
    for name in names:
        path = os.path.join(folder, name)
        owner = claim_owner(path) if CLAIM.match(name) else None
        if owner is not None and not pid_alive(owner):
            release_version(path)
            removed.append(path)
    return removed


def claim_owner(path: str) -> int | None:
    """The pid a version claim names (None: no claim there, or not one of ours)."""
    try:
        target = os.readlink(path)
    except OSError:
        return None
    return int(target) if target.isdigit() else None


def claim_version(base: str, version: int | None = None) -> tuple[int, str]:
    """Claim a version number under the model folder ``base`` for this process; returns
    (version, claim path). ``version`` None takes the next free number.

    The claim is a link created by one ``os.symlink``, which fails when the name exists,
    so two exporters (or an exporter and a push) never get the same number even when
    they start together; the number is free once nobody holds its claim and no version
    folder has it. A given ``version`` that another live process holds is an
    ExportError. Give the claim back with :func:`release_version`.
    """
    os.makedirs(base, exist_ok=True)
    remove_stale_staging(base)
    number = version or next_free(base)
    while True:
        claim = os.path.join(base, f".claim-{number}")
        try:
            os.symlink(str(os.getpid()), claim)
        except FileExistsError:
            if version is not None:
                raise ExportError(
                    f"version {version} under {base!r} is being written by "
                    f"process {claim_owner(claim)}; pass another --version"
                ) from None
            number = max(number + 1, next_free(base))
            continue
        if version is None and os.path.lexists(os.path.join(base, str(number))):
            release_version(claim)  # written meanwhile by a writer without claims
            number = max(number + 1, next_free(base))
            continue
        return number, claim


def next_free(base: str) -> int:
    """1 + the largest version number under ``base``, folders and claims alike."""
    numbers = [int(name) for name in os.listdir(base) if name.isdigit()]
    numbers += [int(m.group(1)) for m in map(CLAIM.match, os.listdir(base)) if m]
    return max(numbers, default=0) + 1


def release_version(claim: str) -> None:
    """Remove a claim made by :func:`claim_version` (gone already: nothing to do)."""
    try:
        os.remove(claim)
    except FileNotFoundError:
        pass
