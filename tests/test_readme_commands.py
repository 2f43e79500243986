"""Every command line the README documents parses with its CLI's own parser, and runs.

Taken from the README itself: the `python -m ...` lines of its code blocks (with their
backslash continuations) and the `python -m ...` spans in its prose and tables. Each
module, trainers, exporters and benchmarks alike, exposes ``build_parser()``, so no flag
can drift unseen. Training a model is too slow for a test, so what is run is what a user
can run at once: the README's own way into `.venv` (its first command block), then every
documented module's `--help` in that shell, as the user would type it.
"""

import importlib
import os
import re
import shlex
import subprocess

import pytest

from conftest import MAIN_COMMANDS, REPO

README = (REPO / "README.md").read_text(encoding="utf-8")
BLOCKS = re.findall(r"^```([a-z]*)\n(.*?)^```", README, re.S | re.M)


def documented_commands():
    commands = []
    for _, block in BLOCKS:
        joined = re.sub(r"\\\n\s*", " ", block)
        commands += [
            line.strip()
            for line in joined.splitlines()
            if line.strip().startswith("python -m ")
        ]
    commands += re.findall(r"(?<!`)`(python -m [^`]+)`", README)
    return commands


#: Placeholders such as `python -m bench.<name>` name no one command.
COMMANDS = [
    command
    for command in dict.fromkeys(documented_commands())
    if re.fullmatch(r"[\w.]+", shlex.split(command)[2])
]
MODULES = sorted({shlex.split(command)[2] for command in COMMANDS})


def test_the_readme_documents_the_main_commands():
    assert set(MAIN_COMMANDS) <= set(MODULES)
    assert any("--demo" in command for command in COMMANDS if "trainers.ucsd" in command)


@pytest.mark.parametrize("command", COMMANDS)
def test_documented_command_parses(command, capsys):
    words = shlex.split(command, comments=True)
    module = importlib.import_module(words[2])
    try:
        module.build_parser().parse_args(words[3:])
    except SystemExit:
        pytest.fail(f"README command does not parse: {command}\n{capsys.readouterr().err}")


def test_documented_scripts_parse():
    """`python docs/<script>.py ...` commands, parsed with the script's own parser."""
    import importlib.util

    scripts = re.findall(r"`python (docs/\w+\.py)( [^`]*)?`", README)
    assert scripts, "the README documents docs/explain_mnist.py"
    for path, flags in scripts:
        spec = importlib.util.spec_from_file_location(path[:-3].replace("/", "."), REPO / path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        module.build_parser().parse_args(shlex.split(flags or ""))


def activation_line():
    """The line of the README's first shell block that enters `.venv`."""
    first = next(block for kind, block in BLOCKS if kind == "bash")
    lines = [line.split("#")[0].strip() for line in first.splitlines()]
    found = [line for line in lines if re.fullmatch(r"(\.|source) \.venv/bin/activate", line)]
    assert found, "the README's first commands must say how to enter .venv"
    return found[0]


def test_the_first_lines_say_how_to_run_the_other_commands():
    """Before any `python -m` command, the README says to activate `.venv` or to call
    `.venv/bin/python` (issue: the system Python has no TensorFlow)."""
    first_python = README.index("python -m ")
    assert ". .venv/bin/activate" in README[:first_python]
    assert ".venv/bin/python -m " in README[: README.index("## ")]


@pytest.mark.slow
@pytest.mark.skipif(
    not (REPO / ".venv" / "bin" / "activate").is_file(),
    reason="no .venv here (make creates it)",
)
def test_every_documented_module_answers_help_in_the_readme_shell():
    """A fresh shell without .venv on its PATH: the README's activation line, then each
    documented module as typed (`python -m <module> --help`); each prints its usage."""
    script = (
        activation_line()
        + "\n"
        + "\n".join(
            f"echo '=== {module}'; python -m {module} --help || echo 'FAILED {module}'"
            for module in MODULES
        )
    )
    environment = {
        key: value
        for key, value in os.environ.items()
        if key not in ("VIRTUAL_ENV", "PYTHONPATH", "TF_CPP_MIN_LOG_LEVEL")
    }
    environment["PATH"] = (
        os.pathsep.join(
            part
            for part in environment.get("PATH", "").split(os.pathsep)
            if ".venv" not in part
        )
        or "/usr/bin:/bin"
    )
    result = subprocess.run(
        ["bash", "-c", script],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env=environment,
    )
    assert "FAILED" not in result.stdout, result.stdout[-3000:] + result.stderr[-3000:]
    for module in MODULES:
        section = result.stdout.split(f"=== {module}\n", 1)[1]
        assert section.startswith(f"usage: python -m {module} "), (module, section[:300])
    assert result.stderr == "", result.stderr[-3000:]  # no banner, no traceback
