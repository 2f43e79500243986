"""Benchmarks: `python -m bench.<name>`; bench/RESULTS.md holds their results."""

import argparse


def cli_parser(name, description):
    """The ArgumentParser of ``python -m bench.<name>``: a usage line naming that command,
    the module's docstring as written (its examples one per line) and every default shown,
    as the trainers' help has them."""
    from trainers.cli import HelpFormatter

    return argparse.ArgumentParser(
        prog=f"python -m bench.{name}", description=description, formatter_class=HelpFormatter
    )
