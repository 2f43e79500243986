"""The benchmark scripts run end to end at tiny sizes and print their tables."""

import subprocess
import sys

import pytest

from conftest import REPO


def run_bench(name):
    result = subprocess.run(
        [sys.executable, "-m", f"bench.{name}", "--quick"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


@pytest.mark.slow
def test_attention_benchmark_prints_its_three_tables():
    out = run_bench("attention")
    assert "loop/batched" in out and "attention/forward" in out and "per-latent/total" in out
    assert "heatmap/forward" in out
    from keras_vae_attn.explain import forms as registry

    layer_forms = {n for n, f in registry.FORMS.items() if not f.reads_decoder}
    assert {"gradcam", "hirescam", "gradient-weighted-deviation"} <= layer_forms
    forms = [line for line in out.splitlines() if "| resnet18" in line and "conv1" in line]
    assert {f for f in layer_forms if any(f"| {f} " in line for line in forms)} == layer_forms
    rows = [line for line in out.splitlines() if line.startswith("| resnet18")]
    # one naive-comparison, three floor, one anomaly row, and a row per layer form
    assert len(rows) == 5 + len(layer_forms)


@pytest.mark.slow
def test_training_benchmark_times_the_step_with_and_without_xla():
    out = run_bench("training")
    rows = [line for line in out.splitlines() if line.startswith("| VAE small")]
    assert len(rows) == 2 and "True" in rows[1]
    decoders = [line for line in out.splitlines() if "decoder" in line]
    assert len(decoders) == 2 and "before" in decoders[0]


@pytest.mark.slow
def test_input_pipeline_benchmark_reports_the_stream_to_step_ratio():
    out = run_bench("input_pipeline")
    assert "augmented training stream" in out and "stream / step" in out


def test_dsprites_table_summarizes_seeds_and_compares_paired_seeds():
    from bench import dsprites_table as table3

    scores = {}
    for seed, (factor, ad) in enumerate([(0.60, 0.70), (0.50, 0.55), (0.70, 0.65)]):
        scores[(table3.FACTOR_VAE, seed)] = factor
        scores[(table3.AD_FACTOR_VAE, seed)] = ad
    table = table3.summarize(scores)
    assert table[table3.AD_FACTOR_VAE]["seeds"] == [0, 1, 2]
    assert abs(table[table3.FACTOR_VAE]["mean"] - 0.6) < 1e-12
    assert abs(table[table3.FACTOR_VAE]["std"] - 0.1) < 1e-12  # sample std
    verdict = table3.verdict(table)
    assert abs(verdict["ad_minus_factor_vae_mean"] - 0.1 / 3) < 1e-12
    assert verdict["ad_above_on_every_seed"] is False  # seed 2 is below
    assert verdict["ad_meets_target"] is False
    rows = table3.markdown(table, [0, 1, 2, 3]).splitlines()
    assert rows[2].startswith(f"| {table3.FACTOR_VAE} | 0.600 | 0.500 | 0.700 | - |")


def test_dsprites_table_reads_a_finished_run_back_instead_of_training(tmp_path):
    import json

    from bench import dsprites_table as table3

    folder = table3.run_folder(str(tmp_path), ["--model", "factor_vae"], 4)
    (tmp_path / "factor_vae-seed4").mkdir()
    with open(f"{folder}/metrics.json", "w", encoding="utf-8") as handle:
        json.dump({"factor_vae_score": 0.5}, handle)
    # a model the trainer would refuse: any attempt to train would raise
    metrics = table3.train(
        str(tmp_path), ["--model", "factor_vae"], 4, 10, ["--no-such-flag"], 1
    )
    assert metrics == {"factor_vae_score": 0.5}
    with pytest.raises(RuntimeError, match="trainer.log"):
        table3.train(str(tmp_path), ["--model", "factor_vae"], 5, 10, ["--no-such-flag"], 1)


def test_seed_scores_figure_is_written(tmp_path):
    from PIL import Image

    from keras_vae_attn import viz

    path = str(tmp_path / "table.png")
    viz.save_seed_scores({"a (x)": [0.5, 0.6, 0.7], "b": [0.4]}, path, "t", "score")
    assert Image.open(path).size[0] > 300
