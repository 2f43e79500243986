"""Attention cost: our batched pass vs the naive ways, and vs the encoder-forward floor.

    python -m bench.attention            # full tables (a few minutes on 2 CPU cores)
    python -m bench.attention --quick    # tiny sizes, seconds (used by the test suite)

Table 1 times all D per-latent maps three ways at each (network, layer, D):
  batched   VAEAttention.explain (ours, compiled): encoder once to the layer, then the
            D backward passes batched by its "auto" method (column "ours": "stack" =
            the rest of the network on D stacked copies, "jacobian" = batch_jacobian)
  loop      a persistent tape and D separate tape.gradient calls (what users write)
  jacobian  tape.batch_jacobian (TensorFlow's vectorized Jacobian)
Table 2 compares attention at the last conv layer with a plain encoder forward pass at
the same batch (the cost floor), eager, in tf.function and with XLA. Table 3 times the
anomaly heatmap per-latent (D backward passes) and from the total energy (one pass).
Table 4 times each attribution form's heatmap against the encoder forward pass.
"""

from __future__ import annotations

import os

from bench import add_timing_flags, cli_parser, parse_args
from keras_vae_attn.console import start_tensorflow

start_tensorflow()  # before keras and TensorFlow load: without their C++ banners

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from bench.timing import median_seconds, print_table  # noqa: E402
from keras_vae_attn.attention import VAEAttention  # noqa: E402
from keras_vae_attn.backbones import resnet18_encoder, small_conv_encoder  # noqa: E402


def encoder_for(kind, size, latent):
    if kind == "resnet18":
        return resnet18_encoder((size, size, 3), latent)
    return small_conv_encoder(
        (size, size, 1), latent, filters=(32, 32, 64, 64), dense_units=256
    )


def loop_weights(explainer, images):
    """The naive way: one tape.gradient per latent dimension."""
    features_model = keras.Model(
        explainer.encoder.input, [explainer.front.output, *explainer.encoder.outputs]
    )
    with tf.GradientTape(persistent=True) as tape:
        features, mu, _ = features_model(images, training=False)
        columns = tf.unstack(mu, axis=1)
    pooled = [
        tf.reduce_mean(tape.gradient(column, features), axis=[1, 2]) for column in columns
    ]
    del tape
    return tf.stack(pooled, axis=1)


def jacobian_weights(explainer, images):
    features = explainer.front(images, training=False)
    with tf.GradientTape() as tape:
        tape.watch(features)
        mu = explainer.head(features, training=False)[0]
    return tf.reduce_mean(tape.batch_jacobian(mu, features), axis=[2, 3])


def noise_images(batch, size, channels):
    """A case's input batch: uniform noise from seed 0, the same numbers on every run."""
    return tf.constant(
        np.random.default_rng(0).random((batch, size, size, channels)), tf.float32
    )


def case_columns(kind, size, layer, latent, batch):
    """The columns naming a row's case (network, layer, latent size D, batch), which
    lead the row."""
    return {"net": f"{kind} {size}px", "layer": layer, "D": latent, "batch": batch}


def seconds_columns(images, functions, repeats, budget):
    """Each ``(name, function)``'s median seconds on ``images`` (its result fetched, so
    the work is done) as a "<name> s" column, timed in the order given."""
    return {
        f"{name} s": median_seconds(lambda f=f: f(images).numpy(), repeats, budget_s=budget)
        for name, f in functions
    }


def naive_table(cases, repeats, budget):
    return [naive_row(*case, repeats, budget) for case in cases]


def naive_row(kind, size, batch, layer, latent, repeats, budget):
    """One case of :func:`naive_table`, in its own function so that the timed closures
    hold this case's explainer and images."""
    explainer = VAEAttention(encoder_for(kind, size, latent), layer=layer)
    channels = explainer.encoder.inputs[0].shape[-1]
    images = noise_images(batch, size, channels)
    reference = explainer.explain(images).weights.numpy()
    np.testing.assert_allclose(
        loop_weights(explainer, images).numpy(), reference, rtol=1e-3, atol=1e-6
    )
    seconds = seconds_columns(
        images,
        (
            ("batched", lambda x: explainer.explain(x).weights),
            ("loop", lambda x: loop_weights(explainer, x)),
            ("jacobian", lambda x: jacobian_weights(explainer, x)),
        ),
        repeats,
        budget,
    )
    return {
        **case_columns(kind, size, layer, latent, batch),
        "ours": explainer.method,
        **seconds,
        "loop/batched": seconds["loop s"] / seconds["batched s"],
        "jacobian/batched": seconds["jacobian s"] / seconds["batched s"],
    }


