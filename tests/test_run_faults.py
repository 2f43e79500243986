"""Faults a trainer run must survive (issue 26): a kill or Ctrl-C at each moment of its
state's writes, a full disk, a second identical command, bad flags. Each leaves a state
the same command resumes from, and the resumed run trains exactly the epochs asked.

The faults are real signals sent by the trainer process to itself at a named point
(tests/scripts/fault_at.py), so their timing is exact."""
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

SCRIPTS = REPO / "tests" / "scripts"
EPOCHS, STEPS = 3, 2


def mnist_command(shared_data, runs_root, *extra):
    return ["--data-dir", str(shared_data / "mnist"), "--epochs", str(EPOCHS),
            "--steps-per-epoch", str(STEPS), "--batch-size", "16", "--max-train", "64",
            "--max-test", "30", "--latent-dim", "4", "--runs-root", str(runs_root),
            "--quiet", *extra]


def run(flags, fault=None, module="trainers.mnist"):
    """The trainer's CLI (with ``fault`` = (point, call, signal): through fault_at.py)."""
    head = ([str(SCRIPTS / "fault_at.py"), *map(str, fault), module] if fault
            else ["-m", module])
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run([sys.executable, *head, *flags], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def read_log(run_dir):
    return [json.loads(line)
            for line in (run_dir / "training_log.jsonl").read_text().splitlines()]


def only_run(runs_root):
    (run_dir,) = (runs_root / "mnist").iterdir()
    return run_dir


def assert_trained_exactly_the_epochs_asked(run_dir):
    log = read_log(run_dir)
    ends = {e["epoch"]: e for e in log if e["event"] == "epoch_end"}
    assert sorted(ends) == list(range(1, EPOCHS + 1))
    assert ends[EPOCHS]["optimizer_step"] == EPOCHS * STEPS       # no epoch trained twice
    assert (run_dir / "metrics.json").is_file()
    assert not (run_dir / "backup").exists() and not (run_dir / "checkpoints").exists()
    assert not [p for p in (run_dir / "model").iterdir() if p.name.startswith(".model-")]


def test_kill_and_ctrl_c_during_backups_resume_to_exactly_the_epochs_asked(shared_data,
                                                                           tmp_path):
    flags = mnist_command(shared_data, tmp_path)
    # SIGKILL while the first backup is written: nothing half-written is ever loaded
    killed = run(flags, ("commit_backup", 1, "KILL"))
    assert killed.returncode == -9
    run_dir = only_run(tmp_path)
    assert [p.name for p in (run_dir / "backup").iterdir()] == [f".partial-{p}" for p in
                                                               [read_log(run_dir)[0]["pid"]]]
    # Ctrl-C while the second backup is written: one line, exit 130, no traceback
    interrupted = run(flags, ("commit_backup", 2, "INT"))
    assert interrupted.returncode == 130, interrupted.stderr[-2000:]
    assert interrupted.stderr.strip().splitlines()[-1] == (
        "interrupted at epoch 2; the same command resumes")
    assert "Traceback" not in interrupted.stderr
    assert [p.name for p in (run_dir / "backup").iterdir()] == ["epoch-0001"]
    last = read_log(run_dir)[-1]                          # epoch 2 trained, not backed up
    assert (last["event"], last["epoch"]) == ("epoch_end", 1)

    done = run(flags)
    assert done.returncode == 0, done.stderr[-2000:]
    begins = [e for e in read_log(run_dir) if e["event"] == "train_begin"]
    assert [b["epoch"] for b in begins] == [0, 0, 1]
    assert begins[-1]["optimizer_step"] == STEPS
    assert_trained_exactly_the_epochs_asked(run_dir)


def test_kill_between_fit_and_save_and_during_save_never_retrains(shared_data, tmp_path):
    flags = mnist_command(shared_data, tmp_path)
    killed = run(flags, ("save_vae", 1, "KILL"))          # fit done, model/ not saved
    assert killed.returncode == -9
    run_dir = only_run(tmp_path)
    assert [p.name for p in (run_dir / "backup").iterdir()] == [f"epoch-{EPOCHS:04d}"]
    killed = run(flags, ("publish_model", 1, "KILL"))     # model/ staged, not published
    assert killed.returncode == -9
    staged = [p for p in (run_dir / "model").iterdir() if p.name.startswith(".model-")]
    assert len(staged) == 1 and not (run_dir / "model" / "model.json").exists()

    done = run(flags)
    assert done.returncode == 0, done.stderr[-2000:]
    begins = [e for e in read_log(run_dir) if e["event"] == "train_begin"]
    assert [b["epoch"] for b in begins] == [0, EPOCHS, EPOCHS]     # nothing retrained
    assert_trained_exactly_the_epochs_asked(run_dir)
