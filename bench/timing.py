"""Timing helpers shared by the benchmark scripts: medians of repeated calls."""

from __future__ import annotations

import statistics
import time


def median_seconds(fn, repeats=5, warmup=1, budget_s=60.0):
    """Median wall time of ``fn()`` over up to ``repeats`` calls after ``warmup`` calls.

    Stops early once ``budget_s`` is spent (at least one timed call always runs), so a
    slow baseline cannot stall a whole benchmark. ``fn`` must block until its result
    is ready (call ``.numpy()`` on TensorFlow outputs).
    """
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < repeats:
        begin = time.perf_counter()
        fn()
        times.append(time.perf_counter() - begin)
        if time.perf_counter() - start > budget_s:
            break
    return statistics.median(times)


def print_table(rows, columns):
    """Print dict rows as an aligned plain-text (markdown-compatible) table."""
    widths = [max(len(str(c)), *(len(_fmt(r.get(c))) for r in rows)) for c in columns]
    line = "| " + " | ".join(str(c).ljust(w) for c, w in zip(columns, widths)) + " |"
    print(line)
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print(
            "| "
            + " | ".join(_fmt(row.get(c)).ljust(w) for c, w in zip(columns, widths))
            + " |"
        )


def _fmt(value):
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def interleaved_medians(fns, repeats=5, budget_s=60.0):
    """Median wall time of each of ``fns`` (after one warm-up call each), timed in turns:
    one call of each per round, so a change in the machine's load hits all of them alike
    (for side-by-side ratios on a shared machine). Stops after the round that spends
    ``budget_s``."""
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    start = time.perf_counter()
    for _ in range(repeats):
        for fn, spent in zip(fns, times):
            begin = time.perf_counter()
            fn()
            spent.append(time.perf_counter() - begin)
        if time.perf_counter() - start > budget_s:
            break
    return [statistics.median(spent) for spent in times]
