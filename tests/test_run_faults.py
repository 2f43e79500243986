"""Faults a trainer run must survive (issue 26): a kill or Ctrl-C at each moment of its
state's writes, a full disk, a second identical command, bad flags. Each leaves a state
the same command resumes from, and the resumed run trains exactly the epochs asked.

The faults are real signals sent by the trainer process to itself at a named point
(tests/scripts/fault_at.py), so their timing is exact."""

import json
import os

import numpy as np
import pytest

from conftest import REPO, run_python

pytestmark = pytest.mark.slow  # kills, fills the disk under and resumes real trainer processes

SCRIPTS = REPO / "tests" / "scripts"
EPOCHS, STEPS = 3, 2


def mnist_command(shared_data, runs_root, *extra):
    return [
        "--data-dir",
        str(shared_data / "mnist"),
        "--epochs",
        str(EPOCHS),
        "--steps-per-epoch",
        str(STEPS),
        "--batch-size",
        "16",
        "--max-train",
        "64",
        "--max-test",
        "30",
        "--latent-dim",
        "4",
        "--runs-root",
        str(runs_root),
        "--quiet",
        *extra,
    ]


def run(flags, fault=None, module="trainers.mnist"):
    """The trainer's CLI (with ``fault`` = (point, call, signal): through fault_at.py)."""
    head = [SCRIPTS / "fault_at.py", *fault, module] if fault else ["-m", module]
    return run_python(*head, *flags, env={"TF_CPP_MIN_LOG_LEVEL": "3"})


def read_log(run_dir):
    return [
        json.loads(line) for line in (run_dir / "training_log.jsonl").read_text().splitlines()
    ]


def only_run(runs_root):
    (run_dir,) = (runs_root / "mnist").iterdir()
    return run_dir


def assert_trained_exactly_the_epochs_asked(run_dir):
    log = read_log(run_dir)
    ends = {e["epoch"]: e for e in log if e["event"] == "epoch_end"}
    assert sorted(ends) == list(range(1, EPOCHS + 1))
    assert ends[EPOCHS]["optimizer_step"] == EPOCHS * STEPS  # no epoch trained twice
    assert (run_dir / "metrics.json").is_file()
    assert not (run_dir / "backup").exists() and not (run_dir / "checkpoints").exists()
    assert not [p for p in run_dir.iterdir() if ".partial-" in p.name]


def test_kill_and_ctrl_c_during_backups_resume_to_exactly_the_epochs_asked(
    shared_data, tmp_path
):
    flags = mnist_command(shared_data, tmp_path)
    # SIGKILL while the first backup is written: nothing half-written is ever loaded
    killed = run(flags, ("commit_backup", 1, "KILL"))
    assert killed.returncode == -9
    run_dir = only_run(tmp_path)
    assert [p.name for p in (run_dir / "backup").iterdir()] == [
        f".partial-{p}" for p in [read_log(run_dir)[0]["pid"]]
    ]
    # Ctrl-C while the second backup is written: one line, exit 130, no traceback
    interrupted = run(flags, ("commit_backup", 2, "INT"))
    assert interrupted.returncode == 130, interrupted.stderr[-2000:]
    assert interrupted.stderr.strip().splitlines()[-1] == (
        "interrupted at epoch 2; the same command resumes"
    )
    assert "Traceback" not in interrupted.stderr
    assert "which ended without finishing it" in interrupted.stderr  # after the kill
    assert [p.name for p in (run_dir / "backup").iterdir()] == ["epoch-0001"]
    last = read_log(run_dir)[-1]  # epoch 2 trained, not backed up
    assert (last["event"], last["epoch"]) == ("epoch_end", 1)

    done = run(flags)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "taking over" not in done.stderr  # a Ctrl-C leaves no stale lock
    begins = [e for e in read_log(run_dir) if e["event"] == "train_begin"]
    assert [b["epoch"] for b in begins] == [0, 0, 1]
    assert begins[-1]["optimizer_step"] == STEPS
    assert_trained_exactly_the_epochs_asked(run_dir)


