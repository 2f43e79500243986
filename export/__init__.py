"""Exporters: a TF Serving SavedModel, an ONNX graph, and a checker that runs either.

Every exported graph computes :func:`keras_vae_attn.scoring.explain_anomaly` with the
options the run was trained and evaluated with (``config.json``), so a served heatmap
equals the one the trainer showed. This module holds what the command lines share:
reading a run folder and refusing bad paths before anything is written.
"""
from __future__ import annotations

import json
import os
from typing import NamedTuple

from keras_vae_attn.runs import RUN_COMPLETE, ExplainOptions, OptionError


class ExportError(Exception):
    """A refused export: the message names the path or argument and what is wrong."""


class Run(NamedTuple):
    """A trained run folder, loaded.

    ``options`` is the :class:`~keras_vae_attn.runs.ExplainOptions` the run was
    evaluated with; ``complete`` is False when ``metrics.json`` is missing (training or
    evaluation did not finish).
    """

    path: str
    model: object
    config: dict
    options: dict
    complete: bool


def explain_options(config):
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
            run.model.feature_distribution(layer)
    if options.needs_scales:
        raise ValueError(f"the options combine layers {options.layers} but config.json "
                         "holds no layer_scales for them")


def load_run(path):
    """Load the trained model of run folder ``path`` (read-only); ExportError if none."""
    from keras_vae_attn.models.io import MODEL_SPEC, MODEL_WEIGHTS, load_vae

    if not os.path.isdir(path):
        raise ExportError(f"--run {path!r} is not a folder")
    model_dir = os.path.join(path, "model")
    missing = [name for name in (MODEL_SPEC, MODEL_WEIGHTS)
               if not os.path.isfile(os.path.join(model_dir, name))]
    if missing:
        raise ExportError(f"run folder {path!r} holds no trained model: "
                          f"{', '.join(os.path.join(model_dir, m) for m in missing)} missing "
                          "(train it first, or point --run at a finished run)")
    config_path = os.path.join(path, "config.json")
    config = {}
    if os.path.isfile(config_path):
        try:
            with open(config_path, encoding="utf-8") as handle:
                config = json.load(handle)
        except (OSError, ValueError) as error:
            raise ExportError(f"cannot read {config_path}: {error}") from None
        if not isinstance(config, dict):
            raise ExportError(f"{config_path} must hold a JSON object, got "
                              f"{type(config).__name__}")
    try:
        model = load_vae(model_dir)
    except (OSError, ValueError, TypeError, KeyError) as error:
        raise ExportError(f"cannot load the model in {model_dir!r}: {error}") from None
    return Run(path, model, config, explain_options(config),
               os.path.isfile(os.path.join(path, RUN_COMPLETE)))


def load_thresholds(path):
    """A :class:`keras_vae_attn.calibration.Thresholds` from a ``thresholds.json``."""
    from keras_vae_attn.calibration import Thresholds

    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
        values = Thresholds(float(data["pixel"]), float(data["image"]),
                            str(data.get("method", "")))
    except OSError as error:
        raise ExportError(f"--thresholds {path!r}: {error.strerror or error}") from None
    except (ValueError, TypeError, KeyError) as error:
        raise ExportError(f"--thresholds {path!r} must be a JSON object with numbers "
                          f"'pixel' and 'image' ({type(error).__name__}: {error})") from None
    if not values.pixel > 0:
        raise ExportError(f"--thresholds {path!r}: pixel threshold must be > 0, got "
                          f"{values.pixel}")
    return values


def refuse_existing(path, force, flag="--out"):
    """ExportError if ``path`` exists and ``force`` is not set; nothing is touched."""
    if os.path.lexists(path) and not force:
        raise ExportError(f"{flag} {path!r} already exists; choose another path or pass "
                          "--force to replace it")
