"""Every command line answers --help at once: argparse runs before TensorFlow loads."""
import subprocess
import sys

import pytest

from conftest import REPO

CLIS = ["trainers.mvtec", "trainers.ucsd", "trainers.mnist", "trainers.dsprites",
        "export.saved_model", "export.onnx", "export.infer", "export.pipeline",
        "bench.localization_grid"]

PROBE = """
import runpy, sys
sys.argv = [{module!r}, "--help"]
try:
    runpy.run_module({module!r}, run_name="__main__")
except SystemExit as stop:
    assert stop.code in (0, None), stop.code
print("TENSORFLOW LOADED" if "tensorflow" in sys.modules else "no tensorflow")
"""


@pytest.mark.parametrize("module", CLIS)
def test_help_needs_no_tensorflow(module):
    result = subprocess.run([sys.executable, "-c", PROBE.format(module=module)], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage:" in result.stdout
    assert result.stdout.strip().endswith("no tensorflow")


def test_attribution_flags_are_documented_in_the_trainers_help():
    result = subprocess.run([sys.executable, "-m", "trainers.mvtec", "--help"], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    for flag in ("--attribution", "--form", "--target", "--deviation", "--sign",
                 "--ig-steps", "--combine", "--smooth"):
        assert flag in result.stdout, flag
    assert "whitened" in result.stdout and "gradient-weighted-deviation" in result.stdout
