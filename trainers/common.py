"""What every trainer shares: flags, run folders, strategy, callbacks, JSON output."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import errno
import hashlib
import json
import math
import os
import shutil
import sys
import time

import numpy as np

from keras_vae_attn import runs
from keras_vae_attn.explain import options
from keras_vae_attn.runs import RUN_COMPLETE, write_json

BACKUP_DIR = "backup"
CHECKPOINTS = "checkpoints"
TENSORBOARD = "tensorboard"
#: Newest per-epoch weight files kept in <run>/checkpoints while training (a diverged
#: run keeps them; resuming reads the backup, and a trained run its model/ folder, so
#: the folder is removed once the model is saved).
KEEP_CHECKPOINTS = 1


def add_attention_flags(parser):
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
    group.add_argument(
        "--form",
        choices=options.FORMS,
        default=None,
        help="how gradients and features become a map",
    )
    group.add_argument(
        "--target",
        choices=options.TARGETS,
        default=None,
        help="what is back-propagated: u_i or the energy per "
        "latent (D backward passes), or the total energy (one)",
    )
    group.add_argument(
        "--deviation",
        choices=options.DEVIATIONS,
        default=None,
        help="how the features are compared with the normal ones: none (as "
        "they are), centered (minus their normal mean), standardized "
        "(also divided by the normal std per position and channel) or "
        "whitened (centered, then decorrelated across channels by the "
        "normal channel covariance at each position: the 'default' "
        "preset's choice)",
    )
    group.add_argument(
        "--sign",
        choices=options.SIGNS,
        default=None,
        help="for gradcam/hirescam/integrated: ReLU, absolute value or signed",
    )
    group.add_argument(
        "--gate",
        choices=options.GATES,
        default=None,
        help="recon: the map's geometric mean with the relative "
        "reconstruction residual (needs the decoder: what a VAE that "
        "learned nothing cannot fake)",
    )
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


def explain_options(parser, args):
    """The run's ExplainOptions from its flags; a bad value is a parser error naming it."""
    fields = dict(options.PRESETS[args.attribution])
    for field in ("target", "form", "deviation", "sign", "gate"):
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


def unknown_layer_message(layers, backbone, shape, latent_dim, flag="--layer"):
    """None when every name in ``layers`` ("last" allowed) is a feature map of the
    ``backbone`` encoder at ``shape``; else the one line that refuses the first unknown
    one and lists the valid names. Checked before any training (builds the encoder only)."""
    from keras_vae_attn import backbones
    from keras_vae_attn.attention import feature_layer_names

    encoder, _ = backbones.build_backbone(backbone, tuple(shape), latent_dim)
    valid = feature_layer_names(encoder)
    unknown = [name for name in layers if name not in valid and name != "last"]
    if not unknown:
        return None
    return (
        f"{flag} {unknown[0]!r} is not a feature map of the {backbone} encoder at "
        f"{shape[0]}x{shape[1]}; valid: {', '.join(valid)}"
    )


class HelpFormatter(
    argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter
):
    """Every flag's default shown, and the description printed as written, so the
    example commands of a module's docstring stay one per line."""


def base_parser(description, epochs, batch_size, lr, latent_dim, layer="last", prog=None):
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


PRECISIONS = ("float32", "mixed_bfloat16")


def add_speed_flags(parser):
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


def jit_compile(args):
    """The ``jit_compile`` value for ``model.compile``: the flag, or Keras' "auto"."""
    return "auto" if args.jit_compile is None else args.jit_compile


