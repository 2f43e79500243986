"""Localization datasets by name: how a run's normal and test data are reopened from its
``config.json``, so a bench or the export pipeline reads the images the trainer read
without calling the trainer.

A dataset is one :func:`register`-ed function ``config -> RunData``. Its name is the
config's ``"dataset"`` entry or, for runs whose config has none, the key only that
dataset's trainer writes (``category``, ``subset``, ``normal_digit``). Generated stand-ins
(the ``demo`` and ``logical`` MVTec categories, the UCSD demo) are written again from their
fixed settings when the run's data folder no longer holds them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from keras_vae_attn.data import LocalizationSplit, to_float

#: The generated MVTec-layout categories: {category: writer in keras_vae_attn.data.synthetic}
GENERATED_CATEGORIES = {"demo": "write_mvtec_category", "logical": "write_logical_category"}
#: The settings of the generated UCSD dataset of ``trainers.ucsd --demo`` (its seed is the
#: run's)
UCSD_DEMO_DATA = dict(
    width=120, height=80, frames=60, n_train=12, n_test=6, n_test_without_gt=2
)


class RunData(NamedTuple):
    """A run's data as its trainer loaded it: ``normal`` float32 training images in
    [0, 1] (before the calibration hold-out), ``test`` a LocalizationSplit of float32
    images."""

    dataset: str
    normal: Any
    test: LocalizationSplit


class Dataset(NamedTuple):
    """A registered dataset: its name, the config key that marks its runs, and the
    function reopening a run's data from its config."""

    name: str
    marker: str
    reopen: Callable[[Mapping[str, Any]], RunData]


DATASETS: dict[str, Dataset] = {}


class UnknownDataset(ValueError):
    """A config that names no registered dataset; the message lists the known ones."""


def register(name: str, marker: str) -> Callable:
    """Decorator: register ``reopen(config) -> RunData`` as dataset ``name``, whose runs
    older than the ``"dataset"`` entry are told by the config key ``marker``."""

    def add(reopen: Callable[[Mapping[str, Any]], RunData]) -> Callable:
        DATASETS[name] = Dataset(name, marker, reopen)
        return reopen

    return add


def dataset_name(config: Mapping[str, Any]) -> str:
    """The registered dataset a run's config belongs to; UnknownDataset if none."""
    name = config.get("dataset")
    if name is None:
        name = next((d.name for d in DATASETS.values() if d.marker in config), None)
    if name not in DATASETS:
        found = "no dataset entry" if name is None else f"dataset {name!r}"
        raise UnknownDataset(
            f"the config holds {found} of a localization run; known datasets: "
            f"{', '.join(DATASETS)} (told by a 'dataset' entry or by the keys "
            f"{', '.join(d.marker for d in DATASETS.values())})"
        )
    return name


def open_run_data(config: Mapping[str, Any]) -> RunData:
    """Reopen the normal and test data of the run whose ``config.json`` is ``config``,
    with its limits (``max_train``, ``max_test``...): pass a changed copy for others."""
    return DATASETS[dataset_name(config)].reopen(config)


@register("mvtec", marker="category")
def _mvtec(config: Mapping[str, Any]) -> RunData:
    from keras_vae_attn.data import mvtec

    root, category = config["data_dir"], config["category"]
    if category in GENERATED_CATEGORIES and not os.path.isdir(os.path.join(root, category)):
        from keras_vae_attn.data import synthetic

        getattr(synthetic, GENERATED_CATEGORIES[category])(root, category)
    options = dict(
        size=config["image_size"],
        channels=config.get("channels", 3),
        skip_corrupt=config.get("skip_corrupt", False),
    )
    train = mvtec.load_train(root, category, limit=config.get("max_train"), **options)
    test = mvtec.load_test(root, category, limit=config.get("max_test"), **options)
    return RunData(
        "mvtec",
        to_float(train),
        LocalizationSplit(
            to_float(test.images), test.masks, test.labels, list(test.defects), test.paths
        ),
    )


@register("ucsd", marker="subset")
def _ucsd(config: Mapping[str, Any]) -> RunData:
    from keras_vae_attn.data import ucsd

    root, subset = config["data_dir"], config["subset"]
    if config.get("demo"):  # reused when already there
        from keras_vae_attn.data.synthetic import write_ucsd_dataset

        write_ucsd_dataset(root, subset, seed=config.get("seed", 0), **UCSD_DEMO_DATA)

    def frames(load, part, step_key):
        return load(
            root,
            subset,
            config["image_size"],
            max_clips=config.get(f"max_{part}_clips"),
            frame_step=config.get(step_key, 1),
        )

    train = frames(ucsd.load_train, "train", "frame_step")
    test = frames(ucsd.load_test, "test", "test_frame_step")
    return RunData(
        "ucsd",
        to_float(train),
        LocalizationSplit(
            to_float(test.images), test.masks, test.labels, test.clips, test.paths
        ),
    )


@register("mnist", marker="normal_digit")
def _mnist(config: Mapping[str, Any]) -> RunData:
    from keras_vae_attn.data import mnist

    digit = config["normal_digit"]
    train_x, train_y = mnist.load(config.get("data_dir"), "train")
    test_x, test_y = mnist.load(config.get("data_dir"), "test")
    test_x, test_y = test_x[: config.get("max_test")], test_y[: config.get("max_test")]
    return RunData(
        "mnist",
        mnist.to_float(train_x[train_y == digit][: config.get("max_train")]),
        LocalizationSplit(
            mnist.to_float(test_x),
            None,
            (test_y != digit).astype(int),
            [int(y) for y in test_y],
            [f"test/{index:05d}" for index in range(len(test_y))],  # predictions.csv's
        ),
    )
