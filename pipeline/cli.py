"""Train -> evaluate -> validate -> export -> push, with lineage and cached stages.

    python -m pipeline --category cable --data-dir <mvtec root> \\
        --serving-dir <dir> [--min-pixel-auroc 0.85] [-- <extra trainer flags>]

Each stage writes its artifact into the pipeline folder and a record into
``manifest.json``; re-running skips stages whose inputs did not change, and
``--from-stage`` forces a restart from that stage on. A candidate is pushed only when
blessed: its metrics pass the given floors and are no worse (by more than
``--tolerance``) than the reference map of the same run (``--reference``, by default the
reconstruction difference of the same VAE) and than the served model's. With
``--reference none`` a floor is required, so a candidate is never blessed unjudged. An
unblessed candidate ends the pipeline with exit code 3 and one line of reasons. The
push is atomic: TF Serving never sees a partial version, and the staging folders of a
killed push are removed by the next one.

Children (the trainer, the exporters) run in their own process group: SIGINT/SIGTERM to
the pipeline are forwarded to that group, and the group is killed when the pipeline
exits, so a stopped pipeline leaves no orphan training. A train stage that was stopped
is resumed from the trainer's backup when the same command is run again (its run folder
is kept); a changed configuration, or ``--from-stage train``, trains afresh.
``--model-name`` (and the default ``vae_<category>``), ``--category`` and every number
are checked before anything is written.

The pipeline owns only what it creates: its folder holds a marker file
(:data:`pipeline.folder.MARKER`) naming the entries it writes, a ``--pipeline-dir``
holding anything else (or overlapping the data) is refused, and it deletes nothing
outside those entries. The trainer is run through :mod:`trainers.api`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from export import model_name_problem
from export.metadata import FingerprintError
from pipeline import blessing, lineage, stages
from pipeline.folder import PipelineError
from pipeline.processes import Interrupted

#: Exit code of a run whose candidate was not blessed.
NOT_BLESSED = 3


def number(
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> Callable[[str], float]:
    """An argparse type: a finite float within [low, high] (open ends as asked), so a
    NaN floor or tolerance cannot bless an unjudged model."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
        below = low is not None and (value <= low if low_open else value < low)
        above = high is not None and (value >= high if high_open else value > high)
        if not math.isfinite(value) or below or above:
            left = "any" if low is None else f"{'(' if low_open else '['}{low:g}"
            right = "" if high is None else f"{high:g}{')' if high_open else ']'}"
            where = f"in {left}, {right}" if high is not None else f">= {low:g}"
            raise argparse.ArgumentTypeError(f"must be a finite number {where}, got {text}")
        return value

    return parse


