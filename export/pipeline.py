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
``--model-name`` (and the default ``vae_<category>``) is checked before any stage runs.
"""
from __future__ import annotations

import argparse
import atexit
import ctypes
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading

from export import lineage, model_name_problem, remove_stale_staging
from keras_vae_attn.runs import write_json

STAGES = ("train", "evaluate", "validate", "export", "push")
METHOD = "anomaly_attention"
#: Rows of the run's metrics.json a candidate may be compared with (--reference).
REFERENCES = ("recon_error", "feature_deviation", "mean_image_difference",
              "pixel_deviation", "none")
NOT_BLESSED = 3            # exit code of a run whose candidate was not blessed
GATED_METRICS = ("pixel_auroc", "image_auroc", "aupro")
LINEAGE = "lineage.json"


def build_parser():
    parser = argparse.ArgumentParser(prog="python -m export.pipeline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--category", required=True,
                        help="MVTec AD category under --data-dir (e.g. cable)")
    parser.add_argument("--data-dir", default=os.environ.get("MVTEC_AD_ROOT"),
                        help="MVTec AD root (default: $MVTEC_AD_ROOT)")
    parser.add_argument("--serving-dir", required=True,
                        help="TF Serving model base path: <dir>/<model name>/<version>/")
    parser.add_argument("--model-name", default=None, help="default: vae_<category>")
    parser.add_argument("--pipeline-dir", default=None,
                        help="artifact folder (default: runs/pipeline/<category>)")
    parser.add_argument("--from-stage", choices=STAGES, default=None,
                        help="rerun this stage and every later one even if cached")
    parser.add_argument("--holdout", type=float, default=0.1,
                        help="fraction of train/good held out to calibrate thresholds")
    parser.add_argument("--validation-dir", default=None,
                        help="labelled MVTec-layout root: calibrate F1-optimal thresholds "
                             "on its test split instead of normal percentiles")
    parser.add_argument("--pixel-percentile", type=float, default=99.5,
                        help="pixel threshold: this percentile of the held-out normal "
                             "images' heatmaps (default: %(default)s)")
    parser.add_argument("--image-percentile", type=float, default=99.0,
                        help="image threshold: this percentile of their image scores "
                             "(default: %(default)s)")
    for metric in GATED_METRICS:
        parser.add_argument(f"--min-{metric.replace('_', '-')}", type=float, default=None,
                            help=f"bless only if {metric} of the anomaly attention >= this")
    parser.add_argument("--reference", choices=REFERENCES, default="recon_error",
                        help="bless only if the anomaly attention is no worse than this "
                             "map of the same run (metrics.json 'methods') on every gated "
                             "metric; 'none' requires a --min-* floor")
    parser.add_argument("--tolerance", type=float, default=0.01,
                        help="how much worse than the reference and the served model a "
                             "candidate may be")
    parser.add_argument("--seed", type=int, default=0,
                        help="the trainer's --seed (default: %(default)s)")
    parser.add_argument("trainer_args", nargs="*",
                        help="after `--`: extra flags for trainers.mvtec (e.g. --epochs 5)")
    return parser


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


_PR_SET_PDEATHSIG = 1       # linux/prctl.h


def _dies_with(parent_pid):
    """A ``preexec_fn`` asking Linux to SIGTERM the child when the pipeline dies, even by
    SIGKILL, which no handler of the pipeline can catch. Elsewhere: a no-op."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)         # loaded before the fork

    def set_death_signal():
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent_pid:               # the pipeline died before prctl
            os.kill(os.getpid(), signal.SIGTERM)

    return set_death_signal


def run_child(command):
    """Run ``command`` like ``subprocess.run(check=True)``, in its own process group.

    A SIGINT/SIGTERM to the pipeline is passed on to the group, which then gets
    CHILD_GRACE_S to exit before it is killed, and the pipeline exits with 128 + the
    signal; however this returns, nothing of the group is left running.
    """
    process = subprocess.Popen(command, start_new_session=True,
                               preexec_fn=_dies_with(os.getpid()))
    _children.add(process)
    stopped = []

    def forward(signum, frame):
        kill_group(process, signum)
        stopped.append(signal.Signals(signum).name)
        raise SystemExit(128 + signum)

    handle = threading.current_thread() is threading.main_thread()   # signals: main only
    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED_SIGNALS} \
        if handle else {}
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
            print(f"interrupted by {stopped[0]}: stopped {' '.join(command[1:4])}",
                  file=sys.stderr)
        kill_group(process)            # grandchildren too, whatever happened
        process.wait()
        _children.discard(process)
    if code:
        raise subprocess.CalledProcessError(code, command)


