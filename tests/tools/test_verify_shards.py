"""tools/verify_shards.py: passes good shards, names every kind of damage, exits non-zero."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from imt.tools.verify_shards import main, verify_shards

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def shards(synthetic_shards, tmp_path) -> Path:
    """A private copy of the session's shards, to damage."""
    out = tmp_path / "shards"
    shutil.copytree(synthetic_shards, out)
    return out


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


def test_good_shards_pass(synthetic_shards):
    assert verify_shards(synthetic_shards, progress=False) == []


def test_damaged_jpeg_is_reported(shards):
    # Offset of the first sample's JPEG data, from its index line; damage the entropy-coded data.
    line = (shards / "train-000001.idx").read_text().splitlines()[1].split()
    _flip(shards / "train-000001.tar", int(line[1]) + int(line[2]) // 2)
    problems = verify_shards(shards, progress=False)
    assert problems and problems[0] == "train-000001.tar: sha256 differs from the manifest"


def test_undecodable_jpeg_is_reported(shards):
    line = (shards / "val-000000.idx").read_text().splitlines()[3].split()
    with open(shards / "val-000000.tar", "r+b") as f:  # zero the image's header: PIL cannot open it
        f.seek(int(line[1]))
        f.write(b"\0" * 64)
    problems = verify_shards(shards, progress=False)
    assert any("val_00000002" in p and "does not decode" in p for p in problems), problems


def test_index_mismatch_and_label_mismatch_are_reported(shards):
    idx = shards / "train-000000.idx"
    lines = idx.read_text().splitlines()
    f = lines[2].split()
    f[1] = str(int(f[1]) + 512)
    lines[2] = " ".join(f)
    idx.write_text("\n".join(lines) + "\n")
    m = json.loads((shards / "manifest.json").read_text())
    m["classes"] = m["classes"][:2]  # labels 2..7 now out of range
    (shards / "manifest.json").write_text(json.dumps(m))
    problems = verify_shards(shards, progress=False)
    assert any("index line 2 does not match" in p for p in problems)
    assert any(".cls=" in p and "[0, 2)" in p for p in problems)


def test_missing_shard_and_stray_files_are_reported(shards):
    (shards / "val-000099.tar").write_bytes(b"")
    assert any("not in the manifest: val-000099.tar" in p for p in verify_shards(shards, progress=False))
    (shards / "train-000002.tar").unlink()
    problems = verify_shards(shards, progress=False)
    assert len(problems) == 1 and "train-000002.tar: missing" in problems[0]


def test_cli_exit_status(shards):
    cmd = [sys.executable, str(REPO / "tools" / "verify_shards.py"), str(shards), "--no-progress"]
    r = subprocess.run(cmd + ["--no-decode"], capture_output=True, text=True)
    assert r.returncode == 0 and "all shards match" in r.stdout, r.stderr
    (shards / "val-000000.idx").write_text("v1.2 31\n")
    r = CliRunner().invoke(main, [str(shards), "--no-progress"])  # in-process: no second torch import
    assert r.exit_code == 1 and "index lists 31 samples" in r.output