def native_bfloat16():
    """Whether this machine computes bfloat16 in hardware: every GPU of compute capability
    8.0 or more, or (no GPU) a CPU with AMX-BF16 or AVX512-BF16. Elsewhere bfloat16 is
    emulated and slower than float32 (bench/RESULTS.md, "Training at the hardware's limit")."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        return all(
            tf.config.experimental.get_device_details(gpu).get("compute_capability", (0, 0))
            >= (8, 0)
            for gpu in gpus
        )
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            flags = handle.read()
    except OSError:
        return False
    return " amx_bf16" in flags or " avx512_bf16" in flags


def resolve_precision(args, announce=True):
    """Turn ``--precision auto`` into the policy it stands for (stored back in ``args``,
    so metrics.json records it), and with ``announce`` say on stderr which one trains:
    bfloat16 moves the numbers a little."""
    chosen = args.precision == "auto"
    if chosen:
        args.precision = "mixed_bfloat16" if native_bfloat16() else "float32"
    if announce:
        print(
            f"training precision: {args.precision}"
            + (" (--precision auto: this machine's choice)" if chosen else ""),
            file=sys.stderr,
        )
    return args.precision


@contextlib.contextmanager
def precision_scope(precision):
    """Layers built inside take the ``precision`` dtype policy; the global policy is
    restored on exit, so models built later (loaded ones, exports) stay float32."""
    import keras

    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(precision)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


def parse(parser, argv=None):
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
        args.epochs = trained_epochs(args.model_dir)
    from keras_vae_attn.console import start_tensorflow

    start_tensorflow()
    setup_devices(args)  # before anything initializes the devices
    return args


#: --seed feeds NumPy and TensorFlow seeds, which take 0 .. 2**32 - 1
SEED_RANGE = (0, 2**32 - 1)


def check_numbers(parser, args):
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


def image_side(args):
    """The side of the square images a trainer's model takes (MNIST 28, dSprites 64)."""
    size = getattr(args, "image_size", None)
    if size:
        return size
    return 28 if hasattr(args, "normal_digit") else 64


def check_tf_config(parser):
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


def unwritable_folder(path):
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


def training_bytes(backbone, side, channels, latent_dim, batch_size):
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


