"""The paper's Table 3 on CPU: beta-VAE, FactorVAE and AD-FactorVAE, several seeds each,
the same steps, scored with the FactorVAE metric.

    python -m bench.dsprites_table --steps 3000 --seeds 0 1 2 --jobs 2 --out runs/table3
    python -m bench.dsprites_table --steps 3000 --seeds 0 1 2 --out runs/table3 \\
        -- --lr 1e-3 --d-lr 1e-3          # anything after -- goes to every trainer run

Each cell is one ``python -m trainers.dsprites`` run in ``<out>/<model>-seed<S>``; a run
that finished is read back, an interrupted one resumes, so re-typing the command after a
kill only trains what is missing. Prints a markdown table (per seed, mean +- sample std)
and writes ``table.json`` and ``table.png`` (each seed a dot, the mean a bar) in ``<out>``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np

MODELS = (
    ("beta-VAE (beta 4)", ["--model", "beta_vae", "--beta", "4"]),
    ("FactorVAE (gamma 40)", ["--model", "factor_vae", "--gamma", "40"]),
    ("AD-FactorVAE (gamma 40, lambda 1)", ["--model", "ad_factor_vae", "--gamma", "40",
                                           "--lambda-ad", "1"]),
)
FACTOR_VAE, AD_FACTOR_VAE = MODELS[1][0], MODELS[2][0]


def run_folder(out, model_args, seed):
    """<out>/<model>-seed<S>, the model named by its --model value."""
    return os.path.join(out, f"{model_args[1]}-seed{seed}")


def train(out, model_args, seed, steps, extra, threads):
    """One trainer run (skipped when its metrics.json exists); its metrics dict."""
    folder = run_folder(out, model_args, seed)
    metrics_path = os.path.join(folder, "metrics.json")
    if not os.path.exists(metrics_path):
        env = dict(os.environ, TF_NUM_INTRAOP_THREADS=str(threads),
                   TF_NUM_INTEROP_THREADS="1", TF_CPP_MIN_LOG_LEVEL="2")
        command = [sys.executable, "-m", "trainers.dsprites", *model_args, "--seed",
                   str(seed), "--steps", str(steps), "--run-dir", folder, "--quiet", *extra]
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "trainer.log"), "a", encoding="utf-8") as log:
            done = subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        if done.returncode:
            raise RuntimeError(f"{' '.join(command)} failed (exit {done.returncode}); see "
                               f"{os.path.join(folder, 'trainer.log')}")
    with open(metrics_path, encoding="utf-8") as handle:
        return json.load(handle)


def summarize(scores):
    """{model: {"seeds": [...], "scores": [...], "mean", "std"}} from {(model, seed): score}."""
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
    paired = [a - f for seed, a in zip(ad["seeds"], ad["scores"])
              for s, f in zip(factor["seeds"], factor["scores"]) if s == seed]
    return {"ad_minus_factor_vae_mean": ad["mean"] - factor["mean"],
            "ad_above_on_every_seed": bool(paired) and min(paired) > 0,
            "ad_meets_target": ad["mean"] >= target, "target": target}


def markdown(table, seeds):
    header = ["model", *[f"seed {s}" for s in seeds], "mean +- std"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for model, row in table.items():
        by_seed = dict(zip(row["seeds"], row["scores"]))
        cells = [f"{by_seed[s]:.3f}" if s in by_seed else "-" for s in seeds]
        lines.append(f"| {model} | " + " | ".join(cells)
                     + f" | **{row['mean']:.3f} +- {row['std']:.3f}** |")
    return "\n".join(lines)


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default=os.path.join("runs", "table3"))
    parser.add_argument("--jobs", type=int, default=1, help="trainer runs at once")
    parser.add_argument("extra", nargs="*", help="after --: passed to every trainer run")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.jobs < 1:
        parser.error(f"--steps and --jobs must be at least 1, got {args.steps}, {args.jobs}")
    return args


def main(argv=None):
    from keras_vae_attn import viz

    args = parse(argv)
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    cells = [(name, model_args, seed) for seed in args.seeds for name, model_args in MODELS]
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = {(name, seed): pool.submit(train, args.out, model_args, seed, args.steps,
                                             args.extra, threads)
                   for name, model_args, seed in cells}
        metrics = {key: future.result() for key, future in futures.items()}
    table = summarize({key: m["factor_vae_score"] for key, m in metrics.items()})
    result = {"steps": args.steps, "seeds": args.seeds, "trainer_args": args.extra,
              "table": table, "verdict": verdict(table),
              "seconds_per_step": {name: float(np.mean([m["seconds_per_step"]
                                                        for (n, _), m in metrics.items()
                                                        if n == name]))
                                   for name, _ in MODELS}}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "table.json"), "w", encoding="utf-8") as handle:
        json.dump(result, handle, indent=2)
    viz.save_seed_scores({name: row["scores"] for name, row in table.items()},
                         os.path.join(args.out, "table.png"),
                         f"dSprites, {args.steps} steps, {len(args.seeds)} seeds",
                         "FactorVAE score")
    print(markdown(table, args.seeds))
    print(json.dumps(result["verdict"]))
    return result


if __name__ == "__main__":
    main()
