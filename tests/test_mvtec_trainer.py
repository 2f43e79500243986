"""The MVTec trainer end to end on the generated demo category, and its input errors."""

import json
from pathlib import Path

import pytest

from keras_vae_attn.data import DataError
from keras_vae_attn.data.synthetic import write_mvtec_category
from keras_vae_attn.evaluate import LABELS
from keras_vae_attn.metrics.localization import METRIC_NAMES
from trainers import mvtec as trainer
from trainers import run_dirs

from conftest import QUICK_RUN_FLAGS, run_python

QUICK = [
    *"--image-size 32 --max-train 16 --max-test 6 --eval-batch-size 8".split(),
    *QUICK_RUN_FLAGS,
]

#: the anomaly attention and every reference it is compared with (evaluate.localize)
METHODS = tuple(LABELS)


def command(root, runs_root, *flags, category="widget"):
    """The flags of a quick run on ``category`` under ``root``, run folders under
    ``runs_root``, then ``flags``."""
    where = ["--category", category, "--data-dir", str(root), "--runs-root", str(runs_root)]
    return [*where, *QUICK, *flags]


@pytest.mark.slow
def test_demo_run_writes_every_output_and_reevaluates(tmp_path):
    run_dir = trainer.main(["--category", "demo", "--runs-root", str(tmp_path), *QUICK])
    assert (tmp_path / "data" / "demo" / "train" / "good").is_dir()  # generated cache
    run = tmp_path / "mvtec-demo"
    (only,) = run.iterdir()
    assert str(only) == run_dir
    expected = [
        "metrics.json",
        "config.json",
        "roc.png",
        "curves.png",
        "defect_good.png",
        "defect_hole.png",
        "defect_scratch.png",
        "defect_stain.png",
        "model/model.json",
        "model/model.weights.h5",
        "training_log.jsonl",
        "sanity.png",
        "cascade.png",
        "faithfulness.png",
    ]
    for name in expected:
        assert (only / name).is_file(), name
    assert (only / "defect_hole.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((only / "tensorboard").rglob("events.out.tfevents*"))
    assert list((only / "tensorboard" / "evaluation").glob("events.out.tfevents*"))
    # model/ is saved: the per-epoch checkpoints and the backup are gone
    assert not (only / "checkpoints").exists() and not (only / "backup").exists()
    metrics = json.loads((only / "metrics.json").read_text())
    assert set(metrics["methods"]) == set(METHODS)
    for values in metrics["methods"].values():
        assert set(values) == set(METRIC_NAMES)
        assert 0.0 <= values["pixel_auroc"] <= 1.0 and 0.0 <= values["best_iou"] <= 1.0
    assert metrics["best_iou_is_test_set_tuned"] is True
    # the randomization check of every map, and the faithfulness curves
    assert set(metrics["sanity"]) == set(METHODS) - {"random_features"}
    for name in ("mean_image_difference", "pixel_deviation"):  # model-free: fail
        assert metrics["sanity"][name]["spearman"] == pytest.approx(1.0)
        assert metrics["sanity"][name]["passes"] is False
    assert metrics["sanity_passes"] in (True, False)
    assert set(metrics["faithfulness"]) == set(METHODS) | {"random order"}
    stages = [step["stage"] for step in metrics["sanity_cascade"]]
    assert stages[:3] == ["trained", "decoder", "head"] and stages[-1] == "conv1"
    assert metrics["test_images"] == 6 and metrics["train_images"] == 14  # 2 calibrate
    assert set(metrics["pixel_auroc_per_defect"]) == {"hole", "scratch", "stain"}
    config = json.loads((only / "config.json").read_text())
    assert config["image_size"] == 32 and config["category"] == "demo"

    # The same command again trains nothing: it names the finished run.
    with pytest.raises(run_dirs.RunFinished, match=f"already finished a run: {only}"):
        trainer.main(["--category", "demo", "--runs-root", str(tmp_path), *QUICK])

    # The saved model re-scored at another layer with smoothing: no training, new run.
    again = trainer.main(
        [
            "--category",
            "demo",
            "--runs-root",
            str(tmp_path),
            *QUICK,
            "--model-dir",
            str(only / "model"),
            "--layer",
            "layer3",
            "--smooth",
            "1.5",
            "--deviation",
            "centered",
        ]
    )
    assert again != run_dir
    rescored = json.loads((Path(again) / "metrics.json").read_text())
    assert not (Path(again) / "curves.png").exists()
    assert rescored["layer"] == "layer3" and rescored["seconds"]["train"] == 0.0
    # re-scored relative to the normal features (fitted on the training images then)
    explain = json.loads((Path(again) / "config.json").read_text())["explain"]
    assert explain["deviation"] == "centered" and explain["layers"] == ["layer3"]
    # what each run did: the precision --precision auto chose (a re-score trains in
    # none), and a re-score records its model's 1 epoch, not the flag's default of 100
    assert metrics["precision"] in ("float32", "mixed_bfloat16")
    assert rescored["precision"] is None
    args = trainer.parse_args(
        [
            "--category",
            "cable",
            "--data-dir",
            str(tmp_path / "data"),
            "--model-dir",
            str(only / "model"),
        ]
    )
    assert args.epochs == 1


@pytest.fixture(scope="module")
def small_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("mvtec_root")
    write_mvtec_category(
        str(root), "widget", size=32, n_train=4, n_test_good=1, n_test_defect=1
    )
    return root


def test_unknown_category_lists_found_ones_and_writes_nothing(small_root, tmp_path):
    with pytest.raises(DataError, match=r"'cable' not found.*categories found: widget"):
        trainer.main(command(small_root, tmp_path / "runs", category="cable"))
    assert not (tmp_path / "runs").exists()


def test_corrupt_training_image_stops_before_any_run_folder(small_root, tmp_path):
    import shutil

    root = tmp_path / "root"
    shutil.copytree(small_root, root)
    (root / "widget" / "train" / "good" / "001.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    with pytest.raises(DataError, match=r"001\.png"):
        trainer.main(command(root, tmp_path / "runs"))
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--image-size", "16"], "--image-size must be at least 32"),
        (["--max-test", "0"], "--max-test must be at least 1"),
        (["--smooth", "-1"], "--smooth must be >= 0"),
        (["--steps-per-epoch", "-1"], "--steps-per-epoch must be at least 1"),
        (["--form", "nosuch"], "argument --form: invalid choice: 'nosuch'"),
        (["--ig-steps", "0"], "--ig-steps must be an integer >= 1"),
        (["--layer", "conv1,conv1"], "--layer repeats a layer"),
        (["--feature-baseline", "normal"], "unrecognized arguments: --feature-baseline"),
    ],
)
def test_bad_flags_are_named(flags, message, capsys, small_root):
    with pytest.raises(SystemExit) as exit_info:
        trainer.parse_args(["--category", "widget", "--data-dir", str(small_root), *flags])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_no_root_is_a_flag_error(monkeypatch, capsys):
    monkeypatch.delenv("MVTEC_AD_ROOT", raising=False)
    with pytest.raises(SystemExit):
        trainer.parse_args(["--category", "bottle"])
    assert "--data-dir" in capsys.readouterr().err
    monkeypatch.setenv("MVTEC_AD_ROOT", "/some/root")
    assert trainer.parse_args(["--category", "bottle"]).data_dir == "/some/root"