def machine_memory():
    """Bytes of physical memory of this machine (None where unknown)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def memory_message(args):
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


def require_counts(parser, args, flags):
    """A parser error for any of ``flags`` (dest names) given below 1 (None = not set)."""
    for flag in flags:
        value = getattr(args, flag, None)
        if value is not None and value < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1, got {value}")


def trained_epochs(model_dir):
    """The epochs the saved model in ``model_dir`` (a run's model/ folder) was trained
    for: the last epoch its run's training log ended, else its run's config.json
    "epochs"; None when neither says (a model from elsewhere)."""
    run = os.path.dirname(os.path.abspath(model_dir))
    log = os.path.join(run, "training_log.jsonl")
    if os.path.isfile(log):
        with open(log, encoding="utf-8") as handle:
            ended = [json.loads(line).get("epoch") for line in handle if '"epoch_end"' in line]
        if ended:
            return max(ended)
    try:
        return runs.read_config(run).get("epochs")
    except (OSError, ValueError):
        return None


def add_model_dir_flag(parser, what="images"):
    """--model-dir: score a saved model again instead of training."""
    parser.add_argument(
        "--model-dir",
        default=None,
        help=f"evaluate this saved model (a run's model/ folder) on the "
        f"test {what} instead of training: re-score it with other "
        "attribution flags",
    )


def holdout_fraction(text):
    """argparse type of --calibration-holdout: a number in [0, 1)."""
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def add_prediction_flags(parser, png=True):
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


def config_of(args):
    """The run's configuration as plain JSON values (what `config.json` holds)."""
    skip = {"run_dir", "runs_root", "fresh", "quiet"}
    return {key: value for key, value in sorted(vars(args).items()) if key not in skip}


def config_hash(config):
    return hashlib.sha1(json.dumps(config, sort_keys=True).encode()).hexdigest()[:8]


class RunFinished(Exception):
    """The same command already finished a run; the message names it and the ways on."""


class RunRefused(Exception):
    """The run folder cannot be used as asked (busy, another run's, not writable); the
    message says why and the way on. One line, exit 2."""


#: What a trainer writes into its run folder: what ``--fresh`` clears in a finished or
#: other-flags ``--run-dir`` before training in it again (nothing else there is touched).
RUN_OUTPUTS = (
    BACKUP_DIR,
    CHECKPOINTS,
    TENSORBOARD,
    "model",
    "predictions",
    "training_log.jsonl",
    RUN_COMPLETE,
    "predictions.csv",
    "thresholds.json",
)
LOCK = ".lock"
#: {real path of a run folder: its open lock file}, held until the run completes
_HELD = {}


def run_dir_for(args, experiment):
    """Pick the run folder and lock it for this process: explicit, the unfinished run of
    the same config, or a new one.

    Re-typing an interrupted command therefore resumes it from its backup; re-typing a
    finished one raises RunFinished (nothing is trained twice) unless ``--fresh``; a
    command whose run is being trained by another process is refused (RunRefused), and
    so is a ``--run-dir`` holding a run of other flags, unless ``--fresh``.
    """
    config = config_of(args)
    try:
        worker = worker_index()
        if args.run_dir:
            path = explicit_run_dir(args, config, worker)
        else:
            parent = os.path.join(args.runs_root, experiment)
            os.makedirs(parent, exist_ok=True)
            with locked(parent):  # two commands started at once
                path = own_folder(pick_run_dir(args, parent, config), worker)
        write_json(os.path.join(path, "config.json"), config)
    except OSError as error:
        flag = "--run-dir" if args.run_dir else "--runs-root"
        raise RunRefused(
            f"{flag} {args.run_dir or args.runs_root}: cannot write "
            f"{error.filename or ''}: {error.strerror or error}"
        ) from None
    return path


def pick_run_dir(args, parent, config):
    """The unfinished run of the same config under ``parent``, else a new folder (made
    here); RunFinished when the same config finished already (unless --fresh)."""
    digest = config_hash(config)
    same = (
        sorted(name for name in os.listdir(parent) if name.endswith(digest))
        if not args.fresh
        else []
    )
    unfinished = [
        name for name in same if not os.path.exists(os.path.join(parent, name, RUN_COMPLETE))
    ]
    if same and not unfinished:
        rescore = hasattr(args, "model_dir") and not args.model_dir
        raise RunFinished(finished_message(os.path.join(parent, same[-1]), rescore))
    if unfinished:
        return os.path.join(parent, unfinished[-1])
    path = os.path.join(parent, _new_run_name(parent, digest))
    os.makedirs(path)
    return path


def own_folder(path, worker):
    """The folder this process owns in the run folder ``path``, made and locked: the run
    folder itself for the chief (worker 0); in multi-worker training the other workers
    keep their own checkpoints and backups beside it, in ``worker-N``."""
    if worker:
        path = os.path.join(path, f"worker-{worker}")
        os.makedirs(path, exist_ok=True)
    claim(path)
    return path


def explicit_run_dir(args, config, worker=0):
    """``--run-dir``: resumed when it holds an unfinished run of the same flags; a
    finished run of the same flags is RunFinished; a run of other flags is refused,
    unless ``--fresh``, which clears that run's outputs (RUN_OUTPUTS) first."""
    path = args.run_dir
    if os.path.exists(path) and not os.path.isdir(path):
        raise RunRefused(f"--run-dir {path} is a file, not a folder")
    os.makedirs(path, exist_ok=True)
    path = own_folder(path, worker)
    old = runs.read_config(path) if os.path.isfile(os.path.join(path, runs.CONFIG)) else {}
    differ = sorted(
        key for key in set(old) & set(config) if key != "explain" and old[key] != config[key]
    )
    finished = os.path.exists(os.path.join(path, RUN_COMPLETE))
    if args.fresh and (differ or finished):
        for name in RUN_OUTPUTS:
            target = os.path.join(path, name)
            if os.path.isdir(target):
                shutil.rmtree(target)
            elif os.path.exists(target):
                os.remove(target)
        print(f"--fresh: cleared the previous run's outputs in {path}", file=sys.stderr)
    elif differ:
        shown = ", ".join(
            f"--{k.replace('_', '-')} {old[k]!r} there, {config[k]!r} here" for k in differ[:3]
        )
        state = "finished" if finished else "unfinished"
        raise RunRefused(
            f"--run-dir {path} holds a {state} run of other flags ({shown}); "
            "pass another --run-dir, or --fresh to replace that run"
        )
    elif finished:
        rescore = hasattr(args, "model_dir") and not args.model_dir
        raise RunFinished(finished_message(path, rescore))
    return path


@contextlib.contextmanager
def locked(folder):
    """An exclusive lock on ``folder`` itself for the block (waits for other holders;
    no file is made in it)."""
    import fcntl

    descriptor = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)  # closing releases the lock


