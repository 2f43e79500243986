"""The pipeline's one way to ask for a training run (trainers/api.py): the command it
builds is one the trainer's own parser takes, with the request's values."""

import sys

from trainers import mvtec
from trainers.api import TRAINER, TrainRequest, train


def parsed(request):
    argv = request.command()
    assert argv[:3] == [sys.executable, "-m", TRAINER]
    return mvtec.build_parser().parse_args(argv[3:])


def test_the_trainer_parses_every_field_of_a_request():
    request = TrainRequest(
        category="demo",
        data_dir="/data/view",
        run_dir="/pipe/train",
        seed=7,
        calibration_holdout=0.0,
        extra_args=("--epochs", "3"),
    )
    args = parsed(request)
    assert (args.category, args.data_dir, args.run_dir) == (
        "demo",
        "/data/view",
        "/pipe/train",
    )
    assert (args.seed, args.calibration_holdout, args.epochs) == (7, 0.0, 3)


def test_extra_flags_come_last_and_win():
    request = TrainRequest("demo", "d", "r", calibration_holdout=0.0)
    assert parsed(request).calibration_holdout == 0.0
    overridden = TrainRequest(
        "demo", "d", "r", calibration_holdout=0.0, extra_args=("--calibration-holdout", "0.2")
    )
    assert parsed(overridden).calibration_holdout == 0.2
    default = TrainRequest("demo", "d", "r")  # None: the trainer's own default
    assert "--calibration-holdout" not in default.command()


def test_train_hands_the_command_to_the_runner_and_returns_the_run_folder():
    seen = []
    request = TrainRequest("demo", "d", "runs/x", seed=3)
    assert train(request, runner=seen.append) == "runs/x"
    assert seen == [request.command()]
