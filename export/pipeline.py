"""Train -> evaluate -> validate -> export -> push, with lineage and cached stages.

    python -m export.pipeline --category cable --data-dir <mvtec root> \\
        --serving-dir <dir> [--min-pixel-auroc 0.85] [-- <extra trainer flags>]

Each stage writes its artifact into the pipeline folder and a record into
``manifest.json``; re-running skips stages whose inputs did not change, and
``--from-stage`` forces a restart from that stage on. A candidate is pushed only when
blessed: its metrics pass the given floors and are no worse (by more than
``--tolerance``) than the reference map of the same run (``--reference``, by default the
reconstruction difference of the same VAE) and than the served model's. With
``--reference none`` a floor is required, so a candidate is never blessed unjudged. An
unblessed candidate ends the pipeline with exit code 3 and one line of reasons. The
push is atomic: TF Serving never sees a partial version, and the staging folders of a
killed push are removed by the next one.

Children (the trainer, the exporters) run in their own process group: SIGINT/SIGTERM to
the pipeline are forwarded to that group, and the group is killed when the pipeline
exits, so a stopped pipeline leaves no orphan training. A train stage that was stopped
is resumed from the trainer's backup when the same command is run again (its run folder
is kept); a changed configuration, or ``--from-stage train``, trains afresh.
``--model-name`` (and the default ``vae_<category>``), ``--category`` and every number
are checked before anything is written.

The pipeline owns only what it creates: its folder holds a marker file
(:data:`MARKER`) naming the entries it writes, a ``--pipeline-dir`` holding anything
else (or overlapping the data) is refused, and it deletes nothing outside those entries.
"""

from __future__ import annotations

import argparse
import atexit
import ctypes
import hashlib
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import threading

from export import (
    claim_version,
    lineage,
    model_name_problem,
    release_version,
    remove_stale_staging,
)
from export.metadata import FingerprintError, fingerprint_files
from keras_vae_attn.runs import write_json

STAGES = ("train", "evaluate", "validate", "export", "push")
METHOD = "anomaly_attention"
#: Rows of the run's metrics.json a candidate may be compared with (--reference).
REFERENCES = (
    "recon_error",
    "feature_deviation",
    "mean_image_difference",
    "pixel_deviation",
    "none",
)
NOT_BLESSED = 3  # exit code of a run whose candidate was not blessed
GATED_METRICS = ("pixel_auroc", "image_auroc", "aupro")
LINEAGE = "lineage.json"
#: The file that marks a folder as a pipeline's, and the entries the pipeline writes
#: there (its own bookkeeping; nothing else in the folder is ever touched).
MARKER = ".export-pipeline.json"
OWNED = (
    MARKER,
    lineage.MANIFEST,
    "train",
    "evaluate",
    "export",
    "data",
    "holdout.json",
    "blessing.json",
)


class PipelineError(Exception):
    """A refused pipeline folder or data folder; the message names it and what is wrong."""


def number(low=None, high=None, low_open=False, high_open=False):
    """An argparse type: a finite float within [low, high] (open ends as asked), so a
    NaN floor or tolerance cannot bless an unjudged model."""

    def parse(text):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
        below = low is not None and (value <= low if low_open else value < low)
        above = high is not None and (value >= high if high_open else value > high)
        if not math.isfinite(value) or below or above:
            left = "any" if low is None else f"{'(' if low_open else '['}{low:g}"
            right = "" if high is None else f"{high:g}{')' if high_open else ']'}"
            where = f"in {left}, {right}" if high is not None else f">= {low:g}"
            raise argparse.ArgumentTypeError(f"must be a finite number {where}, got {text}")
        return value

    return parse


