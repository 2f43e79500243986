"""Re-score a trained run with every attribution form x deviation x sign x layer set.

    python -m bench.localization_grid --run <run folder> [--out <folder>]
    python -m bench.localization_grid --rank <grid.json> [<grid.json> ...] [--mnist <grid.json>]

No retraining: the run's model is loaded, its layers' normal feature distributions are
fitted on the un-augmented training images when missing, and for each layer ONE traced
pass yields the features, the total-energy gradient, the two integrated-gradient paths
(from zero and from the normal mean) and the paper's per-latent Grad-CAM; every form,
deviation and sign is then a cheap function of those. Layer sets are named by position
("1", "2", "3", "1+2", "1+2+3"); combined sets divide each layer's map by its 99th
percentile on the normal training images, as the trainers do.

Writes ``grid.json``, ``grid.md`` and ``grid.png`` (the best configurations beside the
reference rows) into --out (default: <run>/grid). The score is pixel AUROC at each
smoothing level (none, side/32, side/16); on an MNIST run, the image AUROC of the max.
``--rank`` applies the rule of bench/RESULTS.md ("Choosing the default attribution") to
several grids and prints the mean-rank table and the chosen default.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

from bench import cli_parser

FORMS_WITH_SIGN = ("gradcam", "hirescam", "integrated")
#: the rule's tie-break order (cheapest first)
FORM_COST = ("gradcam", "gradient-weighted-deviation", "hirescam", "integrated", "deviation")
PAPER = "paper"
POSITION_SETS = ("1", "2", "3", "1+2", "1+2+3")


def configurations():
    """(form, deviation, sign) of every total-energy grid entry; sign "-" = no sign rule.
    Integrated gradients on standardized or whitened features equal the centered ones
    (the path integral does not depend on a linear change of basis), so those rows are
    left out."""
    rows = []
    for form in ("gradcam", "hirescam", "integrated", "gradient-weighted-deviation",
                 "deviation"):
        for deviation in ("none", "centered", "standardized", "whitened"):
            if form == "integrated" and deviation in ("standardized", "whitened"):
                continue
            signs = ("relu", "abs", "signed") if form in FORMS_WITH_SIGN else ("-",)
            rows.extend((form, deviation, sign) for sign in signs)
    return rows


def key(form, deviation, sign):
    return f"{form}/{deviation}/{sign}"


def layer_maps_fn(model, layer, configs, size):
    """A tf.function: images -> {config key: (B, H, W)} for one layer (module doc)."""
    import tensorflow as tf

    from keras_vae_attn import attention as attn
    from keras_vae_attn import attribution

    explainer = model.explainer(layer)
    stats = model.normal_stats()
    distribution = model.feature_distribution(layer)
    zero = tf.zeros(explainer.front.output.shape[1:], tf.float32)
    integrated = explainer.head is not None

    def compute(images):
        out = {}
        features, grads, _, _ = explainer.target_gradients(images, "total-energy", stats)
        paths = {}
        if integrated:
            for deviation, start in (("none", zero), ("centered", distribution.mean)):
                _, path_grads, _, _ = explainer.path_gradients(images, stats, start, 8)
                paths[deviation] = (path_grads, features - start)
        for form_name, deviation, sign in configs:
            form = attribution.get_form(form_name)
            if form.integrated:
                if deviation not in paths:
                    continue
                path_grads, dev = paths[deviation]
                small = attribution.attribute(form, path_grads, dev, sign)
            else:
                dev = attribution.deviation(features, distribution, deviation)
                basis = attribution.gradients_in_deviation_basis(grads, distribution,
                                                                 deviation)
                small = attribution.attribute(form, basis if form.needs_gradient else None,
                                              dev, sign)
            out[key(form_name, deviation, sign)] = attn.upsample(small, size)
        _, latent_grads, _, _ = explainer.target_gradients(images, "energy", stats)
        paper = attribution.attribute(attribution.get_form("gradcam"), latent_grads,
                                      features, "relu")
        out[PAPER] = attn.upsample(paper, size)
        return out

    return tf.function(compute, reduce_retracing=True)


def run_layer(fn, images, batch_size, percentile_only=False):
    """{config: maps (N, H, W)} (or {config: 99th percentile} of them)."""
    import tensorflow as tf

    collected = {}
    for start in range(0, len(images), batch_size):
        out = fn(tf.constant(images[start:start + batch_size], tf.float32))
        for name, value in out.items():
            collected.setdefault(name, []).append(value.numpy())
    maps = {name: np.concatenate(parts) for name, parts in collected.items()}
    if percentile_only:
        return {name: max(float(np.percentile(m, 99.0)), 1e-12) for name, m in maps.items()}
    return maps


def load_run_data(run_dir):
    """(experiment, config, model, normal float images, test float images, masks or None,
    labels): the run's own data, read as its trainer read it."""
    from keras_vae_attn.models import load_vae
    from keras_vae_attn.runs import read_config

    config = read_config(run_dir)
    model = load_vae(os.path.join(run_dir, "model"))
    args = argparse.Namespace(**config, runs_root=os.path.dirname(os.path.dirname(
        os.path.abspath(run_dir))))
    if "category" in config:
        from keras_vae_attn.data.mvtec import to_float
        from trainers import mvtec

        args.skip_corrupt = config.get("skip_corrupt", False)
        train, test = mvtec.load_data(args)
        return ("mvtec", config, model, to_float(train), to_float(test.images), test.masks,
                test.labels)
    if "subset" in config:
        from keras_vae_attn.data.ucsd import to_float
        from trainers import ucsd

        args.demo = False          # the generated data is already on disk
        train, test = ucsd.load_data(args)
        return ("ucsd", config, model, to_float(train), to_float(test.images), test.masks,
                test.labels)
    if "normal_digit" in config:
        from keras_vae_attn.data import mnist

        train_x, train_y = mnist.load(config.get("data_dir"), "train")
        test_x, test_y = mnist.load(config.get("data_dir"), "test")
        normal = mnist.to_float(train_x[train_y == config["normal_digit"]][:2000])
        limit = config.get("grid_max_test") or 2000
        labels = (test_y[:limit] != config["normal_digit"]).astype(int)
        return ("mnist", config, model, normal, mnist.to_float(test_x[:limit]), None, labels)
    raise SystemExit(f"error: {run_dir}/config.json is not an MVTec, UCSD or MNIST run")