def claim(path):
    """Lock the run folder ``path`` for the rest of this process (or until
    :func:`release`): its ``.lock`` file is flock'ed and holds our pid. A folder locked
    by a live process is refused (RunRefused); a lock file left by a process that died
    (a kill frees the flock, the pid stays) is taken over with a line saying so."""
    import fcntl

    key = os.path.realpath(path)
    if key in _HELD:
        return
    handle = open(os.path.join(path, LOCK), "a+", encoding="utf-8")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        owner = handle.read().strip() or "?"
        handle.close()
        raise RunRefused(
            f"the run folder {path} is in use by process {owner} (the same "
            "command, still running); wait for it to end, or pass --fresh "
            "to start another run"
        ) from None
    handle.seek(0)
    previous = handle.read().strip()
    if previous and previous != str(os.getpid()):
        print(
            f"taking over the run folder {path} from process {previous}, which ended "
            "without finishing it",
            file=sys.stderr,
        )
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    _HELD[key] = handle


def release(path):
    """Give up the lock of a finished run folder (its lock file is emptied: no owner)."""
    import fcntl

    handle = _HELD.pop(os.path.realpath(path), None)
    if handle is not None:
        handle.seek(0)
        handle.truncate()
        handle.flush()
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def finished_message(path, rescore=True):
    """What to do when the command's run is finished: where it is, how to re-score its
    model with other flags (``rescore``: the trainer has --model-dir), how to train
    again."""
    hint = (
        f"; re-score its model with other flags: --model-dir {os.path.join(path, 'model')}"
        if rescore
        else ""
    )
    return (
        f"this command already finished a run: {path} (metrics.json and figures)"
        f"{hint}; --fresh trains a new one"
    )


def fit_and_record_options(model, normal_images, options, batch_size, run_dir):
    """The options a run is evaluated and exported with: the per-layer scales a
    multi-layer --layer needs fitted on ``normal_images`` (float, the normal training
    images), then stored in config.json for the exporters. Returns them."""
    if options.needs_scales:
        from keras_vae_attn.explain import pipeline

        options = pipeline.fit_layer_scales(model, normal_images, options, batch_size)
    record_options(run_dir, options)
    return options


def record_options(run_dir, options):
    """Store the explain options the run is evaluated (and exported) with in its
    config.json, fitted layer scales included."""
    path = os.path.join(run_dir, runs.CONFIG)
    config = runs.read_config(run_dir)
    config["explain"] = options.as_config()
    write_json(path, config)


