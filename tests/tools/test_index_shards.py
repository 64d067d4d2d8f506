"""Adopting WebDataset shards made by webdataset.ShardWriter (the imagenet-1k-wds layout): index files and
a manifest beside the untouched tars, odd samples skipped by key and reported, both loaders and the trainer
reading them."""
from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from imt.pipeline.config import DataConfig
from imt.pipeline.manifest import ManifestError, load_manifest
from imt.tools.index_shards import index_shards, main
from imt.tools.make_shards import ShardError
from imt.train.dist import DistInfo

wds = pytest.importorskip("webdataset")


def _files(root: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.iterdir()) if p.is_file()}


def _png(path: Path) -> bytes:
    buf = io.BytesIO()
    Image.open(path).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture()
def wds_shards(synthetic_root, tmp_path) -> tuple[Path, dict[str, dict[str, int]], list[str]]:
    """imagenet-1k-wds as ShardWriter writes it: <key>.jpg/.cls/.json, train in 3 tars, val in 1. Plus odd
    samples: a key with dots, a truncated JPEG, a PNG in .jpg, one without .cls, a duplicate key."""
    root = tmp_path / "wds"
    root.mkdir()
    classes = sorted(p.name for p in (synthetic_root / "train").iterdir())
    expected: dict[str, dict[str, int]] = {"train": {}, "val": {}}
    for split, pattern, per_tar in (("train", "imagenet1k-train-%04d.tar", 40),
                                    ("val", "imagenet1k-validation-%02d.tar", 100)):
        folder = "train" if split == "train" else "val"
        with wds.ShardWriter(str(root / pattern), maxcount=per_tar, verbose=0) as sink:
            for c, name in enumerate(classes):
                for i, img in enumerate(sorted((synthetic_root / folder / name).glob("*.JPEG"))):
                    key = f"{name}_{i:04d}" + (".v2" if (split, c, i) == ("train", 1, 0) else "")
                    sink.write({"__key__": key, "jpg": img.read_bytes(), "cls": c,
                                "json": {"label": c, "class_name": name, "filename": img.name}})
                    expected[split][key] = c
            if split == "train":
                good = sorted((synthetic_root / "train" / classes[0]).glob("*.JPEG"))[0].read_bytes()
                sink.write({"__key__": "broken_truncated", "jpg": good[:len(good) // 2], "cls": 0, "json": {}})
                sink.write({"__key__": "broken_png", "jpg": _png(sorted((synthetic_root / "train" / classes[0])
                                                                        .glob("*.JPEG"))[0]), "cls": 0, "json": {}})
                sink.write({"__key__": "broken_nolabel", "jpg": good, "json": {}})
                sink.write({"__key__": f"{classes[2]}_0000", "jpg": good, "cls": 0, "json": {}})  # duplicate
    return root, expected, classes


def test_shardwriter_output_is_not_called_interrupted(wds_shards):
    root, _, _ = wds_shards
    with pytest.raises(ManifestError, match="not made by imt-make-shards.*imt-index-shards") as info:
        load_manifest(root)
    assert "interrupted" not in str(info.value)


def test_index_beside_the_untouched_tars_with_report(wds_shards):
    root, expected, classes = wds_shards
    before = _files(root)
    r = CliRunner().invoke(main, [str(root), "--workers", "1", "--no-progress"])
    assert r.exit_code == 0, r.output
    after = _files(root)
    assert {k: v for k, v in after.items() if k in before} == before  # not a byte of the user's files changed
    added = set(after) - set(before)
    assert added == {"manifest.json"} | {f"{n[:-4]}.imt.idx" for n in before}
    m = load_manifest(root)
    assert m.adopted and m.label_ext == "lblsize" and list(m.classes) == [str(i) for i in range(8)]
    assert m.split("train").num_samples == len(expected["train"]) == 96
    assert m.split("val").num_samples == len(expected["val"]) == 32
    assert [s.sha256 for s in m.split("train").shards] == [before[s.tar.name] for s in m.split("train").shards]
    reasons = {s["key"]: s["reason"] for s in m.split("train").skipped}
    assert set(reasons) == {"broken_truncated", "broken_png", "broken_nolabel", f"{classes[2]}_0000"}
    assert "truncated" in reasons["broken_truncated"] and "not JPEG" in reasons["broken_png"]
    assert reasons["broken_nolabel"] == "no .cls member" and "duplicate key" in reasons[f"{classes[2]}_0000"]
    assert "train: 100 inputs = 96 indexed + 4 skipped" in r.output and "1 keys contain dots" in r.output
    assert "skipped imagenet1k-train-0002.tar:broken_png" in r.output
    # again: the same files, rewritten in place; a manifest.json of something else is left alone
    index_shards(root, progress=False)
    assert _files(root) == after
    (root / "manifest.json").write_text('{"format": "someone-elses"}')
    with pytest.raises(ShardError, match="not an index written by imt-index-shards.*--out"):
        index_shards(root, progress=False)


@pytest.mark.parametrize("kind", ["torch", "dali"])
def test_both_loaders_read_every_kept_sample_with_its_label(wds_shards, kind):
    pytest.importorskip("nvidia.dali")
    from imt.pipeline.dali import DaliLoader
    from imt.pipeline.torch_baseline import ShardLoader

    root, expected, _ = wds_shards
    index_shards(root, progress=False)
    cfg = DataConfig(path=str(root), batch_size=8, resolution=32, val_resolution=32, workers=1, shuffle_buffer=32,
                     dtype="float32", dali_device="cpu", seed=3)
    cls = DaliLoader if kind == "dali" else ShardLoader
    for split, train in (("train", True), ("val", False)):
        seen = {}
        for images, labels, keys in cls(cfg, split, DistInfo(), train=train, keys=True):
            assert images.shape[1:] == (3, 32, 32)
            seen.update(zip(keys, labels.tolist()))
        # DALI's keys come from source_info and end at the first dot: compare by that prefix
        want = {k.split(".")[0] if kind == "dali" else k: v for k, v in expected[split].items()}
        assert seen == want


def test_labels_from_a_json_field_and_a_class_list(wds_shards, tmp_path):
    root, expected, classes = wds_shards
    names = tmp_path / "classes.txt"
    names.write_text("".join(f"{c}\n" for c in classes))
    m = index_shards(root, out=tmp_path / "idx", label="json:class_name", classes_file=names, progress=False)
    assert m["classes"] == classes and m["splits"]["val"]["num_samples"] == 32
    assert Path(tmp_path / "idx" / "manifest.json").is_file() and not (root / "manifest.json").exists()
    loaded = load_manifest(tmp_path / "idx")
    assert loaded.split("val").shards[0].tar.resolve() == root / "imagenet1k-validation-00.tar"
    reasons = {s["key"]: s["reason"] for s in m["splits"]["train"]["skipped"]}
    assert "no field 'class_name'" in reasons["broken_nolabel"]
    with pytest.raises(ShardError, match="--label 'txt'"):
        index_shards(root, label="txt", progress=False)
    with pytest.raises(ShardError, match="--split val=nothing-\\*.tar: no tar"):
        index_shards(root, splits={"val": "nothing-*.tar"}, progress=False)


@pytest.mark.slow  # 60-80 s each on the shared 2-core machine
@pytest.mark.parametrize("loader", ["torch", "dali"])
def test_trainer_runs_an_epoch_on_adopted_shards(wds_shards, tmp_path, loader):
    pytest.importorskip("nvidia.dali")
    from imt.train.config import load_config
    from imt.train.run import train

    root, _, _ = wds_shards
    index_shards(root, progress=False)
    cfg = load_config(None, {"model.arch": "resnet18", "data.batch_size": 16, "data.resolution": 32,
                             "data.val_resolution": 32, "data.workers": 1, "data.loader": loader,
                             "data.path": str(root), "data.dali_device": "cpu", "optim.warmup_epochs": 0,
                             "run.epochs": 1, "run.tensorboard": False, "run.device": "cpu",
                             "run.out": str(tmp_path / loader)})
    summary = train(cfg)
    assert summary["final"]["val_count"] == 32
    assert json.loads((tmp_path / loader / "metrics.jsonl").read_text().splitlines()[0])["epoch"] == 1
