"""dSprites without a TFDS copy: the images are regenerated without a word from TFDS."""

import subprocess
import sys

from conftest import REPO


def test_auto_source_without_a_tfds_copy_logs_nothing(tmp_path):
    """The reported case: `WARNING:absl:Variant folder .../dsprites/2.0.0 has no
    dataset_info.json` for a folder that does not exist."""
    probe = (
        "from keras_vae_attn.data import dsprites\n"
        "print(dsprites.tfds_copy_present(), dsprites.load(None, 'auto').source)"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={
            "PATH": "/usr/bin:/bin",
            "HOME": str(tmp_path),
            "TFDS_DATA_DIR": str(tmp_path / "tfds"),
        },
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["False", "generated"]
    assert "absl" not in result.stderr and "dataset_info" not in result.stderr


def test_a_prepared_tfds_copy_is_found(tmp_path, monkeypatch):
    from keras_vae_attn.data import dsprites

    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
    assert not dsprites.tfds_copy_present()
    version = tmp_path / "dsprites" / "2.0.0"
    version.mkdir(parents=True)
    assert not dsprites.tfds_copy_present()  # an empty version folder is none
    (version / "dataset_info.json").write_text("{}")
    assert dsprites.tfds_copy_present()