def floor_table(cases, repeats, budget):
    return [row for case in cases for row in floor_rows(*case, repeats, budget)]


def floor_rows(kind, size, batch, latent, repeats, budget):
    """One case of :func:`floor_table`: the forward pass and the attention maps, eager,
    as a tf.function and compiled with XLA."""
    encoder = encoder_for(kind, size, latent)
    explainer = VAEAttention(encoder, layer="last")
    channels = encoder.inputs[0].shape[-1]
    images = noise_images(batch, size, channels)

    def forward(x):
        return encoder(x, training=False)[0]

    def attend(x):
        return explainer.explain(x).latent_maps

    variants = {
        "eager": (forward, attend),
        "tf.function": (tf.function(forward), tf.function(attend)),
        "XLA": (tf.function(forward, jit_compile=True), tf.function(attend, jit_compile=True)),
    }
    rows = []
    for mode, (run_forward, run_attend) in variants.items():
        seconds = seconds_columns(
            images, (("forward", run_forward), ("attention", run_attend)), repeats, budget
        )
        rows.append(
            {
                **case_columns(kind, size, explainer.layer_name, latent, batch),
                "mode": mode,
                **seconds,
                "attention/forward": seconds["attention s"] / seconds["forward s"],
            }
        )
    return rows


def anomaly_table(cases, repeats, budget):
    """The anomaly heatmap (Eq. 5) per-latent ("energy", D backward passes) vs from the
    total energy ("total-energy", one pass), against the encoder forward pass."""
    return [anomaly_row(*case, repeats, budget) for case in cases]


def anomaly_row(kind, size, batch, layer, latent, repeats, budget):
    """One case of :func:`anomaly_table`."""
    from keras_vae_attn.explain.latent import NormalStats
    from keras_vae_attn.explain.options import ExplainOptions

    encoder = encoder_for(kind, size, latent)
    explainer = VAEAttention(encoder, layer=layer)
    channels = encoder.inputs[0].shape[-1]
    images = noise_images(batch, size, channels)
    stats = NormalStats(tf.zeros(latent), tf.ones(latent))
    per_latent = ExplainOptions.preset("paper")
    total = per_latent.replace(target="total-energy")
    forward = tf.function(lambda x: encoder(x, training=False)[0])
    seconds = seconds_columns(
        images,
        (
            ("forward", forward),
            ("per-latent", lambda x: explainer.anomaly_attention(x, stats, per_latent)),
            ("total-energy", lambda x: explainer.anomaly_attention(x, stats, total)),
        ),
        repeats,
        budget,
    )
    return {
        **case_columns(kind, size, explainer.layer_name, latent, batch),
        **seconds,
        "per-latent/total": seconds["per-latent s"] / seconds["total-energy s"],
        "total/forward": seconds["total-energy s"] / seconds["forward s"],
    }


def forms_table(cases, repeats, budget):
    """Each attribution form's anomaly heatmap (``pipeline.explain_anomaly``, total-energy
    target, standardized deviation) against the encoder forward pass, same batch."""
    return [row for case in cases for row in forms_rows(*case, repeats, budget)]


