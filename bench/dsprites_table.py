"""The paper's Table 3: beta-VAE, FactorVAE and AD-FactorVAE, several seeds each,
the same steps, scored with the FactorVAE metric.

    python -m bench.dsprites_table --steps 3000 --seeds 0 1 2 --jobs 2 --out runs/table3
    python -m bench.dsprites_table --steps 3000 --seeds 0 1 2 --out runs/table3 \\
        -- --lr 1e-3 --d-lr 1e-3          # anything after -- goes to every trainer run

Each cell is one ``python -m trainers.dsprites`` run in ``<out>/<model>-seed<S>``; a run
that finished is read back, an interrupted one resumes, so re-typing the command after a
kill only trains what is missing. Prints a markdown table (per seed, mean +- sample std)
and writes ``table.json`` and ``table.png`` (each seed a dot, the mean a bar) in ``<out>``.

On one GPU, every cell at once, sized to a time budget (bench/gpu_dsprites.sh):

    python -m bench.dsprites_table --steps 30000 --jobs 12 --budget-minutes 9 --out runs/t3

With ``--budget-minutes`` a calibration comes first: ``--jobs`` copies of the slowest
selected model run at once for two short epochs (``--calibrate-steps`` each) with the
same trainer flags; the second epoch gives the time per step under that sharing, the
rest of the wall time the per-run overhead (start-up, compile, metric). It prints the
projected grid time; a grid over the budget is shrunk to the steps that fit, or refused
when those are below ``--min-steps``. The runs share the GPU with memory growth on.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from bench import cli_parser
from keras_vae_attn.runs import RunFolder

MODELS = (
    ("beta-VAE (beta 4)", ["--model", "beta_vae", "--beta", "4"]),
    ("FactorVAE (gamma 40)", ["--model", "factor_vae", "--gamma", "40"]),
    (
        "AD-FactorVAE (gamma 40, lambda 1)",
        ["--model", "ad_factor_vae", "--gamma", "40", "--lambda-ad", "1"],
    ),
    (
        "AD-FactorVAE, `--ad-maps normalized`",
        [
            "--model",
            "ad_factor_vae",
            "--gamma",
            "40",
            "--lambda-ad",
            "1",
            "--ad-maps",
            "normalized",
        ],
    ),
)
FACTOR_VAE, AD_FACTOR_VAE = MODELS[1][0], MODELS[2][0]


def cell_name(model_args):
    """The --model value, plus the --ad-maps value when one is given: ``factor_vae``,
    ``ad_factor_vae-normalized``; names the run folders and the --models choices."""
    name = model_args[1]
    if "--ad-maps" in model_args:
        name += "-" + model_args[model_args.index("--ad-maps") + 1]
    return name


def run_folder(out, model_args, seed):
    """<out>/<cell name>-seed<S>."""
    return os.path.join(out, f"{cell_name(model_args)}-seed{seed}")


def train(out, model_args, seed, steps, extra, threads):
    """One trainer run (skipped when its metrics.json exists); its metrics dict."""
    folder = run_folder(out, model_args, seed)
    run = RunFolder(folder)
    if not run.complete:
        env = dict(
            os.environ,
            TF_NUM_INTRAOP_THREADS=str(threads),
            TF_NUM_INTEROP_THREADS="1",
            TF_CPP_MIN_LOG_LEVEL="2",
            TF_FORCE_GPU_ALLOW_GROWTH="true",
        )  # the runs share one GPU
        command = [
            sys.executable,
            "-m",
            "trainers.dsprites",
            *model_args,
            "--seed",
            str(seed),
            "--steps",
            str(steps),
            "--run-dir",
            folder,
            "--quiet",
            *extra,
        ]
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "trainer.log"), "a", encoding="utf-8") as log:
            done = subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        if done.returncode:
            raise RuntimeError(
                f"{' '.join(command)} failed (exit {done.returncode}); see "
                f"{os.path.join(folder, 'trainer.log')}"
            )
    return run.metrics()


def steady_seconds_per_step(metrics):
    """A run's seconds per step in its last epoch (compiled, past the start-up)."""
    if not metrics.get("epoch_seconds"):
        return metrics.get("seconds_per_step")
    return metrics["epoch_seconds"][-1] / metrics["steps_per_epoch"]