def _new_run_name(parent, digest):
    """`<timestamp>-<hash>`, with a counter when that folder already exists."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    name, count = f"{stamp}-{digest}", 1
    while os.path.exists(os.path.join(parent, name)):
        count += 1
        name = f"{stamp}.{count}-{digest}"
    return name


def worker_index():
    """0 for the process that owns the run folder (the chief, or the only process);
    1, 2, ... for the other workers of a TF_CONFIG cluster."""
    config = json.loads(os.environ.get("TF_CONFIG", "{}"))
    task = config.get("task", {})
    if not task or task.get("type") == "chief":
        return 0
    index = int(task.get("index", 0))
    return index + 1 if "chief" in config.get("cluster", {}) else index


def setup_devices(args):
    """Split the CPU into logical devices before TensorFlow starts, for testing strategies."""
    import tensorflow as tf

    replicas = getattr(args, "cpu_replicas", 0)
    if replicas and replicas > 1:
        cpu = tf.config.list_physical_devices("CPU")[0]
        if tf.config.get_logical_device_configuration(cpu):
            return  # split already (parse does it first)
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * replicas
        )


def make_strategy(args):
    """The tf.distribute strategy named by ``--strategy``."""
    import tensorflow as tf

    if args.strategy == "mirrored":
        setup_devices(args)
        if args.cpu_replicas and args.cpu_replicas > 1:
            devices = [d.name for d in tf.config.list_logical_devices("CPU")]
            return tf.distribute.MirroredStrategy(devices)
        return tf.distribute.MirroredStrategy()
    if args.strategy == "multiworker":
        if "TF_CONFIG" not in os.environ:
            raise SystemExit(
                "--strategy multiworker needs the TF_CONFIG environment "
                "variable describing the cluster and this worker's task"
            )
        return tf.distribute.MultiWorkerMirroredStrategy()
    return tf.distribute.get_strategy()


class TrainingDiverged(RuntimeError):
    """Raised when a loss became NaN or infinite; the message says where."""


def nan_guard():
    """A callback that stops training at the first non-finite loss and remembers where."""
    import keras

    class NaNGuard(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.epoch = 0
            self.failure = None

        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch

        def on_train_batch_end(self, batch, logs=None):
            bad = {k: float(v) for k, v in (logs or {}).items() if not math.isfinite(float(v))}
            if bad:
                self.failure = (
                    f"training diverged at epoch {self.epoch + 1}, batch "
                    f"{batch + 1}: non-finite {bad}. Lower --lr or check the "
                    "input data for NaNs; the last checkpoint is kept."
                )
                self.model.stop_training = True

    return NaNGuard()


#: Where the process is, for the line a Ctrl-C prints (see :func:`main_guard`):
#: "epoch" is the epoch being trained, "evaluating" is set once model/ is saved.
STAGE = {"epoch": None, "evaluating": False}


def interrupted_message():
    """The one line a Ctrl-C prints: where it stopped and that re-typing resumes."""
    if STAGE["evaluating"]:
        return "interrupted during evaluation; the same command resumes at evaluation"
    if STAGE["epoch"] is None:
        return "interrupted before training; the same command starts it again"
    return f"interrupted at epoch {STAGE['epoch']}; the same command resumes"


def training_log(path):
    """A callback appending one JSON line per epoch (and per start) to ``path``.

    Each line holds the process id, the epoch and a checksum of the weights, so a
    resumed run shows where it picked up and from which weights.
    """
    import keras

    class TrainingLog(keras.callbacks.Callback):
        def _write(self, event, epoch, logs=None):
            total = float(sum(np.abs(np.asarray(v)).sum() for v in self.model.weights))
            optimizer = getattr(self.model, "optimizer", None)
            step = int(np.asarray(optimizer.iterations)) if optimizer is not None else None
            line = {
                "event": event,
                "epoch": epoch,
                "pid": os.getpid(),
                "weights_checksum": total,
                "optimizer_step": step,
                **{k: float(v) for k, v in (logs or {}).items()},
            }
            with open(path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(line) + "\n")

        def on_epoch_begin(self, epoch, logs=None):
            STAGE["epoch"] = epoch + 1

        def on_train_begin(self, logs=None):
            start = int(getattr(self.model, "_initial_epoch", 0) or 0)
            if start:
                print(f"resuming from the backup at epoch {start + 1}", file=sys.stderr)
            self._write("train_begin", start)

        def on_epoch_end(self, epoch, logs=None):
            self._write("epoch_end", epoch + 1, logs)

    return TrainingLog()


def epoch_weights(folder, keep):
    """A callback writing the weights after each epoch to
    ``<folder>/epoch-NNN.weights.h5`` (through a temporary name, so a kill never leaves
    a half-written file under a real name) and deleting all but the newest ``keep``
    (a 256-px ResNet18 checkpoint is ~130 MB; one per epoch fills a disk)."""
    import keras

    from keras_vae_attn.callbacks import state_bytes
    from keras_vae_attn.runs import require_space

    class EpochWeights(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            os.makedirs(folder, exist_ok=True)
            require_space(
                folder, state_bytes(self.model), f"the checkpoint of epoch {epoch + 1}"
            )
            partial = os.path.join(folder, f".partial-{os.getpid()}.weights.h5")
            try:
                self.model.save_weights(partial)
                os.replace(partial, os.path.join(folder, f"epoch-{epoch + 1:03d}.weights.h5"))
            finally:
                if os.path.exists(partial):
                    os.remove(partial)
            names = sorted(
                n
                for n in os.listdir(folder)
                if n.startswith("epoch-") and n.endswith(".weights.h5")
            )
            for name in names[:-keep] if keep > 0 else []:
                os.remove(os.path.join(folder, name))

    return EpochWeights()


def standard_callbacks(run_dir, log_images=None, keep_checkpoints=KEEP_CHECKPOINTS):
    """Resume-from-backup, training log, checkpoint, TensorBoard and NaN guard callbacks.

    The backup (keras_vae_attn.callbacks.TrainingBackup) is written under a temporary
    name and renamed, so a kill or Ctrl-C while it is written leaves the previous one;
    it stays after ``fit`` until the trainer has saved model/ (:func:`finish_training`).
    Its restore runs first, so the training log sees restored weights. Only the newest
    ``keep_checkpoints`` per-epoch checkpoints are kept.
    """
    from keras_vae_attn import callbacks as kva_callbacks

    guard = nan_guard()
    callbacks = [
        kva_callbacks.TrainingBackup(os.path.join(run_dir, BACKUP_DIR)),
        training_log(os.path.join(run_dir, "training_log.jsonl")),
        epoch_weights(os.path.join(run_dir, CHECKPOINTS), keep_checkpoints),
        kva_callbacks.EpochScalars(os.path.join(run_dir, TENSORBOARD)),
        guard,
    ]
    if log_images is not None:
        callbacks.append(log_images)
    return callbacks, guard


def finish_training(run_dir):
    """Once model/ is saved, the training state is no longer needed: remove the backup
    and the per-epoch checkpoints (model/ holds the same weights)."""
    for name in (BACKUP_DIR, CHECKPOINTS):
        shutil.rmtree(os.path.join(run_dir, name), ignore_errors=True)


def complete_run(run_dir, metrics, examples=None):
    """Mark the run complete: its evaluation into TensorBoard at its last epoch (the
    metrics, and with ``examples`` = (test images, heatmaps, labels) a few heatmaps, see
    keras_vae_attn.callbacks.log_evaluation), then ``metrics.json``."""
    from keras_vae_attn import callbacks as kva_callbacks

    log = os.path.join(run_dir, "training_log.jsonl")
    epochs = losses_per_epoch(log).get("loss", []) if os.path.isfile(log) else []
    kva_callbacks.log_evaluation(
        os.path.join(run_dir, TENSORBOARD), metrics, max(len(epochs) - 1, 0), examples
    )
    write_json(os.path.join(run_dir, RUN_COMPLETE), metrics)
    release(run_dir)


def check_diverged(guard):
    if guard.failure:
        raise TrainingDiverged(guard.failure)


def progress(iterable, quiet, **kwargs):
    """A tqdm progress bar on stderr unless ``quiet``."""
    if quiet:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, file=sys.stderr, **kwargs)


def main_guard(main):
    """Run a trainer's main, turning expected user errors into one clear line and exit 2."""
    from keras_vae_attn.data import DataError
    from keras_vae_attn.extras import MissingExtra
    from keras_vae_attn.runs import DiskFull, ModelLoadError

    try:
        return main()
    except KeyboardInterrupt:
        print(interrupted_message(), file=sys.stderr)
        raise SystemExit(130) from None
    except DiskFull as error:
        print(
            f"error: {error}; free space and run the same command to resume", file=sys.stderr
        )
        raise SystemExit(2) from None
    except RunFinished as finished:
        print(finished, file=sys.stderr)
        raise SystemExit(0) from None
    except RunRefused as refused:
        print(f"error: {refused}", file=sys.stderr)
        raise SystemExit(2) from None
    except ModelLoadError as error:
        print(f"error: {error} [see --model-dir]", file=sys.stderr)
        raise SystemExit(2) from None
    except (DataError, MissingExtra, TrainingDiverged, FileNotFoundError) as error:
        option = getattr(error, "option", None)
        hint = f" [see --{option.replace('_', '-')}]" if option else ""
        print(f"error: {error}{hint}", file=sys.stderr)
        raise SystemExit(2) from None
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
            raise
        name = f" {error.filename}" if error.filename else ""
        print(
            f"error: cannot write{name}: {error.strerror}; the same command resumes "
            "once it can",
            file=sys.stderr,
        )
        raise SystemExit(2) from None
    finally:
        for path in list(_HELD):  # an orderly end (even Ctrl-C) leaves no owner:
            release(path)  # only a killed run's lock is "taken over"


