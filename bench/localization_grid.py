"""Re-score a trained run with every attribution form x deviation x sign x layer set.

    python -m bench.localization_grid --run <run folder> [--out <folder>]
    python -m bench.localization_grid --rank <grid.json> [...] [--mnist <grid.json>]

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
Each row is also scored on a randomized twin of the VAE (keras_vae_attn/explain/sanity.py:
same spec, fresh weights, statistics re-fitted), with the mean per-image Spearman
correlation of the two maps and the randomization check; every configuration appears
plain and gated by the reconstruction residual (``--gate recon``), beside the new maps
that read the decoder (feature-residual, recon-deviation). ``--rank`` applies the second
rule of bench/RESULTS.md ("Choosing the default attribution, second rule") to several
grids and prints the mean-rank table and the chosen default.
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

from bench import cli_parser
from keras_vae_attn.explain import forms
from keras_vae_attn.explain.options import DEVIATIONS, SIGNS, ExplainOptions

#: the forms that read the decoder: the feature residual (a row per layer set) and the
#: reconstruction deviation (one row, no layer)
RESIDUAL = next(name for name, form in forms.FORMS.items() if form.residual)
RECON_DEVIATION = next(name for name, form in forms.FORMS.items() if form.pixels)
#: the grid's row of the paper's map (per-latent energy, Grad-CAM, ReLU): not a form name
PAPER = "paper"
#: the rule's tie-break order (cheapest first, then the registry's order)
FORM_COST = (*sorted(forms.FORMS, key=lambda name: forms.FORMS[name].cost), PAPER)
POSITION_SETS = ("1", "2", "3", "1+2", "1+2+3")
GATES = ("none", "recon")
#: the references the rule never picks (bench/RESULTS.md, second rule)
REFERENCE_FORMS = tuple(name for name, form in forms.FORMS.items() if form.reference)


def configurations(full=False):
    """(form, deviation, sign) of every total-energy grid entry, one per form of the
    registry that reads a layer; sign "-" = no sign rule. Integrated gradients on
    standardized or whitened features equal the centered ones (the path integral does
    not depend on a linear change of basis), so those rows are left out. The feature
    reconstruction residual has no deviation of its own.

    Without ``full`` (the default since the grid also runs on a randomized twin, which
    doubles its cost) the rows no earlier grid ranked in its top 12 are left out: the
    integrated gradients (16 extra backward passes per batch) and the "signed" sign."""
    rows = []
    for name, form in forms.FORMS.items():
        if form.reads_decoder or (form.integrated and not full):
            continue
        for deviation in DEVIATIONS:
            if form.integrated and deviation in ("standardized", "whitened"):
                continue
            signs = SIGNS if form.uses_sign else ("-",)
            rows.extend((name, deviation, sign) for sign in signs if full or sign != "signed")
    return rows + [(RESIDUAL, "-", "-")]


def key(form, deviation, sign):
    return f"{form}/{deviation}/{sign}"


def row_options(layer, form, deviation, sign):
    """The :class:`ExplainOptions` of a grid row at ``layer`` (a "-" part is unused)."""
    return ExplainOptions(
        layers=(layer,),
        form=form,
        target="total-energy",
        deviation="none" if deviation == "-" else deviation,
        sign="relu" if sign == "-" else sign,
    )


def layer_maps_fn(model, layer, configs, size):
    """A tf.function: images -> {config key: (B, H, W)} for one layer, every map from
    the passes the configurations share (``pipeline.layer_maps``, module doc)."""
    import tensorflow as tf

    from keras_vae_attn.explain import pipeline

    cut_point = model.explainer(layer).head is not None  # integrated gradients need one
    wanted = {
        key(*config): row_options(layer, *config)
        for config in configs
        if cut_point or not forms.get_form(config[0]).integrated
    }
    wanted[PAPER] = ExplainOptions.preset("paper", layers=(layer,))
    stats = model.normal_stats()

    def compute(images):
        maps = pipeline.layer_maps(model, images, layer, list(wanted.values()), stats)[0]
        return {
            name: pipeline.upsample(maps[options], size) for name, options in wanted.items()
        }

    return tf.function(compute, reduce_retracing=True)


def recon_deviation_maps(model, images, batch_size):
    """The reconstruction deviation of ``images`` (N, H, W): the pixel map the gate
    multiplies in, as the pipeline serves it."""
    from keras_vae_attn.explain import pipeline

    options = ExplainOptions(form=RECON_DEVIATION)
    return pipeline.batched(model, images, batch_size, options, keys=("heatmap",))["heatmap"]


def run_layer(fn, images, batch_size, percentile_only=False):
    """{config: maps (N, H, W)} (or {config: 99th percentile} of them)."""
    import tensorflow as tf

    collected = {}
    for start in range(0, len(images), batch_size):
        out = fn(tf.constant(images[start : start + batch_size], tf.float32))
        for name, value in out.items():
            collected.setdefault(name, []).append(value.numpy())
    maps = {name: np.concatenate(parts) for name, parts in collected.items()}
    if percentile_only:
        return {name: max(float(np.percentile(m, 99.0)), 1e-12) for name, m in maps.items()}
    return maps


def load_run_data(run_dir):
    """(experiment, config, model, normal float images, test float images, masks or None,
    labels): the run's own data, reopened through the dataset registry."""
    from keras_vae_attn.runs import RunFolder, RunFolderError

    run = RunFolder(run_dir)
    try:
        config = run.config()
        experiment = config.dataset
        # an MNIST run keeps a few digits; the grid reads more of them
        more = (
            {"max_train": 2000, "max_test": config.get("grid_max_test") or 2000}
            if experiment == "mnist"
            else {}
        )
        data = run.data(**more)
        model = run.load_model()
    except RunFolderError as error:
        raise SystemExit(f"error: {error}") from None
    test = data.test
    return (
        experiment,
        config.as_dict(),
        model,
        data.normal,
        test.images,
        test.masks,
        test.labels,
    )


