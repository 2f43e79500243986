"""The five stages over one pipeline folder: train, evaluate, validate, export, push.

Each stage writes its artifact into the pipeline folder and a record into
``manifest.json`` (:mod:`pipeline.lineage`); a stage reruns only when its config or the
content of its inputs changed, or when ``--from-stage`` names it or an earlier one.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Callable
from typing import Any

from export.metadata import fingerprint_files
from keras_vae_attn.runs import write_json
from pipeline import blessing, data, evaluation, folder, lineage, serving
from pipeline.processes import run_child, run_module
from trainers.api import TrainRequest, train

STAGES = ("train", "evaluate", "validate", "export", "push")

Record = dict[str, Any]


class Pipeline:
    """The stages of one run of the pipeline; ``args`` are its parsed flags
    (:func:`pipeline.cli.build_parser`)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.model_name = args.model_name or f"vae_{args.category}"
        self.root = os.path.abspath(args.pipeline_dir or folder.default_folder(args.category))
        category = os.path.join(args.data_dir, args.category)
        if not os.path.isdir(category):
            raise folder.PipelineError(
                f"--data-dir {args.data_dir!r} holds no category folder {args.category!r}"
            )
        folder.check_apart(self.root, category)
        folder.check_serving_outside(self.root, args.serving_dir)
        self.data = fingerprint_files(category)
        folder.claim_folder(self.root)
        self.manifest = lineage.Manifest(self.root)
        self.forced = False
        self.current = None  # the stage running now (named when interrupted)

    def path(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

    def stage(
        self,
        name: str,
        config: Any,
        inputs: dict[str, str],
        action: Callable[[], lineage.StageResult],
    ) -> Record:
        """Run stage ``name`` through the manifest (cached unless forced) and print its
        verdict line, ``[name] done`` / ``cached`` / ..."""
        self.current = name
        self.forced = self.forced or self.args.from_stage == name
        record = lineage.run_stage(
            self.manifest, name, config, inputs, self.data, action, force=self.forced
        )
        verdict = "cached" if record["cached"] else record["status"]
        print(f"[{name}] {verdict}", file=sys.stderr)
        return record

    def run(self) -> dict[str, Record]:
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

    # --- train ------------------------------------------------------------------------
    def train(self) -> Record:
        config = {
            "category": self.args.category,
            "holdout": self.args.holdout,
            "seed": self.args.seed,
            "trainer_args": self.args.trainer_args,
        }
        resume = self.interrupted("train", config) and not self.args.from_stage == "train"
        return self.stage("train", config, {}, lambda: self._train(resume))

    def interrupted(self, name: str, config: Any) -> bool:
        """Whether stage ``name`` last started with this same config and never finished
        (killed: "running", or stopped by a signal or an error: "failed")."""
        previous = self.manifest.record(name) or {}
        return previous.get("status") in ("running", "failed") and previous.get(
            "cache_key"
        ) == lineage.cache_key(config, {}, self.data)

    def _train(self, resume: bool = False) -> lineage.StageResult:
        """Run the trainer on the training view; with ``resume`` its run folder is kept,
        so the trainer picks up from its backup instead of epoch 0."""
        from keras_vae_attn.data import mvtec

        files = mvtec.train_files(self.args.data_dir, self.args.category)
        trained_on, held = data.hold_out(files, self.args.holdout)
        view = data.training_view(self.root, self.args.data_dir, self.args.category, held)
        run_dir = self.path("train")
        if resume and os.path.isdir(run_dir):
            print(f"train: resuming the interrupted training in {run_dir}", file=sys.stderr)
        else:
            folder.remove_entry(self.root, "train")
        request = TrainRequest(
            category=self.args.category,
            data_dir=view,
            run_dir=run_dir,
            seed=self.args.seed,
            calibration_holdout=0.0,  # the pipeline holds its own normal images out
            extra_args=tuple(self.args.trainer_args),
        )
        train(request, runner=run_child)
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
            {"train_images": len(trained_on), "held_out": len(held)},
        )

    # --- evaluate ---------------------------------------------------------------------
    def evaluate(self, trained: Record) -> Record:
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

    def _evaluate(self, trained: dict[str, str]) -> lineage.StageResult:
        """The trainer's test-set metrics, thresholds calibrated on held-out data, and
        predictions.csv: the test-set decisions at those thresholds, the ones the
        exported model makes (the train run's own predictions.csv and thresholds.json,
        calibrated on its training images, are replaced by these)."""
        from keras_vae_attn.runs import PREDICTIONS, THRESHOLDS, RunFolder

        out_dir = self.path("evaluate")
        os.makedirs(out_dir, exist_ok=True)
        run = RunFolder(os.path.dirname(trained["config"]))
        train_config = run.config().as_dict()
        metrics = run.metrics()
        held = read_json(trained["holdout"])
        model = run.load_model()
        options = run.options()
        thresholds, source = evaluation.calibrate_run(
            model,
            options,
            train_config,
            held,
            self.args.category,
            self.args.validation_dir,
            self.args.pixel_percentile,
            self.args.image_percentile,
        )
        metrics["predictions"] = evaluation.served_predictions(
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
        for name in (PREDICTIONS, THRESHOLDS):  # one set of decisions in the folder
            shutil.copyfile(os.path.join(out_dir, name), run.file(name))
        return (
            "done",
            {
                "metrics": metrics_path,
                "thresholds": thresholds_path,
                "predictions": os.path.join(out_dir, PREDICTIONS),
            },
            {
                "metrics": metrics["methods"][blessing.METHOD],
                "thresholds": thresholds.as_dict(),
                "at_threshold": metrics["predictions"]["at_threshold"],
            },
        )

    # --- validate ---------------------------------------------------------------------
    def validate(self, trained: Record, evaluated: Record) -> Record:
        floors = {m: getattr(self.args, f"min_{m}") for m in blessing.GATED_METRICS}
        candidate = blessing.candidate_id(
            trained["outputs"]["model"], evaluated["outputs"]["thresholds"]
        )
        baseline = serving.served_baseline(self.args.serving_dir, self.model_name, candidate)
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

    def _validate(
        self, evaluated: dict[str, str], floors: dict[str, float | None], served_path: str
    ) -> lineage.StageResult:
        methods = read_json(evaluated["metrics"])["methods"]
        candidate = methods[blessing.METHOD]
        served = read_json(served_path)["methods"][blessing.METHOD] if served_path else None
        name = self.args.reference
        reference = None if name == "none" else (name, methods.get(name))
        reasons = blessing.blessing_reasons(
            candidate, floors, served, self.args.tolerance, reference
        )
        verdict = {
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
        write_json(path, verdict)
        return ("blessed" if not reasons else "not blessed"), {"blessing": path}, verdict

    # --- export -----------------------------------------------------------------------
    def export(self, trained: Record, evaluated: Record, validated: Record) -> Record:
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

    def _export(self, inputs: dict[str, str], candidate: str) -> lineage.StageResult:
        """Both exporters' command lines (each a child, stopped with the pipeline), and
        the candidate's metrics, thresholds and lineage in the SavedModel's assets."""
        out = self.path("export")
        folder.remove_entry(self.root, "export")
        os.makedirs(out)
        saved = os.path.join(out, "saved_model")
        onnx_path = os.path.join(out, "model.onnx")
        common = ("--run", self.path("train"), "--thresholds", inputs["thresholds"])
        run_module(
            "export.saved_model",
            *common,
            *("--out", saved, "--model-name", self.model_name, "--version", "1"),
        )
        verify = () if self.args.verify else ("--no-verify",)
        run_module("export.onnx", *common, "--out", onnx_path, *verify)
        version_dir = os.path.join(saved, self.model_name, "1")
        assets = os.path.join(version_dir, "assets")
        os.makedirs(assets, exist_ok=True)
        shutil.copy(inputs["metrics"], os.path.join(assets, "metrics.json"))
        shutil.copy(inputs["thresholds"], os.path.join(assets, "thresholds.json"))
        write_json(
            os.path.join(assets, serving.LINEAGE),
            {"candidate": candidate, "pipeline": self.root, "manifest": self.manifest.path},
        )
        return "done", {"saved_model": version_dir, "onnx": onnx_path}, {}

    # --- push -------------------------------------------------------------------------
    def push(self, validated: Record, exported: Record) -> Record:
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

    def _push(self, validated: Record, exported: Record) -> lineage.StageResult:
        if validated["status"] != "blessed":
            return "skipped (not blessed)", {}, {"reasons": validated["details"]["reasons"]}
        source = exported["outputs"]["saved_model"]
        newest = serving.served_versions(self.args.serving_dir, self.model_name)[-1:]
        if newest and serving.read_candidate(newest[0]) == serving.read_candidate(source):
            print(f"{newest[0]} already serves this model; nothing pushed", file=sys.stderr)
            return "already served", {}, {"version_dir": newest[0]}
        target = serving.push_version(source, self.args.serving_dir, self.model_name)
        print(f"pushed {target}", file=sys.stderr)
        return "pushed", {}, {"version_dir": target}


def read_json(path: str) -> Any:
    """The JSON value in ``path`` (a file the pipeline or its trainer wrote)."""
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)
