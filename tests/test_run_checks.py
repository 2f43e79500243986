"""Bad numbers, folders, data and saved models a trainer meets (issue 26): each is
refused in one line with exit 2 where it enters (before TensorFlow starts where it can),
or handled with a warning or a null metric; never a traceback, never a user's file
overwritten."""

import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import QUICK_RUN_FLAGS, run_python
from test_run_faults import read_log


def cli(module, flags, env=None, timeout=120):
    """A trainer's CLI as a user runs it (TensorFlow's logs off)."""
    env = {"TF_CPP_MIN_LOG_LEVEL": "3", **(env or {})}
    return run_python("-m", module, *flags, env=env, timeout=timeout)


def widget_run(tmp_path, *flags, timeout=120):
    """The MVTec trainer's CLI on the category "widget" under ``tmp_path``/data, its run
    folders under ``tmp_path``/runs."""
    where = ["--category", "widget", "--data-dir", tmp_path / "data"]
    flags = [*where, "--runs-root", tmp_path / "runs", *flags]
    return cli("trainers.mvtec", flags, timeout=timeout)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--smooth", "inf"], "--smooth must be >= 0 and finite, got inf"),
        (["--smooth", "nan"], "--smooth must be >= 0 and finite, got nan"),
        (
            ["--smooth", "1e6"],
            "--smooth must be at most the image side (64 px), got 1000000.0",
        ),
        (["--seed", "-1"], "--seed must be from 0 to 4294967295, got -1"),
        (
            ["--latent-dim", "100000000"],
            "--latent-dim 100000000: training this model needs about",
        ),
        (["--image-size", "100000"], "--image-size 100000: training this model needs about"),
    ],
)
def test_numbers_that_cannot_work_are_refused_naming_the_flag(
    flags, message, capsys, tmp_path
):
    from trainers import mvtec

    with pytest.raises(SystemExit) as stop:
        mvtec.parse_args(["--category", "demo", "--runs-root", str(tmp_path), *flags])
    assert stop.value.code == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing written, no data made


@pytest.mark.slow
def test_tf_config_that_is_not_json_is_one_line(tmp_path):
    result = cli(
        "trainers.mvtec",
        ["--category", "demo", "--runs-root", tmp_path, "--strategy", "multiworker"],
        env={"TF_CONFIG": "{not json"},
    )
    assert result.returncode == 2
    assert "the environment variable TF_CONFIG is not JSON" in result.stderr
    assert "Traceback" not in result.stderr and not list(tmp_path.iterdir())


def test_runs_root_that_cannot_be_written_is_one_line(tmp_path, mount_point, capsys):
    from trainers import mvtec

    a_file = tmp_path / "a-file"
    a_file.write_text("mine")
    read_only = mount_point("ro,size=1m")
    for root, why in (
        (a_file, "is a file, not a folder"),
        (a_file / "runs", "is a file, not a folder"),
        (read_only / "runs", "is not writable"),
    ):
        for flag in ("--runs-root", "--run-dir"):
            with pytest.raises(SystemExit) as stop:
                mvtec.parse_args(["--category", "demo", flag, str(root)])
            assert stop.value.code == 2
            err = capsys.readouterr().err
            assert f"{flag} {root}: " in err and why in err
    assert a_file.read_text() == "mine"


def hold_lock(path):
    """Another process holding the lock of the run folder ``path`` (as a running
    trainer does); returns it once it holds the lock."""
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys, time\n"
            "lock = open(os.path.join(sys.argv[1], '.lock'), 'a+')\n"
            "fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
            "lock.truncate(0); lock.write(str(os.getpid())); lock.flush()\n"
            "print('held', flush=True); time.sleep(120)",
            str(path),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_run_folder_in_use_is_refused_and_a_dead_owner_is_taken_over(tmp_path, capsys):
    from tests.test_common import args_for
    from trainers import run_dirs

    first = run_dirs.run_dir_for(args_for(tmp_path), "exp")
    run_dirs.release(first)  # as if another process made it
    holder = hold_lock(first)
    try:
        with pytest.raises(
            run_dirs.RunRefused,
            match=f"the run folder {first} is in use by process {holder.pid}",
        ):
            run_dirs.run_dir_for(args_for(tmp_path), "exp")  # the same command
        with pytest.raises(run_dirs.RunRefused, match="in use by process"):
            run_dirs.run_dir_for(args_for(tmp_path, run_dir=first), "exp")
        other = run_dirs.run_dir_for(args_for(tmp_path, fresh=True), "exp")  # a new run
        assert other != first
        run_dirs.release(other)
    finally:
        holder.kill()
        holder.wait()
    capsys.readouterr()  # killed: its pid stays in the lock file
    assert run_dirs.run_dir_for(args_for(tmp_path, run_dir=first), "exp") == first
    assert capsys.readouterr().err == (
        f"taking over the run folder {first} from process "
        f"{holder.pid}, which ended without finishing it\n"
    )
    run_dirs.release(first)