class Pipeline:
    """The five stages over one pipeline folder."""

    def __init__(self, args):
        self.args = args
        self.model_name = args.model_name or f"vae_{args.category}"
        self.root = os.path.abspath(args.pipeline_dir or
                                    os.path.join("runs", "pipeline", args.category))
        os.makedirs(self.root, exist_ok=True)
        self.manifest = lineage.Manifest(self.root)
        self.data = lineage.fingerprint_files(os.path.join(args.data_dir, args.category))
        self.forced = False

    def path(self, *parts):
        return os.path.join(self.root, *parts)

    def stage(self, name, config, inputs, action):
        # --from-stage forces that stage and every later one; otherwise a stage reruns
        # only when its config or the content of its inputs changed (cache key)
        self.forced = self.forced or self.args.from_stage == name
        record = lineage.run_stage(self.manifest, name, config, inputs, self.data, action,
                                   force=self.forced)
        verdict = "cached" if record["cached"] else record["status"]
        print(f"[{name}] {verdict}", file=sys.stderr)
        return record

    # --- train ------------------------------------------------------------------------
    def train(self):
        config = {"category": self.args.category, "holdout": self.args.holdout,
                  "seed": self.args.seed, "trainer_args": self.args.trainer_args}
        resume = self.interrupted("train", config) and not self.args.from_stage == "train"
        return self.stage("train", config, {}, lambda: self._train(resume))

    def interrupted(self, name, config):
        """Whether stage ``name`` last started with this same config and never finished
        (killed: "running", or stopped by a signal or an error: "failed")."""
        previous = self.manifest.record(name) or {}
        return (previous.get("status") in ("running", "failed")
                and previous.get("cache_key") == lineage.cache_key(config, {}, self.data))

    def _train(self, resume=False):
        """Run the trainer on the training view; with ``resume`` its run folder is kept,
        so the trainer picks up from its backup instead of epoch 0."""
        from keras_vae_attn.data import mvtec

        files = mvtec.train_files(self.args.data_dir, self.args.category)
        held = sorted(random.Random(self.args.seed).sample(
            files, max(1, int(round(self.args.holdout * len(files))))))
        view = self._training_view(set(held))
        run_dir = self.path("train")
        if resume and os.path.isdir(run_dir):
            print(f"train: resuming the interrupted training in {run_dir}", file=sys.stderr)
        else:
            shutil.rmtree(run_dir, ignore_errors=True)
        # the pipeline holds its own normal images out; the trainer need not hold out more
        own_holdout = [] if any(a.startswith("--calibration-holdout")
                                for a in self.args.trainer_args) else \
            ["--calibration-holdout", "0"]
        command = [sys.executable, "-m", "trainers.mvtec", "--category", self.args.category,
                   "--data-dir", view, "--run-dir", run_dir, "--seed", str(self.args.seed),
                   *own_holdout, *self.args.trainer_args]
        run_child(command)
        holdout = self.path("holdout.json")
        write_json(holdout, held)
        return "done", {"model": os.path.join(run_dir, "model"), "holdout": holdout,
                        "config": os.path.join(run_dir, "config.json"),
                        "metrics": os.path.join(run_dir, "metrics.json")}, \
            {"train_images": len(files) - len(held), "held_out": len(held)}

    def _training_view(self, held):
        """A data root that links to the real one, minus the held-out normal images."""
        from keras_vae_attn.data import mvtec

        source = os.path.join(os.path.abspath(self.args.data_dir), self.args.category)
        view = self.path("data")
        shutil.rmtree(view, ignore_errors=True)
        good = os.path.join(view, self.args.category, "train", mvtec.GOOD)
        os.makedirs(good)
        for name in os.listdir(source):
            if name != "train":
                os.symlink(os.path.join(source, name), os.path.join(view, self.args.category,
                                                                    name))
        for path in mvtec.train_files(self.args.data_dir, self.args.category):
            if path not in held:
                os.symlink(os.path.abspath(path), os.path.join(good, os.path.basename(path)))
        return view

    # --- evaluate ---------------------------------------------------------------------
    def evaluate(self, trained):
        config = {"validation_dir": self.args.validation_dir,
                  "pixel_percentile": self.args.pixel_percentile,
                  "image_percentile": self.args.image_percentile}
        return self.stage("evaluate", config, trained["outputs"],
                          lambda: self._evaluate(trained["outputs"]))

    def _evaluate(self, trained):
        """The trainer's test-set metrics, plus thresholds calibrated on held-out data."""
        out_dir = self.path("evaluate")
        os.makedirs(out_dir, exist_ok=True)
        with open(trained["config"], encoding="utf-8") as handle:
            train_config = json.load(handle)
        with open(trained["metrics"], encoding="utf-8") as handle:
            metrics = json.load(handle)
        with open(trained["holdout"], encoding="utf-8") as handle:
            held = json.load(handle)
        thresholds = calibrate_run(trained["model"], train_config, held, self.args)
        metrics_path = os.path.join(out_dir, "metrics.json")
        thresholds_path = os.path.join(out_dir, "thresholds.json")
        write_json(metrics_path, metrics)
        write_json(thresholds_path, thresholds.as_dict())
        return "done", {"metrics": metrics_path, "thresholds": thresholds_path}, \
            {"metrics": metrics["methods"][METHOD], "thresholds": thresholds.as_dict()}

    # --- validate ---------------------------------------------------------------------
    def validate(self, trained, evaluated):
        floors = {m: getattr(self.args, f"min_{m}") for m in GATED_METRICS}
        candidate = candidate_id(trained["outputs"]["model"], evaluated["outputs"]["thresholds"])
        baseline = served_baseline(self.args.serving_dir, self.model_name, candidate)
        config = {"floors": floors, "tolerance": self.args.tolerance, "candidate": candidate,
                  "served": baseline, "reference": self.args.reference}
        inputs = dict(evaluated["outputs"])
        if baseline:
            inputs["served_metrics"] = baseline
        return self.stage("validate", config, inputs,
                          lambda: self._validate(evaluated["outputs"], floors, baseline))

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
        blessing = {"blessed": not reasons, "reasons": reasons, "candidate": candidate,
                    "served": served, "served_metrics": served_path, "floors": floors,
                    "reference": name, "reference_metrics": reference and reference[1],
                    "tolerance": self.args.tolerance}
        path = self.path("blessing.json")
        write_json(path, blessing)
        return ("blessed" if not reasons else "not blessed"), {"blessing": path}, blessing

    # --- export -----------------------------------------------------------------------
    def export(self, trained, evaluated, validated):
        inputs = {"model": trained["outputs"]["model"],
                  "thresholds": evaluated["outputs"]["thresholds"],
                  "metrics": evaluated["outputs"]["metrics"]}
        candidate = validated["config"]["candidate"]     # the id validate judged
        return self.stage("export", {"model_name": self.model_name, "candidate": candidate},
                          inputs, lambda: self._export(inputs, candidate))

    def _export(self, inputs, candidate):
        out = self.path("export")
        shutil.rmtree(out, ignore_errors=True)
        os.makedirs(out)
        saved = os.path.join(out, "saved_model")
        onnx_path = os.path.join(out, "model.onnx")
        common = ["--run", self.path("train"), "--thresholds", inputs["thresholds"]]
        run_child([sys.executable, "-m", "export.saved_model", *common, "--out", saved,
                   "--model-name", self.model_name, "--version", "1"])
        run_child([sys.executable, "-m", "export.onnx", *common, "--out", onnx_path])
        version_dir = os.path.join(saved, self.model_name, "1")
        assets = os.path.join(version_dir, "assets")
        os.makedirs(assets, exist_ok=True)
        shutil.copy(inputs["metrics"], os.path.join(assets, "metrics.json"))
        shutil.copy(inputs["thresholds"], os.path.join(assets, "thresholds.json"))
        write_json(os.path.join(assets, LINEAGE),
                   {"candidate": candidate, "pipeline": self.root, "manifest": self.manifest.path})
        return "done", {"saved_model": version_dir, "onnx": onnx_path}, {}

    # --- push -------------------------------------------------------------------------
    def push(self, validated, exported):
        inputs = {"blessing": validated["outputs"]["blessing"],
                  "saved_model": exported["outputs"]["saved_model"]}
        return self.stage("push", {"serving_dir": os.path.abspath(self.args.serving_dir)},
                          inputs, lambda: self._push(validated, exported))

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
        return {"train": trained, "evaluate": evaluated, "validate": validated,
                "export": exported, "push": pushed}


