"""Benchmarks: `python -m bench.<name>`; bench/RESULTS.md holds their results."""

import argparse


def cli_parser(name, description, quick=None):
    """The ArgumentParser of ``python -m bench.<name>``: a usage line naming that command,
    the module's docstring as written (its examples one per line) and every default shown,
    as the trainers' help has them; with ``quick`` (its help), a ``--quick`` smoke mode
    as the first flag."""
    from trainers.cli import HelpFormatter

    parser = argparse.ArgumentParser(
        prog=f"python -m bench.{name}", description=description, formatter_class=HelpFormatter
    )
    if quick is not None:
        parser.add_argument("--quick", action="store_true", help=quick)
    return parser


def parse_args(parser, argv, **quick):
    """The flags of ``argv``; with ``--quick``, the ``quick`` settings (a smoke run's
    smaller sizes and budgets) replace the flags of those names."""
    args = parser.parse_args(argv)
    if args.quick:
        for name, value in quick.items():
            setattr(args, name, value)
    return args


def add_timing_flags(parser, repeats, repeats_help, budget, budget_help):
    """``--repeats`` (timed calls whose median is reported) and ``--budget`` (seconds after
    which the timing stops repeating), with the bench's defaults and its words for them."""
    parser.add_argument("--repeats", type=int, default=repeats, help=repeats_help)
    parser.add_argument("--budget", type=float, default=budget, help=budget_help)