class OneLineParser(argparse.ArgumentParser):
    """argparse's parser reporting a bad flag in one line (with a pointer to --help),
    not after its usage, which is longer than a terminal's screen here."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser():
    parser = OneLineParser(
        prog="python -m export.pipeline",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--category", required=True, help="MVTec AD category under --data-dir (e.g. cable)"
    )
    parser.add_argument(
        "--data-dir",
        default=os.environ.get("MVTEC_AD_ROOT"),
        help="MVTec AD root (default: $MVTEC_AD_ROOT)",
    )
    parser.add_argument(
        "--serving-dir",
        required=True,
        help="TF Serving model base path: <dir>/<model name>/<version>/",
    )
    parser.add_argument("--model-name", default=None, help="default: vae_<category>")
    parser.add_argument(
        "--pipeline-dir",
        default=None,
        help="artifact folder (default: runs/pipeline/<category>)",
    )
    parser.add_argument(
        "--from-stage",
        choices=STAGES,
        default=None,
        help="rerun this stage and every later one even if cached",
    )
    parser.add_argument(
        "--holdout",
        type=number(0, 1, True, True),
        default=0.1,
        help="fraction of train/good held out to calibrate thresholds",
    )
    parser.add_argument(
        "--validation-dir",
        default=None,
        help="labelled MVTec-layout root: calibrate F1-optimal thresholds "
        "on its test split instead of normal percentiles",
    )
    parser.add_argument(
        "--pixel-percentile",
        type=number(0, 100),
        default=99.5,
        help="pixel threshold: this percentile of the held-out normal "
        "images' heatmaps (default: %(default)s)",
    )
    parser.add_argument(
        "--image-percentile",
        type=number(0, 100),
        default=99.0,
        help="image threshold: this percentile of their image scores (default: %(default)s)",
    )
    for metric in GATED_METRICS:
        parser.add_argument(
            f"--min-{metric.replace('_', '-')}",
            type=number(0, 1),
            default=None,
            help=f"bless only if {metric} of the anomaly attention >= this",
        )
    parser.add_argument(
        "--reference",
        choices=REFERENCES,
        default="recon_error",
        help="bless only if the anomaly attention is no worse than this "
        "map of the same run (metrics.json 'methods') on every gated "
        "metric; 'none' requires a --min-* floor",
    )
    parser.add_argument(
        "--tolerance",
        type=number(0),
        default=0.01,
        help="how much worse than the reference and the served model a candidate may be",
    )
    parser.add_argument(
        "--seed",
        type=seed_value,
        default=0,
        help="the trainer's --seed (default: %(default)s)",
    )
    parser.add_argument(
        "--no-verify",
        dest="verify",
        action="store_false",
        help="export stage: skip export.onnx's check of the converted graph against the model",
    )
    parser.add_argument(
        "trainer_args",
        nargs="*",
        help="after `--`: extra flags for trainers.mvtec (e.g. --epochs 5)",
    )
    return parser


def seed_value(text):
    """An argparse type: a seed >= 0 (the trainer's random generators take no other)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {value}")
    return value


FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM)
#: Seconds a child gets to exit after a forwarded signal before its group is killed.
CHILD_GRACE_S = 10.0
_children = set()


