"""Pipeline lineage: manifest records, cache hits, invalidation and failures."""

import json

import pytest

from export.metadata import fingerprint_files
from pipeline import lineage

from conftest import MANIFEST_RECORD_FIELDS


def make_stage(tmp_path, calls):
    def action():
        calls.append(1)
        out = tmp_path / "artifact.txt"
        out.write_text((tmp_path / "input.txt").read_text().upper())
        return "done", {"artifact": str(out)}, {"length": len(out.read_text())}

    return action


def test_second_run_reuses_the_cached_stage_and_changes_invalidate_it(tmp_path):
    (tmp_path / "input.txt").write_text("abc")
    manifest = lineage.Manifest(str(tmp_path))
    calls = []
    inputs = {"input": str(tmp_path / "input.txt")}
    data = {"sha256": "x", "files": 1}
    first = lineage.run_stage(
        manifest, "upper", {"k": 1}, inputs, data, make_stage(tmp_path, calls)
    )
    assert first["status"] == "done" and not first["cached"] and calls == [1]
    record = json.loads((tmp_path / "manifest.json").read_text())["stages"]["upper"]
    for field in MANIFEST_RECORD_FIELDS:
        assert field in record, field
    assert record["versions"]["tensorflow"]

    reloaded = lineage.Manifest(str(tmp_path))
    again = lineage.run_stage(
        reloaded, "upper", {"k": 1}, inputs, data, make_stage(tmp_path, calls)
    )
    assert again["cached"] and calls == [1]
    lineage.run_stage(reloaded, "upper", {"k": 2}, inputs, data, make_stage(tmp_path, calls))
    assert calls == [1, 1]  # config changed
    (tmp_path / "input.txt").write_text("abcd")
    lineage.run_stage(reloaded, "upper", {"k": 2}, inputs, data, make_stage(tmp_path, calls))
    assert calls == [1, 1, 1]  # input changed
    (tmp_path / "artifact.txt").write_text("tampered")
    lineage.run_stage(reloaded, "upper", {"k": 2}, inputs, data, make_stage(tmp_path, calls))
    assert calls == [1, 1, 1, 1]  # output changed on disk
    lineage.run_stage(
        reloaded, "upper", {"k": 2}, inputs, data, make_stage(tmp_path, calls), force=True
    )
    assert len(calls) == 5


def test_a_failing_stage_is_recorded_and_rerun(tmp_path):
    manifest = lineage.Manifest(str(tmp_path))

    def broken():
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        lineage.run_stage(manifest, "s", {}, {}, {}, broken)
    record = lineage.Manifest(str(tmp_path)).record("s")
    assert record["status"] == "failed" and "disk full" in record["error"]


def test_fingerprint_changes_with_the_file_list(tmp_path):
    (tmp_path / "a.png").write_bytes(b"12")
    before = fingerprint_files(str(tmp_path))
    (tmp_path / "b.png").write_bytes(b"3")
    after = fingerprint_files(str(tmp_path))
    assert before["files"] == 1 and after["files"] == 2 and before["sha256"] != after["sha256"]