def score_maps(maps, masks, labels, levels):
    """{level: score}: pixel AUROC per smoothing level, or image AUROC of the max."""
    from keras_vae_attn.metrics import comparison, localization

    if masks is None:
        return {"0": localization.image_auroc(maps.reshape(len(maps), -1).max(1), labels)}
    return {
        comparison.level_key(s): localization.pixel_auroc(comparison.blur(maps, s), masks)
        for s in levels
    }


def model_maps(model, layers, normal, images, batch_size, quiet, tag):
    """({layer set: {config: maps (N, H, W)}}, recon-deviation maps (N, H, W)) of one
    model: every configuration at each layer set (combined sets divide each layer's map
    by its 99th percentile on ``normal``), and the pixel map the gate multiplies in."""
    configs = configurations()
    size = images.shape[1:3]
    per_layer, scales = {}, {}
    for position, layer in enumerate(layers, 1):
        fn = layer_maps_fn(model, layer, configs, size)
        per_layer[str(position)] = run_layer(fn, images, batch_size)
        scales[str(position)] = run_layer(fn, normal, batch_size, percentile_only=True)
        log(quiet, f"{tag}: layer {position} ({layer}): {len(per_layer[str(position)])} maps")
    sets = {}
    for layer_set in POSITION_SETS:
        positions = layer_set.split("+")
        if any(p not in per_layer for p in positions):
            continue
        sets[layer_set] = {
            name: (
                per_layer[positions[0]][name]
                if len(positions) == 1
                else np.mean([per_layer[p][name] / scales[p][name] for p in positions], 0)
            )
            for name in per_layer[positions[0]]
        }
    recon = recon_deviation_maps(model, images, batch_size)
    return sets, recon


def gated(maps, recon, gate):
    """The map (gate "none") or its geometric mean with the recon deviation ("recon")."""
    return maps if gate == "none" else np.sqrt(np.maximum(maps, 0) * recon + 1e-12)