def forms_rows(kind, size, batch, layer, latent, repeats, budget):
    """One case of :func:`forms_table`: one row per form that reads the layer (the
    registry's, so a new form gets its row)."""
    from keras_vae_attn.explain import forms, pipeline
    from keras_vae_attn.explain.options import ExplainOptions
    from keras_vae_attn.models import build_vae

    model = build_vae(kind, (size, size, 3), latent)
    explainer = model.explainer(layer)
    model.add_feature_distribution(explainer.layer_name, explainer.front.output.shape[1:])
    images = noise_images(batch, size, 3)
    forward = tf.function(lambda x: model.encoder(x, training=False)[0])
    base = median_seconds(lambda: forward(images).numpy(), repeats, budget_s=budget)
    rows = []
    for form in (name for name, f in forms.FORMS.items() if not f.reads_decoder):
        options = ExplainOptions(
            layers=(layer,),
            form=form,
            target="total-energy",
            deviation="standardized",
            sign="abs",
            steps=8,
        )
        heat = tf.function(
            lambda x, o=options: pipeline.explain_anomaly(model, x, o, keys=("heatmap",))[
                "heatmap"
            ]
        )
        seconds = median_seconds(lambda h=heat: h(images).numpy(), repeats, budget_s=budget)
        rows.append(
            {
                "net": f"{kind} {size}px",
                "layer": explainer.layer_name,
                "batch": batch,
                "form": form,
                "forward s": base,
                "heatmap s": seconds,
                "heatmap/forward": seconds / base,
            }
        )
    return rows


def build_parser():
    """Its flags, apart from main: the README test parses its documented commands."""
    parser = cli_parser("attention", __doc__, quick="tiny sizes, for smoke tests")
    add_timing_flags(
        parser,
        5,
        "timed calls per row",
        30.0,
        "seconds per measurement before it stops repeating",
    )
    parser.add_argument(
        "--forms-only",
        action="store_true",
        help="only the attribution-forms table (ResNet18 256 px, batch 16)",
    )
    parser.add_argument(
        "--latent-dims",
        default="10,32,64",
        help="comma-separated D values for the first table",
    )
    return parser


def main(argv=None):
    args = parse_args(build_parser(), argv, repeats=2, budget=5.0)
    if args.quick:
        naive = [("small", 32, 2, "last", 4), ("resnet18", 32, 2, "layer2", 4)]
        floor = [("resnet18", 32, 2, 4)]
        anomaly = [("resnet18", 32, 2, "layer2", 4)]
        forms = [("resnet18", 32, 2, "conv1", 4)]
    else:
        dims = [int(d) for d in args.latent_dims.split(",")]
        naive = [("small", 64, 16, layer, d) for layer in ("last", "conv1") for d in dims]
        naive += [("resnet18", 256, 4, layer, d) for layer in ("last", "layer2") for d in dims]
        floor = [("resnet18", 256, 16, 32), ("small", 64, 16, 32)]
        anomaly = [("small", 64, 16, layer, 32) for layer in ("last", "conv1")]
        anomaly += [("resnet18", 256, 4, layer, 32) for layer in ("last", "layer2")]
        forms = [("resnet18", 256, 16, layer, 32) for layer in ("conv1", "layer2")]
    print(
        f"TensorFlow {tf.__version__}, Keras {keras.__version__}, {os.cpu_count()} CPU cores\n"
    )
    if args.forms_only:
        print_forms(forms, args)
        return
    print("All D per-latent maps: batched pass vs loop vs batch_jacobian (median seconds)")
    print_table(
        naive_table(naive, args.repeats, args.budget),
        [
            "net",
            "layer",
            "D",
            "batch",
            "ours",
            "batched s",
            "loop s",
            "jacobian s",
            "loop/batched",
            "jacobian/batched",
        ],
    )
    print("\nAttention at the last conv layer vs the encoder forward pass (the floor)")
    print_table(
        floor_table(floor, args.repeats, args.budget),
        [
            "net",
            "layer",
            "D",
            "batch",
            "mode",
            "forward s",
            "attention s",
            "attention/forward",
        ],
    )
    print("\nAnomaly heatmap: per-latent energy (D passes) vs total energy (one pass)")
    print_table(
        anomaly_table(anomaly, args.repeats, args.budget),
        [
            "net",
            "layer",
            "D",
            "batch",
            "forward s",
            "per-latent s",
            "total-energy s",
            "per-latent/total",
            "total/forward",
        ],
    )
    print_forms(forms, args)


def print_forms(forms, args):
    print("\nAttribution forms (total energy, standardized) vs the encoder forward pass")
    print_table(
        forms_table(forms, args.repeats, args.budget),
        ["net", "layer", "batch", "form", "forward s", "heatmap s", "heatmap/forward"],
    )


if __name__ == "__main__":
    main()
