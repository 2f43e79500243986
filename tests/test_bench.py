"""The benchmark scripts run end to end at tiny sizes and print their tables."""
import subprocess
import sys

from conftest import REPO


def run_bench(name):
    result = subprocess.run([sys.executable, "-m", f"bench.{name}", "--quick"], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_attention_benchmark_prints_its_three_tables():
    out = run_bench("attention")
    assert "loop/batched" in out and "attention/forward" in out and "per-latent/total" in out
    rows = [line for line in out.splitlines() if line.startswith("| resnet18")]
    assert len(rows) == 5          # one naive-comparison row, three floor rows, one anomaly row


def test_training_benchmark_times_the_step_with_and_without_xla():
    out = run_bench("training")
    rows = [line for line in out.splitlines() if line.startswith("| VAE small")]
    assert len(rows) == 2 and "True" in rows[1]
    decoders = [line for line in out.splitlines() if "decoder" in line]
    assert len(decoders) == 2 and "before" in decoders[0]


def test_input_pipeline_benchmark_reports_the_stream_to_step_ratio():
    out = run_bench("input_pipeline")
    assert "augmented training stream" in out and "stream / step" in out