def test_run_dir_of_a_finished_run_with_other_flags_is_refused_unless_fresh(tmp_path):
    from keras_vae_attn import runs
    from tests.test_common import args_for
    from trainers import run_dirs

    run_dir = str(tmp_path / "mine")
    run_dirs.run_dir_for(args_for(tmp_path, run_dir=run_dir), "exp")
    runs.write_json(f"{run_dir}/metrics.json", {"pixel_auroc": 0.9})
    runs.write_json(f"{run_dir}/predictions.csv", {"kept": True})
    (tmp_path / "mine" / "notes.txt").write_text("the user's own")
    run_dirs.release(run_dir)
    config = (tmp_path / "mine" / "config.json").read_text()
    with pytest.raises(
        run_dirs.RunRefused,
        match=r"holds a finished run of other flags "
        r"\(--epochs 1 there, 2 here\)",
    ):
        run_dirs.run_dir_for(args_for(tmp_path, run_dir=run_dir, epochs=2), "exp")
    assert (tmp_path / "mine" / "config.json").read_text() == config  # untouched
    assert json.loads((tmp_path / "mine" / "metrics.json").read_text()) == {"pixel_auroc": 0.9}
    run_dirs.release(run_dir)
    with pytest.raises(run_dirs.RunFinished):  # same flags
        run_dirs.run_dir_for(args_for(tmp_path, run_dir=run_dir), "exp")
    run_dirs.release(run_dir)
    run_dirs.run_dir_for(args_for(tmp_path, run_dir=run_dir, epochs=2, fresh=True), "exp")
    assert json.loads((tmp_path / "mine" / "config.json").read_text())["epochs"] == 2
    assert not (tmp_path / "mine" / "metrics.json").exists()
    assert not (tmp_path / "mine" / "predictions.csv").exists()
    assert (tmp_path / "mine" / "notes.txt").read_text() == "the user's own"
    run_dirs.release(run_dir)


@pytest.mark.slow
def test_mvtec_trainer_runs_mirrored_on_two_logical_cpus(tmp_path):
    """The devices are split when the flags are parsed, before the MVTec trainer's layer
    check starts TensorFlow's devices (it failed with "Virtual devices cannot be
    modified after being initialized")."""
    result = cli(
        "trainers.mvtec",
        [
            *("--category", "demo", "--runs-root", tmp_path, *QUICK_RUN_FLAGS),
            *"--image-size 32 --max-train 16 --max-test 6 --eval-batch-size 8".split(),
            *"--backbone small --no-sanity --strategy mirrored --cpu-replicas 2".split(),
        ],
        timeout=300,
    )
    assert "Virtual devices cannot be modified" not in result.stderr
    assert result.returncode == 0, result.stderr[-2000:]
    (run_dir,) = (tmp_path / "mvtec-demo").iterdir()
    assert read_log(run_dir)[-1]["optimizer_step"] == 2


def broken_models(source, root):
    """Copies of the saved model ``source`` (a model/ folder), each broken one way."""
    import shutil

    cases = {}
    for name in ("not-json", "negative-latent", "unknown-class", "truncated-weights"):
        target = root / name
        shutil.copytree(source, target)
        cases[name] = target
    (cases["not-json"] / "model.json").write_text("{not json")
    for name, change in (
        ("negative-latent", {"latent_dim": -4}),
        ("unknown-class", {"class": "Transformer"}),
    ):
        spec = json.loads((cases[name] / "model.json").read_text())
        (cases[name] / "model.json").write_text(json.dumps({**spec, **change}))
    weights = cases["truncated-weights"] / "model.weights.h5"
    weights.write_bytes(weights.read_bytes()[:5000])
    return cases


@pytest.mark.slow
def test_a_model_dir_that_does_not_load_is_one_line(mnist_run, tmp_path, capsys):
    from keras_vae_attn.models import load_vae
    from trainers import guard

    for name, folder in broken_models(mnist_run / "model", tmp_path).items():
        with pytest.raises(SystemExit) as stop:
            guard.main_guard(lambda folder=folder: load_vae(str(folder)))
        assert stop.value.code == 2, name
        (line,) = capsys.readouterr().err.splitlines()
        assert line.startswith(f"error: cannot load the model in {folder}: "), line
        assert line.endswith("[see --model-dir]")