def recalibrate_batch_norm(model, dataset):
    """Set every BatchNorm layer's moving mean/variance to the average of its batch
    statistics over ``dataset``, run through the training forward pass.

    With momentum 0.99 the moving averages trail the weights by ~100 steps, so after a
    short training the model in inference mode is not the one that was trained (its
    reconstructions drift to a wrong mean image). Batch k is blended in with momentum
    k / (k + 1), which leaves the exact average of all batches. Weights are untouched.
    """
    import keras

    layers = [
        layer
        for part in (model.encoder, model.decoder)
        for layer in part.layers
        if isinstance(layer, keras.layers.BatchNormalization)
    ]
    if not layers:
        return
    saved = [layer.momentum for layer in layers]
    try:
        for index, images in enumerate(dataset):
            for layer in layers:
                layer.momentum = index / (index + 1.0)
            model.vae_losses(images, training=True)  # eager: reads momentum each call
    finally:
        for layer, momentum in zip(layers, saved):
            layer.momentum = momentum


def fit_one_class(
    args,
    build_model,
    dataset,
    normal,
    run_dir,
    watch,
    feature_layers,
    batch_norm_batches=None,
    covariance=False,
):
    """The one-class training every localization trainer runs, in one place.

    Seeded build and compile under the ``--strategy``; ``model.fit`` with the standard
    callbacks (resume from backup, log, checkpoints, TensorBoard, NaN guard); the
    divergence check; BatchNorm statistics re-estimated when the model has BatchNorm
    (over ``batch_norm_batches``, default ``normal``); the normal latent statistics and
    the feature distributions of ``feature_layers`` (with the channel covariance when
    ``covariance``) fitted on ``normal`` (un-augmented batches); the model saved.
    Returns (model, {loss: [per epoch]} from the training log, so right after a resume
    too, training seconds).
    """
    import keras

    from keras_vae_attn.models import load_vae, save_vae
    from keras_vae_attn.models.io import MODEL_SPEC, MODEL_WEIGHTS, rebuild

    model_dir = os.path.join(run_dir, "model")
    log = os.path.join(run_dir, "training_log.jsonl")
    remove_stale_staging(model_dir)
    if all(os.path.isfile(os.path.join(model_dir, n)) for n in (MODEL_SPEC, MODEL_WEIGHTS)):
        # killed after the model was saved (during evaluation): never train it again
        print(
            f"{model_dir} holds this run's trained model; resuming at evaluation "
            "(--fresh starts a new run)",
            file=sys.stderr,
        )
        model = load_vae(model_dir)
        resolve_precision(args, announce=False)  # what the same command trained in
        finish_training(run_dir)
        STAGE["evaluating"] = True
        missing = [
            name
            for name in feature_layers
            if not model.has_feature_distribution(name, covariance)
        ]
        if missing:
            model.fit_feature_distributions(normal, missing, covariance)
        return model, losses_per_epoch(log) if os.path.isfile(log) else {}, 0.0
    keras.utils.set_random_seed(args.seed)
    if getattr(args, "deterministic", False):
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()
    with make_strategy(args).scope(), precision_scope(resolve_precision(args)):
        model = build_model()
        model.compile(optimizer=keras.optimizers.Adam(args.lr), jit_compile=jit_compile(args))
    steps = args.steps_per_epoch or epoch_steps(dataset)
    dataset = fast_forward(dataset, steps, backup_epoch(os.path.join(run_dir, BACKUP_DIR)))
    callbacks, guard = standard_callbacks(run_dir, watch)
    started = time.perf_counter()
    model.fit(
        dataset,
        epochs=args.epochs,
        steps_per_epoch=steps,
        shuffle=False,  # the tf.data stream is shuffled (and seeded) itself
        callbacks=callbacks,
        verbose=0 if args.quiet else 1,
    )
    seconds = time.perf_counter() - started
    check_diverged(guard)
    if args.precision != "float32":
        model = rebuild(model)  # stats, evaluation and the saved model in float32
    recalibrate_batch_norm(model, batch_norm_batches or normal)
    model.fit_normal_stats(normal)
    model.fit_feature_distributions(normal, list(feature_layers), covariance)
    save_vae(model, model_dir)
    finish_training(run_dir)  # the backup only now: model/ holds the training
    STAGE["evaluating"] = True
    return model, losses_per_epoch(log), seconds