def kill_group(process, signum=signal.SIGKILL):
    """Send ``signum`` to the process group ``process`` leads (gone already: no-op)."""
    try:
        os.killpg(process.pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


@atexit.register
def _kill_children():
    """On the pipeline's exit, kill the groups of children still running."""
    for process in list(_children):
        kill_group(process)


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _dies_with(parent_pid):
    """A ``preexec_fn`` asking Linux to SIGTERM the child when the pipeline dies, even by
    SIGKILL, which no handler of the pipeline can catch. Elsewhere: a no-op."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)  # loaded before the fork

    def set_death_signal():
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent_pid:  # the pipeline died before prctl
            os.kill(os.getpid(), signal.SIGTERM)

    return set_death_signal


class Interrupted(SystemExit):
    """The pipeline was stopped by a signal (exit code 128 + the signal); the stage it
    was in prints the one line that says so."""

    def __init__(self, signum):
        super().__init__(128 + signum)
        self.signal = signal.Signals(signum).name


def run_child(command):
    """Run ``command`` like ``subprocess.run(check=True)``, in its own process group.

    A SIGINT/SIGTERM to the pipeline is passed on to the group, which then gets
    CHILD_GRACE_S to exit before it is killed, and Interrupted (exit 128 + the signal)
    is raised; however this returns, nothing of the group is left running.
    """
    process = subprocess.Popen(
        command, start_new_session=True, preexec_fn=_dies_with(os.getpid())
    )
    _children.add(process)
    stopped = []

    def forward(signum, frame):
        kill_group(process, signum)
        stopped.append(signum)
        raise Interrupted(signum)

    handle = threading.current_thread() is threading.main_thread()  # signals: main only
    previous = (
        {sig: signal.signal(sig, forward) for sig in FORWARDED_SIGNALS} if handle else {}
    )
    try:
        code = process.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if stopped:
            try:
                process.wait(timeout=CHILD_GRACE_S)
            except subprocess.TimeoutExpired:
                pass
        kill_group(process)  # grandchildren too, whatever happened
        process.wait()
        _children.discard(process)
    if code:
        raise subprocess.CalledProcessError(code, command)


class Pipeline:
    """The five stages over one pipeline folder."""

    def __init__(self, args):
        self.args = args
        self.model_name = args.model_name or f"vae_{args.category}"
        self.root = os.path.abspath(pipeline_dir(args))
        category = os.path.join(args.data_dir, args.category)
        if not os.path.isdir(category):
            raise PipelineError(
                f"--data-dir {args.data_dir!r} holds no category folder {args.category!r}"
            )
        check_apart(self.root, category)
        check_serving_outside(self.root, args.serving_dir)
        self.data = fingerprint_files(category)
        claim_folder(self.root)
        self.manifest = lineage.Manifest(self.root)
        self.forced = False
        self.current = None  # the stage running now (named when interrupted)

    def path(self, *parts):
        return os.path.join(self.root, *parts)

    def remove(self, name):
        """Delete entry ``name`` of the pipeline folder: only one of the entries the
        pipeline writes itself (OWNED) is ever removed."""
        if name not in OWNED:
            raise ValueError(f"the pipeline removes only its own entries, not {name!r}")
        path = self.path(name)
        if os.path.islink(path) or os.path.isfile(path):
            os.remove(path)
        else:
            shutil.rmtree(path, ignore_errors=True)

    def stage(self, name, config, inputs, action):
        # --from-stage forces that stage and every later one; otherwise a stage reruns
        # only when its config or the content of its inputs changed (cache key)
        self.current = name
        self.forced = self.forced or self.args.from_stage == name
        record = lineage.run_stage(
            self.manifest, name, config, inputs, self.data, action, force=self.forced
        )
        verdict = "cached" if record["cached"] else record["status"]
        print(f"[{name}] {verdict}", file=sys.stderr)
        return record

    # --- train ------------------------------------------------------------------------
    def train(self):
        config = {
            "category": self.args.category,
            "holdout": self.args.holdout,
            "seed": self.args.seed,
            "trainer_args": self.args.trainer_args,
        }
        resume = self.interrupted("train", config) and not self.args.from_stage == "train"
        return self.stage("train", config, {}, lambda: self._train(resume))

    def interrupted(self, name, config):
        """Whether stage ``name`` last started with this same config and never finished
        (killed: "running", or stopped by a signal or an error: "failed")."""
        previous = self.manifest.record(name) or {}
        return previous.get("status") in ("running", "failed") and previous.get(
            "cache_key"
        ) == lineage.cache_key(config, {}, self.data)

    def _train(self, resume=False):
        """Run the trainer on the training view; with ``resume`` its run folder is kept,
        so the trainer picks up from its backup instead of epoch 0."""
        from keras_vae_attn.data import mvtec

        files = mvtec.train_files(self.args.data_dir, self.args.category)
        held = sorted(
            random.Random(self.args.seed).sample(
                files, max(1, int(round(self.args.holdout * len(files))))
            )
        )
        view = self._training_view(set(held))
        run_dir = self.path("train")
        if resume and os.path.isdir(run_dir):
            print(f"train: resuming the interrupted training in {run_dir}", file=sys.stderr)
        else:
            self.remove("train")
        # the pipeline holds its own normal images out; the trainer need not hold out more
        own_holdout = (
            []
            if any(a.startswith("--calibration-holdout") for a in self.args.trainer_args)
            else ["--calibration-holdout", "0"]
        )
        command = [
            sys.executable,
            "-m",
            "trainers.mvtec",
            "--category",
            self.args.category,
            "--data-dir",
            view,
            "--run-dir",
            run_dir,
            "--seed",
            str(self.args.seed),
            *own_holdout,
            *self.args.trainer_args,
        ]
        run_child(command)
        holdout = self.path("holdout.json")
        write_json(holdout, held)
        return (
            "done",
            {
                "model": os.path.join(run_dir, "model"),
                "holdout": holdout,
                "config": os.path.join(run_dir, "config.json"),
                "metrics": os.path.join(run_dir, "metrics.json"),
            },
            {"train_images": len(files) - len(held), "held_out": len(held)},
        )

    def _training_view(self, held):
        """A data root that links to the real one, minus the held-out normal images: a
        folder of links in the pipeline folder (which never overlaps the data, see
        check_apart), so rebuilding it deletes links, never an image."""
        from keras_vae_attn.data import mvtec

        source = os.path.join(os.path.abspath(self.args.data_dir), self.args.category)
        view = self.path("data")
        self.remove("data")
        good = os.path.join(view, self.args.category, "train", mvtec.GOOD)
        os.makedirs(good)
        for name in os.listdir(source):
            if name != "train":
                os.symlink(
                    os.path.join(source, name), os.path.join(view, self.args.category, name)
                )
        for path in mvtec.train_files(self.args.data_dir, self.args.category):
            if path not in held:
                os.symlink(os.path.abspath(path), os.path.join(good, os.path.basename(path)))
        return view

    # --- evaluate ---------------------------------------------------------------------
    def evaluate(self, trained):
        # "predictions": an evaluate record from before it wrote predictions.csv is
        # not reused, so every pipeline folder gets the served decisions
        config = {
            "validation_dir": self.args.validation_dir,
            "pixel_percentile": self.args.pixel_percentile,
            "image_percentile": self.args.image_percentile,
            "predictions": True,
        }
        return self.stage(
            "evaluate", config, trained["outputs"], lambda: self._evaluate(trained["outputs"])
        )

    def _evaluate(self, trained):
        """The trainer's test-set metrics, thresholds calibrated on held-out data, and
        predictions.csv: the test-set decisions at those thresholds, the ones the
        exported model makes (the train run's own predictions.csv and thresholds.json,
        calibrated on its training images, are replaced by these)."""
        from export import options_from_config
        from keras_vae_attn.models import load_vae
        from keras_vae_attn.predictions import PREDICTIONS, THRESHOLDS

        out_dir = self.path("evaluate")
        os.makedirs(out_dir, exist_ok=True)
        with open(trained["config"], encoding="utf-8") as handle:
            train_config = json.load(handle)
        with open(trained["metrics"], encoding="utf-8") as handle:
            metrics = json.load(handle)
        with open(trained["holdout"], encoding="utf-8") as handle:
            held = json.load(handle)
        model = load_vae(trained["model"])
        options = options_from_config(train_config)
        thresholds, source = calibrate_run(model, options, train_config, held, self.args)
        metrics["predictions"] = served_predictions(
            model,
            options,
            train_config,
            self.args.data_dir,
            self.args.category,
            thresholds,
            source,
            out_dir,
        )
        metrics_path = os.path.join(out_dir, "metrics.json")
        thresholds_path = os.path.join(out_dir, THRESHOLDS)
        write_json(metrics_path, metrics)
        run_dir = os.path.dirname(trained["config"])
        for name in (PREDICTIONS, THRESHOLDS):  # one set of decisions in the folder
            shutil.copyfile(os.path.join(out_dir, name), os.path.join(run_dir, name))
        return (
            "done",
            {
                "metrics": metrics_path,
                "thresholds": thresholds_path,
                "predictions": os.path.join(out_dir, PREDICTIONS),
            },
            {
                "metrics": metrics["methods"][METHOD],
                "thresholds": thresholds.as_dict(),
                "at_threshold": metrics["predictions"]["at_threshold"],
            },
        )

    # --- validate ---------------------------------------------------------------------
    def validate(self, trained, evaluated):
        floors = {m: getattr(self.args, f"min_{m}") for m in GATED_METRICS}
        candidate = candidate_id(
            trained["outputs"]["model"], evaluated["outputs"]["thresholds"]
        )
        baseline = served_baseline(self.args.serving_dir, self.model_name, candidate)
        config = {
            "floors": floors,
            "tolerance": self.args.tolerance,
            "candidate": candidate,
            "served": baseline,
            "reference": self.args.reference,
        }
        inputs = dict(evaluated["outputs"])
        if baseline:
            inputs["served_metrics"] = baseline
        return self.stage(
            "validate",
            config,
            inputs,
            lambda: self._validate(evaluated["outputs"], floors, baseline),
        )

    def _validate(self, evaluated, floors, served_path):
        with open(evaluated["metrics"], encoding="utf-8") as handle:
            methods = json.load(handle)["methods"]
        candidate = methods[METHOD]
        served = None
        if served_path:
            with open(served_path, encoding="utf-8") as handle:
                served = json.load(handle)["methods"][METHOD]
        name = self.args.reference
        reference = None if name == "none" else (name, methods.get(name))
        reasons = blessing_reasons(candidate, floors, served, self.args.tolerance, reference)
        blessing = {
            "blessed": not reasons,
            "reasons": reasons,
            "candidate": candidate,
            "served": served,
            "served_metrics": served_path,
            "floors": floors,
            "reference": name,
            "reference_metrics": reference and reference[1],
            "tolerance": self.args.tolerance,
        }
        path = self.path("blessing.json")
        write_json(path, blessing)
        return ("blessed" if not reasons else "not blessed"), {"blessing": path}, blessing

    # --- export -----------------------------------------------------------------------
    def export(self, trained, evaluated, validated):
        inputs = {
            "model": trained["outputs"]["model"],
            "thresholds": evaluated["outputs"]["thresholds"],
            "metrics": evaluated["outputs"]["metrics"],
        }
        candidate = validated["config"]["candidate"]  # the id validate judged
        config = {"model_name": self.model_name, "candidate": candidate}
        if not self.args.verify:  # a verified export is not redone by --no-verify
            config["verify"] = False
        return self.stage("export", config, inputs, lambda: self._export(inputs, candidate))

    def _export(self, inputs, candidate):
        out = self.path("export")
        self.remove("export")
        os.makedirs(out)
        saved = os.path.join(out, "saved_model")
        onnx_path = os.path.join(out, "model.onnx")
        common = ["--run", self.path("train"), "--thresholds", inputs["thresholds"]]
        run_child(
            [
                sys.executable,
                "-m",
                "export.saved_model",
                *common,
                "--out",
                saved,
                "--model-name",
                self.model_name,
                "--version",
                "1",
            ]
        )
        run_child(
            [
                sys.executable,
                "-m",
                "export.onnx",
                *common,
                "--out",
                onnx_path,
                *([] if self.args.verify else ["--no-verify"]),
            ]
        )
        version_dir = os.path.join(saved, self.model_name, "1")
        assets = os.path.join(version_dir, "assets")
        os.makedirs(assets, exist_ok=True)
        shutil.copy(inputs["metrics"], os.path.join(assets, "metrics.json"))
        shutil.copy(inputs["thresholds"], os.path.join(assets, "thresholds.json"))
        write_json(
            os.path.join(assets, LINEAGE),
            {"candidate": candidate, "pipeline": self.root, "manifest": self.manifest.path},
        )
        return "done", {"saved_model": version_dir, "onnx": onnx_path}, {}

    # --- push -------------------------------------------------------------------------
    def push(self, validated, exported):
        inputs = {
            "blessing": validated["outputs"]["blessing"],
            "saved_model": exported["outputs"]["saved_model"],
        }
        return self.stage(
            "push",
            {"serving_dir": os.path.abspath(self.args.serving_dir)},
            inputs,
            lambda: self._push(validated, exported),
        )

    def _push(self, validated, exported):
        if validated["status"] != "blessed":
            return "skipped (not blessed)", {}, {"reasons": validated["details"]["reasons"]}
        source = exported["outputs"]["saved_model"]
        newest = served_versions(self.args.serving_dir, self.model_name)[-1:]
        if newest and read_candidate(newest[0]) == read_candidate(source):
            print(f"{newest[0]} already serves this model; nothing pushed", file=sys.stderr)
            return "already served", {}, {"version_dir": newest[0]}
        target = push_version(source, self.args.serving_dir, self.model_name)
        print(f"pushed {target}", file=sys.stderr)
        return "pushed", {}, {"version_dir": target}

    def run(self):
        trained = self.train()
        evaluated = self.evaluate(trained)
        validated = self.validate(trained, evaluated)
        exported = self.export(trained, evaluated, validated)
        pushed = self.push(validated, exported)
        return {
            "train": trained,
            "evaluate": evaluated,
            "validate": validated,
            "export": exported,
            "push": pushed,
        }


def candidate_id(model_dir, thresholds_path):
    """What identifies a candidate: the trained weights plus the thresholds baked in."""
    digest = lineage.hash_path(model_dir) + lineage.hash_path(thresholds_path)
    return hashlib.sha256(digest.encode()).hexdigest()[:16]


def served_versions(serving_dir, model_name):
    """Version folders under ``<serving_dir>/<model_name>/``, oldest first."""
    folder = os.path.join(serving_dir, model_name)
    if not os.path.isdir(folder):
        return []
    return [
        os.path.join(folder, str(v))
        for v in sorted(int(n) for n in os.listdir(folder) if n.isdigit())
    ]


def read_candidate(version_dir):
    """The candidate id a pipeline wrote into a SavedModel's assets (None: not ours)."""
    path = os.path.join(version_dir, "assets", LINEAGE)
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as handle:
        return json.load(handle).get("candidate")


def served_baseline(serving_dir, model_name, candidate):
    """metrics.json of the model to beat: the newest served version that is not this
    candidate (so re-running after a push compares against the same model as before)."""
    for version_dir in reversed(served_versions(serving_dir, model_name)):
        if read_candidate(version_dir) != candidate:
            path = os.path.join(version_dir, "assets", "metrics.json")
            return path if os.path.exists(path) else None
    return None


def calibrate_run(model, options, train_config, held_out, args):
    """Thresholds for a trained run: F1-optimal on ``args.validation_dir`` when given,
    else percentiles of the held-out normal images' scores. Returns (thresholds, which
    images, in words)."""
    from keras_vae_attn import calibration
    from keras_vae_attn.data import mvtec
    from keras_vae_attn.explain import pipeline as explain_pipeline

    size, channels = train_config["image_size"], train_config.get("channels", 3)
    keys = ("heatmap", "score")
    if args.validation_dir:
        split = mvtec.load_test(args.validation_dir, args.category, size, channels)
        out = explain_pipeline.batched(
            model, mvtec.to_float(split.images), 16, options, keys=keys
        )
        return calibration.from_labelled(
            out["heatmap"], split.masks, out["score"], split.labels
        ), f"the labelled test split of {args.validation_dir}"
    images, _ = mvtec.decode_files(held_out, size, channels)
    thresholds = calibration.from_model(
        model,
        mvtec.to_float(images),
        options,
        16,
        args.pixel_percentile,
        args.image_percentile,
    )[0]
    return thresholds, (
        f"the {len(held_out)} normal training images the pipeline held "
        "out (--holdout), not trained on"
    )


def served_predictions(
    model, options, train_config, data_dir, category, thresholds, source, out_dir
):
    """predictions.csv and thresholds.json into ``out_dir``: the decisions at
    ``thresholds`` on the test images the trainer evaluated (its image size and
    --max-test), i.e. what the exported model answers for them. Returns the metrics.json
    entry (counts at the threshold)."""
    from keras_vae_attn import predictions
    from keras_vae_attn.data import mvtec
    from keras_vae_attn.explain import pipeline as explain_pipeline

    test = mvtec.load_test(
        data_dir,
        category,
        train_config["image_size"],
        train_config.get("channels", 3),
        limit=train_config.get("max_test"),
        skip_corrupt=bool(train_config.get("skip_corrupt")),
    )
    maps = explain_pipeline.batched(
        model, mvtec.to_float(test.images), 16, options, keys=("heatmap",)
    )["heatmap"]
    decided = predictions.predict(maps, thresholds)
    files = [os.path.relpath(path, data_dir) for path in test.paths]
    calibrated = predictions.Calibration(thresholds, {}, source)
    return predictions.write(
        out_dir, files, test.defects, "defect_type", test.labels, decided, calibrated
    )


def blessing_reasons(candidate, floors, served, tolerance, reference=None):
    """Why a candidate is not blessed (empty list: blessed).

    ``candidate``, ``served``: {metric: value} of the anomaly attention; ``reference``:
    (name, {metric: value} or None when the run has no such row) of a map of the same
    run it must not lose to; ``floors``: {metric: minimum or None}. With no floor, no
    reference and no served model there is nothing to judge by, which is a reason too.
    """
    reasons = []
    for metric, floor in floors.items():
        value = candidate.get(metric)
        if floor is not None and (value is None or value < floor):
            shown = "n/a" if value is None else f"{value:.4g}"
            reasons.append(f"{metric} {shown} is below the required {floor}")
    if reference is not None:
        name, values = reference
        if values is None:
            reasons.append(f"the run's metrics.json holds no {name!r} row to compare with")
        else:
            reasons += worse_than(candidate, values, tolerance, f"this run's {name}")
    if served:
        reasons += worse_than(candidate, served, tolerance, "the served model's")
    if reference is None and not served and all(f is None for f in floors.values()):
        reasons.append(
            "nothing to judge it by: no floor (--min-pixel-auroc ...), no "
            "--reference and no served model"
        )
    return reasons


def worse_than(candidate, other, tolerance, label):
    """One reason per gated metric where ``candidate`` is below ``other`` by more than
    ``tolerance``."""
    reasons = []
    for metric in GATED_METRICS:
        new, old = candidate.get(metric), other.get(metric)
        if new is not None and old is not None and new < old - tolerance:
            reasons.append(
                f"{metric} {new:.4f} is worse than {label} {old:.4f} by more than {tolerance}"
            )
    return reasons


def push_version(version_dir, serving_dir, model_name):
    """Copy a SavedModel to ``<serving_dir>/<model_name>/<next version>/`` atomically.

    The copy is made under a dot-name TF Serving ignores, then renamed into place; the
    rename either happens whole or not at all. The number is claimed as exporters claim
    theirs (export.claim_version), so a push and an export never take the same one.
    Staging folders of killed pushes (their pid dead) are removed first. Returns the new
    version folder.
    """
    base = os.path.join(serving_dir, model_name)
    os.makedirs(base, exist_ok=True)
    remove_stale_staging(base)
    staging = os.path.join(base, f".incoming-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        shutil.copytree(version_dir, staging)
        version, claim = claim_version(base)
        try:
            target = os.path.join(base, str(version))
            os.rename(staging, target)
        finally:
            release_version(claim)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def pipeline_dir(args):
    """The pipeline folder: --pipeline-dir, or runs/pipeline/<category>."""
    return args.pipeline_dir or os.path.join("runs", "pipeline", args.category)


def check_apart(root, category_dir):
    """PipelineError unless the pipeline folder and the category's data folder are
    apart (neither inside the other): the pipeline rebuilds folders of its own, and
    they must never be the user's images (nor may its outputs look like data)."""
    here, data = os.path.realpath(root), os.path.realpath(category_dir)
    if os.path.commonpath([here, data]) in (here, data):
        raise PipelineError(
            f"--pipeline-dir {root!r} and the data folder {category_dir!r} "
            "overlap (one holds the other); choose a --pipeline-dir "
            "outside the data"
        )


def check_serving_outside(root, serving_dir):
    """PipelineError if --serving-dir lies inside the pipeline folder: that folder holds
    only the pipeline's own entries, so the next run would refuse it."""
    here, serving = os.path.realpath(root), os.path.realpath(serving_dir)
    if os.path.commonpath([here, serving]) == here:
        raise PipelineError(
            f"--serving-dir {serving_dir!r} lies inside --pipeline-dir "
            f"{root!r}, which holds only the pipeline's own entries; "
            "choose a serving folder outside it"
        )


def owned(name):
    """Whether ``name`` in a pipeline folder is one the pipeline writes (an entry of
    OWNED, or the temporary file of one being rewritten)."""
    return name in OWNED or any(name.startswith(f"{entry}.partial") for entry in OWNED)


def claim_folder(root):
    """Make ``root`` the pipeline's folder, or PipelineError without touching it.

    A new or empty folder gets the marker file; a folder with the marker may hold only
    the entries the pipeline writes; one without it is taken only when it holds nothing
    but a pipeline's own entries and a readable manifest.json (a folder from before the
    marker). Anything else is the user's, and the pipeline would delete some of it.
    """
    if os.path.lexists(root) and not os.path.isdir(root):
        raise PipelineError(f"--pipeline-dir {root!r} exists and is not a folder")
    entries = sorted(os.listdir(root)) if os.path.isdir(root) else []
    foreign = [name for name in entries if not owned(name)]
    earlier = lineage.MANIFEST in entries
    if earlier and MARKER not in entries:
        lineage.read_manifest(os.path.join(root, lineage.MANIFEST))  # ours, or refused
    if foreign or (entries and MARKER not in entries and not earlier):
        names = foreign or entries
        listed = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        raise PipelineError(
            f"--pipeline-dir {root!r} holds files the pipeline did not "
            f"write ({listed}); choose a new or empty folder, or move them "
            "away (the pipeline deletes and rewrites its own entries "
            f"there: {', '.join(OWNED[1:])})"
        )
    os.makedirs(root, exist_ok=True)
    if MARKER not in entries:
        write_json(
            os.path.join(root, MARKER), {"written_by": "export.pipeline", "owns": list(OWNED)}
        )


def check_names(parser, args):
    """Refuse, before anything is written, a --category that is not a plain folder name
    (``../x`` would put the pipeline folder elsewhere) and a serving name that would
    leave --serving-dir."""
    category = args.category
    if not category or category.startswith(".") or "/" in category or os.sep in category:
        parser.exit(
            2,
            f"error: --category {category!r} must be a plain folder name (no "
            "path separator, not starting with '.')\n",
        )
    check_model_name(parser, args)


def check_model_name(parser, args):
    """Refuse, before any stage, a serving name that would leave ``--serving-dir``
    (one line naming the flag, exit 2); the default vae_<category> is checked too."""
    if args.model_name is not None:
        flag, name = "--model-name", args.model_name
    else:
        flag, name = "--category", f"vae_{args.category}"
    problem = model_name_problem(name)
    if problem:
        parser.exit(2, f"error: {flag}: model name {problem}\n")


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.data_dir:
        parser.error("--data-dir is required (or set $MVTEC_AD_ROOT)")
    check_names(parser, args)
    if args.reference == "none" and all(
        getattr(args, f"min_{m}") is None for m in GATED_METRICS
    ):
        parser.error(
            "--reference none needs a floor to judge the candidate by: "
            "--min-pixel-auroc, --min-image-auroc or --min-aupro"
        )
    from keras_vae_attn.console import start_tensorflow

    start_tensorflow()
    from keras_vae_attn.data import DataError

    pipe = None
    try:
        pipe = Pipeline(args)
        results = pipe.run()
    except (DataError, PipelineError, lineage.LineageError, FingerprintError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except subprocess.CalledProcessError as error:
        print(
            f"error: the {pipe.current} stage stopped: {' '.join(error.cmd[1:3])} exited "
            f"with code {error.returncode} (its message is above)",
            file=sys.stderr,
        )
        raise SystemExit(2) from None
    except (Interrupted, KeyboardInterrupt) as stop:
        name = getattr(stop, "signal", "SIGINT")
        where = f"in the {pipe.current} stage" if pipe and pipe.current else "before any stage"
        print(
            f"interrupted by {name} {where}; run the same command to resume from it",
            file=sys.stderr,
        )
        raise SystemExit(128 + signal.Signals[name].value) from None
    print(json.dumps({name: r["status"] for name, r in results.items()}, indent=2))
    validated = results["validate"]
    if validated["status"] != "blessed":
        print(
            "not blessed, nothing pushed: " + "; ".join(validated["details"]["reasons"]),
            file=sys.stderr,
        )
        raise SystemExit(NOT_BLESSED)
    return results


if __name__ == "__main__":
    main()
