"""Exporters: a TF Serving SavedModel, an ONNX graph, and a checker that runs either.

Every exported graph computes :func:`keras_vae_attn.explain.pipeline.explain_anomaly`
with the options the run was trained and evaluated with (``config.json``), so a served
heatmap equals the one the trainer showed. One job per module:

    graph        the graph every exporter serves: outputs, decisions, decoding, checks
    metadata     what an exported model records about its making
    versions     version numbers under a TF Serving model folder, and stale staging
    saved_model  the SavedModel and its signatures (``python -m export.saved_model``)
    onnx         the ONNX graph and its self-check (``python -m export.onnx``)
    infer        a deployed model run on image files (``python -m export.infer``)
    cli          what the exporters' command lines share: flags, exit codes

This module holds what the exporters share: opening a run folder (through
:class:`keras_vae_attn.runs.RunFolder`), and refusing bad paths, names and thresholds
before anything is written; :mod:`export.cli` holds what their command lines share.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any, NamedTuple

from keras_vae_attn.runs import RUN_COMPLETE


class Stages:
    """Numbered stage lines on stderr, "export.onnx 2/4: converting ... (5.1 s elapsed)"
    (seconds since the first stage began, so labelled: not the stage's own time), so an
    export that takes half a minute shows where it is. Called
    with the stage's description."""

    def __init__(self, label: str, total: int) -> None:
        self.label, self.total, self.done, self.started = label, total, 0, None

    def __call__(self, message: str) -> None:
        import time

        self.started = self.started or time.perf_counter()
        self.done += 1
        print(
            f"{self.label} {self.done}/{self.total}: {message} "
            f"({time.perf_counter() - self.started:.1f} s elapsed)",
            file=sys.stderr,
            flush=True,
        )


#: What an export calls with each stage's description (a :class:`Stages`, or quiet).
Progress = Callable[[str], None]


def no_stages(message: str) -> None:
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
    model: Any
    config: dict[str, Any]
    options: Any
    complete: bool


def check_options(run: Run) -> None:
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


def load_run(path: str) -> Run:
    """Load the trained model, config and options of run folder ``path`` (read-only,
    through :class:`keras_vae_attn.runs.RunFolder`); ExportError naming the file when
    one is missing or unreadable."""
    from keras_vae_attn.runs import RunFolder, RunFolderError

    if not os.path.isdir(path):
        raise ExportError(f"--run {path!r} is not a folder")
    folder = RunFolder(path)
    missing = folder.missing_model_files()
    if missing:
        raise ExportError(
            f"run folder {path!r} holds no trained model: {', '.join(missing)} missing "
            "(train it first, or point --run at a finished run)"
        )
    try:
        config, options = folder.config().as_dict(), folder.options()
    except RunFolderError as error:
        raise ExportError(str(error)) from None
    try:
        model = folder.load_model()
    except (OSError, ValueError, TypeError, KeyError) as error:
        raise ExportError(f"cannot load the model in {folder.model_dir!r}: {error}") from None
    return Run(path, model, config, options, folder.complete)


def load_inputs(run_dir: str, thresholds: str | None, progress: Progress) -> tuple[Run, Any]:
    """The run folder ``run_dir``, loaded, and its ``--thresholds`` (None without); the
    thresholds are read first, so a bad file is refused before the model loads."""
    values = load_thresholds(thresholds) if thresholds else None
    progress(f"loading the model of {run_dir}")
    return load_run(run_dir), values


def load_thresholds(path: str) -> Any:
    """The :class:`keras_vae_attn.calibration.Thresholds` of a ``thresholds.json`` given
    as ``--thresholds``; ExportError naming the flag and the file when it is unreadable
    or holds no finite thresholds."""
    from keras_vae_attn.calibration import read_thresholds

    try:
        return read_thresholds(path)
    except OSError as error:
        raise ExportError(f"--thresholds {path!r}: {error.strerror or error}") from None
    except ValueError as error:
        raise ExportError(f"--thresholds {error}") from None


def warn_incomplete(run_dir: str) -> None:
    """Say so on stderr when the exported run never wrote ``metrics.json``."""
    if not os.path.isfile(os.path.join(run_dir, RUN_COMPLETE)):
        print(
            f"warning: {os.path.join(run_dir, RUN_COMPLETE)} is missing, so the run did not "
            "finish; the model it saved was exported",
            file=sys.stderr,
        )


def refuse_existing(path: str, force: bool, flag: str = "--out") -> None:
    """ExportError if ``path`` exists and ``force`` is not set; nothing is touched."""
    if os.path.lexists(path) and not force:
        raise ExportError(
            f"{flag} {path!r} already exists; choose another path or pass "
            "--force to replace it"
        )


def model_name_problem(name: str) -> str | None:
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