@pytest.mark.slow
def test_cli_prints_one_clear_line_and_exits_2(tmp_path):
    flags = [
        "--category",
        "bottle",
        "--data-dir",
        tmp_path / "missing",
        "--runs-root",
        tmp_path,
    ]
    result = run_python("-m", "trainers.mvtec", *flags, timeout=300)
    assert result.returncode == 2
    assert "error: MVTec AD root" in result.stderr and "does not exist" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_throughput_bench_measures_both_phases():
    from bench import mvtec_throughput

    assert mvtec_throughput.measure_train(32, 2, 1) > 0
    assert mvtec_throughput.measure_eval(32, 2, 1, "layer3") > 0
    assert 0 < mvtec_throughput._peak_gib() < 64


def test_layer_the_encoder_lacks_is_refused_before_any_run_folder(
    small_root, tmp_path, capsys
):
    with pytest.raises(SystemExit) as exit_info:
        trainer.main(command(small_root, tmp_path / "runs", "--layer", "nosuchlayer"))
    assert "--layer 'nosuchlayer' is not a feature map" in str(exit_info.value)
    assert "conv1" in str(exit_info.value) and not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_run_killed_after_its_model_was_saved_resumes_at_evaluation(
    small_root, tmp_path, capsys
):
    """The state a kill during evaluation leaves: model/ saved, no metrics.json. The
    same command scores the saved model instead of training again."""
    flags = command(small_root, tmp_path, "--backbone", "small")
    run_dir = Path(trainer.main(flags))
    (run_dir / "metrics.json").unlink()
    weights = (run_dir / "model" / "model.weights.h5").read_bytes()
    log_lines = (run_dir / "training_log.jsonl").read_text().splitlines()
    capsys.readouterr()
    assert Path(trainer.main(flags)) == run_dir
    assert "resuming at evaluation" in capsys.readouterr().err
    assert (run_dir / "training_log.jsonl").read_text().splitlines() == log_lines
    assert (run_dir / "model" / "model.weights.h5").read_bytes() == weights
    assert json.loads((run_dir / "metrics.json").read_text())["methods"]


@pytest.mark.slow
def test_two_deterministic_runs_give_identical_weights(small_root, tmp_path):
    import numpy as np

    from keras_vae_attn.models import load_vae

    runs = [
        Path(
            trainer.main(
                command(small_root, tmp_path / name, "--backbone", "small", "--deterministic")
            )
        )
        for name in ("a", "b")
    ]
    first, second = (load_vae(str(run / "model")) for run in runs)
    for a, b in zip(first.weights, second.weights):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=a.path)


@pytest.mark.slow
def test_a_corrupt_image_names_the_file_and_the_cli_adds_its_flag(tmp_path):
    """The library names the loader option; the trainer turns it into its flag."""
    root = tmp_path / "root"
    write_mvtec_category(
        str(root), "widget", size=32, n_train=4, n_test_good=1, n_test_defect=1
    )
    bad = root / "widget" / "train" / "good" / "000.png"
    bad.write_bytes(b"not a png")
    result = run_python("-m", "trainers.mvtec", *command(root, tmp_path / "runs"), timeout=300)
    assert result.returncode == 2
    line = result.stderr.strip().splitlines()[-1]
    assert "000.png" in line and "skip_corrupt" in line and "[see --skip-corrupt]" in line
