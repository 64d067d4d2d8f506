"""pipeline/manifest.py: parses make_shards' manifest and fails early with a message that helps."""
from __future__ import annotations

import json
import shutil

import pytest

from imt.pipeline.manifest import ManifestError, load_manifest


def test_loads_shards_as_absolute_paths(synthetic_shards):
    m = load_manifest(synthetic_shards)
    assert m.root == synthetic_shards.resolve() and m.num_classes == len(m.classes) == 8
    train = m.split("train")
    assert train.num_samples == sum(s.num_samples for s in train.shards) == 96
    assert all(s.tar.is_absolute() and s.tar.is_file() and s.index.suffix == ".idx" for s in train.shards)
    assert train.tars == [str(s.tar) for s in train.shards] and len(train.indexes) == len(train.shards)
    assert train.skipped == ()


def test_unknown_split_lists_the_available_ones(synthetic_shards):
    with pytest.raises(ManifestError, match=r"no split 'test'; available: train, val"):
        load_manifest(synthetic_shards).split("test")


def test_missing_folder_says_what_to_run(tmp_path):
    with pytest.raises(ManifestError, match="tools.make_shards --src <data> --out"):
        load_manifest(tmp_path / "nowhere")


@pytest.fixture
def copy(synthetic_shards, tmp_path):
    out = tmp_path / "s"
    shutil.copytree(synthetic_shards, out)
    return out


def test_index_count_mismatch_and_missing_files(copy):
    (copy / "val-000000.idx").write_text("v1.2 7\n")
    with pytest.raises(ManifestError, match="index lists 7 samples but the manifest says 32"):
        load_manifest(copy)
    load_manifest(copy, check_files=False)  # cheap parse only
    (copy / "train-000001.tar").unlink()
    with pytest.raises(ManifestError, match="train-000001.tar: missing or empty"):
        load_manifest(copy)


def test_foreign_or_inconsistent_manifest(copy):
    d = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps({**d, "format": "other"}))
    with pytest.raises(ManifestError, match="not an imt-shards manifest"):
        load_manifest(copy)
    d["splits"]["train"]["num_samples"] = 95
    (copy / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(ManifestError, match="says 95 samples but its shards hold 96"):
        load_manifest(copy)
    (copy / "manifest.json").write_text("{")
    with pytest.raises(ManifestError, match="unreadable"):
        load_manifest(copy)


def test_paths_outside_the_folder_and_shards_listed_twice_are_refused(copy, tmp_path):
    """A tampered manifest: a path that leaves the folder, or a shard counted twice (its samples would be
    trained on twice per epoch, or a train shard would be evaluated as val)."""
    good = json.loads((copy / "manifest.json").read_text())
    for outside in ("../elsewhere/train-000000.tar", str(tmp_path / "train-000000.tar")):
        d = json.loads(json.dumps(good))
        d["splits"]["train"]["shards"][0]["file"] = outside
        (copy / "manifest.json").write_text(json.dumps(d))
        with pytest.raises(ManifestError, match=r"a path outside .*inside its own folder only"):
            load_manifest(copy, check_files=False)
    d = json.loads(json.dumps(good))
    train = d["splits"]["train"]
    train["shards"].append(train["shards"][0])
    train["num_samples"] += train["shards"][0]["num_samples"]
    (copy / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(ManifestError, match=r"train-000000.tar is listed twice \(in split 'train' and in split "
                                            r"'train'\)"):
        load_manifest(copy)
    d = json.loads(json.dumps(good))
    d["splits"]["val"]["shards"].append(d["splits"]["train"]["shards"][1])
    d["splits"]["val"]["num_samples"] += d["splits"]["train"]["shards"][1]["num_samples"]
    (copy / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(ManifestError, match=r"train-000001.tar is listed twice \(in split 'train' and in split "
                                            r"'val'\)"):
        load_manifest(copy)
