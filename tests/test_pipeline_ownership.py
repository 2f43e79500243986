"""The pipeline owns only what it creates: a folder holding someone else's files, a data
folder inside (or around) the pipeline folder, a name that leaves its folder, a number
that cannot be judged, a manifest or data link it cannot read: each is one line and
exit 2, before anything is written or deleted. (Refusals happen before the first stage,
so these tests train nothing.)"""

import json
import os

import pytest

from export.metadata import FingerprintError, fingerprint_files
from pipeline import cli, folder, lineage


def write_demo(root):
    """A small generated category "demo" (32 px) under ``root``."""
    from keras_vae_attn.data.synthetic import write_mvtec_category

    write_mvtec_category(str(root), "demo", size=32, n_train=6, n_test_good=2)
    return root


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return write_demo(tmp_path_factory.mktemp("mvtec"))


def folders(data, serving, pipe=None, category="demo"):
    """The pipeline's category and folder flags (--pipeline-dir left to its default
    where ``pipe`` is None)."""
    argv = ["--category", category, "--data-dir", str(data), "--serving-dir", str(serving)]
    return argv + ([] if pipe is None else ["--pipeline-dir", str(pipe)])


def snapshot(folder):
    """{relative path: content hash} of every file under ``folder``."""
    return {
        os.path.relpath(os.path.join(d, n), folder): lineage.hash_path(os.path.join(d, n))
        for d, _, names in os.walk(folder)
        for n in names
    }


def refused(capsys, *argv):
    """Run the pipeline's main; assert exit 2 and return its one stderr line."""
    with pytest.raises(SystemExit) as stop:
        cli.main(list(argv) + ["--", "--epochs", "1", "--steps-per-epoch", "1"])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and "Traceback" not in "\n".join(err)
    return err[-1]


def test_data_inside_the_pipeline_dir_is_refused_and_kept(tmp_path, capsys):
    """Case 1: `--data-dir <dir>/data --pipeline-dir <dir>` deleted the dataset (the
    training view was rebuilt at <dir>/data by rmtree)."""
    write_demo(tmp_path / "data")
    before = snapshot(tmp_path)
    line = refused(capsys, *folders(tmp_path / "data", tmp_path / "serving", tmp_path))
    assert line == (
        f"error: --pipeline-dir {str(tmp_path)!r} and the data folder "
        f"{str(tmp_path / 'data' / 'demo')!r} overlap (one holds the other); "
        "choose a --pipeline-dir outside the data"
    )
    assert snapshot(tmp_path) == before


def test_a_pipeline_dir_inside_the_data_is_refused(data_root, tmp_path, capsys):
    inside = data_root / "demo" / "pipe"
    line = refused(capsys, *folders(data_root, tmp_path / "serving", inside))
    assert "overlap" in line and not inside.exists()


def test_a_serving_dir_inside_the_pipeline_dir_is_refused(data_root, tmp_path, capsys):
    pipe = tmp_path / "pipe"
    line = refused(capsys, *folders(data_root, pipe / "serving", pipe))
    assert line == (
        f"error: --serving-dir {str(pipe / 'serving')!r} lies inside "
        f"--pipeline-dir {str(pipe)!r}, which holds only the pipeline's own "
        "entries; choose a serving folder outside it"
    )
    assert not pipe.exists()


def test_a_folder_holding_the_users_files_is_refused_untouched(data_root, tmp_path, capsys):
    """The user's own train/, export/ and data/ were deleted without a word."""
    pipe = tmp_path / "mine"
    for name in ("train/notes.txt", "export/model.onnx", "data/keep.png"):
        (pipe / name).parent.mkdir(parents=True, exist_ok=True)
        (pipe / name).write_text(name)
    before = snapshot(pipe)
    line = refused(capsys, *folders(data_root, tmp_path / "serving", pipe))
    assert line.startswith(
        f"error: --pipeline-dir {str(pipe)!r} holds files the pipeline "
        "did not write (data, export, train); choose a new or empty "
        "folder"
    )
    assert snapshot(pipe) == before and sorted(os.listdir(pipe)) == ["data", "export", "train"]
    assert not (tmp_path / "serving").exists()


def test_the_marker_names_what_the_pipeline_may_rewrite(tmp_path):
    pipe = tmp_path / "pipe"
    folder.claim_folder(str(pipe))  # new folder: marked
    marker = json.loads((pipe / folder.MARKER).read_text())
    assert marker["owns"] == list(folder.OWNED)
    (pipe / "train").mkdir()
    (pipe / "holdout.json.partial-12").write_text("[]")  # a write being renamed
    folder.claim_folder(str(pipe))  # its own entries: taken again
    (pipe / "notes.txt").write_text("mine")
    with pytest.raises(
        folder.PipelineError,
        match=r"holds files the pipeline did not "
        r"write \(notes.txt\)",
    ):
        folder.claim_folder(str(pipe))

    earlier = tmp_path / "earlier"  # made before the marker
    (earlier / "train").mkdir(parents=True)
    (earlier / "manifest.json").write_text(json.dumps({"stages": {}}))
    folder.claim_folder(str(earlier))
    assert (earlier / folder.MARKER).exists()

    empty = tmp_path / "empty"
    empty.mkdir()
    folder.claim_folder(str(empty))
    assert sorted(os.listdir(empty)) == [folder.MARKER]
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(folder.PipelineError, match="exists and is not a folder"):
        folder.claim_folder(str(a_file))


