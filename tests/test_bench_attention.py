"""The attention benchmark runs end to end at tiny sizes and prints both tables."""
import subprocess
import sys

from conftest import REPO


def test_attention_benchmark_quick_mode_prints_both_tables():
    result = subprocess.run([sys.executable, "-m", "bench.attention", "--quick"], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert "loop/batched" in out and "attention/forward" in out
    rows = [line for line in out.splitlines() if line.startswith("| resnet18")]
    assert len(rows) == 4          # one naive-comparison row, three floor rows
