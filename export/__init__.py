"""Exporters: a TF Serving SavedModel, an ONNX graph, and a checker that runs either.

Every exported graph computes :func:`keras_vae_attn.pipeline.explain_anomaly` with the
options the run was trained and evaluated with (``config.json``), so a served heatmap
equals the one the trainer showed. This module holds what the command lines share:
reading a run folder, refusing bad paths and names before anything is written, and
claiming version numbers and clearing the staging folders a killed export left behind.
The graph the exporters serve is built from :mod:`export.graph`.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
from typing import NamedTuple

from keras_vae_attn.explain.options import ExplainOptions, OptionError
from keras_vae_attn.runs import RUN_COMPLETE


class Stages:
    """Numbered stage lines on stderr, "export.onnx 2/4: converting ... (5.1 s elapsed)"
    (seconds since the first stage began, so labelled: not the stage's own time), so an
    export that takes half a minute shows where it is. Called
    with the stage's description."""

    def __init__(self, label, total):
        self.label, self.total, self.done, self.started = label, total, 0, None

    def __call__(self, message):
        import time

        self.started = self.started or time.perf_counter()
        self.done += 1
        print(
            f"{self.label} {self.done}/{self.total}: {message} "
            f"({time.perf_counter() - self.started:.1f} s elapsed)",
            file=sys.stderr,
            flush=True,
        )


def no_stages(message):
    """The progress callback of a quiet export."""


class ExportError(Exception):
    """A refused export: the message names the path or argument and what is wrong."""


class InputError(ValueError):
    """Images an exported model cannot take; the message says what is wrong."""


class Run(NamedTuple):
    """A trained run folder, loaded.

    ``options`` is the :class:`~keras_vae_attn.explain.options.ExplainOptions` the run was
    evaluated with; ``complete`` is False when ``metrics.json`` is missing (training or
    evaluation did not finish).
    """

    path: str
    model: object
    config: dict
    options: dict
    complete: bool


def options_from_config(config):
    """The run's ExplainOptions from its ``config.json`` dict; ExportError if invalid."""
    try:
        return ExplainOptions.from_config(config)
    except (OptionError, TypeError) as error:
        raise ExportError(f"config.json holds invalid explain options: {error}") from None


def check_options(run):
    """Build every explainer the run's options need, and check the model holds the
    fitted state they read (feature distributions, layer scales): ValueError if not."""
    options = run.options
    for layer in options.layers:
        run.model.explainer(layer, options.gradient_relu)
        if options.needs_distribution:
            distribution = run.model.feature_distribution(layer)
            if options.needs_covariance and distribution.whiten is None:
                raise ValueError(
                    f"deviation 'whitened' needs the feature covariance of "
                    f"layer {layer!r}, which the model does not hold"
                )
    if options.needs_scales:
        raise ValueError(
            f"the options combine layers {options.layers} but config.json "
            "holds no layer_scales for them"
        )


def load_run(path):
    """Load the trained model of run folder ``path`` (read-only); ExportError if none."""
    from keras_vae_attn.models.io import MODEL_SPEC, MODEL_WEIGHTS, load_vae

    if not os.path.isdir(path):
        raise ExportError(f"--run {path!r} is not a folder")
    model_dir = os.path.join(path, "model")
    missing = [
        name
        for name in (MODEL_SPEC, MODEL_WEIGHTS)
        if not os.path.isfile(os.path.join(model_dir, name))
    ]
    if missing:
        raise ExportError(
            f"run folder {path!r} holds no trained model: "
            f"{', '.join(os.path.join(model_dir, m) for m in missing)} missing "
            "(train it first, or point --run at a finished run)"
        )
    config_path = os.path.join(path, "config.json")
    config = {}
    if os.path.isfile(config_path):
        try:
            with open(config_path, encoding="utf-8") as handle:
                config = json.load(handle)
        except (OSError, ValueError) as error:
            raise ExportError(f"cannot read {config_path}: {error}") from None
        if not isinstance(config, dict):
            raise ExportError(
                f"{config_path} must hold a JSON object, got {type(config).__name__}"
            )
    try:
        model = load_vae(model_dir)
    except (OSError, ValueError, TypeError, KeyError) as error:
        raise ExportError(f"cannot load the model in {model_dir!r}: {error}") from None
    return Run(
        path,
        model,
        config,
        options_from_config(config),
        os.path.isfile(os.path.join(path, RUN_COMPLETE)),
    )


def load_thresholds(path):
    """A :class:`keras_vae_attn.calibration.Thresholds` from a ``thresholds.json``."""
    from keras_vae_attn.calibration import Thresholds

    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
        values = Thresholds(
            float(data["pixel"]), float(data["image"]), str(data.get("method", ""))
        )
    except OSError as error:
        raise ExportError(f"--thresholds {path!r}: {error.strerror or error}") from None
    except (ValueError, TypeError, KeyError) as error:
        raise ExportError(
            f"--thresholds {path!r} must be a JSON object with numbers "
            f"'pixel' and 'image' ({type(error).__name__}: {error})"
        ) from None
    for name in ("pixel", "image"):  # json reads NaN and Infinity: every label "normal"
        if not math.isfinite(getattr(values, name)):
            raise ExportError(
                f"--thresholds {path!r}: {name} threshold must be a finite "
                f"number, got {getattr(values, name)}"
            )
    if not values.pixel > 0:
        raise ExportError(
            f"--thresholds {path!r}: pixel threshold must be > 0, got {values.pixel}"
        )
    return values


def warn_incomplete(run_dir):
    """Say so on stderr when the exported run never wrote ``metrics.json``."""
    if not os.path.isfile(os.path.join(run_dir, RUN_COMPLETE)):
        print(
            f"warning: {os.path.join(run_dir, RUN_COMPLETE)} is missing, so the run did not "
            "finish; the model it saved was exported",
            file=sys.stderr,
        )


def refuse_existing(path, force, flag="--out"):
    """ExportError if ``path`` exists and ``force`` is not set; nothing is touched."""
    if os.path.lexists(path) and not force:
        raise ExportError(
            f"{flag} {path!r} already exists; choose another path or pass "
            "--force to replace it"
        )


def model_name_problem(name):
    """Why ``name`` cannot be a TF Serving model folder name (None: it can). A name with
    a path separator or ``..`` would put the model outside the serving folder."""
    if (
        not name
        or name.startswith(".")
        or "/" in name
        or os.sep in name
        or ".." in name
        or name.isdigit()
    ):
        return (
            f"{name!r} must be a plain folder name (not a number, no path separator "
            "or '..', not starting with '.')"
        )
    return None


#: Staging names the exporters and the pipeline's push write, with the writer's pid:
#: ``.incoming-<pid>``, ``.incoming-<version>-<pid>``, ``<version>.replaced-<pid>``.
STAGING = re.compile(r"^(?:\.incoming-(?:\d+-)?|\d+\.replaced-)(\d+)$")


def pid_alive(pid):
    """Whether process ``pid`` exists (one of another user counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_staging(folder):
    """Delete the staging folders and version claims in ``folder`` whose writer is
    dead: a push or export killed before its rename leaves one, and TF Serving never
    looks at it. Those of a live writer (a concurrent export) are kept. Returns the
    removed paths."""
    removed = []
    if not os.path.isdir(folder):
        return removed
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        match = STAGING.match(name)
        if match and not pid_alive(int(match.group(1))):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        elif (
            CLAIM.match(name)
            and claim_owner(path) is not None
            and not pid_alive(claim_owner(path))
        ):
            release_version(path)
            removed.append(path)
    return removed


#: A version number being written: ``.claim-<version>``, a symbolic link whose target
#: is the writer's pid (made in one system call, so a claim always names its owner).
CLAIM = re.compile(r"^\.claim-(\d+)$")


def claim_owner(path):
    """The pid a version claim names (None: no claim there, or not one of ours)."""
    try:
        target = os.readlink(path)
    except OSError:
        return None
    return int(target) if target.isdigit() else None


def claim_version(base, version=None):
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


def next_free(base):
    """1 + the largest version number under ``base``, folders and claims alike."""
    numbers = [int(name) for name in os.listdir(base) if name.isdigit()]
    numbers += [int(m.group(1)) for m in map(CLAIM.match, os.listdir(base)) if m]
    return max(numbers, default=0) + 1


def release_version(claim):
    """Remove a claim made by :func:`claim_version` (gone already: nothing to do)."""
    try:
        os.remove(claim)
    except FileNotFoundError:
        pass