def calibrate(out, model_args, jobs, steps, extra, threads):
    """``jobs`` copies of one cell run at once for 2 epochs of ``steps`` steps (a fresh
    ``<out>/calibration``): {"seconds_per_step" (the slowest copy's 2nd epoch),
    "overhead_s" (wall time not spent in those steps), "wall_s", "jobs"}."""
    folder = os.path.join(out, "calibration")
    shutil.rmtree(folder, ignore_errors=True)
    started = time.perf_counter()
    with ThreadPoolExecutor(jobs) as pool:
        runs = list(
            pool.map(
                lambda seed: train(
                    folder, model_args, seed, 2 * steps, [*extra, "--epochs", "2"], threads
                ),
                range(jobs),
            )
        )
    wall = time.perf_counter() - started
    per_step = max(steady_seconds_per_step(m) for m in runs)
    return {
        "jobs": jobs,
        "steps": 2 * steps,
        "seconds_per_step": per_step,
        "overhead_s": max(0.0, wall - 2 * steps * per_step),
        "wall_s": wall,
    }


def plan(calibration, cells, steps, min_steps, budget_s):
    """(steps to train, the projection as one line): ``steps`` when the grid fits the
    budget, else the most that fit (whole thousands); SystemExit when below ``min_steps``."""
    waves = math.ceil(cells / calibration["jobs"])

    def projected(count):
        return waves * (calibration["overhead_s"] + count * calibration["seconds_per_step"])

    line = (
        f"{cells} runs in {waves} wave(s) of {calibration['jobs']} at once: "
        f"{steps} steps projected {projected(steps):.0f} s (budget {budget_s:.0f} s)"
    )
    if projected(steps) <= budget_s:
        return steps, line
    fit = int((budget_s / waves - calibration["overhead_s"]) / calibration["seconds_per_step"])
    fit = fit // 1000 * 1000 if fit >= 1000 else fit
    if fit < min_steps:
        raise SystemExit(
            f"error: {line}; the budget fits {max(fit, 0)} steps, below "
            f"--min-steps {min_steps}: not run"
        )
    return fit, f"{line}; shrunk to {fit} steps ({projected(fit):.0f} s)"


