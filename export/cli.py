"""What the exporters' command lines share: the flags every one takes, and how a run of
one ends (exit 2 with one line on a refusal, 130 on Ctrl-C, a warning when the exported
run never finished), so ``python -m export.onnx`` and ``python -m export.saved_model``
cannot drift apart."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import TypeVar

from export import ExportError, Progress, Stages, warn_incomplete

T = TypeVar("T")


def export_parser(
    prog: str, description: str | None, out_help: str
) -> argparse.ArgumentParser:
    """The parser of an exporter, holding the ``--run`` and ``--out`` every exporter
    takes first; the module docstring is printed as written."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--run", required=True, help="trained run folder (holds model/)")
    parser.add_argument("--out", required=True, help=out_help)
    return parser


def add_output_flags(parser: argparse.ArgumentParser, force_help: str) -> None:
    """``--force`` (replace what ``--out`` would write) and ``--thresholds`` (the decision
    outputs), which every exporter takes."""
    parser.add_argument("--force", action="store_true", help=force_help)
    parser.add_argument(
        "--thresholds",
        default=None,
        help="thresholds.json (pixel, image): adds pred_score, pred_label "
        "and pred_mask outputs",
    )


def run_export(
    label: str,
    stages: int,
    export: Callable[[Progress], T],
    run_dir: str,
    not_written: str,
    refusals: tuple[type[Exception], ...] = (),
) -> T:
    """What ``export`` returns, called with the numbered stage lines of ``label``. A
    refusal (ExportError, or one of ``refusals``) exits 2 with its one-line message;
    Ctrl-C exits 130 saying ``not_written``; an export of an unfinished run warns."""
    try:
        result = export(Stages(label, stages))
    except (ExportError, *refusals) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print(f"{label}: interrupted; {not_written}", file=sys.stderr)
        raise SystemExit(130) from None
    warn_incomplete(run_dir)
    return result
