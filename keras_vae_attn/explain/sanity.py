"""The model-randomization check for VAE maps (Adebayo et al., "Sanity checks for
saliency maps", NeurIPS 2018).

A map that explains the VAE must change when the VAE is destroyed. The *twin* is the
same spec with fresh weights (another seed, BatchNorm at its initial state) and its
normal statistics re-fitted on the same normal images, exactly as a trained model gets
them, so every map can be computed on it the same way. A map passes when, at the middle
smoothing level, its pixel AUROC drops by at least ``MIN_DROP`` on the twin and the mean
per-image Spearman rank correlation between the trained and the twin map is at most
``MAX_SPEARMAN`` (the rule in bench/RESULTS.md). A map computed from the image alone
(the pixel z-score) has Spearman 1 and no drop: it fails, by construction.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

#: trained minus twin pixel AUROC at the middle sigma a map must reach to pass
MIN_DROP = 0.15
#: the largest mean per-image Spearman correlation (trained vs twin map) that passes
MAX_SPEARMAN = 0.5
#: the twin's Keras seed is the trained model's plus this
SEED_OFFSET = 1000
DECODER = "decoder"
HEAD = "head"


def twin_seed(model):
    return int(model.spec.get("seed", 0)) + SEED_OFFSET


def fresh_model(model, seed):
    """A model of ``model``'s spec with freshly initialized weights (Keras seed
    ``seed``; the global Keras seed is set, as a trainer's build does), no statistics."""
    import keras

    from keras_vae_attn.models.io import build_like

    keras.utils.set_random_seed(seed)
    return build_like(model)


def _part_layers(part):
    return {layer.name: layer for layer in part.layers if layer.weights}


def stages(model):
    """The re-initialization stages from the top of the VAE down, as (label, [(part,
    layer name)]) pairs: the decoder, the encoder's head (everything after its last named
    stage), then each named stage ("layer4", ..., "conv1") with the layers that lead to
    it from the stage before."""
    from keras_vae_attn.explain.taps import stage_layer_names

    encoder = model.encoder
    names = [layer.name for layer in encoder.layers]
    cuts = [names.index(n) for n in stage_layer_names(encoder)]
    weighted = set(_part_layers(encoder))
    out = [(DECODER, [("decoder", n) for n in _part_layers(model.decoder)])]
    bounds = [len(names) - 1] + cuts[::-1] + [-1]
    labels = [HEAD] + [names[c] for c in cuts[::-1]]
    for label, high, low in zip(labels, bounds[:-1], bounds[1:]):
        members = [n for n in names[low + 1 : high + 1] if n in weighted]
        out.append((label, [("encoder", n) for n in members]))
    return out


def randomize(model, seed, reinitialized):
    """A copy of ``model`` whose layers in ``reinitialized`` ([(part, name)], from
    :func:`stages`) get the fresh weights of ``fresh_model(model, seed)``; all other
    layers keep the trained weights. No statistics fitted yet (:func:`refit`)."""
    twin = fresh_model(model, seed)
    fresh = {(part, name) for part, name in reinitialized}
    for part in ("encoder", "decoder"):
        trained, target = _part_layers(getattr(model, part)), _part_layers(getattr(twin, part))
        for name, layer in trained.items():
            if (part, name) not in fresh:
                target[name].set_weights(layer.get_weights())
    return twin


def refit(model, normal_dataset, layers, covariance):
    """Fit the normal statistics a map needs on ``model`` (the latent statistics of
    Eq. 5 and the feature distributions of ``layers``), BatchNorm left as it is."""
    model.fit_normal_statistics(normal_dataset, layers, covariance)
    return model


def twin(model, normal_dataset, layers, covariance, seed=None):
    """The fully randomized twin of ``model`` with its statistics re-fitted."""
    seed = twin_seed(model) if seed is None else seed
    reinitialized = [pair for _, pairs in stages(model) for pair in pairs]
    return refit(randomize(model, seed, reinitialized), normal_dataset, layers, covariance)


def cascade(model, normal_dataset, layers, covariance, seed=None):
    """Yield (stage label, model) with the VAE re-initialized from the top down,
    cumulatively: the decoder alone, then also the encoder's head, then each stage down
    to the first layer (Adebayo's cascading randomization); statistics re-fitted."""
    seed = twin_seed(model) if seed is None else seed
    done = []
    for label, pairs in stages(model):
        done.extend(pairs)
        yield label, refit(randomize(model, seed, done), normal_dataset, layers, covariance)


def spearman(a, b):
    """Per-image Spearman rank correlation of two map stacks (N, H, W) -> (N,). A map
    that is constant on an image shares no ranking with the other: 0 there."""
    from scipy.stats import rankdata

    a = rankdata(np.asarray(a, np.float64).reshape(len(a), -1), axis=1)
    b = rankdata(np.asarray(b, np.float64).reshape(len(b), -1), axis=1)
    a -= a.mean(1, keepdims=True)
    b -= b.mean(1, keepdims=True)
    norm = np.sqrt((a * a).sum(1) * (b * b).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = (a * b).sum(1) / norm
    return np.where(norm > 0, rho, 0.0)


class Verdict(NamedTuple):
    """One map's randomization check."""

    trained: float | None  # its score on the trained model (middle sigma)
    randomized: float | None  # the same on the twin
    drop: float | None  # trained - randomized
    spearman: float  # mean per-image rank correlation, trained vs twin
    passes: bool | None  # None when the score is undefined (no anomalies)

    def as_dict(self):
        return self._asdict()


def verdict(trained, randomized, rho):
    """The check for one map: scores (or None) on both models, per-image Spearman."""
    mean_rho = float(np.mean(rho)) if len(rho) else float("nan")
    if trained is None or randomized is None:
        return Verdict(trained, randomized, None, mean_rho, None)
    drop = float(trained) - float(randomized)
    return Verdict(
        float(trained),
        float(randomized),
        drop,
        mean_rho,
        bool(drop >= MIN_DROP and mean_rho <= MAX_SPEARMAN),
    )


def verdict_line(name, check):
    """ "<map> passes / fails the randomization check (...)" for the console."""
    if check.passes is None:
        return (
            f"{name}: randomization check undefined (no score on this test set); "
            f"Spearman trained vs randomized {check.spearman:.2f}"
        )
    word = "passes" if check.passes else "FAILS"
    return (
        f"{name} {word} the randomization check: AUROC {check.trained:.3f} trained vs "
        f"{check.randomized:.3f} randomized (drop {check.drop:+.3f}, needs >= "
        f"{MIN_DROP}), Spearman {check.spearman:.2f} (needs <= {MAX_SPEARMAN})"
    )


def cascade_maps(
    model, images, normal_dataset, options, batch_size=16, normal_images=None, seed=None
):
    """[(stage, maps (n, H, W))] of ``options``' heatmap on ``images``: the trained model
    first, then each step of :func:`cascade`. For the cascading figure; a multi-layer
    map re-fits its layer scales on ``normal_images`` at every step."""
    from keras_vae_attn.explain import pipeline

    def heatmaps(vae):
        chosen = options
        if len(options.layers) > 1:
            chosen = pipeline.fit_layer_scales(
                vae, normal_images, options.replace(layer_scales=None), batch_size
            )
        return pipeline.batched(vae, images, batch_size, chosen, keys=("heatmap",))["heatmap"]

    out = [("trained", heatmaps(model))]
    for label, randomized in cascade(
        model, normal_dataset, options.layers, options.needs_covariance, seed
    ):
        out.append((label, heatmaps(randomized)))
    return out
