"""Every command line the README documents parses with its CLI's own parser.

Taken from the README itself: the `python -m ...` lines of its code blocks (with their
backslash continuations) and the `python -m ...` spans in its prose and tables. Each
module must expose ``build_parser()``; nothing is run, so no flag can drift unseen.
"""
import importlib
import re
import shlex

import pytest

from conftest import REPO

#: Documented commands of modules that are not CLIs with flags to check.
NO_PARSER = ("bench.",)


def documented_commands():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    commands = []
    for block in re.findall(r"^```[a-z]*\n(.*?)^```", text, re.S | re.M):
        joined = re.sub(r"\\\n\s*", " ", block)
        commands += [line.strip() for line in joined.splitlines()
                     if line.strip().startswith("python -m ")]
    commands += re.findall(r"(?<!`)`(python -m [^`]+)`", text)
    return commands


COMMANDS = list(dict.fromkeys(documented_commands()))


def test_the_readme_documents_the_main_commands():
    modules = {shlex.split(command)[2] for command in COMMANDS}
    assert {"trainers.mvtec", "trainers.ucsd", "trainers.mnist", "trainers.dsprites",
            "export.saved_model", "export.onnx", "export.infer",
            "export.pipeline"} <= modules
    assert any("--demo" in command for command in COMMANDS if "trainers.ucsd" in command)


@pytest.mark.parametrize("command", [c for c in COMMANDS
                                     if not shlex.split(c)[2].startswith(NO_PARSER)])
def test_documented_command_parses(command, capsys):
    words = shlex.split(command, comments=True)
    module = importlib.import_module(words[2])
    try:
        module.build_parser().parse_args(words[3:])
    except SystemExit:
        pytest.fail(f"README command does not parse: {command}\n{capsys.readouterr().err}")
