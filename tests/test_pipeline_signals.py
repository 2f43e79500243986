"""A pipeline stopped by a signal: SIGTERM is forwarded to its trainer, SIGKILL ends the
trainer through its parent-death signal, and the rerun resumes the trainer's backup.
(Its own file, so that pytest-xdist runs it beside the other pipeline tests.)"""

import contextlib
import json
import os
import signal
import subprocess
import time

import pytest

from conftest import REPO
from test_pipeline import TRAINER, command, run, stage_lines

pytestmark = pytest.mark.slow  # kills and interrupts a running pipeline and its trainer


EPOCHS = 5
SLOW_TRAINER = [
    str(EPOCHS) if TRAINER[i - 1] == "--epochs" else flag  # several epochs
    for i, flag in enumerate(TRAINER)
]


def log_events(path):
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@contextlib.contextmanager
def pipeline_until(category_root, tmp_path, event):
    """Start the pipeline (several epochs) and yield it once its trainer logged ``event``;
    killed on the way out if it still runs. Its stderr goes to tmp_path/stderr.txt."""
    log = tmp_path / "pipe" / "train" / "training_log.jsonl"
    argv = command(category_root, tmp_path, trainer=SLOW_TRAINER)
    with open(tmp_path / "stderr.txt", "w") as err:
        pipe = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=err)
        try:
            deadline = time.time() + 600
            while not any(e["event"] == event for e in log_events(log)):
                assert pipe.poll() is None, (tmp_path / "stderr.txt").read_text()[-3000:]
                assert time.time() < deadline, f"the trainer logged no {event} in 600 s"
                time.sleep(0.05)
            yield pipe
        finally:
            if pipe.poll() is None:
                pipe.kill()


def process_gone(pid, seconds=20):
    """Whether process ``pid`` ends (or is a zombie) within ``seconds``."""
    end = time.time() + seconds
    while time.time() < end:
        try:
            os.kill(pid, 0)
            with open(f"/proc/{pid}/stat", encoding="utf-8") as handle:
                if handle.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except (ProcessLookupError, FileNotFoundError):
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL], ids=["TERM", "KILL"])
def test_killed_pipeline_takes_its_trainer_along_and_the_rerun_resumes(
    category_root, tmp_path, signum
):
    """SIGTERM is forwarded to the trainer's group; SIGKILL cannot be caught, so the
    trainer holds a parent-death signal and ends on its own."""
    log = tmp_path / "pipe" / "train" / "training_log.jsonl"
    with pipeline_until(category_root, tmp_path, "epoch_end") as pipe:
        trainer = log_events(log)[0]["pid"]
        pipe.send_signal(signum)
        expected = 128 + signum if signum == signal.SIGTERM else -signum
        assert pipe.wait(timeout=60) == expected
    stderr = (tmp_path / "stderr.txt").read_text()
    if signum == signal.SIGTERM:
        assert "interrupted by SIGTERM" in stderr, stderr[-3000:]
    assert process_gone(trainer), f"trainer {trainer} outlived the pipeline"
    killed = log_events(log)
    done = max(e["epoch"] for e in killed if e["event"] == "epoch_end")
    assert 1 <= done < EPOCHS, "the trainer was not stopped mid-training"
    if signum == signal.SIGKILL:  # the same trainer state as after TERM: resumed below
        return

    again = run(category_root, tmp_path, trainer=SLOW_TRAINER)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "train: resuming the interrupted training" in again.stderr
    begins = [e for e in log_events(log) if e["event"] == "train_begin"]
    assert [e["epoch"] for e in begins] == [0, done], begins
    assert begins[1]["pid"] != trainer
    ends = [e["epoch"] for e in log_events(log)[len(killed) :] if e["event"] == "epoch_end"]
    assert ends == list(range(done + 1, EPOCHS + 1))
    assert stage_lines(again)[0] == "[train] done"


def test_ctrl_c_names_the_stage_in_one_line_and_exits_130(category_root, tmp_path):
    """Issue 25, 4 / 26: Ctrl-C printed the child's traceback and a cut-off command."""
    with pipeline_until(category_root, tmp_path, "train_begin") as pipe:
        pipe.send_signal(signal.SIGINT)
        assert pipe.wait(timeout=60) == 130
    stderr = (tmp_path / "stderr.txt").read_text()
    assert stderr.splitlines()[-1] == (
        "interrupted by SIGINT in the train stage; run the same command to resume from it"
    ), stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    manifest = json.loads((tmp_path / "pipe" / "manifest.json").read_text())
    assert manifest["stages"]["train"]["status"] == "failed"  # resumed by the rerun