def candidate_id(model_dir, thresholds_path):
    """What identifies a candidate: the trained weights plus the thresholds baked in."""
    digest = lineage.hash_path(model_dir) + lineage.hash_path(thresholds_path)
    return hashlib.sha256(digest.encode()).hexdigest()[:16]


def served_versions(serving_dir, model_name):
    """Version folders under ``<serving_dir>/<model_name>/``, oldest first."""
    folder = os.path.join(serving_dir, model_name)
    if not os.path.isdir(folder):
        return []
    return [os.path.join(folder, str(v))
            for v in sorted(int(n) for n in os.listdir(folder) if n.isdigit())]


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


def calibrate_run(model_dir, train_config, held_out, args):
    """Thresholds for a trained run: F1-optimal on ``args.validation_dir`` when given,
    else percentiles of the held-out normal images' scores."""
    from export import explain_options
    from keras_vae_attn import calibration, scoring
    from keras_vae_attn.data import mvtec
    from keras_vae_attn.models import load_vae

    model = load_vae(model_dir)
    size, channels = train_config["image_size"], train_config.get("channels", 3)
    options = explain_options(train_config)
    keys = ("heatmap", "score")
    if args.validation_dir:
        split = mvtec.load_test(args.validation_dir, args.category, size, channels)
        out = scoring.batched(model, mvtec.to_float(split.images), 16, options, keys=keys)
        return calibration.from_labelled(out["heatmap"], split.masks, out["score"],
                                         split.labels)
    images, _ = mvtec.decode_files(held_out, size, channels)
    return calibration.from_model(model, mvtec.to_float(images), options, 16,
                                  args.pixel_percentile, args.image_percentile)[0]


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
        reasons.append("nothing to judge it by: no floor (--min-pixel-auroc ...), no "
                       "--reference and no served model")
    return reasons


