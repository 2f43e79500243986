"""The run-folder contract on real folders: atomic publishing survives a killed writer,
a RunFolder reads back what a trainer wrote, the dataset registry reopens a run's data,
and a missing or broken file is an error naming it."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from keras_vae_attn import runs
from keras_vae_attn.data import registry
from keras_vae_attn.runs import RunFolder, RunFolderError

from conftest import REPO

KILLED_WRITER = """
import os, signal, sys
from keras_vae_attn import runs
final, kind = sys.argv[1], sys.argv[2]
path = runs.staging_path(final)
if kind == "folder":
    os.makedirs(path)
    open(os.path.join(path, "half"), "w").write("half written")
else:
    open(path, "w").write('{"half":')
print(path, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def killed_writer(final, kind):
    """The staging path a writer of ``final`` left when it was killed mid-write."""
    done = subprocess.run(
        [sys.executable, "-c", KILLED_WRITER, str(final), kind],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == -signal.SIGKILL, done.stderr
    return done.stdout.strip()


def write_folder(path, text):
    os.makedirs(path)
    with open(os.path.join(path, "data.txt"), "w", encoding="utf-8") as handle:
        handle.write(text)


def read_folder(path):
    with open(os.path.join(path, "data.txt"), encoding="utf-8") as handle:
        return handle.read()


# --- atomic publishing ---------------------------------------------------------------


def test_a_killed_folder_write_is_invisible_and_the_next_publish_clears_it(tmp_path):
    final = tmp_path / "version"
    left = killed_writer(final, "folder")
    assert os.path.isdir(left) and not final.exists()  # readers of final see nothing
    with runs.staged(str(final)) as path:
        write_folder(path, "complete")
    assert read_folder(final) == "complete"
    assert sorted(os.listdir(tmp_path)) == ["version"]  # the dead writer's copy is gone


def test_a_killed_json_write_leaves_the_old_file_and_is_cleared(tmp_path):
    final = tmp_path / "metrics.json"
    runs.write_json(str(final), {"auroc": 0.9, "nan": float("nan")})
    left = killed_writer(final, "file")
    assert os.path.isfile(left)
    assert json.loads(final.read_text()) == {"auroc": 0.9, "nan": None}
    runs.write_json(str(final), {"auroc": 0.95})
    assert json.loads(final.read_text()) == {"auroc": 0.95}
    assert sorted(os.listdir(tmp_path)) == ["metrics.json"]


def test_a_live_writers_staging_copy_is_left_alone(tmp_path):
    final = tmp_path / "model.onnx"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = tmp_path / f"model.onnx{runs.PARTIAL}{sleeper.pid}"
        live.write_text("being written")
        with runs.staged(str(final)) as path:
            open(path, "w").write("mine")
        assert live.read_text() == "being written" and final.read_text() == "mine"
    finally:
        sleeper.kill()
        sleeper.wait()
    assert runs.remove_stale(str(final)) == [str(live)]  # its writer is dead now
    assert not live.exists()


def test_publishing_over_an_existing_folder_needs_replace(tmp_path):
    final = tmp_path / "3"
    write_folder(final, "old")
    with pytest.raises(FileExistsError, match=f"{final} already exists"):
        with runs.staged(str(final)) as path:
            write_folder(path, "new")
    assert read_folder(final) == "old" and os.listdir(tmp_path) == ["3"]
    with runs.staged(str(final), replace=True) as path:
        write_folder(path, "new")
    assert read_folder(final) == "new" and os.listdir(tmp_path) == ["3"]


def test_a_file_is_not_overwritten_without_replace(tmp_path):
    final = tmp_path / "model.onnx"
    final.write_text("old")
    with pytest.raises(FileExistsError):
        with runs.staged(str(final)) as path:
            open(path, "w").write("new")
    assert final.read_text() == "old" and os.listdir(tmp_path) == ["model.onnx"]


def test_a_replace_killed_between_its_renames_gets_the_old_folder_back(tmp_path):
    final = tmp_path / "model"
    write_folder(final, "old")
    left = killed_writer(final, "folder")  # any dead pid
    dead_pid = left.rsplit("-", 1)[1]
    os.rename(final, f"{final}{runs.REPLACED}{dead_pid}")  # moved aside, then killed
    with runs.staged(str(tmp_path / "other")) as path:  # another final: untouched
        write_folder(path, "x")
    assert not final.exists()
    restored = runs.remove_stale(str(final))
    assert read_folder(final) == "old"
    assert sorted(os.path.basename(p) for p in restored) == sorted(
        [os.path.basename(left), f"model{runs.REPLACED}{dead_pid}"]
    )
    assert sorted(os.listdir(tmp_path)) == ["model", "other"]


def test_an_error_inside_the_block_publishes_nothing(tmp_path):
    final = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with runs.staged(str(final)) as path:
            write_folder(path, "half")
            raise RuntimeError("the export failed")
    assert os.listdir(tmp_path) == []


# --- reading a run folder ------------------------------------------------------------


def test_a_missing_config_is_an_error_naming_the_file(tmp_path):
    run = RunFolder(tmp_path)
    with pytest.raises(RunFolderError, match=f"{tmp_path / 'config.json'} is missing"):
        run.config()
    assert runs.read_config(str(tmp_path)) == {}  # the trainers' lenient read
    assert not run.complete


@pytest.mark.parametrize(
    "text, says",
    [
        ('{"explain": ', "cannot read the configuration"),
        ("[1, 2]", "must hold a JSON object, got list"),
        ("\xff\xfe", "cannot read the configuration"),
    ],
)
def test_a_corrupt_config_is_an_error_naming_the_file(tmp_path, text, says):
    (tmp_path / "config.json").write_bytes(text.encode("latin-1"))
    for read in (RunFolder(tmp_path).config, lambda: runs.read_config(tmp_path)):
        with pytest.raises(RunFolderError) as error:
            read()
        assert str(tmp_path / "config.json") in str(error.value) and says in str(error.value)


def test_invalid_explain_options_name_the_config(tmp_path):
    run = RunFolder(tmp_path)
    run.write_config({"category": "demo", "explain": {"form": "nonsense"}})
    with pytest.raises(RunFolderError, match="config.json holds invalid explain options"):
        run.options()
    run.write_config({"category": "demo"})
    with pytest.raises(
        RunFolderError, match='config.json holds invalid explain options: .*"explain"'
    ):
        run.options()


def test_missing_run_files_are_errors_naming_them(tmp_path):
    run = RunFolder(tmp_path)
    for read, name in [
        (run.metrics, "metrics.json"),
        (run.thresholds, "thresholds.json"),
        (run.predictions, "predictions.csv"),
        (run.load_model, os.path.join("model", "model.json")),
    ]:
        with pytest.raises(RunFolderError, match=str(tmp_path / name)):
            read()
    (tmp_path / "thresholds.json").write_text('{"pixel": NaN, "image": 1}')
    with pytest.raises(RunFolderError, match="pixel threshold must be a finite number"):
        run.thresholds()


def test_a_config_of_no_known_dataset_is_an_error_listing_them(tmp_path):
    run = RunFolder(tmp_path)
    run.write_config({"explain": {}})
    with pytest.raises(RunFolderError, match="known datasets: mvtec, ucsd, mnist"):
        run.data()
    run.write_config({"dataset": "kitti"})
    with pytest.raises(RunFolderError, match="dataset 'kitti'"):
        _ = run.config().dataset


def test_the_registry_writes_a_generated_category_again_and_reopens_it(tmp_path):
    from keras_vae_attn.data import mvtec

    root = tmp_path / "data"  # the run's data folder, since deleted
    config = {"category": "demo", "data_dir": str(root), "image_size": 32}
    data = registry.open_run_data({**config, "max_train": 12, "max_test": 5})
    assert data.dataset == "mvtec" and (root / "demo" / "train" / "good").is_dir()
    train = mvtec.load_train(str(root), "demo", 32, limit=12)
    test = mvtec.load_test(str(root), "demo", 32, limit=5)
    np.testing.assert_array_equal(data.normal, mvtec.to_float(train))
    np.testing.assert_array_equal(data.test.images, mvtec.to_float(test.images))
    np.testing.assert_array_equal(data.test.masks, test.masks)
    assert list(data.test.labels) == list(test.labels) and data.test.groups == test.defects
    assert data.test.paths == test.paths


def test_the_registry_reopens_ucsd_clips_with_the_runs_frame_steps(tmp_path):
    from keras_vae_attn.data import ucsd
    from keras_vae_attn.data.synthetic import write_ucsd_dataset

    write_ucsd_dataset(str(tmp_path), "ped2", frames=12, n_train=2, n_test=2)
    config = {"subset": "ped2", "data_dir": str(tmp_path), "image_size": 24}
    config.update(frame_step=3, test_frame_step=2, max_test_clips=1)
    data = registry.open_run_data(config)
    train = ucsd.load_train(str(tmp_path), "ped2", 24, frame_step=3)
    test = ucsd.load_test(str(tmp_path), "ped2", 24, max_clips=1, frame_step=2)
    assert data.dataset == "ucsd"
    np.testing.assert_array_equal(data.normal, ucsd.to_float(train))
    np.testing.assert_array_equal(data.test.images, ucsd.to_float(test.images))
    np.testing.assert_array_equal(data.test.masks, test.masks)
    assert data.test.groups == test.clips and len(set(test.clips)) == 1


def test_the_registry_reopens_mnist_digits_image_labelled(shared_data):
    from keras_vae_attn.data import mnist

    config = {"normal_digit": 7, "data_dir": str(shared_data / "mnist")}
    data = registry.open_run_data({**config, "max_train": 20, "max_test": 30})
    test_x, test_y = mnist.load(config["data_dir"], "test")
    assert data.dataset == "mnist" and data.normal.shape == (20, 28, 28, 1)
    assert data.test.masks is None
    assert list(data.test.labels) == [int(y != 7) for y in test_y[:30]]
    assert data.test.groups == [int(y) for y in test_y[:30]]
    np.testing.assert_array_equal(data.test.images, mnist.to_float(test_x[:30]))


# --- a trainer's run, read back ------------------------------------------------------


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """A run folder of the MVTec trainer on the generated demo category (CLI)."""
    root = tmp_path_factory.mktemp("runs")
    flags = ["--category", "demo", "--runs-root", str(root), "--image-size", "32"]
    flags += ["--epochs", "1", "--steps-per-epoch", "1", "--batch-size", "8"]
    flags += ["--max-train", "16", "--max-test", "6", "--eval-batch-size", "8"]
    done = subprocess.run(
        [sys.executable, "-m", "trainers.mvtec", *flags, "--no-sanity", "--quiet"],
        cwd=REPO,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (run_dir,) = (root / "mvtec-demo").iterdir()
    return root, RunFolder(run_dir)


@pytest.mark.slow
def test_a_run_folder_reads_back_what_the_trainer_wrote(demo_run):
    from keras_vae_attn.explain.options import ExplainOptions

    root, run = demo_run
    assert run.complete and run.missing_model_files() == []
    config = run.config()
    assert config.dataset == "mvtec" and config["category"] == "demo"
    assert config.image_size == 32 and config.seed == 0
    assert config.data_dir == str(root / "data")
    assert run.options() == ExplainOptions.from_config(config.values)
    written = json.loads(open(run.metrics_path, encoding="utf-8").read())
    assert run.metrics() == written
    thresholds = run.thresholds()
    assert thresholds.as_dict().items() <= written["predictions"]["thresholds"].items()
    rows = run.predictions()
    assert len(rows) == written["test_images"] == 6
    model = run.load_model()
    assert tuple(model.encoder.inputs[0].shape[1:]) == (32, 32, 3)


@pytest.mark.slow
def test_the_registry_reopens_the_trainers_data_even_once_deleted(demo_run):
    import shutil

    root, run = demo_run
    data = run.data()
    rows = run.predictions()
    assert data.dataset == "mvtec" and len(data.normal) == 16
    assert [int(r["label"]) for r in rows] == list(data.test.labels)
    assert [r["defect_type"] for r in rows] == data.test.groups
    files = [os.path.relpath(path, root / "data") for path in data.test.paths]
    assert [r["file"] for r in rows] == files  # the very images the trainer predicted
    shutil.rmtree(root / "data")  # the generated category is written again, the same
    again = run.data()
    np.testing.assert_array_equal(again.normal, data.normal)
    np.testing.assert_array_equal(again.test.images, data.test.images)
