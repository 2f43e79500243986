"""Do two versions of the code export the same run folders to the same graphs?

A refactor of the explain path must leave every served map as it was. This script
trains small run folders through the trainers' CLI (one per attribution variant), exports
each with ``python -m export.saved_model`` and ``python -m export.onnx``, runs the
exported graphs on fixed real images and stores every output. Run it once with the old
code and once with the new, then compare:

    python -m bench.export_parity runs  --data-dir ../shared/data --out /tmp/parity/runs
    python -m bench.export_parity snap  --runs /tmp/parity/runs --out /tmp/parity/before.npz
    (change the code)
    python -m bench.export_parity snap  --runs /tmp/parity/runs --out /tmp/parity/after.npz
    python -m bench.export_parity compare /tmp/parity/before.npz /tmp/parity/after.npz

It talks to the code only through the CLIs and the exported graphs, so the same script
snapshots either version.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

import numpy as np

# name -> trainer flags beyond the shared small-run flags (bottle at 64 px, 2 steps)
VARIANTS = {
    "default": [],
    "paper": ["--attribution", "paper"],
    "whitened": ["--attribution", "whitened-deviation"],
    "gradcam-layer2": ["--form", "gradcam", "--layer", "layer2", "--gradient-relu"],
    "integrated": ["--form", "integrated", "--ig-steps", "4"],
    "gated-norm": ["--form", "gradient-norm", "--gate", "recon", "--layer", "conv1,layer1"],
    "small-hirescam": ["--backbone", "small", "--form", "hirescam", "--layer", "conv2"],
    "feature-residual": ["--form", "feature-residual", "--smooth", "2"],
}
SMALL_RUN = (
    "--category bottle --image-size 64 --latent-dim 8 --epochs 1 --steps-per-epoch 2 "
    "--batch-size 8 --max-train 16 --max-test 6 --no-sanity --quiet --seed 3"
).split()
SAVED_OUTPUTS = ("heatmap", "per_latent", "score", "recon_error", "mu")
ONNX_OUTPUTS = ("heatmap", "score")


def make_runs(data_dir, out):
    for name, flags in VARIANTS.items():
        run_dir = os.path.join(out, name)
        if os.path.exists(os.path.join(run_dir, "metrics.json")):
            continue
        command = [sys.executable, "-m", "trainers.mvtec", "--data-dir"]
        command += [os.path.join(data_dir, "mvtec_ad"), "--run-dir", run_dir]
        print(name, flush=True)
        subprocess.run(command + SMALL_RUN + flags, check=True)


def fixed_images(data_dir, count=4, size=64, seed=0):
    """Real bottle test images (the same files in both versions) plus noise, in [0, 1]."""
    from PIL import Image

    folder = os.path.join(data_dir, "mvtec_ad", "bottle", "test", "broken_large")
    files = sorted(os.listdir(folder))[:count]
    images = [
        np.asarray(Image.open(os.path.join(folder, f)).convert("RGB").resize((size, size)))
        for f in files
    ]
    images = np.stack(images).astype(np.float32) / 255.0
    noise = np.random.default_rng(seed).uniform(0, 1, images[:1].shape).astype(np.float32)
    return np.concatenate([images, noise])


def snapshot(runs, data_dir, out):
    import onnxruntime as ort
    import tensorflow as tf

    images = fixed_images(data_dir)
    arrays = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in sorted(os.listdir(runs)):
            run_dir = os.path.join(runs, name)
            served, onnx_path = os.path.join(tmp, name), os.path.join(tmp, name + ".onnx")
            python = [sys.executable, "-m"]
            subprocess.run(
                python + ["export.saved_model", "--run", run_dir, "--out", served],
                check=True,
            )
            subprocess.run(
                # --no-verify: both versions' graphs are compared with each other instead
                python + ["export.onnx", "--run", run_dir, "--out", onnx_path, "--no-verify"],
                check=True,
            )
            version = os.path.join(served, os.listdir(served)[0], "1")
            signature = tf.saved_model.load(version).signatures["explain_latents"]
            got = signature(images=tf.constant(images))
            for key in SAVED_OUTPUTS:
                arrays[f"{name}/saved/{key}"] = got[key].numpy()
            session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
            names = [o.name for o in session.get_outputs()]
            for key, value in zip(names, session.run(None, {"images": images})):
                if key in ONNX_OUTPUTS:
                    arrays[f"{name}/onnx/{key}"] = value
    np.savez(out, **arrays)
    print(f"{len(arrays)} arrays -> {out}")


def compare(before, after):
    """Max relative difference per array (|a - b| / max |a|); 0 exit status if all <= 1e-6."""
    a, b = np.load(before), np.load(after)
    missing = sorted(set(a.files) ^ set(b.files))
    worst = 0.0
    for key in sorted(set(a.files) & set(b.files)):
        scale = max(float(np.max(np.abs(a[key]))), 1e-12)
        diff = float(np.max(np.abs(a[key] - b[key]))) / scale if a[key].size else 0.0
        worst = max(worst, diff)
        print(f"{key:40s} {str(a[key].shape):22s} max rel diff {diff:.2e}")
    if missing:
        print("only in one file:", ", ".join(missing))
    print(f"worst {worst:.2e} over {len(set(a.files) & set(b.files))} arrays")
    return 0 if worst <= 1e-6 and not missing else 1


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    runs = sub.add_parser("runs", help="train the small run folders")
    runs.add_argument("--data-dir", default="../shared/data")
    runs.add_argument("--out", required=True)
    snap = sub.add_parser("snap", help="export every run folder and store the outputs")
    snap.add_argument("--runs", required=True)
    snap.add_argument("--data-dir", default="../shared/data")
    snap.add_argument("--out", required=True)
    cmp = sub.add_parser("compare", help="max relative difference of two snapshots")
    cmp.add_argument("before")
    cmp.add_argument("after")
    args = parser.parse_args(argv)
    if args.command == "runs":
        make_runs(args.data_dir, args.out)
    elif args.command == "snap":
        snapshot(args.runs, args.data_dir, args.out)
    else:
        return compare(args.before, args.after)
    return 0


if __name__ == "__main__":
    sys.exit(main())