@pytest.mark.slow
def test_an_mnist_header_of_784x1_pixels_is_one_line(shared_data, tmp_path):
    """The bytes are all there (10000 x 784 x 1 = 10000 x 28 x 28), only the header's
    shape is wrong: refused before training, naming the shape."""
    import gzip
    import shutil
    import struct

    folder = tmp_path / "mnist"
    shutil.copytree(shared_data / "mnist", folder)
    path = folder / "t10k-images-idx3-ubyte.gz"
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[:8] + struct.pack(">II", 784, 1) + raw[16:]))
    result = cli(
        "trainers.mnist",
        ["--data-dir", folder, "--runs-root", tmp_path / "runs", "--epochs", "1", "--quiet"],
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: MNIST test images in {str(folder)!r}: the IDX header says 784x1 pixels, "
        "MNIST's are 28x28"
    )
    assert "Traceback" not in result.stderr


def test_no_verdict_is_printed_over_metrics_that_are_all_n_a():
    """A test set with only good images defines no pixel AUROC: no "beats ... at every
    sigma" over n/a (issue 26, case 9)."""
    from keras_vae_attn.metrics.comparison import verdict

    def cell(value):
        return {"pixel_auroc": value}

    results = {
        "ours": {"0": cell(None), "1": cell(None)},
        "theirs": {"0": cell(None), "1": cell(None)},
        "half": {"0": cell(0.5), "1": cell(None)},
    }
    results["ours"]["0"] = cell(None)
    assert verdict(results, "ours") == [
        "no verdict on ours vs theirs: the metric is n/a at every sigma",
        "no verdict on ours vs half: the metric is n/a at every sigma",
    ]
    results["ours"] = {"0": cell(0.9), "1": cell(None)}
    assert verdict(results, "ours")[1] == "ours beats half at sigma 0; n/a at 1"


def test_grey_photo_masks_are_thresholded_with_a_warning(tmp_path):
    from PIL import Image

    from keras_vae_attn.data import mvtec
    from keras_vae_attn.data.synthetic import write_mvtec_category

    write_mvtec_category(
        str(tmp_path), "widget", size=32, n_train=2, n_test_good=1, n_test_defect=1
    )
    binary = mvtec.load_test(str(tmp_path), "widget", 32).masks
    grey = sorted((tmp_path / "widget" / "ground_truth").rglob("*.png"))[0]
    photo = np.random.default_rng(0).integers(20, 110, (32, 32)).astype(np.uint8)
    photo[:8] = 240  # a bright band: the defect
    Image.fromarray(photo).save(grey)
    with pytest.warns(UserWarning, match=r"1 of \d+ masks are not binary .*_mask.png"):
        split = mvtec.load_test(str(tmp_path), "widget", 32)
    row = [
        i
        for i, p in enumerate(split.paths)
        if p.endswith(f"{grey.parent.name}/{grey.name.replace('_mask', '')}")
    ][0]
    assert split.masks[row].sum() == 8 * 32  # the band, not every pixel
    others = [i for i in range(len(split.paths)) if i != row]
    np.testing.assert_array_equal(split.masks[others], binary[others])


@pytest.mark.slow
def test_a_test_set_whose_masks_are_all_empty_scores_null_not_a_traceback(tmp_path):
    """Defect images whose masks mark no pixel: the pixel metrics are undefined; the
    run finishes with null in metrics.json (it raised UndefinedMetric after training)."""
    from PIL import Image

    from keras_vae_attn.data.synthetic import write_mvtec_category

    write_mvtec_category(
        str(tmp_path / "data"), "widget", size=32, n_train=8, n_test_good=1, n_test_defect=1
    )
    for mask in (tmp_path / "data" / "widget" / "ground_truth").rglob("*.png"):
        Image.fromarray(np.zeros((32, 32), np.uint8)).save(mask)
    result = widget_run(
        tmp_path,
        *"--image-size 32 --epochs 1 --steps-per-epoch 1 --batch-size 4".split(),
        *"--eval-batch-size 8 --backbone small --quiet --no-sanity".split(),
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "beats" not in result.stdout.replace("no verdict", "")
    (run_dir,) = (tmp_path / "runs" / "mvtec-widget").iterdir()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["methods"]["anomaly_attention"]["pixel_auroc"] is None
    assert set(metrics["pixel_auroc_per_defect"]["hole"].values()) == {None}


@pytest.mark.slow
def test_training_images_that_are_all_black_are_one_line(tmp_path):
    """All-black normal images (a model of them gave NaN maps after training): refused
    when they are loaded, before any run folder."""
    from PIL import Image

    from keras_vae_attn.data.synthetic import write_mvtec_category

    write_mvtec_category(
        str(tmp_path / "data"), "widget", size=32, n_train=4, n_test_good=1, n_test_defect=1
    )
    for image in (tmp_path / "data" / "widget" / "train" / "good").iterdir():
        Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(image)
    result = widget_run(tmp_path, "--image-size", "32")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: the 4 training images of 'widget' under {str(tmp_path / 'data')!r} are all "
        "one flat colour (every pixel 0): there is no normal appearance to learn"
    )
    assert not (tmp_path / "runs").exists()