def score_maps(maps, masks, labels, levels):
    """{level: score}: pixel AUROC per smoothing level, or image AUROC of the max."""
    from keras_vae_attn.metrics import comparison, localization

    if masks is None:
        return {"0": localization.image_auroc(maps.reshape(len(maps), -1).max(1), labels)}
    return {comparison.level_key(s): localization.pixel_auroc(comparison.blur(maps, s), masks)
            for s in levels}


def grid(run_dir, batch_size=16, quiet=False):
    """The whole grid of one run as a JSON-able dict."""
    import tensorflow as tf

    from keras_vae_attn import references
    from keras_vae_attn.attention import stage_layer_names
    from keras_vae_attn.metrics import comparison

    started = time.perf_counter()
    experiment, config, model, normal, images, masks, labels = load_run_data(run_dir)
    layers = stage_layer_names(model.encoder)[:3]
    missing = [name for name in layers if not model.has_feature_distribution(name, True)]
    if missing:
        model.fit_feature_distributions(
            tf.data.Dataset.from_tensor_slices(normal).batch(64), missing, covariance=True)
    size = images.shape[1:3]
    levels = comparison.smoothing_levels(size[0]) if masks is not None else [0.0]
    configs = configurations()
    per_layer, scales = {}, {}
    for position, layer in enumerate(layers, 1):
        fn = layer_maps_fn(model, layer, configs, size)
        per_layer[str(position)] = run_layer(fn, images, batch_size)
        scales[str(position)] = run_layer(fn, normal, batch_size, percentile_only=True)
        log(quiet, f"layer {position} ({layer}): {len(per_layer[str(position)])} maps")
    rows = []
    for layer_set in POSITION_SETS:
        positions = layer_set.split("+")
        if any(p not in per_layer for p in positions):
            continue
        for name in per_layer[positions[0]]:
            maps = (per_layer[positions[0]][name] if len(positions) == 1 else
                    np.mean([per_layer[p][name] / scales[p][name] for p in positions], 0))
            form, deviation, sign = (PAPER, "none", "relu") if name == PAPER else name.split("/")
            rows.append({"form": form, "deviation": deviation, "sign": sign,
                         "target": "energy" if name == PAPER else "total-energy",
                         "layer_set": layer_set,
                         "layers": [layers[int(p) - 1] for p in positions],
                         "score": score_maps(maps, masks, labels, levels)})
        log(quiet, f"scored layer set {layer_set}")
    refs = {}
    if masks is not None:
        pixel = references.fit_pixel_distribution(normal)
        recon = reconstruction_difference(model, images, batch_size)
        for name, maps in {"recon_error": recon,
                           **references.reference_maps(images, pixel)}.items():
            refs[name] = score_maps(maps, masks, labels, levels)
    else:
        recon = reconstruction_difference(model, images, batch_size)
        refs["recon_score"] = {"0": _image_auc(recon.mean(axis=(1, 2)), labels)}
    return {"run": os.path.abspath(run_dir), "experiment": experiment,
            "dataset": dataset_name(experiment, config), "image_size": int(size[0]),
            "layers": layers, "levels": [comparison.level_key(s) for s in levels],
            "metric": "pixel_auroc" if masks is not None else "image_auroc",
            "test_images": int(len(images)), "references": refs, "grid": rows,
            "seconds": time.perf_counter() - started}


