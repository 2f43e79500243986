"""Train -> evaluate -> validate -> export -> push: a model shipped with its lineage.

    python -m pipeline --category cable --data-dir <mvtec root> --serving-dir <dir>

One job per module:
    cli         the command line: flags, checks before anything is written, exit codes
    stages      the five stages over one pipeline folder
    lineage     manifest.json: each stage's record, and the cache that skips a stage
    folder      the pipeline folder, of which the pipeline owns only what it writes
    data        the held-out normal images and the training view without them
    evaluation  thresholds calibrated on held-out data, and the served decisions
    blessing    the verdict on a candidate, and why
    serving     the TF Serving folder: served versions, and the atomic push
    processes   the children (trainer, exporters), stopped with the pipeline

It trains through :mod:`trainers.api` and exports through the command lines of
:mod:`export`; it builds no model or graph of its own.
"""

from pipeline.cli import build_parser, main

__all__ = ["build_parser", "main"]
