"""What a run and an export report is what they did: a re-score's epochs, stage times
labelled as elapsed, blessing numbers rounded."""

import json

from trainers import run_dirs


def test_a_rescore_records_the_models_own_epochs(tmp_path):
    """The training log of the model's run says how far it trained (a resumed epoch
    counted once); without a log, its config.json; without either, None."""
    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    lines = [
        {"event": "train_begin", "epoch": 0},
        {"event": "epoch_end", "epoch": 1},
        {"event": "train_begin", "epoch": 1},
        {"event": "epoch_end", "epoch": 2},
    ]
    (run / "training_log.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (run / "config.json").write_text(json.dumps({"epochs": 100}))
    assert run_dirs.trained_epochs(str(run / "model")) == 2
    (run / "training_log.jsonl").unlink()
    assert run_dirs.trained_epochs(str(run / "model")) == 100
    (run / "config.json").unlink()
    assert run_dirs.trained_epochs(str(run / "model")) is None


def test_export_stage_lines_say_their_time_is_elapsed(capsys):
    from export import Stages

    stages = Stages("export.onnx", 2)
    stages("loading the run")
    stages("converting")
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("export.onnx 1/2: loading the run (0.0 s elapsed)")
    assert lines[1].startswith("export.onnx 2/2: converting (") and lines[1].endswith(
        " s elapsed)"
    )


def test_blessing_reasons_print_rounded_numbers():
    from pipeline import blessing

    floors = {metric: None for metric in blessing.GATED_METRICS}
    floors["pixel_auroc"] = 0.97
    candidate = {metric: 0.9 for metric in blessing.GATED_METRICS}
    candidate["pixel_auroc"] = 0.9645639789133258
    assert blessing.blessing_reasons(candidate, floors, None, 0.01, None) == [
        "pixel_auroc 0.9646 is below the required 0.97"
    ]