def worse_than(candidate, other, tolerance, label):
    """One reason per gated metric where ``candidate`` is below ``other`` by more than
    ``tolerance``."""
    reasons = []
    for metric in GATED_METRICS:
        new, old = candidate.get(metric), other.get(metric)
        if new is not None and old is not None and new < old - tolerance:
            reasons.append(f"{metric} {new:.4f} is worse than {label} {old:.4f} by more "
                           f"than {tolerance}")
    return reasons


def push_version(version_dir, serving_dir, model_name):
    """Copy a SavedModel to ``<serving_dir>/<model_name>/<next version>/`` atomically.

    The copy is made under a dot-name TF Serving ignores, then renamed into place; the
    rename either happens whole or not at all. Staging folders of killed pushes (their
    pid dead) are removed first. Returns the new version folder.
    """
    base = os.path.join(serving_dir, model_name)
    os.makedirs(base, exist_ok=True)
    remove_stale_staging(base)
    staging = os.path.join(base, f".incoming-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(version_dir, staging)
    while True:
        versions = [int(n) for n in os.listdir(base) if n.isdigit()]
        target = os.path.join(base, str(max(versions, default=0) + 1))
        try:
            os.rename(staging, target)       # fails if another push took this number
            return target
        except OSError:
            if not os.path.exists(target):
                raise


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
    check_model_name(parser, args)
    if args.reference == "none" and all(getattr(args, f"min_{m}") is None
                                        for m in GATED_METRICS):
        parser.error("--reference none needs a floor to judge the candidate by: "
                     "--min-pixel-auroc, --min-image-auroc or --min-aupro")
    from keras_vae_attn.console import start_tensorflow

    start_tensorflow()
    from keras_vae_attn.data import DataError

    try:
        results = Pipeline(args).run()
    except (DataError, subprocess.CalledProcessError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    print(json.dumps({name: r["status"] for name, r in results.items()}, indent=2))
    validated = results["validate"]
    if validated["status"] != "blessed":
        print("not blessed, nothing pushed: " + "; ".join(validated["details"]["reasons"]),
              file=sys.stderr)
        raise SystemExit(NOT_BLESSED)
    return results


if __name__ == "__main__":
    main()