def summarize(scores):
    """{model: {"seeds": [...], "scores": [...], "mean", "std"}} from
    {(model, seed): score}."""
    table = {}
    for (model, seed), score in sorted(scores.items(), key=lambda item: item[0][1]):
        row = table.setdefault(model, {"seeds": [], "scores": []})
        row["seeds"].append(seed)
        row["scores"].append(score)
    for row in table.values():
        values = np.asarray(row["scores"])
        row["mean"] = float(values.mean())
        row["std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    return table


def verdict(table, target=0.85):
    """Is AD-FactorVAE above FactorVAE on the mean and on every seed, and >= target?"""
    ad, factor = table.get(AD_FACTOR_VAE), table.get(FACTOR_VAE)
    if not ad or not factor:
        return {}
    paired = [
        a - f
        for seed, a in zip(ad["seeds"], ad["scores"])
        for s, f in zip(factor["seeds"], factor["scores"])
        if s == seed
    ]
    return {
        "ad_minus_factor_vae_mean": ad["mean"] - factor["mean"],
        "ad_above_on_every_seed": bool(paired) and min(paired) > 0,
        "ad_meets_target": ad["mean"] >= target,
        "target": target,
    }


def markdown(table, seeds):
    header = ["model", *[f"seed {s}" for s in seeds], "mean +- std"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for model, row in table.items():
        by_seed = dict(zip(row["seeds"], row["scores"]))
        cells = [f"{by_seed[s]:.3f}" if s in by_seed else "-" for s in seeds]
        lines.append(
            f"| {model} | "
            + " | ".join(cells)
            + f" | **{row['mean']:.3f} +- {row['std']:.3f}** |"
        )
    return "\n".join(lines)


def build_parser():
    """Its flags, apart from main: the README test parses its documented commands."""
    parser = cli_parser("dsprites_table", __doc__.split("\n\n")[0])
    parser.add_argument(
        "--steps",
        type=int,
        default=3000,
        help="training steps of every run (the paper's grid uses 3000)",
    )
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[0, 1, 2], help="one run per model and seed"
    )
    parser.add_argument(
        "--out",
        default=os.path.join("runs", "table3"),
        help="folder of the runs and the table (rerun to resume)",
    )
    parser.add_argument("--jobs", type=int, default=1, help="trainer runs at once")
    parser.add_argument(
        "--models",
        nargs="+",
        choices=[cell_name(a) for _, a in MODELS],
        default=None,
        help="train and tabulate only these rows (default all)",
    )
    parser.add_argument(
        "--budget-minutes",
        type=float,
        default=None,
        help="calibrate first and fit the grid in this wall time (above)",
    )
    parser.add_argument(
        "--calibrate-steps",
        type=int,
        default=200,
        help="steps of each of the calibration's two epochs",
    )
    parser.add_argument(
        "--min-steps",
        type=int,
        default=None,
        help="shrink the grid to fit the budget down to this many steps, "
        "no further (default: --steps, i.e. never shrink)",
    )
    parser.add_argument("extra", nargs="*", help="after --: passed to every trainer run")
    return parser


def parse(argv):
    parser = build_parser()
    args = parser.parse_args(argv)
    for flag in ("steps", "jobs", "calibrate_steps", "min_steps"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1, got {value}")
    if args.budget_minutes is not None and not args.budget_minutes > 0:
        parser.error(f"--budget-minutes must be a positive number, got {args.budget_minutes}")
    args.min_steps = args.steps if args.min_steps is None else args.min_steps
    return args


def main(argv=None):
    args = parse(argv)
    from keras_vae_attn import viz  # after the flags: --help answers before TensorFlow

    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    models = [
        (name, model_args)
        for name, model_args in MODELS
        if args.models is None or cell_name(model_args) in args.models
    ]
    cells = [(name, model_args, seed) for seed in args.seeds for name, model_args in models]
    started, calibration, steps = time.perf_counter(), None, args.steps
    if args.budget_minutes is not None:
        jobs = min(args.jobs, len(cells))
        calibration = calibrate(
            args.out, models[-1][1], jobs, args.calibrate_steps, args.extra, threads
        )  # the last row is the slowest
        print(
            f"calibration: {jobs} x {cell_name(models[-1][1])} at once, "
            f"{calibration['seconds_per_step'] * 1e3:.1f} ms/step each, "
            f"{calibration['overhead_s']:.0f} s start-up + metric per run, "
            f"{calibration['wall_s']:.0f} s",
            flush=True,
        )
        budget = args.budget_minutes * 60 - calibration["wall_s"]
        steps, line = plan(calibration, len(cells), args.steps, args.min_steps, budget)
        print(line, flush=True)
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = {
            (name, seed): pool.submit(
                train, args.out, model_args, seed, steps, args.extra, threads
            )
            for name, model_args, seed in cells
        }
        metrics = {key: future.result() for key, future in futures.items()}
    table = summarize({key: m["factor_vae_score"] for key, m in metrics.items()})

    def per_model(value):
        return {
            name: float(np.mean([value(m) for (n, _), m in metrics.items() if n == name]))
            for name, _ in models
        }

    result = {
        "steps": steps,
        "seeds": args.seeds,
        "trainer_args": args.extra,
        "table": table,
        "verdict": verdict(table),
        "calibration": calibration,
        "wall_s": time.perf_counter() - started,
        "seconds_per_step": per_model(lambda m: m["seconds_per_step"]),
        "images_per_second": per_model(
            lambda m: m.get("batch_size", np.nan) / steady_seconds_per_step(m)
        ),
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "table.json"), "w", encoding="utf-8") as handle:
        json.dump(result, handle, indent=2)
    viz.save_seed_scores(
        {name: row["scores"] for name, row in table.items()},
        os.path.join(args.out, "table.png"),
        f"dSprites, {steps} steps, {len(args.seeds)} seeds",
        "FactorVAE score",
    )
    print(markdown(table, args.seeds))
    print(json.dumps(result["verdict"]))
    print(
        f"{result['wall_s']:.0f} s; images/s per run (last epoch): "
        + ", ".join(f"{n} {v:.0f}" for n, v in result["images_per_second"].items())
    )
    return result


if __name__ == "__main__":
    main()
