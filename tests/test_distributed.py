"""Real tf.distribute strategies on CPU: mirrored replicas, two local workers, and a
training process killed with SIGKILL that resumes from its backup."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO, run_python

pytestmark = pytest.mark.slow  # spawns training processes (mirrored, multi-worker, killed)

SCRIPTS = REPO / "tests" / "scripts"


def test_two_replicas_match_one_replica_on_the_same_global_batch(tmp_path):
    one = run_python(SCRIPTS / "one_step.py", 1, 16, tmp_path / "one.npz")
    two = run_python(SCRIPTS / "one_step.py", 2, 16, tmp_path / "two.npz")
    assert one.returncode == 0, one.stderr[-2000:]
    assert two.returncode == 0, two.stderr[-2000:]
    assert "replicas 2" in two.stdout
    a, b = np.load(tmp_path / "one.npz"), np.load(tmp_path / "two.npz")
    np.testing.assert_allclose(float(a["loss"]), float(b["loss"]), rtol=1e-5)
    weights = [k for k in a.files if k.startswith("w")]
    assert len(weights) > 4
    for key in weights:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6, err_msg=key)


def free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def test_two_local_workers_train_to_the_same_weights(tmp_path):
    workers = [f"127.0.0.1:{port}" for port in free_ports(2)]
    env = {"PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"}
    processes = []
    for index in range(2):
        config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
        processes.append(
            subprocess.Popen(
                [sys.executable, str(SCRIPTS / "multiworker.py"), str(tmp_path)],
                cwd=REPO,
                env={**os.environ, **env, "TF_CONFIG": json.dumps(config)},
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    for process in processes:
        _, err = process.communicate(timeout=300)
        assert process.returncode == 0, err[-2000:]
    first, second = (np.load(tmp_path / f"worker-{i}.npz") for i in range(2))
    assert int(first["replicas"]) == 2
    assert float(first["moved"]) > 0 and np.isfinite(first["loss"]).all()
    for key in (k for k in first.files if k.startswith("w")):
        np.testing.assert_array_equal(first[key], second[key], err_msg=key)


def read_log(run_dir):
    return [
        json.loads(line) for line in (run_dir / "training_log.jsonl").read_text().splitlines()
    ]


def test_killed_run_resumes_from_its_backup(shared_data, tmp_path):
    command = [
        sys.executable,
        "-m",
        "trainers.mnist",
        "--data-dir",
        str(shared_data / "mnist"),
        "--epochs",
        "40",
        "--steps-per-epoch",
        "2",
        "--batch-size",
        "16",
        "--max-train",
        "256",
        "--max-test",
        "100",
        "--latent-dim",
        "4",
        "--runs-root",
        str(tmp_path),
        "--quiet",
    ]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    first = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 240
    run_dir = None
    while time.time() < deadline and first.poll() is None:
        runs = list((tmp_path / "mnist").glob("*")) if (tmp_path / "mnist").exists() else []
        if runs and (runs[0] / "training_log.jsonl").exists():
            run_dir = runs[0]
            if sum(1 for e in read_log(run_dir) if e["event"] == "epoch_end") >= 3:
                break
        time.sleep(0.05)
    assert first.poll() is None, "the first run finished before it could be killed"
    first.send_signal(signal.SIGKILL)
    first.wait()
    killed_log = read_log(run_dir)
    done = [e for e in killed_log if e["event"] == "epoch_end"]
    assert not (run_dir / "metrics.json").exists()

    second = subprocess.run(
        command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert second.returncode == 0, second.stderr[-2000:]
    assert [p.name for p in (tmp_path / "mnist").iterdir()] == [run_dir.name]  # same folder
    resumed = read_log(run_dir)[len(killed_log) :]
    begin = resumed[0]
    assert begin["event"] == "train_begin" and begin["epoch"] >= 3
    # it starts from the weights of the last backed-up epoch, not from scratch
    backed_up = next(e for e in done if e["epoch"] == begin["epoch"])
    assert begin["weights_checksum"] == pytest.approx(backed_up["weights_checksum"], rel=1e-6)
    assert begin["optimizer_step"] == backed_up["optimizer_step"] == 2 * begin["epoch"]
    assert begin["weights_checksum"] != pytest.approx(
        killed_log[0]["weights_checksum"], rel=1e-6
    )
    assert resumed[1]["epoch"] == begin["epoch"] + 1
    assert resumed[-1]["epoch"] == 40
    assert f"resuming from the backup at epoch {begin['epoch'] + 1}" in second.stderr
    assert (run_dir / "metrics.json").exists()


def test_mnist_trainer_runs_mirrored_on_two_logical_cpus(shared_data, tmp_path):
    result = run_python(
        "-m",
        "trainers.mnist",
        "--data-dir",
        shared_data / "mnist",
        "--epochs",
        "1",
        "--steps-per-epoch",
        "3",
        "--max-test",
        "100",
        "--latent-dim",
        "4",
        "--runs-root",
        tmp_path,
        "--quiet",
        "--strategy",
        "mirrored",
        "--cpu-replicas",
        "2",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    (run_dir,) = (tmp_path / "mnist").iterdir()
    log = read_log(run_dir)
    assert log[-1]["event"] == "epoch_end" and np.isfinite(log[-1]["loss"])
    assert (run_dir / "metrics.json").exists()


@pytest.mark.parametrize("kind", ["vae", "factor_vae", "ad_factor_vae"])
def test_models_train_under_mirrored_strategy_with_finite_losses(kind):
    result = run_python(SCRIPTS / "mirrored_train.py", kind)
    assert result.returncode == 0, result.stderr[-2000:]
    logs = json.loads(result.stdout.strip().splitlines()[-1])
    assert logs.pop("replicas") == 2
    assert all(np.isfinite(values).all() for values in logs.values())
    if kind == "ad_factor_vae":
        assert 0.0 < logs["l_ad"][-1] <= 1.0  # the attention overlap is live
    if kind != "vae":
        assert "tc" in logs and "d_loss" in logs
