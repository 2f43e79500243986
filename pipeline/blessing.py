"""The verdict on a candidate: blessed (pushed) or not, and why.

A candidate is blessed only when its anomaly-attention metrics pass the given floors
and are no worse, by more than a tolerance, than a reference map of the same run and
than the served model's; with nothing to judge it by it is never blessed.
"""

from __future__ import annotations

import hashlib

from pipeline import lineage

#: The row of metrics.json that is the candidate (the map the exported graph serves).
METHOD = "anomaly_attention"
#: Rows of the run's metrics.json a candidate may be compared with (--reference).
REFERENCES = (
    "recon_error",
    "feature_deviation",
    "mean_image_difference",
    "pixel_deviation",
    "none",
)
GATED_METRICS = ("pixel_auroc", "image_auroc", "aupro")

Metrics = dict[str, float]


def candidate_id(model_dir: str, thresholds_path: str) -> str:
    """What identifies a candidate: the trained weights plus the thresholds baked in."""
    digest = lineage.hash_path(model_dir) + lineage.hash_path(thresholds_path)
    return hashlib.sha256(digest.encode()).hexdigest()[:16]


def blessing_reasons(
    candidate: Metrics,
    floors: dict[str, float | None],
    served: Metrics | None,
    tolerance: float,
    reference: tuple[str, Metrics | None] | None = None,
) -> list[str]:
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


def worse_than(candidate: Metrics, other: Metrics, tolerance: float, label: str) -> list[str]:
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
