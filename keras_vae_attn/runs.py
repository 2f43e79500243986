"""Run folders: their layout, read and written in one place (:class:`RunFolder`), and
the one way a file or a folder is published atomically (:func:`staged`, :func:`publish`,
:func:`write_json`), used by models, exporters and the pipeline.

Pure Python (no TensorFlow import), so trainers can parse flags before TensorFlow loads.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import os
import shutil
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

#: The files of a run folder (see :class:`RunFolder`); metrics.json, written last, marks
#: a finished run.
RUN_COMPLETE = "metrics.json"
CONFIG = "config.json"
MODEL = "model"
THRESHOLDS = "thresholds.json"
PREDICTIONS = "predictions.csv"


def to_jsonable(value: Any) -> Any:
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


class RunFolderError(ValueError):
    """A run folder file that is missing or does not hold what it must; the message
    names the file."""


def read_json_object(path: str, what: str) -> dict:
    """The JSON object in ``path``; RunFolderError naming it (and ``what`` it is) when
    it is missing, unreadable, not JSON or not an object."""
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except FileNotFoundError:
        raise RunFolderError(f"{path} is missing: the run has no {what}") from None
    except (OSError, ValueError) as error:  # UnicodeDecodeError is a ValueError too
        reason = " ".join(str(error).split())[:200]
        raise RunFolderError(f"cannot read the {what} {path}: {reason}") from None
    if not isinstance(data, dict):
        raise RunFolderError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def read_config(run_dir: str) -> dict:
    """A run folder's config.json as a dict ({} when it has none; RunFolderError naming
    the file when it is not a JSON object)."""
    path = os.path.join(run_dir, CONFIG)
    if not os.path.isfile(path):
        return {}
    return read_json_object(path, "configuration")


class DiskFull(OSError):
    """No room for a file the run must write; the message names it and the way on."""


def require_space(folder: str, needed: int, what: str) -> None:
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


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """A run's ``config.json``: its trainer's flags under their argparse names, plus
    ``"explain"`` (the ExplainOptions). Typed accessors for what readers of a run use;
    ``values`` holds every entry, as written."""

    values: Mapping[str, Any]
    path: str = CONFIG

    def get(self, key: str, default: Any = None) -> Any:
        return self.values.get(key, default)

    def __getitem__(self, key: str) -> Any:
        if key not in self.values:
            raise RunFolderError(f"{self.path} has no {key!r} entry")
        return self.values[key]

    def __contains__(self, key: object) -> bool:
        return key in self.values

    def as_dict(self) -> dict:
        return dict(self.values)

    @property
    def dataset(self) -> str:
        """The registered dataset of the run (keras_vae_attn.data.registry)."""
        from keras_vae_attn.data.registry import UnknownDataset, dataset_name

        try:
            return dataset_name(self.values)
        except UnknownDataset as error:
            raise RunFolderError(f"{self.path}: {error}") from None

    @property
    def data_dir(self) -> str | None:
        return self.values.get("data_dir")

    @property
    def seed(self) -> int:
        return int(self.values.get("seed") or 0)

    @property
    def image_size(self) -> int | None:
        return self.values.get("image_size")

    @property
    def explain(self) -> dict:
        """The "explain" entry: the options every map of the run is made with."""
        explain = self.values.get("explain")
        if not isinstance(explain, dict):
            raise RunFolderError(f'{self.path} has no "explain" options object')
        return explain


class RunFolder:
    """One run's folder, read and written in one place. The layout:

    config.json      the run's flags and its "explain" options (:class:`RunConfig`)
    model/           model.json + model.weights.h5 (:mod:`keras_vae_attn.models.io`)
    metrics.json     the test-set metrics, written last: a run holding it is complete
    thresholds.json  the calibrated decision thresholds
    predictions.csv  one row per test image at those thresholds

    Their paths are attributes: config_path, model_dir, metrics_path, thresholds_path,
    predictions_path. Each read is a method that reads the file again (nothing is
    cached, so a folder that a trainer is writing reads as it is now) and fails with a
    RunFolderError (a ValueError) naming the file. TensorFlow is imported only by
    :meth:`load_model` and :meth:`data`.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        self.config_path = self.file(CONFIG)
        self.metrics_path = self.file(RUN_COMPLETE)
        self.model_dir = self.file(MODEL)
        self.thresholds_path = self.file(THRESHOLDS)
        self.predictions_path = self.file(PREDICTIONS)

    def __repr__(self) -> str:
        return f"RunFolder({self.path!r})"

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    @property
    def complete(self) -> bool:
        """Whether the run finished (its metrics.json exists)."""
        return os.path.isfile(self.metrics_path)

    def missing_model_files(self) -> list[str]:
        """The paths of the saved model's files that are not there ([]: it is saved)."""
        from keras_vae_attn.models.io import MODEL_SPEC, MODEL_WEIGHTS

        paths = [os.path.join(self.model_dir, name) for name in (MODEL_SPEC, MODEL_WEIGHTS)]
        return [path for path in paths if not os.path.isfile(path)]

    # --- reading -------------------------------------------------------------------
    def config(self) -> RunConfig:
        """The run's config.json; RunFolderError when it is missing or not an object."""
        return RunConfig(read_json_object(self.config_path, "configuration"), self.config_path)

    def options(self) -> Any:
        """The run's ExplainOptions (its config's "explain" entry)."""
        from keras_vae_attn.explain.options import ExplainOptions, OptionError

        config = self.config()
        try:
            return ExplainOptions.from_config(config.values)
        except (OptionError, TypeError) as error:
            raise RunFolderError(
                f"{self.config_path} holds invalid explain options: {error}"
            ) from None

    def metrics(self) -> dict:
        """metrics.json; RunFolderError when the run did not finish."""
        return read_json_object(self.metrics_path, "metrics (it did not finish)")

    def thresholds(self) -> Any:
        """thresholds.json as a :class:`keras_vae_attn.calibration.Thresholds`."""
        from keras_vae_attn.calibration import read_thresholds

        try:
            return read_thresholds(self.thresholds_path)
        except FileNotFoundError:
            raise RunFolderError(
                f"{self.thresholds_path} is missing: the run has no calibrated thresholds"
            ) from None
        except OSError as error:
            raise RunFolderError(
                f"cannot read {self.thresholds_path}: {error.strerror or error}"
            ) from None
        except ValueError as error:
            raise RunFolderError(str(error)) from None

    def predictions(self) -> list[dict[str, str]]:
        """predictions.csv's rows ({column: text}); RunFolderError when missing."""
        try:
            with open(self.predictions_path, newline="", encoding="utf-8") as handle:
                return list(csv.DictReader(handle))
        except FileNotFoundError:
            raise RunFolderError(
                f"{self.predictions_path} is missing: the run wrote no predictions"
            ) from None

    def load_model(self) -> Any:
        """The trained model of ``model/``; RunFolderError naming the missing files when
        it was not saved, ModelLoadError when its files do not load."""
        from keras_vae_attn.models.io import load_vae

        missing = self.missing_model_files()
        if missing:
            raise RunFolderError(
                f"run folder {self.path} holds no trained model: {', '.join(missing)} missing"
            )
        return load_vae(self.model_dir)

    def data(self, **overrides: Any) -> Any:
        """The run's normal and test data, reopened as its trainer read them
        (:class:`keras_vae_attn.data.registry.RunData`); ``overrides`` change config
        entries first (e.g. ``max_test=2000``)."""
        from keras_vae_attn.data.registry import DATASETS

        config = self.config()
        return DATASETS[config.dataset].reopen({**config.values, **overrides})

    # --- writing -------------------------------------------------------------------
    def write_config(self, config: Mapping[str, Any] | RunConfig) -> None:
        """config.json, atomically; the folder is created when missing."""
        values = config.values if isinstance(config, RunConfig) else config
        os.makedirs(self.path, exist_ok=True)
        write_json(self.config_path, values)

    def write_metrics(self, metrics: Mapping[str, Any]) -> None:
        """metrics.json, atomically: the run's completion marker, so write it last."""
        write_json(self.metrics_path, metrics)