def grid(run_dir, batch_size=16, quiet=False, twin=True):
    """The whole grid of one run as a JSON-able dict; with ``twin`` each row also holds
    its score on the randomized twin of the VAE and the mean per-image Spearman
    correlation of the two maps, at the middle smoothing level (the check of the rule)."""
    import tensorflow as tf

    from keras_vae_attn import references
    from keras_vae_attn.explain import pipeline, sanity
    from keras_vae_attn.explain.options import ExplainOptions
    from keras_vae_attn.explain.taps import stage_layer_names
    from keras_vae_attn.metrics import comparison

    started = time.perf_counter()
    experiment, config, model, normal, images, masks, labels = load_run_data(run_dir)
    layers = stage_layer_names(model.encoder)[:3]
    batches = tf.data.Dataset.from_tensor_slices(normal).batch(64)
    pipeline.fit_missing_statistics(
        model,
        batches,
        ExplainOptions(layers=tuple(layers), deviation="whitened", form="deviation"),
    )
    size = images.shape[1:3]
    levels = comparison.smoothing_levels(size[0]) if masks is not None else [0.0]
    middle = levels[len(levels) // 2]
    models = {"trained": model}
    if twin:
        models["randomized"] = sanity.twin(model, batches, layers, True)
    computed = {
        name: model_maps(m, layers, normal, images, batch_size, quiet, name)
        for name, m in models.items()
    }
    (sets, recon), other = computed["trained"], computed.get("randomized")
    rows = []

    def add(form, deviation, sign, layer_set, gate, trained_maps, twin_maps):
        row = {
            "form": form,
            "deviation": deviation,
            "sign": sign,
            "gate": gate,
            "target": "energy" if form == PAPER else "total-energy",
            "layer_set": layer_set,
            "layers": (
                []
                if layer_set == "pixels"
                else [layers[int(p) - 1] for p in layer_set.split("+")]
            ),
            "score": score_maps(trained_maps, masks, labels, levels),
        }
        if twin_maps is not None:
            row["twin_score"] = score_maps(twin_maps, masks, labels, [middle])[
                comparison.level_key(middle)
            ]
            row["spearman"] = float(
                np.mean(
                    sanity.spearman(
                        comparison.blur(trained_maps, middle),
                        comparison.blur(twin_maps, middle),
                    )
                )
            )
            check = sanity.verdict(
                row["score"][comparison.level_key(middle)],
                row["twin_score"],
                [row["spearman"]],
            )
            row["passes"] = check.passes
        rows.append(row)

    for layer_set, maps in sets.items():
        for name, trained_maps in maps.items():
            form, deviation, sign = (
                (PAPER, "none", "relu") if name == PAPER else name.split("/")
            )
            for gate in ("none",) if form == PAPER else GATES:
                add(
                    form,
                    deviation,
                    sign,
                    layer_set,
                    gate,
                    gated(trained_maps, recon, gate),
                    None
                    if other is None
                    else gated(other[0][layer_set][name], other[1], gate),
                )
        log(quiet, f"scored layer set {layer_set}")
    add(
        RECON_DEVIATION, "-", "-", "pixels", "none", recon, None if other is None else other[1]
    )
    refs, twin_refs = {}, {}
    pixel = references.fit_pixel_distribution(normal)
    recon_maps = {
        n: reconstruction_difference(m, images, batch_size) for n, m in models.items()
    }
    if masks is not None:
        for name, maps in {
            "recon_error": recon_maps["trained"],
            **references.reference_maps(images, pixel),
        }.items():
            refs[name] = score_maps(maps, masks, labels, levels)
        if other is not None:
            refs["random_features"] = score_maps(
                other[0]["1"]["deviation/whitened/-"], masks, labels, levels
            )
            twin_refs["recon_error"] = score_maps(
                recon_maps["randomized"], masks, labels, [middle]
            )
    else:
        refs["recon_score"] = {
            "0": _image_auc(recon_maps["trained"].mean(axis=(1, 2)), labels)
        }
    return {
        "run": os.path.abspath(run_dir),
        "experiment": experiment,
        "dataset": dataset_name(experiment, config),
        "image_size": int(size[0]),
        "layers": layers,
        "levels": [comparison.level_key(s) for s in levels],
        "metric": "pixel_auroc" if masks is not None else "image_auroc",
        "test_images": int(len(images)),
        "references": refs,
        "twin_references": twin_refs,
        "twin": bool(twin),
        "grid": rows,
        "seconds": time.perf_counter() - started,
    }


def _image_auc(scores, labels):
    from keras_vae_attn.metrics import localization

    return localization.image_auroc(scores, labels)


def reconstruction_difference(model, images, batch_size):
    from keras_vae_attn.explain import pipeline
    from keras_vae_attn.explain.options import ExplainOptions

    options = ExplainOptions(form=RECON_DEVIATION)
    return pipeline.batched(model, images, batch_size, options, keys=("recon_error",))[
        "recon_error"
    ]


def dataset_name(experiment, config):
    if experiment == "mvtec":
        return f"mvtec-{config['category']}-{config['image_size']}px"
    if experiment == "ucsd":
        return (
            f"ucsd-{os.path.basename(str(config.get('data_dir', '')).rstrip('/'))}-"
            f"{config['image_size']}px"
        )
    return f"mnist-digit{config['normal_digit']}"


def ident(row):
    """A configuration's identity across grids."""
    return (
        row["form"],
        row["deviation"],
        row["sign"],
        row["layer_set"],
        row.get("gate", "none"),
    )


def label(row):
    return label_of(ident(row))


def label_of(k):
    form, deviation, sign, layer_set, gate = k
    if form == PAPER:
        what = "paper (gradcam/energy per latent/none/relu)"
    elif form in (RESIDUAL, RECON_DEVIATION):
        what = form
    else:
        what = f"{form}/{deviation}" + ("" if sign == "-" else f"/{sign}")
    where = "pixels" if layer_set == "pixels" else f"layers {layer_set}"
    return f"{what} @ {where}" + (" x recon" if gate != "none" else "")


def _middle(result):
    return result["levels"][len(result["levels"]) // 2]


def markdown(result, top=None):
    """The grid as a markdown table, best first by the middle smoothing level, with the
    randomized twin's score and the Spearman correlation when the grid has them."""
    levels = result["levels"]
    middle = _middle(result)
    rows = sorted(result["grid"], key=lambda r: -(r["score"][middle] or 0))
    twin = result.get("twin")
    head = " | ".join(f"sigma {lv}" for lv in levels)
    extra = f" | randomized (sigma {middle}) | Spearman | check" if twin else ""
    lines = [
        f"{result['dataset']}: {result['metric']} ({result['test_images']} test images)",
        "",
        f"| configuration | {head}{extra} |",
        "|---|" + "---|" * (len(levels) + (3 if twin else 0)),
    ]
    for name, score in result["references"].items():
        twin_cell = result.get("twin_references", {}).get(name, {}).get(middle)
        lines.append(
            f"| **reference: {name}** | "
            + " | ".join(_fmt(score.get(lv)) for lv in levels)
            + (f" | {_fmt(twin_cell)} | - | - |" if twin else " |")
        )
    for row in rows[:top] if top else rows:
        cells = " | ".join(_fmt(row["score"].get(lv)) for lv in levels)
        if twin:
            word = {True: "passes", False: "fails", None: "n/a"}[row.get("passes")]
            cells += (
                f" | {_fmt(row.get('twin_score'))} | {row.get('spearman', 0):.2f} | {word}"
            )
        lines.append(f"| {label(row)} | {cells} |")
    return "\n".join(lines) + "\n"


def figure(result, path, top=15):
    """Best ``top`` configurations (bars, at the middle level) beside the references;
    with a twin, the same configuration on the randomized VAE as a grey bar under it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    middle = _middle(result)
    rows = sorted(result["grid"], key=lambda r: -(r["score"][middle] or 0))[:top]
    paper = [r for r in result["grid"] if r["form"] == PAPER]
    paper = max(paper, key=lambda r: r["score"][middle] or 0) if paper else None
    shown = rows + ([paper] if paper and paper not in rows else [])
    fig, ax = plt.subplots(figsize=(10, 0.4 * len(shown) + 1.8))
    positions = np.arange(len(shown))
    values = [r["score"][middle] or 0 for r in shown]
    colours = [
        "tab:orange" if r["form"] == PAPER else "tab:green" if r.get("passes") else "tab:blue"
        for r in shown
    ]
    ax.barh(positions - 0.18, values, height=0.36, color=colours, label="trained VAE")
    if result.get("twin"):
        ax.barh(
            positions + 0.18,
            [r.get("twin_score") or 0 for r in shown],
            height=0.36,
            color="lightgrey",
            label="randomized VAE",
        )
    ax.set_yticks(positions, [label(r) for r in shown], fontsize=7)
    ax.invert_yaxis()
    for index, (name, score) in enumerate(result["references"].items()):
        ax.axvline(
            score.get(middle) or 0,
            color=f"C{index + 3}",
            linestyle="--",
            label=f"{name} {score.get(middle) or 0:.3f}",
        )
    ax.set_xlim(0.0, 1.0)
    ax.set_xlabel(f"{result['metric']} at smoothing sigma {middle} px")
    ax.set_title(
        f"{result['dataset']}: best {len(rows)} configurations (green: passes the "
        "randomization check, orange: the paper's form; grey: the same map on a "
        "randomized VAE) vs references (dashed)",
        fontsize=8,
    )
    ax.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def is_reference(row):
    return row["form"] in REFERENCE_FORMS and row.get("gate", "none") == "none"


def best_score(row):
    values = [v for v in row["score"].values() if v is not None]
    return max(values) if values else None


def dataset_group(name):
    """Datasets weighted equally: both real bottle sizes are one dataset."""
    return "mvtec-bottle" if name.startswith("mvtec-bottle-") else name


def rank(grids, mnist=None):
    """The second rule of bench/RESULTS.md: candidates pass the randomization check on
    every grid (else on the most grids); mean rank over datasets weighted equally (the
    bottle sizes averaged into one), each candidate's score at its best sigma; MNIST
    image AUROC >= 0.95 as a constraint."""
    passed, tables = {}, []
    for result in grids:
        scores = {}
        for row in result["grid"]:
            if is_reference(row):
                continue
            scores[ident(row)] = best_score(row)
            passed.setdefault(ident(row), []).append(bool(row.get("passes")))
        tables.append((result["dataset"], scores))
    common = set.intersection(*(set(t[1]) for t in tables))
    most = max(sum(passed[k]) for k in common)
    candidates = [k for k in common if sum(passed[k]) == most]
    groups = {}
    for name, scores in tables:  # ranks among the candidates (1 = best)
        chosen_scores = {k: scores[k] for k in candidates}
        groups.setdefault(dataset_group(name), []).append(
            {k: _tied_rank(chosen_scores, k) for k in candidates}
        )
    mean_rank = {
        k: float(np.mean([np.mean([r[k] for r in group]) for group in groups.values()]))
        for k in candidates
    }
    mnist_scores = {}
    if mnist is not None:
        mnist_scores = {
            ident(r): r["score"]["0"] for r in mnist["grid"] if not is_reference(r)
        }

    def tie_break(k):
        layers = 0 if k[3] == "pixels" else len(k[3].split("+"))
        return (
            mean_rank[k],
            layers,
            k[4] != "none",
            FORM_COST.index(k[0]) if k[0] in FORM_COST else len(FORM_COST),
        )

    ordered = sorted(candidates, key=tie_break)
    chosen = next(
        (k for k in ordered if mnist is None or (mnist_score(mnist_scores, k) or 0) >= 0.95),
        None,
    )
    return {
        "datasets": [name for name, _ in tables],
        "groups": sorted(groups),
        "ordered": ordered,
        "mean_rank": mean_rank,
        "passes_everywhere": most == len(grids),
        "passed_on": most,
        "scores": dict(tables),
        "mnist": mnist_scores,
        "chosen": chosen,
    }


def mnist_score(scores, k):
    """The MNIST score of candidate ``k``; a layer set deeper than MNIST's two-layer
    encoder is read at its first positions that exist there ("1+2+3" -> "1+2")."""
    if k[3] == "pixels":
        return scores.get(k)
    positions = k[3].split("+")
    while positions:
        value = scores.get((*k[:3], "+".join(positions), k[4]))
        if value is not None:
            return value
        positions = positions[:-1]
    return None


def whole_grid_markdown(grids):
    """Every row of every grid (trained score at the middle sigma / randomized score /
    Spearman / check) and the references, one column per grid."""
    names = [g["dataset"] for g in grids]
    middles = [_middle(g) for g in grids]
    keys = []
    for g in grids:
        for r in g["grid"]:
            if ident(r) not in keys:
                keys.append(ident(r))
    lookup = [{ident(r): r for r in g["grid"]} for g in grids]
    lines = [
        "Each cell: trained / randomized score at the middle sigma, Spearman, check.",
        "",
        "| configuration | "
        + " | ".join(f"{n} (sigma {m})" for n, m in zip(names, middles))
        + " |",
        "|---|" + "---|" * len(names),
    ]
    refs = sorted({name for g in grids for name in g["references"]})
    for ref in refs:
        lines.append(
            f"| reference: {ref} | "
            + " | ".join(
                _fmt(g["references"].get(ref, {}).get(m))
                + " / "
                + _fmt(g.get("twin_references", {}).get(ref, {}).get(m))
                for g, m in zip(grids, middles)
            )
            + " |"
        )
    for k in keys:
        cells = []
        for table, middle in zip(lookup, middles):
            row = table.get(k)
            if row is None:
                cells.append("-")
                continue
            word = {True: "pass", False: "fail", None: "n/a"}[row.get("passes")]
            cells.append(
                f"{_fmt(row['score'].get(middle))} / {_fmt(row.get('twin_score'))}"
                f" / {row.get('spearman', float('nan')):.2f} / {word}"
            )
        lines.append(f"| {label_of(k)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _tied_rank(scores, item):
    value = scores[item] or 0
    better = sum(1 for v in scores.values() if (v or 0) > value)
    equal = sum(1 for v in scores.values() if (v or 0) == value)
    return better + (equal + 1) / 2.0


def rank_markdown(ranked, top=20):
    names = ranked["datasets"]
    lines = [
        f"candidates pass the randomization check on {ranked['passed_on']} of "
        f"{len(names)} grids"
        + ("" if ranked["passes_everywhere"] else " (none passes on every grid)"),
        "",
        "| rank | configuration | mean rank | "
        + " | ".join(names)
        + (" | MNIST image AUROC |" if ranked["mnist"] else " |"),
        "|---|---|---|" + "---|" * len(names) + ("---|" if ranked["mnist"] else ""),
    ]
    for index, k in enumerate(ranked["ordered"][:top] if top else ranked["ordered"], 1):
        cells = " | ".join(_fmt(ranked["scores"][n].get(k)) for n in names)
        mark = " **(chosen)**" if k == ranked["chosen"] else ""
        extra = f" {_fmt(mnist_score(ranked['mnist'], k))} |" if ranked["mnist"] else ""
        lines.append(
            f"| {index} | {label_of(k)}{mark} | {ranked['mean_rank'][k]:.2f} | "
            f"{cells} |{extra}"
        )
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
    parser.add_argument(
        "--batch-size", type=int, default=16, help="test images scored per batch"
    )
    parser.add_argument(
        "--rank",
        nargs="+",
        metavar="GRID_JSON",
        help="apply the default-choosing rule to these grids",
    )
    parser.add_argument("--mnist", metavar="GRID_JSON", help="with --rank: the MNIST grid")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    parser.add_argument(
        "--no-twin",
        dest="twin",
        action="store_false",
        help="skip the randomized twin (no randomization check per row)",
    )
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
                handle.write(
                    rank_markdown(ranked, top=None)
                    + "\n"
                    + whole_grid_markdown(grids + ([mnist] if mnist else []))
                )
            print(f"rank.md (the ranking and the whole grid) in {args.out}")
        return ranked
    if not os.path.isdir(os.path.join(args.run, "model")):
        parser.error(f"--run {args.run!r} holds no model/ folder")
    from keras_vae_attn.runs import write_json

    result = grid(args.run, args.batch_size, args.quiet, args.twin)
    out = args.out or os.path.join(args.run, "grid")
    os.makedirs(out, exist_ok=True)
    write_json(os.path.join(out, "grid.json"), result)
    with open(os.path.join(out, "grid.md"), "w", encoding="utf-8") as handle:
        handle.write(markdown(result))
    if result["metric"] == "pixel_auroc":
        figure(result, os.path.join(out, "grid.png"))
    print(markdown(result, top=12))
    print(
        f"grid.json, grid.md{', grid.png' if result['metric'] == 'pixel_auroc' else ''} "
        f"in {out} ({result['seconds']:.0f} s)"
    )
    return result


if __name__ == "__main__":
    main()
