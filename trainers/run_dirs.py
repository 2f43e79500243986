"""Which run folder a trainer's command works in, and the folder's life: a new one, the
unfinished run of the same flags (resumed), or a refusal (finished, busy, another
run's); locked for the process while it trains; marked complete with metrics.json.
Pure Python, so the flags are checked before TensorFlow starts."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import json
import os
import shutil
import sys
from collections.abc import Iterator
from typing import Any

from keras_vae_attn import runs
from keras_vae_attn.runs import RUN_COMPLETE
from trainers.devices import worker_index

BACKUP_DIR = "backup"


CHECKPOINTS = "checkpoints"


TENSORBOARD = "tensorboard"


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


#: The metrics.json entries the trainers write that TensorBoard shows as evaluation
#: scalars ({method: {metric: value}}-like dicts, or numbers) when a run completes.
METRIC_GROUPS = (
    "methods",
    "image_auroc",
    "image_auroc_other_scores",
    "pixel_auroc_per_defect",
    "best_auroc",
    "factor_vae_score",
    "factor_vae_train_accuracy",
    "attention_overlap_top_pair",
    "sanity",
    "latent_selectivity",
)
LOCK = ".lock"


#: {real path of a run folder: its open lock file}, held until the run completes
_HELD = {}


def config_of(args: argparse.Namespace) -> dict[str, Any]:
    """The run's configuration as plain JSON values (what `config.json` holds)."""
    skip = {"run_dir", "runs_root", "fresh", "quiet"}
    return {key: value for key, value in sorted(vars(args).items()) if key not in skip}


def config_hash(config: dict[str, Any]) -> str:
    return hashlib.sha1(json.dumps(config, sort_keys=True).encode()).hexdigest()[:8]


class RunFinished(Exception):
    """The same command already finished a run; the message names it and the ways on."""


class RunRefused(Exception):
    """The run folder cannot be used as asked (busy, another run's, not writable); the
    message says why and the way on. One line, exit 2."""


def run_dir_for(args: argparse.Namespace, experiment: str) -> str:
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
        runs.RunFolder(path).write_config(config)
    except OSError as error:
        flag = "--run-dir" if args.run_dir else "--runs-root"
        raise RunRefused(
            f"{flag} {args.run_dir or args.runs_root}: cannot write "
            f"{error.filename or ''}: {error.strerror or error}"
        ) from None
    return path


def pick_run_dir(args: argparse.Namespace, parent: str, config: dict[str, Any]) -> str:
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


def own_folder(path: str, worker: int) -> str:
    """The folder this process owns in the run folder ``path``, made and locked: the run
    folder itself for the chief (worker 0); in multi-worker training the other workers
    keep their own checkpoints and backups beside it, in ``worker-N``."""
    if worker:
        path = os.path.join(path, f"worker-{worker}")
        os.makedirs(path, exist_ok=True)
    claim(path)
    return path


def explicit_run_dir(args: argparse.Namespace, config: dict[str, Any], worker: int = 0) -> str:
    """``--run-dir``: resumed when it holds an unfinished run of the same flags; a
    finished run of the same flags is RunFinished; a run of other flags is refused,
    unless ``--fresh``, which clears that run's outputs (RUN_OUTPUTS) first."""
    path = args.run_dir
    if os.path.exists(path) and not os.path.isdir(path):
        raise RunRefused(f"--run-dir {path} is a file, not a folder")
    os.makedirs(path, exist_ok=True)
    path = own_folder(path, worker)
    old = runs.read_config(path)  # {} when it has none
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
def locked(folder: str) -> Iterator[None]:
    """An exclusive lock on ``folder`` itself for the block (waits for other holders;
    no file is made in it)."""
    import fcntl

    descriptor = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)  # closing releases the lock


def claim(path: str) -> None:
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


def release(path: str) -> None:
    """Give up the lock of a finished run folder (its lock file is emptied: no owner)."""
    import fcntl

    handle = _HELD.pop(os.path.realpath(path), None)
    if handle is not None:
        handle.seek(0)
        handle.truncate()
        handle.flush()
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def release_all() -> None:
    """Give up every run folder this process holds (an orderly end, even Ctrl-C, leaves
    no owner: only a killed run's lock is "taken over")."""
    for path in list(_HELD):
        release(path)


def finished_message(path: str, rescore: bool = True) -> str:
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


def _new_run_name(parent: str, digest: str) -> str:
    """`<timestamp>-<hash>`, with a counter when that folder already exists."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    name, count = f"{stamp}-{digest}", 1
    while os.path.exists(os.path.join(parent, name)):
        count += 1
        name = f"{stamp}.{count}-{digest}"
    return name


def finish_training(run_dir: str) -> None:
    """Once model/ is saved, the training state is no longer needed: remove the backup
    and the per-epoch checkpoints (model/ holds the same weights)."""
    for name in (BACKUP_DIR, CHECKPOINTS):
        shutil.rmtree(os.path.join(run_dir, name), ignore_errors=True)


def record_options(run_dir: str, options: Any) -> None:
    """Store the explain options the run is evaluated (and exported) with in its
    config.json, fitted layer scales included."""
    run = runs.RunFolder(run_dir)
    config = run.config().as_dict()
    config["explain"] = options.as_config()
    run.write_config(config)


def trained_epochs(model_dir: str) -> int | None:
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


def losses_per_epoch(log_path: str) -> dict[str, list[float]]:
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


def complete_run(run_dir: str, metrics: dict[str, Any], examples: tuple | None = None) -> None:
    """Mark the run complete: its evaluation into TensorBoard at its last epoch (the
    metrics, and with ``examples`` = (test images, heatmaps, labels) a few heatmaps, see
    keras_vae_attn.callbacks.log_evaluation), then ``metrics.json``."""
    from keras_vae_attn import callbacks as kva_callbacks

    log = os.path.join(run_dir, "training_log.jsonl")
    epochs = losses_per_epoch(log).get("loss", []) if os.path.isfile(log) else []
    kva_callbacks.log_evaluation(
        os.path.join(run_dir, TENSORBOARD),
        metrics,
        METRIC_GROUPS,
        max(len(epochs) - 1, 0),
        examples,
    )
    runs.RunFolder(run_dir).write_metrics(metrics)
    release(run_dir)
