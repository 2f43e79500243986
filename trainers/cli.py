"""A trainer's command line: the flag groups every trainer shares, and every check of
their values, all made before TensorFlow starts (``--help`` and a bad flag cost no
TensorFlow import); :func:`parse` starts it once the flags are valid."""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Sequence

from keras_vae_attn.explain import options
from trainers import devices, run_dirs, sanity
from trainers.devices import PRECISIONS


class HelpFormatter(
    argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter
):
    """Every flag's default shown, and the description printed as written, so the
    example commands of a module's docstring stay one per line."""


def base_parser(
    description: str | None,
    epochs: int,
    batch_size: int,
    lr: float,
    latent_dim: int,
    layer: str = "last",
    prog: str | None = None,
) -> argparse.ArgumentParser:
    """Flags shared by all trainers, with the experiment's defaults; ``prog`` is the
    command the usage line names (``python -m trainers.<name>``)."""
    parser = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=HelpFormatter
    )
    parser.add_argument("--data-dir", default=None, help="dataset root")
    parser.add_argument("--runs-root", default="runs", help="parent of run folders")
    parser.add_argument(
        "--run-dir",
        default=None,
        help="run folder (default: a new one under --runs-root, or the "
        "unfinished run of the same command, which is resumed)",
    )
    parser.add_argument(
        "--fresh", action="store_true", help="start a new run even if an unfinished one exists"
    )
    parser.add_argument(
        "--epochs",
        type=int,
        default=epochs,
        help="training epochs (passes over the training data, or of --steps-per-epoch steps)",
    )
    parser.add_argument("--batch-size", type=int, default=batch_size, help="global batch size")
    parser.add_argument("--lr", type=float, default=lr, help="Adam learning rate")
    parser.add_argument(
        "--latent-dim", type=int, default=latent_dim, help="size of the VAE's latent code z"
    )
    parser.add_argument("--layer", default=layer, help="encoder layer for attention")
    parser.add_argument(
        "--loss", choices=("bce", "mse"), default="bce", help="reconstruction loss"
    )
    parser.add_argument(
        "--steps-per-epoch",
        type=int,
        default=None,
        help="cap on training steps per epoch (quick runs)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the weights' initialization and the data order",
    )
    parser.add_argument(
        "--strategy",
        choices=("default", "mirrored", "multiworker"),
        default="default",
        help="tf.distribute strategy",
    )
    parser.add_argument(
        "--cpu-replicas",
        type=int,
        default=0,
        help="with --strategy mirrored: use N logical CPU devices",
    )
    parser.add_argument(
        "--deterministic",
        action="store_true",
        help="TensorFlow op determinism (with the seeded data order): two runs "
        "of the same command give bit-identical weights on the CPU, "
        "somewhat slower",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    add_speed_flags(parser)
    return parser


def add_speed_flags(parser: argparse.ArgumentParser) -> None:
    """--precision and --jit-compile: how the train step runs (bench/speed_limit.py
    measures both; bench/RESULTS.md, "Training at the hardware's limit")."""
    parser.add_argument(
        "--precision",
        choices=("auto", *PRECISIONS),
        default="auto",
        help="dtype policy of training: mixed_bfloat16 computes in bfloat16 "
        "with float32 weights, losses in float32; the trained model is "
        "evaluated and saved in float32. auto: mixed_bfloat16 where the "
        "hardware has bfloat16 units (a GPU from Ampere on, a CPU with "
        "AMX or AVX512-BF16), else float32",
    )
    parser.add_argument(
        "--jit-compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="XLA-compile the train step (default: Keras' choice, on with a "
        "GPU, off on the CPU)",
    )


def add_localization_flags(
    parser: argparse.ArgumentParser,
    what: str = "images",
    png: bool = True,
    model_dir: bool = True,
) -> None:
    """The flags of every localization trainer (trainers/localization.py): how its maps
    are made, how its predictions are calibrated, --model-dir (re-score a saved model on
    the test ``what``) and the explanation checks."""
    add_attention_flags(parser)
    add_prediction_flags(parser, png=png)
    if model_dir:
        add_model_dir_flag(parser, what)
    sanity.add_flags(parser)


#: The flags that override one field of the --attribution preset (the field is the flag's
#: name): (flag, its choices, help); each is None unless given, so the preset's value holds.
PRESET_OVERRIDES = (
    ("--form", options.FORMS, "how gradients and features become a map"),
    (
        "--target",
        options.TARGETS,
        "what is back-propagated: u_i or the energy per "
        "latent (D backward passes), or the total energy (one)",
    ),
    (
        "--deviation",
        options.DEVIATIONS,
        "how the features are compared with the normal ones: none (as "
        "they are), centered (minus their normal mean), standardized "
        "(also divided by the normal std per position and channel) or "
        "whitened (centered, then decorrelated across channels by the "
        "normal channel covariance at each position: the 'default' "
        "preset's choice)",
    ),
    (
        "--sign",
        options.SIGNS,
        "for gradcam/hirescam/integrated: ReLU, absolute value or signed",
    ),
    (
        "--gate",
        options.GATES,
        "recon: the map's geometric mean with the relative "
        "reconstruction residual (needs the decoder: what a VAE that "
        "learned nothing cannot fake)",
    ),
)


def add_attention_flags(parser: argparse.ArgumentParser) -> None:
    """How a localization trainer's maps are made: a preset plus per-option overrides,
    parsed into one ExplainOptions by :func:`explain_options`."""
    group = parser.add_argument_group(
        "attribution (keras_vae_attn/explain/forms.py)",
        "a flag shown with default None takes its value from the --attribution preset",
    )
    group.add_argument(
        "--attribution",
        choices=sorted(options.PRESETS),
        default="default",
        help="preset: 'default' (recon-deviation: the reconstruction "
        "residual relative to its normal size, chosen by a rule that "
        "requires passing the randomization check, see "
        "bench/RESULTS.md), 'paper' (Grad-CAM of the per-latent Eq. 5 "
        "energy, as printed) or 'whitened-deviation' (the previous "
        "default, which an untrained VAE matches); the flags below "
        "override it",
    )
    for flag, choices, text in PRESET_OVERRIDES:
        group.add_argument(flag, choices=choices, default=None, help=text)
    group.add_argument(
        "--gradient-relu",
        action="store_true",
        help="gradcam: ReLU on gradients before pooling (the paper's printed Eq. 3)",
    )
    group.add_argument(
        "--ig-steps",
        type=int,
        default=8,
        help="path points of --form integrated (batched in one pass)",
    )
    group.add_argument(
        "--combine",
        choices=options.COMBINES,
        default="mean",
        help="how the maps of several --layer names are combined",
    )
    group.add_argument(
        "--smooth",
        type=float,
        default=0.0,
        help="Gaussian blur sigma (pixels) of the served heatmap; every "
        "method is also reported at 0, side/32 and side/16",
    )


def explain_options(
    parser: argparse.ArgumentParser, args: argparse.Namespace
) -> options.ExplainOptions:
    """The run's ExplainOptions from its flags; a bad value is a parser error naming it."""
    fields = dict(options.PRESETS[args.attribution])
    for flag, _, _ in PRESET_OVERRIDES:
        field = flag.removeprefix("--")
        if getattr(args, field, None) is not None:
            fields[field] = getattr(args, field)
    try:
        return options.ExplainOptions(
            layers=tuple(name.strip() for name in args.layer.split(",") if name.strip()),
            gradient_relu=bool(args.gradient_relu),
            steps=args.ig_steps,
            combine=args.combine,
            smooth=float(args.smooth),
            **fields,
        )
    except options.OptionError as error:
        parser.error(str(error))


def unknown_layer_message(
    layers: Sequence[str],
    backbone: str,
    shape: Sequence[int],
    latent_dim: int,
    flag: str = "--layer",
) -> str | None:
    """None when every name in ``layers`` ("last" allowed) is a feature map of the
    ``backbone`` encoder at ``shape``; else the one line that refuses the first unknown
    one and lists the valid names. Checked before any training (builds the encoder only)."""
    from keras_vae_attn import backbones
    from keras_vae_attn.explain.taps import feature_layer_names

    encoder, _ = backbones.build_backbone(backbone, tuple(shape), latent_dim)
    valid = feature_layer_names(encoder)
    unknown = [name for name in layers if name not in valid and name != "last"]
    if not unknown:
        return None
    return (
        f"{flag} {unknown[0]!r} is not a feature map of the {backbone} encoder at "
        f"{shape[0]}x{shape[1]}; valid: {', '.join(valid)}"
    )


def add_model_dir_flag(parser: argparse.ArgumentParser, what: str = "images") -> None:
    """--model-dir: score a saved model again instead of training."""
    parser.add_argument(
        "--model-dir",
        default=None,
        help=f"evaluate this saved model (a run's model/ folder) on the "
        f"test {what} instead of training: re-score it with other "
        "attribution flags",
    )


def holdout_fraction(text: str) -> float:
    """argparse type of --calibration-holdout: a number in [0, 1)."""
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def add_prediction_flags(parser: argparse.ArgumentParser, png: bool = True) -> None:
    """How a run's predictions.csv and thresholds.json are made
    (keras_vae_attn/predictions.py), and the optional per-image PNGs."""
    parser.add_argument(
        "--calibration-holdout",
        type=holdout_fraction,
        default=0.1,
        help="share of the normal training images (the last ones) not "
        "trained on but used to calibrate the thresholds of "
        "predictions.csv and thresholds.json; 0 calibrates on the "
        "training images (with --model-dir: the same last share)",
    )
    if png:
        parser.add_argument(
            "--save-predictions-png",
            action="store_true",
            help="also write one PNG per test image into "
            "<run>/predictions/: input, heatmap, ground truth and "
            "the mask predicted at the calibrated threshold",
        )


def parse(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None = None
) -> argparse.Namespace:
    """Parse flags and turn bad values into argparse errors that name the flag; then
    start TensorFlow (the flags are valid, so it is needed) without its banners."""
    args = parser.parse_args(argv)
    require_counts(parser, args, ("epochs", "batch_size", "latent_dim", "steps_per_epoch"))
    if not math.isfinite(args.lr) or args.lr <= 0:
        parser.error(f"--lr must be a positive number, got {args.lr}")
    check_numbers(parser, args)
    check_tf_config(parser)
    for flag in ("runs_root", "run_dir"):
        if getattr(args, flag, None):
            message = unwritable_folder(getattr(args, flag))
            if message:
                parser.error(f"--{flag.replace('_', '-')} {message}")
    message = memory_message(args)
    if message:
        parser.error(message)
    if getattr(args, "model_dir", None):
        # a re-score trains nothing: its config.json records the model's own epochs
        args.epochs = run_dirs.trained_epochs(args.model_dir)
    from keras_vae_attn.console import start_tensorflow

    start_tensorflow()
    devices.setup_devices(args)  # before anything initializes the devices
    return args


def require_counts(
    parser: argparse.ArgumentParser, args: argparse.Namespace, flags: Sequence[str]
) -> None:
    """A parser error for any of ``flags`` (dest names) given below 1 (None = not set)."""
    for flag in flags:
        value = getattr(args, flag, None)
        if value is not None and value < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1, got {value}")


#: --seed feeds NumPy and TensorFlow seeds, which take 0 .. 2**32 - 1
SEED_RANGE = (0, 2**32 - 1)


def check_numbers(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Parser errors for numbers that parse but cannot be used: a negative or too large
    --seed; a --smooth that is not finite or wider than the image (a Gaussian that wide
    flattens every map, and its kernel alone fills the memory); a negative
    --cpu-replicas."""
    seed = getattr(args, "seed", None)
    if seed is not None and not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        parser.error(f"--seed must be from {SEED_RANGE[0]} to {SEED_RANGE[1]}, got {seed}")
    smooth = getattr(args, "smooth", None)
    if smooth is not None:
        side = image_side(args)
        if not math.isfinite(smooth) or smooth < 0:
            parser.error(f"--smooth must be >= 0 and finite, got {smooth}")
        if smooth > side:
            parser.error(f"--smooth must be at most the image side ({side} px), got {smooth}")
    if getattr(args, "cpu_replicas", 0) and args.cpu_replicas < 0:
        parser.error(f"--cpu-replicas must be >= 0, got {args.cpu_replicas}")


def image_side(args: argparse.Namespace) -> int:
    """The side of the square images a trainer's model takes (MNIST 28, dSprites 64)."""
    size = getattr(args, "image_size", None)
    if size:
        return size
    return 28 if hasattr(args, "normal_digit") else 64


def check_tf_config(parser: argparse.ArgumentParser) -> None:
    """A parser error when $TF_CONFIG is set but is not a JSON object with a "task"
    object (tf.distribute would fail on it later with a traceback)."""
    text = os.environ.get("TF_CONFIG")
    if text is None:
        return
    try:
        config = json.loads(text)
    except ValueError as error:
        parser.error(
            f"the environment variable TF_CONFIG is not JSON ({error}): {text[:80]!r}"
        )
    if not isinstance(config, dict) or not isinstance(config.get("task", {}), dict):
        parser.error(
            f"the environment variable TF_CONFIG must be a JSON object with a "
            f'"task" object, got {text[:80]!r}'
        )


def unwritable_folder(path: str) -> str | None:
    """Why a run folder (or the parent of run folders) ``path`` cannot be written, or
    None: a file in its place, or the nearest existing folder not writable (read-only
    file system, permissions)."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        return f"{path}: {probe} is a file, not a folder"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{path}: {probe} is not writable"
    return None


def training_bytes(
    backbone: str, side: int, channels: int, latent_dim: int, batch_size: int
) -> float:
    """A rough size of training in memory: float32 weights with their gradients and the
    two Adam moments, plus the activations kept for the backward pass and their
    gradients (counted from the layer shapes: about 250 floats per pixel for ResNet18
    and its decoder, 64 for the small nets)."""
    if backbone == "resnet18":
        steps = max(1, round(math.log2(max(side, 2) / 8)))
        start = math.ceil(side / 2**steps)
        first = ([256] * steps + [256, 128, 64, 32, 32])[-steps]
        params = 11.2e6 + latent_dim * (2 * 512 + start * start * first)
        per_pixel = 250
    else:
        filters = (32, 64) if side <= 32 else (32, 32, 64, 64) if side <= 64 else (32, 64, 128)
        flat = math.ceil(side / 2 ** len(filters)) ** 2 * filters[-1]
        params = 2 * flat * 256 + 3 * 256 * latent_dim
        per_pixel = 64
    activations = batch_size * side * side * (per_pixel + channels)
    return 4 * (4 * params + 2 * activations)


def machine_memory() -> int | None:
    """Bytes of physical memory of this machine (None where unknown)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def memory_message(args: argparse.Namespace) -> str | None:
    """None when the model of these flags fits in this machine's memory; else the one
    line that refuses it, naming --latent-dim or --image-size (whichever the size
    comes from). Checked before any data is loaded: past the memory the kernel kills
    the process without a word."""
    total = machine_memory()
    if total is None or not getattr(args, "latent_dim", None):
        return None
    side = image_side(args)
    backbone = getattr(args, "backbone", "small")
    channels = getattr(args, "channels", 1 if not hasattr(args, "backbone") else 3)
    needed = training_bytes(backbone, side, channels, args.latent_dim, args.batch_size)
    if needed <= total:
        return None
    alone = training_bytes(backbone, side, channels, 32, args.batch_size)  # a usual latent
    flag = f"--latent-dim {args.latent_dim}" if alone <= total else f"--image-size {side}"
    return (
        f"{flag}: training this model needs about {needed / 2**30:.0f} GiB of memory, "
        f"more than this machine's {total / 2**30:.0f} GiB; choose a smaller value"
    )