def test_kill_between_fit_and_save_and_during_save_never_retrains(shared_data, tmp_path):
    flags = mnist_command(shared_data, tmp_path)
    killed = run(flags, ("save_vae", 1, "KILL"))  # fit done, model/ not saved
    assert killed.returncode == -9
    run_dir = only_run(tmp_path)
    assert [p.name for p in (run_dir / "backup").iterdir()] == [f"epoch-{EPOCHS:04d}"]
    killed = run(flags, ("publish_model", 1, "KILL"))  # model/ staged, not published
    assert killed.returncode == -9
    staged = [p for p in run_dir.iterdir() if p.name.startswith("model.partial-")]
    assert len(staged) == 1 and not (run_dir / "model").exists()

    done = run(flags)
    assert done.returncode == 0, done.stderr[-2000:]
    begins = [e for e in read_log(run_dir) if e["event"] == "train_begin"]
    assert [b["epoch"] for b in begins] == [0, EPOCHS, EPOCHS]  # nothing retrained
    assert_trained_exactly_the_epochs_asked(run_dir)


def test_a_deterministic_run_killed_and_resumed_equals_the_uninterrupted_one(tmp_path):
    """--deterministic survives a resume: the data stream (shuffle order, augmentation
    draws) is read past what the backed-up epochs consumed and the sampling noise's
    generator state is restored with the step, so the weights are bit-identical
    (a resume that starts a fresh pass differed by up to 122 in a weight here)."""
    from keras_vae_attn.data.synthetic import write_mvtec_category
    from keras_vae_attn.models import load_vae

    write_mvtec_category(
        str(tmp_path / "data"), "widget", size=32, n_train=12, n_test_good=1, n_test_defect=1
    )

    def flags(name):
        return [
            "--category",
            "widget",
            "--data-dir",
            str(tmp_path / "data"),
            "--runs-root",
            str(tmp_path / name),
            "--image-size",
            "32",
            "--epochs",
            str(EPOCHS),
            "--batch-size",
            "4",
            "--max-test",
            "2",  # whole passes of 3 steps
            "--eval-batch-size",
            "4",
            "--backbone",
            "small",
            "--deterministic",
            "--calibration-holdout",
            "0",
            "--quiet",
            "--no-sanity",
        ]

    whole = run(flags("whole"), module="trainers.mvtec")
    assert whole.returncode == 0, whole.stderr[-2000:]
    killed = run(flags("resumed"), ("commit_backup", 2, "KILL"), module="trainers.mvtec")
    assert killed.returncode == -9
    resumed = run(flags("resumed"), module="trainers.mvtec")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from the backup at epoch 2" in resumed.stderr
    (a,), (b,) = (
        (tmp_path / name / "mvtec-widget").iterdir() for name in ("whole", "resumed")
    )
    first, second = load_vae(str(a / "model")), load_vae(str(b / "model"))
    for x, y in zip(first.weights, second.weights, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=x.path)


def test_a_full_disk_is_one_line_and_the_same_command_resumes(shared_data, mount_point):
    """Runs on a small tmpfs filled by a ballast file: with no room at all, and with room
    for the run's small files but not its backup, each is one line and exit 2 (HDF5
    crashed or left a backup that never loads); once space is freed the same command
    trains exactly the epochs asked."""
    import shutil

    disk = mount_point("size=128m")
    flags = mnist_command(shared_data, disk / "runs")
    ballast = disk / "ballast"

    def fill(leave):
        if ballast.exists():
            ballast.unlink()
        with open(ballast, "wb") as handle:
            os.posix_fallocate(handle.fileno(), 0, shutil.disk_usage(disk).free - leave)

    fill(0)
    full = run(flags)
    assert full.returncode == 2, full.stderr[-2000:]
    (line,) = [text for text in full.stderr.splitlines() if "rror" in text]
    assert line.startswith("error: --runs-root ") and "No space left on device" in line

    fill(4 << 20)  # the log and config fit, a backup does not
    no_backup = run(flags)
    assert no_backup.returncode == 2, no_backup.stderr[-2000:]
    assert (
        no_backup.stderr.strip()
        .splitlines()[-1]
        .startswith("error: no space left for the backup of epoch 1 in ")
    )
    assert "free space and run the same command to resume" in no_backup.stderr
    assert "Traceback" not in no_backup.stderr + full.stderr
    run_dir = only_run(disk / "runs")
    assert not (run_dir / "backup").exists() or not list((run_dir / "backup").iterdir())

    ballast.unlink()
    done = run(flags)
    assert done.returncode == 0, done.stderr[-2000:]
    assert_trained_exactly_the_epochs_asked(run_dir)
