"""dSprites disentanglement: VAE, beta-VAE, FactorVAE or AD-FactorVAE, scored with the
FactorVAE metric (the paper's Table 3 and Fig. 8).

    python -m trainers.dsprites --model ad_factor_vae --gamma 40 --lambda-ad 1 --steps 3000
    python -m trainers.dsprites --model beta_vae --beta 4 --data-dir path/to/dsprites-npz
    python -m trainers.dsprites --model-dir runs/dsprites/<run>/model --metric-eval-votes 2000

Without --data-dir the images are regenerated from the factors (or read from an already
downloaded TFDS copy); ``--source tfds`` downloads it.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

import numpy as np

from trainers import cli, devices, guard, run_dirs

MODELS = ("vae", "beta_vae", "factor_vae", "ad_factor_vae")
DEFAULT_BETA = {"vae": 1.0, "beta_vae": 4.0, "factor_vae": 1.0, "ad_factor_vae": 1.0}


#: The experiment's defaults of the flags every trainer has (trainers/cli.py).
DEFAULTS = dict(epochs=10, batch_size=64, lr=1e-4, latent_dim=10)


def build_parser():
    parser = cli.base_parser(__doc__, prog="python -m trainers.dsprites", **DEFAULTS)
    parser.add_argument(
        "--model",
        choices=MODELS,
        default="ad_factor_vae",
        help="vae; beta_vae (KL weighted by --beta); factor_vae (plus the "
        "total-correlation penalty --gamma); ad_factor_vae (plus the "
        "attention disentanglement loss L_AD, --lambda-ad)",
    )
    parser.add_argument(
        "--beta", type=float, default=None, help="KL weight (default 4 for beta_vae, else 1)"
    )
    parser.add_argument(
        "--gamma",
        type=float,
        default=None,
        help="TC weight of the FactorVAE models (default 40)",
    )
    parser.add_argument(
        "--lambda-ad",
        type=float,
        default=None,
        help="L_AD weight of ad_factor_vae (default 1)",
    )
    parser.add_argument(
        "--ad-pairs",
        choices=("top", "random"),
        default="top",
        help="L_AD on the two highest-response latents, or a random pair",
    )
    parser.add_argument(
        "--ad-maps",
        choices=("relu", "abs", "normalized"),
        default="relu",
        help="maps L_AD compares: the paper's ReLU maps, their absolute "
        "value, or absolute maps scaled to unit mass (ReLU maps can "
        "be emptied, and abs maps weakened, to satisfy L_AD; see "
        "keras_vae_attn/models/factor_vae.py)",
    )
    parser.add_argument(
        "--ad-first-order",
        action="store_true",
        help="treat the gradient weights of L_AD's maps as constants",
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="total training steps, split over --epochs (default 3000)",
    )
    parser.add_argument("--d-lr", type=float, default=1e-4, help="discriminator learning rate")
    parser.add_argument(
        "--dense-units",
        type=int,
        default=128,
        help="width of the encoder's and decoder's dense layers",
    )
    parser.add_argument(
        "--source",
        choices=("auto", "generate", "archive", "tfds"),
        default="auto",
        help="where the images come from (see above)",
    )
    parser.add_argument(
        "--eval-images",
        type=int,
        default=4096,
        help="images for the normal-data latent stats and the L_AD check",
    )
    parser.add_argument(
        "--metric-train-votes",
        type=int,
        default=800,
        help="votes the FactorVAE metric's majority-vote classifier is fitted on",
    )
    parser.add_argument(
        "--metric-eval-votes",
        type=int,
        default=800,
        help="held-out votes the FactorVAE score is measured on (more: a less noisy score)",
    )
    parser.add_argument(
        "--metric-samples",
        type=int,
        default=64,
        help="images per vote of the FactorVAE metric (L)",
    )
    parser.add_argument(
        "--score-every",
        type=int,
        default=0,
        help="also score every N epochs during training (a score-vs-step "
        "curve in score_curve.png; 0: only at the end)",
    )
    parser.add_argument(
        "--score-every-votes",
        type=int,
        default=200,
        help="train and eval votes of each score taken during training",
    )
    parser.add_argument(
        "--metric-variance-samples",
        type=int,
        default=10000,
        help="images for the per-dimension std of the metric",
    )
    parser.add_argument(
        "--model-dir",
        default=None,
        help="score this saved model (a run's model/ folder) instead of "
        "training: e.g. again with more votes",
    )
    return parser


def check_args(parser, args):
    """Fill model-dependent defaults and reject combinations that mean nothing."""
    if args.model_dir:
        given = [
            flag
            for flag in ("beta", "gamma", "lambda_ad", "steps")
            if getattr(args, flag) is not None
        ]
        if given:
            parser.error(
                f"--model-dir scores a saved model: --{given[0].replace('_', '-')} "
                "only applies to training"
            )
    factor = args.model in ("factor_vae", "ad_factor_vae")
    if args.gamma is not None and not factor:
        parser.error(f"--gamma applies to factor_vae and ad_factor_vae, not {args.model}")
    if args.lambda_ad is not None and args.model != "ad_factor_vae":
        parser.error(f"--lambda-ad applies to ad_factor_vae only, not {args.model}")
    args.beta = DEFAULT_BETA[args.model] if args.beta is None else args.beta
    args.gamma = (40.0 if factor else 0.0) if args.gamma is None else args.gamma
    args.lambda_ad = (
        (1.0 if args.model == "ad_factor_vae" else 0.0)
        if args.lambda_ad is None
        else args.lambda_ad
    )
    for flag in ("beta", "gamma", "lambda_ad", "d_lr"):
        value = getattr(args, flag)
        if not math.isfinite(value) or value < 0:
            parser.error(
                f"--{flag.replace('_', '-')} must be a non-negative number, got {value}"
            )
    if args.model == "ad_factor_vae" and args.lambda_ad == 0:
        parser.error("--lambda-ad 0 is plain FactorVAE: use --model factor_vae")
    if args.model == "ad_factor_vae" and args.latent_dim < 2:
        parser.error(f"--latent-dim must be at least 2 for L_AD, got {args.latent_dim}")
    if args.steps is not None and args.steps_per_epoch is not None:
        parser.error("give --steps (total) or --steps-per-epoch, not both")
    if args.steps is None and args.steps_per_epoch is None:
        args.steps = 3000
    if args.steps is not None:
        if args.steps < 1:
            parser.error(f"--steps must be at least 1, got {args.steps}")
        args.epochs = min(args.epochs, args.steps)
        args.steps_per_epoch = math.ceil(args.steps / args.epochs)
    elif args.steps_per_epoch < 1:
        parser.error(f"--steps-per-epoch must be at least 1, got {args.steps_per_epoch}")
    if args.score_every < 0:
        parser.error(
            f"--score-every must be 0 (off) or a number of epochs, got {args.score_every}"
        )
    cli.require_counts(
        parser,
        args,
        (
            "metric_train_votes",
            "metric_eval_votes",
            "metric_variance_samples",
            "dense_units",
            "eval_images",
            "score_every_votes",
        ),
    )
    if args.metric_samples < 2:
        parser.error(f"--metric-samples must be at least 2, got {args.metric_samples}")
    if args.source == "archive" and not args.data_dir:
        parser.error("--source archive needs --data-dir")
    return args


def build_model(args):
    """The model named by --model, compiled (call inside the strategy scope)."""
    import keras

    from keras_vae_attn.models import build_vae
    from keras_vae_attn.models.factor_vae import build_factor_vae

    shape = (64, 64, 1)
    optimizer = keras.optimizers.Adam(args.lr, beta_1=0.9, beta_2=0.999)
    with devices.precision_scope(devices.resolve_precision(args)):
        if args.model in ("vae", "beta_vae"):
            model = build_vae(
                "factorvae",
                shape,
                args.latent_dim,
                dense_units=args.dense_units,
                recon_loss=args.loss,
                beta=args.beta,
                seed=args.seed,
            )
            model.compile(optimizer=optimizer, jit_compile=devices.jit_compile(args))
            return model
        model = build_factor_vae(
            input_shape=shape,
            latent_dim=args.latent_dim,
            dense_units=args.dense_units,
            recon_loss=args.loss,
            beta=args.beta,
            gamma=args.gamma,
            lambda_ad=args.lambda_ad,
            ad_layer=args.layer,
            ad_pairs=args.ad_pairs,
            ad_second_order=not args.ad_first_order,
            ad_maps=args.ad_maps,
            seed=args.seed,
        )
    model.compile(
        optimizer=optimizer,
        jit_compile=devices.jit_compile(args),
        d_optimizer=keras.optimizers.Adam(args.d_lr, beta_1=0.5, beta_2=0.9),
    )
    return model


def encoder_means(model):
    """images (N, 64, 64, 1) -> mu (N, D) numpy: the representation the metric scores."""
    import tensorflow as tf

    @tf.function(reduce_retracing=True)
    def means(images):
        return model.encoder(images, training=False)[0]

    def representation(images):
        return means(tf.constant(images, tf.float32)).numpy()

    return representation


def score_during_training(data, args):
    """A callback adding ``factor_vae_score`` to the epoch logs every ``--score-every``
    epochs, so the training log (which survives a resume) holds the score-vs-step curve."""
    import keras

    from keras_vae_attn.metrics.disentanglement import factor_vae_score

    class ScoreDuringTraining(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if logs is None or (epoch + 1) % args.score_every:
                return
            score = factor_vae_score(
                encoder_means(self.model),
                data,
                seed=args.seed,
                train_votes=args.score_every_votes,
                eval_votes=args.score_every_votes,
                samples_per_vote=args.metric_samples,
                variance_samples=min(args.metric_variance_samples, 5000),
            )
            logs["factor_vae_score"] = score["eval_accuracy"]

    return ScoreDuringTraining()


def score_curve(log_path):
    """(optimizer steps, scores) of the scores taken during training, resumes included."""
    steps, scores = [], []
    with open(log_path, encoding="utf-8") as handle:
        for line in handle:
            entry = json.loads(line)
            if entry.get("event") == "epoch_end" and "factor_vae_score" in entry:
                steps.append(entry["optimizer_step"])
                scores.append(entry["factor_vae_score"])
    return steps, scores


def latent_pairs(model, images, layer):
    """Per-latent maps (B, D, h, w), the top-response pair (B, 2) and its L_AD (B,)."""
    from keras_vae_attn import losses
    from keras_vae_attn.models.factor_vae import pair_maps, top_pair

    maps = model.explainer(layer).latent_maps(images)
    pair = top_pair(maps)
    return maps.numpy(), pair.numpy(), losses.attention_overlap(*pair_maps(maps, pair)).numpy()


def latent_selectivity(model, images, layer):
    """Are the per-latent maps faithful to their own latent? Deleting map i's top pixels
    (replaced by the images' mean) should move mu_i more than the other latents
    (faithfulness.selectivity)."""
    from keras_vae_attn.explain import faithfulness
    from keras_vae_attn.explain.pipeline import upsample

    maps = model.explainer(layer).latent_maps(images)
    size = images.shape[1:3]
    maps = np.stack([upsample(maps[:, d], size).numpy() for d in range(maps.shape[1])], 1)
    return faithfulness.selectivity(model, images, maps, images.mean(0))


def map_usage(maps, pair, empty_below=1e-3):
    """How many latents' maps still show something: a map is empty when its mass is below
    ``empty_below`` of the image's largest. A low L_AD with many empty second maps means
    the loss was met by switching maps off, not by separating them (bench/RESULTS.md)."""
    mass = maps.sum(axis=(2, 3))  # (B, D)
    floor = empty_below * mass.max(axis=1, keepdims=True)
    second = mass[np.arange(len(mass)), pair[:, 1]]
    return {
        "non_empty_maps_per_image": float((mass > floor).sum(axis=1).mean()),
        "empty_second_map_fraction": float((second <= floor[:, 0]).mean()),
    }


def write_traversals(model, images, path, span=2.5, steps=9):
    """Rows: latent dims by mean KL (most used first); columns: that dim swept over
    [-span, span] from the first image's code; decoded images."""
    from keras_vae_attn import losses, viz

    mu, logvar = model.encode(images)
    kl = losses.kl_per_dimension(mu, logvar).numpy().mean(axis=0)
    mu = mu.numpy()
    order = np.argsort(-kl)
    values = np.linspace(-span, span, steps)
    rows = []
    for dim in order:
        codes = np.repeat(mu[:1], steps, axis=0)
        codes[:, dim] = values
        rows.append(list(model.decode(codes).numpy()))
    viz.save_grid(
        rows,
        path,
        column_titles=[f"{v:+.1f}" for v in values],
        row_titles=[f"z{d} KL {kl[d]:.2f}" for d in order],
        cell_inches=0.9,
    )
    return {int(d): float(kl[d]) for d in order}


def attention_pairs_figure(images, maps, pair, overlap, title):
    """The paper's Fig. 8: each image beside the maps of its two highest-response
    latents, both columns on one colour scale (0 to the largest value shown, with its
    colorbar), so a weak second map looks weak; each row names the pair and its L_AD."""
    from keras_vae_attn import viz
    from keras_vae_attn.explain.pipeline import upsample

    chosen = np.stack([maps[i, pair[i]] for i in range(len(images))])  # (B, 2, h, w)
    big = upsample(chosen.reshape(-1, *chosen.shape[2:]), images.shape[1:3]).numpy()
    big = big.reshape(len(images), 2, *images.shape[1:3])
    vmax = max(float(big.max()), 1e-12)
    scale = (
        f"one scale for both columns and every image: 0 to the largest map value "
        f"shown, {vmax:.3g}"
    )
    columns = [
        ("image", viz.to_rgb(images)),
        viz.Heatmaps("1st latent (highest response)", big[:, 0], vmax, scale),
        viz.Heatmaps("2nd latent", big[:, 1], vmax, scale),
    ]
    return viz.heatmap_figure(
        images,
        columns,
        title=title,
        cell_inches=1.4,
        row_titles=[
            f"z{pair[i, 0]} vs z{pair[i, 1]}: L_AD {overlap[i]:.2f}"
            for i in range(len(images))
        ],
    )


def write_attention_pairs(images, maps, pair, overlap, path, title):
    """attention_pairs.png (:func:`attention_pairs_figure`)."""
    from keras_vae_attn import viz

    viz.save_figure(attention_pairs_figure(images, maps, pair, overlap, title), path)


def figure_images(data, seed):
    """Two images of each shape at random scale/orientation/position, float32
    (6, 64, 64, 1)."""
    rng = np.random.default_rng([seed, 2])
    factors = data.sample_factors(6, rng)
    factors[:, 1] = np.repeat(np.arange(3), 2)
    return data.images_from_factors(factors)


def epoch_timer():
    """A callback keeping each epoch's wall seconds in its ``seconds`` list: the later
    epochs' time per step is the compiled rate without the start-up (bench.dsprites_table
    sizes its grid by it)."""
    import keras

    class EpochTimer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.seconds = []

        def on_epoch_begin(self, epoch, logs=None):
            self.started = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.seconds.append(time.perf_counter() - self.started)

    return EpochTimer()


def train(args, data, run_dir):
    """Build and fit the --model; (model, Keras history dict, training seconds, seconds
    of each epoch run by this process)."""
    import keras
    import tensorflow as tf

    from trainers import fit

    keras.utils.set_random_seed(args.seed)
    strategy = devices.make_strategy(args)
    with strategy.scope():
        model = build_model(args)
    batch_spec = tf.TensorSpec((args.batch_size, 64, 64, 1), tf.float32)
    dataset = tf.data.Dataset.from_generator(
        lambda: data.batches(args.batch_size, [args.seed, 0]), output_signature=batch_spec
    ).prefetch(2)
    from keras_vae_attn.callbacks import AttentionImages

    # the figure's six images, input | reconstruction | attention, per epoch in TensorBoard
    watch = AttentionImages(
        figure_images(data, args.seed), os.path.join(run_dir, run_dirs.TENSORBOARD), args.layer
    )
    callbacks, nan_guard = fit.standard_callbacks(run_dir, watch)
    timer = epoch_timer()
    callbacks.append(timer)
    if args.score_every:
        # before the training log, which writes the logs this callback extends
        callbacks.insert(1, score_during_training(data, args))
    started = time.perf_counter()
    history = model.fit(
        dataset,
        epochs=args.epochs,
        steps_per_epoch=args.steps_per_epoch,
        shuffle=False,
        callbacks=callbacks,
        verbose=0 if args.quiet else 2,
    )
    fit.check_diverged(nan_guard)
    return model, history.history, time.perf_counter() - started, timer.seconds


def load_model(args):
    """The saved model of --model-dir, checked to take dSprites images."""
    from keras_vae_attn.models import load_vae

    model = load_vae(args.model_dir)
    if list(model.spec["input_shape"]) != [64, 64, 1]:
        raise SystemExit(
            f"error: the model in {args.model_dir!r} takes "
            f"{model.spec['input_shape']} images, not dSprites' [64, 64, 1]"
        )
    return model


def describe(model):
    """--model name and loss weights of a built or loaded model."""
    from keras_vae_attn.models.factor_vae import FactorVAE

    if isinstance(model, FactorVAE):
        name = "ad_factor_vae" if model.lambda_ad else "factor_vae"
        return {
            "model": name,
            "beta": model.beta,
            "gamma": model.gamma,
            "lambda_ad": model.lambda_ad,
            "ad_maps": model.ad_maps,
        }
    return {
        "model": "beta_vae" if model.beta != 1 else "vae",
        "beta": model.beta,
        "gamma": 0.0,
        "lambda_ad": 0.0,
    }


def main(argv=None):
    parser = build_parser()
    args = check_args(parser, cli.parse(parser, argv))
    devices.setup_devices(args)
    import tensorflow as tf

    from keras_vae_attn import viz
    from keras_vae_attn.data import dsprites
    from keras_vae_attn.metrics.disentanglement import factor_vae_score
    from keras_vae_attn.models import save_vae
    from keras_vae_attn.models.io import rebuild

    data = dsprites.load(args.data_dir, args.source)
    model = load_model(args) if args.model_dir else None
    run_dir = run_dirs.run_dir_for(args, "dsprites")
    print(f"run folder: {run_dir}  (images: {data.source})", file=sys.stderr)
    sample = data.images_from_factors(
        data.sample_factors(args.eval_images, np.random.default_rng([args.seed, 1]))
    )
    if model is None:
        model, curves, train_seconds, epoch_seconds = train(args, data, run_dir)
        if args.precision != "float32":
            model = rebuild(model)  # scored, mapped and saved in float32
        model.fit_normal_stats(tf.data.Dataset.from_tensor_slices(sample).batch(256))
        save_vae(model, os.path.join(run_dir, "model"))
        run_dirs.finish_training(run_dir)  # backup and checkpoints: model/ holds them
    else:
        curves, train_seconds, epoch_seconds = {}, 0.0, []
    kind = describe(model)

    score = factor_vae_score(
        encoder_means(model),
        data,
        seed=args.seed,
        train_votes=args.metric_train_votes,
        eval_votes=args.metric_eval_votes,
        samples_per_vote=args.metric_samples,
        variance_samples=args.metric_variance_samples,
        progress=lambda it: guard.progress(it, args.quiet, desc="FactorVAE metric"),
    )
    held_out_maps, held_out_pair, overlap = latent_pairs(model, sample[:512], args.layer)
    shown = figure_images(data, args.seed)
    maps, pair, shown_overlap = latent_pairs(model, shown, args.layer)
    write_attention_pairs(
        shown,
        maps,
        pair,
        shown_overlap,
        os.path.join(run_dir, "attention_pairs.png"),
        f"{kind['model']}: attention maps of the two highest-response "
        f"latents at {args.layer} (the paper's Fig. 8); L_AD = their "
        f"overlap, lower = better separated",
    )
    kl_per_dim = write_traversals(model, shown, os.path.join(run_dir, "traversals.png"))
    selectivity = latent_selectivity(model, sample[:64], args.layer)
    if curves:
        viz.save_curves(
            {k: v for k, v in curves.items() if k in ("loss", "recon")},
            os.path.join(run_dir, "curves.png"),
            title=f"{kind['model']}: loss",
        )
        viz.save_curves(
            {k: v for k, v in curves.items() if k not in ("loss", "recon")},
            os.path.join(run_dir, "curves_terms.png"),
            title=f"{kind['model']}: terms",
        )
    total_steps = args.epochs * args.steps_per_epoch if curves else None
    metrics = {
        "factor_vae_score": score["eval_accuracy"],
        "factor_vae_train_accuracy": score["train_accuracy"],
        "active_dims": score["num_active_dims"],
        "votes": {"train": score["train_votes"], "eval": score["eval_votes"]},
        "attention_overlap_top_pair": float(np.mean(overlap)),
        **map_usage(held_out_maps, held_out_pair),
        "kl_per_dim": kl_per_dim,
        "latent_selectivity": selectivity,
        **kind,
        "steps": total_steps,
        "seed": args.seed,
        "model_dir": args.model_dir,
        "seconds_per_step": train_seconds / total_steps if total_steps else None,
        "epoch_seconds": epoch_seconds,
        "steps_per_epoch": args.steps_per_epoch,
        "batch_size": args.batch_size,
        "precision": args.precision if curves else None,
        "images": data.source,
        "final_losses": {k: float(v[-1]) for k, v in curves.items()},
    }
    if args.score_every and curves:
        steps, scores = score_curve(os.path.join(run_dir, "training_log.jsonl"))
        metrics["score_curve"] = {"steps": steps, "scores": scores}
        viz.save_score_curve(
            steps,
            scores,
            (total_steps, score["eval_accuracy"]),
            os.path.join(run_dir, "score_curve.png"),
            title=f"{kind['model']}: FactorVAE score",
            ylabel="FactorVAE score",
        )
    run_dirs.complete_run(run_dir, metrics)
    print(
        f"{kind['model']}: FactorVAE score {score['eval_accuracy']:.3f} "
        f"({score['num_active_dims']} active dims), top-pair L_AD "
        f"{metrics['attention_overlap_top_pair']:.3f}, "
        f"{metrics['non_empty_maps_per_image']:.1f} non-empty latent maps per image"
    )
    print(
        f"per-latent maps: deleting map i's top {selectivity['fraction']:.0%} moves mu_i "
        f"{selectivity['ratio']:.2f}x as much as the other latents; mu_i moves most in "
        f"{selectivity['top1']:.0%} of cases (keras_vae_attn/explain/faithfulness.py)"
    )
    print(f"figures and metrics in {run_dir}")
    return run_dir


if __name__ == "__main__":
    guard.main_guard(main)
