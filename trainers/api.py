"""How another package asks for a training run: a :class:`TrainRequest` and :func:`train`.

This is the one documented interface to the trainers from outside ``trainers/`` (the
train -> push pipeline uses it): the caller fills in what it decides, and the trainer's
command line is spelled here and nowhere else (:meth:`TrainRequest.command`).

    from trainers.api import TrainRequest, train

    request = TrainRequest(
        category="cable",
        data_dir="path/to/mvtec_ad",   # an MVTec AD layout: <data_dir>/<category>/train/good
        run_dir="runs/cable",
        seed=0,
        calibration_holdout=0.0,       # the caller holds out its own images
        extra_args=("--epochs", "5"),  # the user's own trainer flags, passed on last
    )
    run_dir = train(request)           # or train(request, runner=run_in_own_group)

The run is a child process (``python -m trainers.mvtec``), not a call in this process:
TensorFlow's state stays with it, a SIGINT/SIGTERM stops it the way it stops a user's
training (its backup written), and a caller may run it in its own process group to
forward signals and kill what is left (``runner``). What the caller gets back is the
run folder (keras_vae_attn/runs.py): ``model/``, ``config.json`` (the options the run
was evaluated with), ``metrics.json`` (written last: the run is complete),
``thresholds.json``, ``predictions.csv``, ``training_log.jsonl``.

Resuming: a request whose ``run_dir`` holds a stopped run's backup continues from it;
remove the folder first to train afresh. ``extra_args`` come after the request's own
flags, so a flag given there wins (argparse keeps the last value).
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from collections.abc import Callable, Sequence

#: The trainer a request runs: MVTec-layout localization data.
TRAINER = "trainers.mvtec"


@dataclasses.dataclass(frozen=True)
class TrainRequest:
    """One training run. ``calibration_holdout`` None keeps the trainer's default share
    of normal images held out for its thresholds; ``extra_args`` are further trainer
    flags (e.g. ``("--epochs", "5")``), checked by the trainer itself."""

    category: str
    data_dir: str
    run_dir: str
    seed: int = 0
    calibration_holdout: float | None = None
    extra_args: tuple[str, ...] = ()

    def command(self, python: str = sys.executable) -> list[str]:
        """The trainer's command line for this request."""
        argv = [python, "-m", TRAINER, "--category", self.category]
        argv += ["--data-dir", self.data_dir, "--run-dir", self.run_dir]
        argv += ["--seed", str(self.seed)]
        if self.calibration_holdout is not None:
            argv += ["--calibration-holdout", str(self.calibration_holdout)]
        return argv + list(self.extra_args)


def run_checked(command: Sequence[str]) -> None:
    """The default runner: the command in the foreground, CalledProcessError if it
    fails (its message is on the child's stderr)."""
    subprocess.run(list(command), check=True)


def train(request: TrainRequest, runner: Callable[[Sequence[str]], None] = run_checked) -> str:
    """Run ``request`` to the end with ``runner(command)``; returns its run folder.
    ``runner`` raises when the trainer fails (the default: CalledProcessError)."""
    runner(request.command())
    return request.run_dir