def remove_stale_staging(model_dir):
    """Remove ``model/.model-*`` folders that a kill during save_vae left behind."""
    if os.path.isdir(model_dir):
        for name in os.listdir(model_dir):
            if name.startswith(".model-"):
                shutil.rmtree(os.path.join(model_dir, name), ignore_errors=True)


def backup_epoch(backup_dir):
    """The epoch the run's newest complete backup resumes from (0: none)."""
    from keras_vae_attn.callbacks import BACKUP_STATE

    if not os.path.isdir(backup_dir):
        return 0
    for name in sorted(os.listdir(backup_dir), reverse=True):
        path = os.path.join(backup_dir, name, BACKUP_STATE)
        if name.startswith("epoch-") and os.path.isfile(path):
            try:
                with open(path, encoding="utf-8") as handle:
                    return int(json.load(handle)["epoch"])
            except (OSError, ValueError, KeyError):
                continue
    return 0


def epoch_steps(dataset):
    """The batches in one pass of ``dataset`` (None when tf.data cannot tell)."""
    count = int(dataset.cardinality())
    return count if count > 0 else None


def fast_forward(dataset, steps_per_epoch, epochs_done):
    """The training stream, one repeated dataset read across epochs, as the
    uninterrupted run sees it after ``epochs_done`` epochs.

    A seeded stream (shuffle order, augmentation draws) is a function of how much of it
    was read; a resumed run skips what the backed-up epochs consumed, so the epochs it
    trains see the same batches as those of an uninterrupted run. Keras reads a
    repeated stream on across epochs (each pass reshuffled); a fresh pass per epoch
    would restart the shuffle's seed state with every new process. Without a known
    ``steps_per_epoch`` the stream is left as it is (a resume then sees other batches).
    """
    if not steps_per_epoch:
        return dataset
    dataset = dataset.repeat()
    return dataset.skip(epochs_done * steps_per_epoch) if epochs_done else dataset