def _image_auc(scores, labels):
    from keras_vae_attn.metrics import localization

    return localization.image_auroc(scores, labels)


def reconstruction_difference(model, images, batch_size):
    from keras_vae_attn import scoring

    return scoring.batched(model, images, batch_size, "last", keys=("recon_error",),
                           target="total-energy")["recon_error"]


def dataset_name(experiment, config):
    if experiment == "mvtec":
        return f"mvtec-{config['category']}-{config['image_size']}px"
    if experiment == "ucsd":
        return f"ucsd-{os.path.basename(str(config.get('data_dir', '')).rstrip('/'))}-" \
               f"{config['image_size']}px"
    return f"mnist-digit{config['normal_digit']}"


def label(row):
    sign = "" if row["sign"] == "-" or row["form"] == PAPER else f"/{row['sign']}"
    what = "paper (gradcam/energy per latent/none/relu)" if row["form"] == PAPER else \
        f"{row['form']}/{row['deviation']}{sign}"
    return f"{what} @ {'+'.join(row['layers'])}"


def markdown(result, top=None):
    """The grid as a markdown table, best first by the middle smoothing level."""
    levels = result["levels"]
    middle = levels[len(levels) // 2]
    rows = sorted(result["grid"], key=lambda r: -(r["score"][middle] or 0))
    lines = [f"{result['dataset']}: {result['metric']} ({result['test_images']} test images)",
             "", "| configuration | " + " | ".join(f"sigma {lv}" for lv in levels) + " |",
             "|---|" + "---|" * len(levels)]
    for name, score in result["references"].items():
        lines.append(f"| **reference: {name}** | "
                     + " | ".join(_fmt(score.get(lv)) for lv in levels) + " |")
    for row in rows[:top] if top else rows:
        lines.append(f"| {label(row)} | "
                     + " | ".join(_fmt(row["score"].get(lv)) for lv in levels) + " |")
    return "\n".join(lines) + "\n"


def figure(result, path, top=15):
    """Best ``top`` configurations (bars, at the middle level) beside the references."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = result["levels"]
    middle = levels[len(levels) // 2]
    rows = sorted(result["grid"], key=lambda r: -(r["score"][middle] or 0))[:top]
    paper = [r for r in result["grid"] if r["form"] == PAPER]
    paper = max(paper, key=lambda r: r["score"][middle] or 0) if paper else None
    shown = rows + ([paper] if paper and paper not in rows else [])
    fig, ax = plt.subplots(figsize=(10, 0.35 * len(shown) + 1.8))
    values = [r["score"][middle] or 0 for r in shown]
    ax.barh(range(len(shown)), values, color=["tab:orange" if r["form"] == PAPER
                                              else "tab:blue" for r in shown])
    ax.set_yticks(range(len(shown)), [label(r) for r in shown], fontsize=7)
    ax.invert_yaxis()
    for index, (name, score) in enumerate(result["references"].items()):
        ax.axvline(score.get(middle) or 0, color=f"C{index + 2}", linestyle="--",
                   label=f"{name} {score.get(middle) or 0:.3f}")
    low = min(values + [s.get(middle) or 1 for s in result["references"].values()])
    ax.set_xlim(max(0.0, low - 0.05), 1.0)
    ax.set_xlabel(f"{result['metric']} at smoothing sigma {middle} px")
    ax.set_title(f"{result['dataset']}: best {len(rows)} attribution configurations "
                 "(orange: the paper's form) vs references (dashed)", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def rank(grids, mnist=None):
    """The rule of bench/RESULTS.md: mean rank of the candidates over ``grids`` at the
    middle smoothing level; MNIST image AUROC >= 0.95 as a constraint."""
    def candidate(row):
        return row["target"] == "total-energy" and row["form"] not in ("deviation", PAPER)

    def ident(row):
        return (row["form"], row["deviation"], row["sign"], row["layer_set"])

    tables = []
    for result in grids:
        middle = result["levels"][len(result["levels"]) // 2]
        scores = {ident(r): r["score"][middle] for r in result["grid"] if candidate(r)}
        ranks = {k: _tied_rank(scores, k) for k in scores}
        tables.append((result["dataset"], scores, ranks))
    common = set.intersection(*(set(t[1]) for t in tables))
    mean_rank = {k: float(np.mean([t[2][k] for t in tables])) for k in common}
    mnist_scores = {}
    if mnist is not None:
        mnist_scores = {ident(r): r["score"]["0"] for r in mnist["grid"] if candidate(r)}

    def tie_break(k):
        return (mean_rank[k], len(k[3].split("+")), FORM_COST.index(k[0]))

    ordered = sorted(common, key=tie_break)
    chosen = next((k for k in ordered
                   if mnist is None or (mnist_score(mnist_scores, k) or 0) >= 0.95), None)
    return {"datasets": [t[0] for t in tables], "ordered": ordered, "mean_rank": mean_rank,
            "scores": {t[0]: t[1] for t in tables}, "mnist": mnist_scores, "chosen": chosen}


def mnist_score(scores, k):
    """The MNIST score of candidate ``k``; a layer set deeper than MNIST's two-layer
    encoder is read at its first positions that exist there ("1+2+3" -> "1+2")."""
    positions = k[3].split("+")
    while positions:
        value = scores.get((*k[:3], "+".join(positions)))
        if value is not None:
            return value
        positions = positions[:-1]
    return None


def whole_grid_markdown(grids):
    """Every row of every grid (candidates, the deviation reference, the paper's form)
    and the model-free/reconstruction references, at each grid's middle sigma."""
    names = [g["dataset"] for g in grids]
    middles = [g["levels"][len(g["levels"]) // 2] for g in grids]
    keys = []
    for g in grids:
        for r in g["grid"]:
            k = (r["form"], r["deviation"], r["sign"], r["layer_set"])
            if k not in keys:
                keys.append(k)
    lookup = [{(r["form"], r["deviation"], r["sign"], r["layer_set"]): r["score"][m]
               for r in g["grid"]} for g, m in zip(grids, middles)]
    lines = ["| form/deviation/sign | layers | " + " | ".join(
        f"{n} (sigma {m})" for n, m in zip(names, middles)) + " |",
        "|---|---|" + "---|" * len(names)]
    refs = sorted({name for g in grids for name in g["references"]})
    for ref in refs:
        lines.append(f"| reference: {ref} | - | " + " | ".join(
            _fmt(g["references"].get(ref, {}).get(m)) for g, m in zip(grids, middles)) + " |")
    for k in keys:
        what = "paper (gradcam/energy per latent/none/relu)" if k[0] == PAPER else \
            "/".join(k[:3])
        lines.append(f"| {what} | {k[3]} | " + " | ".join(_fmt(t.get(k)) for t in lookup)
                     + " |")
    return "\n".join(lines) + "\n"


def _tied_rank(scores, item):
    value = scores[item] or 0
    better = sum(1 for v in scores.values() if (v or 0) > value)
    equal = sum(1 for v in scores.values() if (v or 0) == value)
    return better + (equal + 1) / 2.0


def rank_markdown(ranked, top=20):
    names = ranked["datasets"]
    lines = ["| rank | form/deviation/sign | layers | mean rank | "
             + " | ".join(names) + (" | MNIST image AUROC |" if ranked["mnist"] else " |"),
             "|---|---|---|---|" + "---|" * len(names) + ("---|" if ranked["mnist"] else "")]
    for index, k in enumerate(ranked["ordered"][:top] if top else ranked["ordered"], 1):
        cells = " | ".join(_fmt(ranked["scores"][n][k]) for n in names)
        mark = " **(chosen)**" if k == ranked["chosen"] else ""
        extra = ""
        if ranked["mnist"]:
            extra = f" {_fmt(mnist_score(ranked['mnist'], k))} |"
        lines.append(f"| {index} | {k[0]}/{k[1]}/{k[2]}{mark} | {k[3]} | "
                     f"{ranked['mean_rank'][k]:.1f} | {cells} |{extra}")
    return "\n".join(lines) + "\n"


def _fmt(value):
    return "n/a" if value is None else f"{value:.3f}"


def log(quiet, message):
    if not quiet:
        print(message, file=sys.stderr, flush=True)


def build_parser():
    """Its flags, apart from main: the README test parses its documented commands."""
    parser = cli_parser("localization_grid", __doc__)
    parser.add_argument("--run", help="a trained MVTec, UCSD or MNIST run folder")
    parser.add_argument("--out", help="where grid.json/md/png go (default <run>/grid)")
    parser.add_argument("--batch-size", type=int, default=16, help="test images scored per batch")
    parser.add_argument("--rank", nargs="+", metavar="GRID_JSON",
                        help="apply the default-choosing rule to these grids")
    parser.add_argument("--mnist", metavar="GRID_JSON", help="with --rank: the MNIST grid")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if bool(args.run) == bool(args.rank):
        parser.error("give either --run (score one run) or --rank (combine grids)")
    if args.batch_size < 1:
        parser.error(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.rank:
        grids = [json.load(open(path, encoding="utf-8")) for path in args.rank]
        mnist = json.load(open(args.mnist, encoding="utf-8")) if args.mnist else None
        ranked = rank(grids, mnist)
        print(rank_markdown(ranked))
        print(f"chosen: {ranked['chosen']}")
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, "rank.md"), "w", encoding="utf-8") as handle:
                handle.write(rank_markdown(ranked, top=None) + "\n"
                             + whole_grid_markdown(grids + ([mnist] if mnist else [])))
            print(f"rank.md (the ranking and the whole grid) in {args.out}")
        return ranked
    if not os.path.isdir(os.path.join(args.run, "model")):
        parser.error(f"--run {args.run!r} holds no model/ folder")
    from keras_vae_attn.runs import write_json

    result = grid(args.run, args.batch_size, args.quiet)
    out = args.out or os.path.join(args.run, "grid")
    os.makedirs(out, exist_ok=True)
    write_json(os.path.join(out, "grid.json"), result)
    with open(os.path.join(out, "grid.md"), "w", encoding="utf-8") as handle:
        handle.write(markdown(result))
    if result["metric"] == "pixel_auroc":
        figure(result, os.path.join(out, "grid.png"))
    print(markdown(result, top=12))
    print(f"grid.json, grid.md{', grid.png' if result['metric'] == 'pixel_auroc' else ''} "
          f"in {out} ({result['seconds']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