def test_only_its_own_entries_are_ever_removed(tmp_path):
    (tmp_path / "notes").write_text("mine")
    with pytest.raises(ValueError, match="only its own entries"):
        folder.remove_entry(str(tmp_path / "pipe"), "..")
    with pytest.raises(ValueError, match="only its own entries"):
        folder.remove_entry(str(tmp_path), "notes")
    assert (tmp_path / "notes").read_text() == "mine"


@pytest.mark.parametrize("category", ["../../../escaped", "a/b", "..", ".hidden"])
def test_a_category_that_leaves_the_folder_is_refused_before_anything_is_written(
    data_root, tmp_path, capsys, monkeypatch, category
):
    """Case 11: `--category ../../../tmp/x` wrote manifest.json outside its folder."""
    work = tmp_path / "a" / "b" / "c"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)  # the default runs/pipeline/<category>
    line = refused(
        capsys,
        *folders(data_root, tmp_path / "serving", category=category),
        "--model-name",
        "m",
    )
    assert line == (
        f"error: --category {category!r} must be a plain folder name (no path "
        "separator, not starting with '.')"
    )
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


BAD_NUMBERS = {
    "--min-pixel-auroc nan": "argument --min-pixel-auroc: must be a finite number in [0, 1]",
    "--min-image-auroc inf": "argument --min-image-auroc: must be a finite number in [0, 1]",
    "--min-aupro 1.5": "argument --min-aupro: must be a finite number in [0, 1], got 1.5",
    "--tolerance nan": "argument --tolerance: must be a finite number >= 0, got nan",
    "--tolerance -0.1": "argument --tolerance: must be a finite number >= 0",
    "--pixel-percentile 150": "argument --pixel-percentile: must be a finite number in "
    "[0, 100], got 150",
    "--image-percentile nan": "argument --image-percentile: must be a finite number",
    "--holdout 1.5": "argument --holdout: must be a finite number in (0, 1), got 1.5",
    "--holdout nan": "argument --holdout: must be a finite number in (0, 1), got nan",
    "--holdout 0": "argument --holdout: must be a finite number in (0, 1), got 0",
    "--holdout ten": "argument --holdout: must be a number, got 'ten'",
    "--seed -1": "argument --seed: must be an integer >= 0, got -1",
}


@pytest.mark.parametrize("flag", sorted(BAD_NUMBERS))
def test_numbers_are_checked_where_they_enter(data_root, tmp_path, capsys, flag):
    """Case 8: a NaN floor or tolerance blessed and pushed an unjudged model."""
    with pytest.raises(SystemExit) as stop:
        cli.main([*folders(data_root, tmp_path / "serving", tmp_path / "pipe"), *flag.split()])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and BAD_NUMBERS[flag] in err[0], err  # no 16-line usage
    assert err[0].endswith(" (see --help)")
    assert not os.listdir(tmp_path)


def test_a_garbage_manifest_is_one_line(data_root, tmp_path, capsys):
    pipe = tmp_path / "pipe"
    folder.claim_folder(str(pipe))
    for garbage in ("not json {", "[1, 2]", json.dumps({"stages": {"train": 3}})):
        (pipe / "manifest.json").write_text(garbage)
        line = refused(capsys, *folders(data_root, tmp_path / "serving", pipe))
        assert line.startswith(f"error: {pipe / 'manifest.json'} is not a pipeline manifest")
        assert line.endswith("move it away, or choose another --pipeline-dir")
        assert (pipe / "manifest.json").read_text() == garbage


@pytest.mark.parametrize("kind", ["dangling", "loop"])
def test_a_bad_link_in_the_data_is_one_line(tmp_path, capsys, kind):
    write_demo(tmp_path / "data")
    good = tmp_path / "data" / "demo" / "train" / "good"
    if kind == "dangling":
        os.symlink(tmp_path / "gone.png", good / "bad.png")
    else:
        os.symlink(good / "bad2.png", good / "bad.png")
        os.symlink(good / "bad.png", good / "bad2.png")
    with pytest.raises(FingerprintError, match="is a dangling or looping link"):
        fingerprint_files(str(tmp_path / "data" / "demo"))
    line = refused(
        capsys, *folders(tmp_path / "data", tmp_path / "serving", tmp_path / "pipe")
    )
    assert line.startswith(
        f"error: data file {str(good / 'bad.png')!r} is a dangling or looping link: "
    )
    assert not (tmp_path / "pipe").exists()
