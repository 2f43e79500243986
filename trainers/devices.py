"""Where and how training runs: the dtype policy (--precision), XLA (--jit-compile), the
tf.distribute strategy (--strategy, --cpu-replicas) and this process's place in a
TF_CONFIG cluster. TensorFlow is imported on first use."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Iterator
from typing import Any

PRECISIONS = ("float32", "mixed_bfloat16")


def jit_compile(args: argparse.Namespace) -> bool | str:
    """The ``jit_compile`` value for ``model.compile``: the flag, or Keras' "auto"."""
    return "auto" if args.jit_compile is None else args.jit_compile


def native_bfloat16() -> bool:
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


def resolve_precision(args: argparse.Namespace, announce: bool = True) -> str:
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
def precision_scope(precision: str) -> Iterator[None]:
    """Layers built inside take the ``precision`` dtype policy; the global policy is
    restored on exit, so models built later (loaded ones, exports) stay float32."""
    import keras

    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(precision)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


def setup_devices(args: argparse.Namespace) -> None:
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


def make_strategy(args: argparse.Namespace) -> Any:
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


def worker_index() -> int:
    """0 for the process that owns the run folder (the chief, or the only process);
    1, 2, ... for the other workers of a TF_CONFIG cluster."""
    config = json.loads(os.environ.get("TF_CONFIG", "{}"))
    task = config.get("task", {})
    if not task or task.get("type") == "chief":
        return 0
    index = int(task.get("index", 0))
    return index + 1 if "chief" in config.get("cluster", {}) else index
