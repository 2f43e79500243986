"""The explanation checks a localization trainer runs after its evaluation: the
randomized twin of the VAE (keras_vae_attn/explain/sanity.py), its figures, and the
deletion/insertion curves and per-latent selectivity (explain/faithfulness.py).

On by default: they cost no training, only a re-fit of the normal statistics on a
freshly initialized VAE and one more scoring pass (``--no-sanity`` skips the twin,
``--faithfulness-images 0`` the curves).
"""

from __future__ import annotations

import argparse
import os
import sys

FIGURE_ROWS = 4


def add_flags(parser):
    group = parser.add_argument_group(
        "explanation checks",
        "every map beside the same map on a randomized VAE (Adebayo "
        "et al. 2018), and deletion/insertion curves against the VAE's latent energy",
    )
    group.add_argument(
        "--sanity",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="score every map again on a randomized twin of the VAE (same "
        "spec, fresh weights, normal statistics re-fitted): the "
        "'random features' row, the randomization check and "
        "sanity.png / cascade.png",
    )
    group.add_argument(
        "--faithfulness-images",
        type=int,
        default=16,
        help="anomalous test images the deletion/insertion curves and the "
        "per-latent selectivity use (0 skips them)",
    )


def normal_batches(normal_images, batch_size=64):
    """Un-augmented normal images as a batched dataset (what the statistics fit on)."""
    import tensorflow as tf

    return tf.data.Dataset.from_tensor_slices(normal_images).batch(batch_size)


def twin_for(args, model, normal_images, options):
    """The randomized twin of ``model`` with its statistics fitted (None with
    --no-sanity)."""
    if not args.sanity:
        return None
    from keras_vae_attn.explain import sanity

    print(
        f"randomization check: a twin of the VAE with fresh weights (seed "
        f"{sanity.twin_seed(model)}), its normal statistics re-fitted (--no-sanity "
        "skips it)",
        file=sys.stderr,
    )
    return sanity.twin(
        model, normal_batches(normal_images), options.layers, options.needs_covariance
    )


def _anomalous(labels, count):
    import numpy as np

    return [int(i) for i in np.flatnonzero(np.asarray(labels) > 0)[:count]]


def run(
    args,
    run_dir,
    model,
    result,
    images,
    masks,
    labels,
    options,
    normal_images,
    pixel_distribution,
    what,
):
    """Write sanity.png, cascade.png and faithfulness.png into ``run_dir`` and return
    (metrics.json entries, printable lines). ``images`` float test images, ``result``
    the evaluate.Localization (with twin maps when --sanity)."""
    import numpy as np

    from keras_vae_attn import evaluate as kva_evaluate
    from keras_vae_attn import viz
    from keras_vae_attn.explain import figures, sanity

    metrics, lines = {}, []
    picks = _anomalous(labels, FIGURE_ROWS)
    shown = (
        kva_evaluate.ATTENTION,
        kva_evaluate.PAPER_FORM,
        kva_evaluate.RECON,
        kva_evaluate.FEATURE_DEVIATION,
    )
    if result.twin_maps and picks:
        chosen_masks = None if masks is None else masks[picks]
        viz.save_figure(
            figures.sanity_figure(
                images[picks],
                chosen_masks,
                {n: result.maps[n][picks] for n in shown},
                {n: result.twin_maps[n][picks] for n in shown},
                kva_evaluate.LABELS,
                f"{what}: each map on the trained VAE and on a randomized twin (same spec, "
                f"fresh weights, statistics re-fitted); a map that does not change explains "
                f"nothing about the VAE",
            ),
            os.path.join(run_dir, "sanity.png"),
        )
        stages = sanity.cascade_maps(
            model,
            images[picks],
            normal_batches(normal_images),
            options,
            args.eval_batch_size,
            normal_images,
        )
        rho = [float(np.mean(sanity.spearman(stages[0][1], maps))) for _, maps in stages]
        # a list, not a dict: metrics.json sorts keys, and the order is the cascade's
        metrics["sanity_cascade"] = [
            {"stage": label, "spearman": value} for (label, _), value in zip(stages, rho)
        ]
        viz.save_figure(
            figures.cascade_figure(
                images[picks],
                chosen_masks,
                stages,
                rho,
                f"{what}: anomaly attention ({options.describe()}) as the VAE is "
                "re-initialized from the top down (decoder, encoder head, then each stage)",
            ),
            os.path.join(run_dir, "cascade.png"),
        )
        lines.append(
            "cascading randomization, Spearman with the trained map: "
            + ", ".join(
                f"{label} {value:.2f}" for (label, _), value in zip(stages[1:], rho[1:])
            )
        )
    chosen = _anomalous(labels, args.faithfulness_images)
    if chosen:
        entries, text = faithfulness(
            model,
            {name: maps[chosen] for name, maps in result.maps.items()},
            images[chosen],
            options,
            pixel_distribution,
            what,
            run_dir,
            args.eval_batch_size,
        )
        metrics.update(entries)
        lines += text
    written = [
        n
        for n in ("sanity.png", "cascade.png", "faithfulness.png")
        if os.path.isfile(os.path.join(run_dir, n))
    ]
    if written:
        lines.append(f"explanation checks: {', '.join(written)}")
    return metrics, lines