class OneLineParser(argparse.ArgumentParser):
    """argparse's parser reporting a bad flag in one line (with a pointer to --help),
    not after its usage, which is longer than a terminal's screen here."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="python -m pipeline",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--category", required=True, help="MVTec AD category under --data-dir (e.g. cable)"
    )
    parser.add_argument(
        "--data-dir",
        default=os.environ.get("MVTEC_AD_ROOT"),
        help="MVTec AD root (default: $MVTEC_AD_ROOT)",
    )
    parser.add_argument(
        "--serving-dir",
        required=True,
        help="TF Serving model base path: <dir>/<model name>/<version>/",
    )
    parser.add_argument("--model-name", help="default: vae_<category>")
    parser.add_argument(
        "--pipeline-dir", help="artifact folder (default: runs/pipeline/<category>)"
    )
    parser.add_argument(
        "--from-stage",
        choices=stages.STAGES,
        help="rerun this stage and every later one even if cached",
    )
    parser.add_argument(
        "--holdout",
        type=number(0, 1, True, True),
        default=0.1,
        help="fraction of train/good held out to calibrate thresholds (the last files, as "
        "the trainers hold theirs out)",
    )
    parser.add_argument(
        "--validation-dir",
        help="labelled MVTec-layout root: calibrate F1-optimal thresholds "
        "on its test split instead of normal percentiles",
    )
    for level, default, of in (
        ("pixel", 99.5, "the held-out normal images' heatmaps"),
        ("image", 99.0, "their image scores"),
    ):
        parser.add_argument(
            f"--{level}-percentile",
            type=number(0, 100),
            default=default,
            help=f"{level} threshold: this percentile of {of} (default: %(default)s)",
        )
    for metric in blessing.GATED_METRICS:
        parser.add_argument(
            f"--min-{metric.replace('_', '-')}",
            type=number(0, 1),
            help=f"bless only if {metric} of the anomaly attention >= this",
        )
    parser.add_argument(
        "--reference",
        choices=blessing.REFERENCES,
        default="recon_error",
        help="bless only if the anomaly attention is no worse than this "
        "map of the same run (metrics.json 'methods') on every gated "
        "metric; 'none' requires a --min-* floor",
    )
    parser.add_argument(
        "--tolerance",
        type=number(0),
        default=0.01,
        help="how much worse than the reference and the served model a candidate may be",
    )
    parser.add_argument(
        "--seed",
        type=seed_value,
        default=0,
        help="the trainer's --seed (default: %(default)s)",
    )
    parser.add_argument(
        "--no-verify",
        dest="verify",
        action="store_false",
        help="export stage: skip export.onnx's check of the converted graph against the model",
    )
    parser.add_argument(
        "trainer_args",
        nargs="*",
        help="after `--`: extra flags for trainers.mvtec (e.g. --epochs 5)",
    )
    return parser


def seed_value(text: str) -> int:
    """An argparse type: a seed >= 0 (the trainer's random generators take no other)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {value}")
    return value


def check_names(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse, before anything is written, a --category that is not a plain folder name
    (``../x`` would put the pipeline folder elsewhere) and a serving name that would
    leave --serving-dir."""
    category = args.category
    if not category or category.startswith(".") or "/" in category or os.sep in category:
        parser.exit(
            2,
            f"error: --category {category!r} must be a plain folder name (no "
            "path separator, not starting with '.')\n",
        )
    check_model_name(parser, args)


def check_model_name(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse, before any stage, a serving name that would leave ``--serving-dir``
    (one line naming the flag, exit 2); the default vae_<category> is checked too."""
    if args.model_name is not None:
        flag, name = "--model-name", args.model_name
    else:
        flag, name = "--category", f"vae_{args.category}"
    problem = model_name_problem(name)
    if problem:
        parser.exit(2, f"error: {flag}: model name {problem}\n")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.data_dir:
        parser.error("--data-dir is required (or set $MVTEC_AD_ROOT)")
    check_names(parser, args)
    if args.reference == "none" and all(
        getattr(args, f"min_{m}") is None for m in blessing.GATED_METRICS
    ):
        parser.error(
            "--reference none needs a floor to judge the candidate by: "
            "--min-pixel-auroc, --min-image-auroc or --min-aupro"
        )
    from keras_vae_attn.console import start_tensorflow

    start_tensorflow()
    from keras_vae_attn.data import DataError
    from keras_vae_attn.runs import RunFolderError

    pipe = None
    try:
        pipe = stages.Pipeline(args)
        results = pipe.run()
    except (
        DataError,
        PipelineError,
        lineage.LineageError,
        FingerprintError,
        RunFolderError,
    ) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except subprocess.CalledProcessError as error:
        print(
            f"error: the {pipe.current} stage stopped: {' '.join(error.cmd[1:3])} exited "
            f"with code {error.returncode} (its message is above)",
            file=sys.stderr,
        )
        raise SystemExit(2) from None
    except (Interrupted, KeyboardInterrupt) as stop:
        name = getattr(stop, "signal", "SIGINT")
        where = f"in the {pipe.current} stage" if pipe and pipe.current else "before any stage"
        print(
            f"interrupted by {name} {where}; run the same command to resume from it",
            file=sys.stderr,
        )
        raise SystemExit(128 + signal.Signals[name].value) from None
    print(json.dumps({name: r["status"] for name, r in results.items()}, indent=2))
    validated = results["validate"]
    if validated["status"] != "blessed":
        print(
            "not blessed, nothing pushed: " + "; ".join(validated["details"]["reasons"]),
            file=sys.stderr,
        )
        raise SystemExit(NOT_BLESSED)
    return results