def losses_per_epoch(log_path):
    """{loss name: [value per epoch]} from the run's training log.

    Read from the log rather than Keras' History, so a run resumed from its backup
    still plots (and reports) every epoch, not only those after the resume.
    """
    by_epoch = {}
    with open(log_path, encoding="utf-8") as handle:
        for line in handle:
            entry = json.loads(line)
            if entry.get("event") == "epoch_end":
                by_epoch[entry["epoch"]] = entry  # a re-run epoch replaces the old
    names = ("loss", "recon", "kl")
    return {
        name: [by_epoch[e][name] for e in sorted(by_epoch) if name in by_epoch[e]]
        for name in names
        if any(name in entry for entry in by_epoch.values())
    }


def write_localization_predictions(
    args, run_dir, model, options, held_out, test, groups, group_column, attention, others=None
):
    """predictions.csv and thresholds.json of an MVTec or UCSD run (with
    --save-predictions-png one PNG per test image), calibrated on the held-out normal
    training images. ``groups``: the defect type or clip of each test image, written as
    ``group_column``; ``others``: {name: ExplainOptions} whose maps get a colour scale.
    Returns (metrics.json entry, Calibration, predictions)."""
    from keras_vae_attn import predictions
    from keras_vae_attn.data import to_float

    source = predictions.describe_source(args.calibration_holdout, len(held_out))
    calibrated = predictions.calibrate(
        model, to_float(held_out), options, args.eval_batch_size, source, others
    )
    predicted = predictions.predict(attention, calibrated.thresholds)
    files = [os.path.relpath(path, args.data_dir) for path in test.paths]
    entry = predictions.write(
        run_dir, files, groups, group_column, test.labels, predicted, calibrated
    )
    entry["calibration_images"] = len(held_out)
    if args.save_predictions_png:
        entry["png_folder"] = os.path.basename(
            predictions.save_images(
                run_dir,
                files,
                to_float(test.images),
                attention,
                test.masks,
                predicted,
                calibrated,
            )
        )
    return entry, calibrated, predicted