def faithfulness(model, maps, images, options, pixel_distribution, what, run_dir, batch_size):
    """Deletion/insertion curves of ``maps`` {name: (n, H, W)} (every map of the run)
    on ``images`` (anomalous test images), and the per-latent maps' selectivity;
    (metrics entries, lines)."""
    import numpy as np

    from keras_vae_attn import evaluate as kva_evaluate
    from keras_vae_attn import viz
    from keras_vae_attn.explain import faithfulness as faith
    from keras_vae_attn.explain import figures, pipeline

    curves = faith.curves(model, images, maps, pixel_distribution.mean, batch_size)
    labels = {**kva_evaluate.LABELS, faith.RANDOM: faith.RANDOM}
    viz.save_figure(
        figures.curves_figure(
            {labels.get(n, n): c for n, c in curves.items()},
            f"{what}: faithfulness to the VAE's latent energy on {len(images)} anomalous test "
            "images",
        ),
        os.path.join(run_dir, "faithfulness.png"),
    )
    per_latent = pipeline.batched(model, images, batch_size, options, keys=("per_latent",))[
        "per_latent"
    ]
    size = images.shape[1:3]
    upsampled = np.stack(
        [
            pipeline.upsample(per_latent[:, d], size).numpy()
            for d in range(per_latent.shape[1])
        ],
        axis=1,
    )
    chosen = faith.selectivity(
        model, images, upsampled, pixel_distribution.mean, batch_size=batch_size
    )
    ours = curves[kva_evaluate.ATTENTION].deletion_auc
    beaten = [
        labels.get(n, n)
        for n, c in curves.items()
        if n != kva_evaluate.ATTENTION and ours < c.deletion_auc
    ]
    lost = [
        labels.get(n, n)
        for n, c in curves.items()
        if n != kva_evaluate.ATTENTION and ours >= c.deletion_auc
    ]
    lines = [
        f"faithfulness on {len(images)} anomalous images: deletion area (lower is "
        "better) / insertion area (higher is better) of the latent energy",
        *[
            f"  {labels.get(n, n)[:34]:<34}{c.deletion_auc:>8.3f}{c.insertion_auc:>8.3f}"
            for n, c in curves.items()
        ],
        f"anomaly attention deletes the energy faster than: {', '.join(beaten) or 'none'}"
        + (f"; not faster than: {', '.join(lost)}" if lost else ""),
        f"per-latent maps: deleting map i's top {chosen['fraction']:.0%} moves mu_i "
        f"{chosen['ratio']:.2f}x as much as the other latents (in normal stds); mu_i "
        f"moves most in {chosen['top1']:.0%} of cases",
    ]
    return (
        {
            "faithfulness": {n: c.as_dict() for n, c in curves.items()},
            "faithfulness_images": len(images),
            "latent_selectivity": chosen,
        },
        lines,
    )


def image_level(
    args, model, twin, images, labels, heatmaps, options, pixels, run_dir, what, batch_size=256
):
    """The checks of a run without masks (MNIST): image AUROC of the heatmap's max and of
    the reconstruction error on the trained model and on ``twin`` (None: skipped), the
    per-image Spearman of the trained and twin maps, and the deletion/insertion curves
    and per-latent selectivity on anomalous test images. (metrics entries, lines)."""
    import numpy as np

    from keras_vae_attn import evaluate as kva_evaluate
    from keras_vae_attn import references
    from keras_vae_attn.explain import pipeline, sanity
    from keras_vae_attn.metrics import localization

    metrics, lines = {}, []
    labels = np.asarray(labels)
    if twin is not None:
        keys = ("heatmap", "score", "recon_error", "recon_score")
        trained = pipeline.batched(model, images, batch_size, options, keys=keys[2:])
        other = pipeline.batched(twin, images, batch_size, options, keys=keys)
        checks = {}
        for name, score, maps in (
            ("attention_max", "score", "heatmap"),
            ("recon_score", "recon_score", "recon_error"),
        ):
            mine = heatmaps if maps == "heatmap" else trained[maps]
            ours = (
                heatmaps.reshape(len(images), -1).max(1)
                if score == "score"
                else trained[score]
            )
            defined = 0 < labels.sum() < len(labels)
            checks[name] = sanity.verdict(
                localization.image_auroc(ours, labels) if defined else None,
                localization.image_auroc(other[score], labels) if defined else None,
                sanity.spearman(mine, other[maps]),
            )
        metrics["sanity"] = {name: check.as_dict() for name, check in checks.items()}
        metrics["sanity_passes"] = checks["attention_max"].passes
        metrics["sanity_rule"] = {
            "score": "image AUROC",
            "min_drop": sanity.MIN_DROP,
            "max_spearman": sanity.MAX_SPEARMAN,
        }
        lines += [
            sanity.verdict_line(
                "anomaly attention (image AUROC of its max)", checks["attention_max"]
            ),
            sanity.verdict_line("reconstruction error (image AUROC)", checks["recon_score"]),
        ]
    chosen = _anomalous(labels, args.faithfulness_images)
    if chosen:
        maps = {
            kva_evaluate.ATTENTION: heatmaps[chosen],
            **references.reference_maps(images[chosen], pixels),
        }
        entries, text = faithfulness(
            model, maps, images[chosen], options, pixels, what, run_dir, batch_size
        )
        metrics.update(entries)
        lines += text
    return metrics, lines
