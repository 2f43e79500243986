"""What a command line prints while TensorFlow starts: its own lines, not TF's banners.

TensorFlow writes its start-up notices from C++ before its logging is set up, so
``TF_CPP_MIN_LOG_LEVEL`` cannot hide them: "All log messages before absl::InitializeLog()",
the oneDNN and CUDA-driver notices (twice, once per shared library), and, on a machine
without a GPU, a ``failed call to cuInit`` error. :func:`start_tensorflow` imports
TensorFlow and initializes its devices with the process's stderr captured, then replays
every captured line except those notices. Nothing else changes: oneDNN stays on (it
affects numerics) and ``CUDA_VISIBLE_DEVICES`` is left alone.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile

#: The start-up notices dropped; any other captured line is printed as it came.
BANNERS = re.compile(
    r"All log messages before absl::InitializeLog\(\) is called"
    r"|oneDNN custom operations are on"
    r"|cudart_stub\.cc.*Could not find cuda drivers"
    r"|failed call to cuInit"
    r"|Unable to register cu(DNN|FFT|BLAS) factory"
    r"|computation placer already registered"
    r"|This TensorFlow binary is optimized to use available CPU instructions"
    r"|To enable the following instructions: .* rebuild TensorFlow"
)


def start_tensorflow():
    """Import TensorFlow and list its devices without its start-up banners on stderr.

    Call it once a command line's flags are parsed (``--help`` must not pay the 4 s
    import). C++ warnings stay hidden unless ``TF_CPP_MIN_LOG_LEVEL`` is set otherwise;
    absl's Python logger is kept to errors. Returns the ``tensorflow`` module.
    """
    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"]
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            import tensorflow as tf

            tf.config.list_physical_devices()  # CUDA's init (and its cuInit line)
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            text = capture.read().decode("utf-8", "replace")
            kept = [
                line for line in text.splitlines(keepends=True) if not BANNERS.search(line)
            ]
            sys.stderr.write("".join(kept))
            sys.stderr.flush()
    return tf


def decision_lines(entry, what="images"):
    """What a run decided, for the end of its console output: at the calibrated image
    threshold, how many test ``what`` were flagged anomalous and how many of those are,
    with a warning when nothing was flagged (AUROCs alone cannot show a threshold that
    flags nothing). ``entry``: the "predictions" entry of metrics.json
    (keras_vae_attn/predictions.write)."""
    counts = entry["at_threshold"]
    flagged = counts["true_positive"] + counts["false_positive"]
    anomalous = counts["true_positive"] + counts["false_negative"]
    total = anomalous + counts["false_positive"] + counts["true_negative"]
    threshold = entry["thresholds"]["image"]
    lines = [
        f"decisions at the calibrated thresholds (image {threshold:.4g}, pixel "
        f"{entry['thresholds']['pixel']:.4g}; predictions.csv): {flagged} of {total} "
        f"test {what} flagged anomalous, {counts['true_positive']} of them anomalous "
        f"({counts['true_positive']} of the {anomalous} anomalous {what} caught, "
        f"{counts['false_positive']} false alarm"
        f"{'' if counts['false_positive'] == 1 else 's'})"
    ]
    if flagged == 0:
        lines.append(
            f"warning: no test {what} scored above the image threshold "
            f"{threshold:.4g}: every decision is 'normal' (a model trained too "
            "briefly, or calibration images unlike the test ones)"
        )
    return lines


def auroc_text(name, auc):
    """``name auc`` for a console line; below 0.5 marked as the ROC figures mark it
    (keras_vae_attn.viz.roc_label): the score is inverted, 1 - AUROC separates."""
    if auc is None:
        return f"{name} n/a"
    if auc < 0.5:
        return f"{name} {auc:.3f} (inverted: 1-AUROC = {1 - auc:.3f})"
    return f"{name} {auc:.3f}"
