"""Every command line answers --help at once: argparse runs before TensorFlow loads."""

import subprocess
import sys

import pytest

from conftest import MAIN_COMMANDS, REPO, run_python

CLIS = [
    *MAIN_COMMANDS,
    "bench.localization_grid",
    "bench.dsprites_table",
    "bench.dsprites_fidelity",
    "bench.mvtec_throughput",
]

PROBE = """
import runpy, sys
sys.argv = [{module!r}, "--help"]
try:
    runpy.run_module({module!r}, run_name="__main__")
except SystemExit as stop:
    assert stop.code in (0, None), stop.code
print("TENSORFLOW LOADED" if "tensorflow" in sys.modules else "no tensorflow")
"""


def help_of(module):
    """``python -m module --help``, its output captured."""
    return run_python("-m", module, "--help", timeout=60)


@pytest.mark.parametrize("module", CLIS)
def test_help_needs_no_tensorflow(module):
    result = run_python("-c", PROBE.format(module=module), timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage:" in result.stdout
    assert result.stdout.strip().endswith("no tensorflow")


def test_attribution_flags_are_documented_in_the_trainers_help():
    result = help_of("trainers.mvtec")
    for flag in (
        "--attribution",
        "--form",
        "--target",
        "--deviation",
        "--sign",
        "--ig-steps",
        "--combine",
        "--smooth",
    ):
        assert flag in result.stdout, flag
    assert "whitened" in result.stdout and "gradient-weighted-deviation" in result.stdout


#: Benchmarks that import TensorFlow when loaded: their help comes after a quiet start.
BENCH_WITH_TENSORFLOW = [
    "bench.attention",
    "bench.factor_step",
    "bench.input_pipeline",
    "bench.serving",
    "bench.speed_limit",
    "bench.training",
]
BENCH = BENCH_WITH_TENSORFLOW + [
    "bench.dsprites_fidelity",
    "bench.dsprites_table",
    "bench.localization_grid",
    "bench.mvtec_throughput",
]


@pytest.mark.parametrize("module", [*MAIN_COMMANDS, *BENCH])
def test_every_flag_has_help_and_the_usage_names_the_command(module):
    """Each option says what it does (its default is then shown beside it), and the usage
    line is the command a user types, `python -m <module>`."""
    import importlib

    parser = importlib.import_module(module).build_parser()
    silent = [
        action.option_strings or action.dest
        for action in parser._actions
        if not (action.help and action.help.strip())
    ]
    assert not silent, f"{module}: options without help: {silent}"
    text = parser.format_help()
    assert text.startswith(f"usage: python -m {module} "), text[:200]


def test_help_shows_defaults_and_examples_one_per_line():
    result = help_of("trainers.mvtec")
    text = " ".join(result.stdout.split())  # argparse wraps help text anywhere
    for shown in (
        "--epochs EPOCHS training epochs",
        "(default: 100)",
        "(default: 0.0001)",
        "(default: 32)",
        "(default: resnet18)",
        "(default: horizontal)",
        "--epochs 6",
    ):
        assert shown in text, shown
    lines = result.stdout.splitlines()
    examples = [line.strip() for line in lines if line.strip().startswith("python -m ")]
    assert examples[:2] == [
        "python -m trainers.mvtec --category bottle --data-dir path/to/mvtec_ad",
        "python -m trainers.mvtec --category demo      # generated category, runs on CPU",
    ]
    options = text[text.index("options:") :]
    deviation = options[options.index("--deviation {") : options.index("--sign {")]
    assert "whitened (" in deviation and "'default' preset" in deviation


def test_dsprites_help_describes_each_model():
    result = help_of("trainers.dsprites")
    text = " ".join(result.stdout.split())
    assert "total-correlation penalty --gamma" in text and "(default: ad_factor_vae)" in text


@pytest.mark.slow
@pytest.mark.parametrize("module", BENCH_WITH_TENSORFLOW)
def test_bench_help_prints_no_tensorflow_banner(module):
    """Without TF_CPP_MIN_LOG_LEVEL (a plain shell), --help shows the usage only."""
    import os

    environment = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    result = subprocess.run(
        [sys.executable, "-m", module, "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env=environment,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stderr == "", result.stderr[-2000:]
    assert result.stdout.startswith(f"usage: python -m {module} ")
