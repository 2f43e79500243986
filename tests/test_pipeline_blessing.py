"""The pipeline's verdict: a candidate is judged against a reference of its own run (or
an explicit floor), never blessed unjudged, and an unblessed one fails the command."""

import pytest

from pipeline import blessing, cli

NO_FLOORS = {metric: None for metric in blessing.GATED_METRICS}
#: The reported case: a 0.467 pixel-AUROC anomaly attention, no floor, nothing served.
WEAK = {"pixel_auroc": 0.467, "image_auroc": 0.71, "aupro": 0.20}
RECON = {"pixel_auroc": 0.89, "image_auroc": 0.70, "aupro": 0.61}


def test_a_weak_candidate_loses_to_the_reconstruction_difference_of_its_run():
    reasons = blessing.blessing_reasons(WEAK, NO_FLOORS, None, 0.01, ("recon_error", RECON))
    assert reasons == [
        "pixel_auroc 0.4670 is worse than this run's recon_error 0.8900 by more than 0.01",
        "aupro 0.2000 is worse than this run's recon_error 0.6100 by more than 0.01",
    ]


def test_a_candidate_as_good_as_its_reference_within_tolerance_is_blessed():
    close = {metric: value - 0.005 for metric, value in RECON.items()}
    assert (
        blessing.blessing_reasons(close, NO_FLOORS, None, 0.01, ("recon_error", RECON)) == []
    )


def test_a_missing_reference_row_is_a_reason_not_a_pass():
    reasons = blessing.blessing_reasons(RECON, NO_FLOORS, None, 0.01, ("recon_error", None))
    assert reasons == ["the run's metrics.json holds no 'recon_error' row to compare with"]


def test_nothing_to_judge_by_is_never_blessed():
    (reason,) = blessing.blessing_reasons(RECON, NO_FLOORS, None, 0.01, None)
    assert reason.startswith("nothing to judge it by")
    floors = dict(NO_FLOORS, pixel_auroc=0.85)
    assert blessing.blessing_reasons(RECON, floors, None, 0.01, None) == []
    assert blessing.blessing_reasons(WEAK, floors, None, 0.01, None) == [
        "pixel_auroc 0.467 is below the required 0.85"
    ]


def test_reference_none_without_a_floor_is_refused_before_any_stage(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(
            [
                "--category",
                "demo",
                "--data-dir",
                str(tmp_path),
                "--serving-dir",
                str(tmp_path / "serving"),
                "--pipeline-dir",
                str(tmp_path / "pipe"),
                "--reference",
                "none",
            ]
        )
    assert stop.value.code == 2
    assert "--reference none needs a floor" in capsys.readouterr().err
    assert not (tmp_path / "pipe").exists()
