"""DALI (CPU operators) and the torchvision baselines over the same shards: the Loader contract,
exactly-once epochs across simulated ranks, augmentation bounds, DALI vs torchvision agreement,
and bad input."""
from __future__ import annotations

import collections
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imt.pipeline import build_loader
from imt.pipeline.common import MEAN, STD, mix_seed, num_batches, rank_batches, seeded_plan
from imt.pipeline.config import DataConfig
from imt.pipeline.manifest import ManifestError
from imt.tools.make_synthetic import CLASSES
from imt.train.dist import DistInfo

dali = pytest.importorskip("nvidia.dali")
from imt.pipeline.dali import DaliLoader  # noqa: E402
from imt.pipeline.torch_baseline import FolderLoader, ShardLoader  # noqa: E402

CPU = DistInfo()


def _cfg(path, **kw) -> DataConfig:
    base = dict(path=str(path), batch_size=8, resolution=32, val_resolution=32, workers=1,
                shuffle_buffer=32, dtype="bfloat16", dali_device="cpu", seed=3)
    return DataConfig(**{**base, **kw})


def _make(kind, cfg, split="train", rank=0, world=1, train=True, keys=True):
    dist = DistInfo(rank=rank, world_size=world)
    if kind == "dali":
        return DaliLoader(cfg, split, dist, train=train, keys=keys)
    if kind == "torch":
        return ShardLoader(cfg, split, dist, train=train, keys=keys)
    return FolderLoader(cfg, split, dist, train=train, keys=keys)


def _path(kind, synthetic_shards, synthetic_root):
    return synthetic_root if kind == "folder" else synthetic_shards


# --- the pure batch plan ------------------------------------------------------------------------

@pytest.mark.parametrize("n,world,batch,drop", [(96, 5, 19, False), (96, 3, 7, False), (10, 3, 3, False),
                                                (97, 2, 8, True), (96, 5, 19, True), (7, 7, 1, False)])
def test_rank_batches_exact_and_equal(n, world, batch, drop):
    plans = [rank_batches(list(range(n)), world, r, batch, drop) for r in range(world)]
    assert {len(p) for p in plans} == {num_batches(n, world, batch, drop)}
    assert all(len(b) > 0 for p in plans for b in p)
    seen = [i for p in plans for b in p for i in b]
    assert len(seen) == len(set(seen))
    if not drop:
        assert sorted(seen) == list(range(n))


def test_mix_seed_is_a_non_negative_int32_for_any_parts():
    """DALI's seeds are int32: one helper serves DALI and torch, so its seeds must fit both."""
    parts = [(), (0,), (3, 7), (7, 3), (2**40, 5, 1), (-1,), (12345, 99, 3, 4000, 2)]
    seeds = [mix_seed(*p) for p in parts]
    assert all(0 <= s < 2**31 - 1 for s in seeds) and len(set(seeds)) == len(seeds)
    assert mix_seed(3, 7) == mix_seed(3, 7)


def test_torch_loader_reads_the_shared_epoch_plan(synthetic_shards):
    """The torch loader's batches are exactly common.seeded_plan's, a function of (seed, epoch) for training
    and the stored order for validation: the one definition the DALI loader's streamed epochs use too."""
    cfg = _cfg(synthetic_shards, batch_size=7)
    for train, split, n in [(True, "train", 96), (False, "val", 32)]:
        lo = _make("torch", cfg, split=split, rank=1, world=2, train=train)
        lo.set_epoch(2)
        plan, windows = seeded_plan(n, cfg.seed, 2, train=train, world=2, rank=1, batch=7, drop_last=False)
        assert [list(b[2]) for b in lo] == [[lo.dataset.source.key(i) for i in b] for b in plan] and windows == []
        other, _ = seeded_plan(n, cfg.seed, 3, train=train, world=2, rank=1, batch=7, drop_last=False)
        assert (other != plan) == train  # training orders change with the epoch, validation's never


def test_rank_batches_impossible_split_is_refused():
    # 7 samples, 2 ranks, batch 1: shares 3 and 4 need 4 batches each; a 1-sample batch cannot split.
    with pytest.raises(ValueError, match="cannot give 2 ranks 4 non-empty batches"):
        rank_batches(list(range(7)), 2, 0, 1, False)


# --- the contract ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["dali", "torch", "folder"])
def test_training_batches(kind, synthetic_shards, synthetic_root):
    cfg = _cfg(_path(kind, synthetic_shards, synthetic_root), batch_size=10)
    loader = build_loader(replace(cfg, loader=kind), "train", CPU, train=True)
    batches = list(loader)
    assert len(batches) == len(loader) == 10 and loader.num_samples == 96
    assert [len(b[1]) for b in batches] == [10] * 9 + [6]
    assert loader.classes[:2] == CLASSES[:2]
    for images, labels in batches:
        assert images.shape[1:] == (3, 32, 32) and images.dtype == torch.bfloat16
        assert images.is_contiguous(memory_format=torch.channels_last)
        assert labels.dtype == torch.int64 and labels.min() >= 0 and labels.max() < 8
        # Normalised range: (0 - mean) / std .. (1 - mean) / std, plus bf16 rounding.
        assert images.float().min() >= -2.13 and images.float().max() <= 2.65
    assert torch.cat([b[0].float().mean((0, 2, 3)) for b in batches]).abs().max() < 1.5
    loader.set_epoch(1)
    loader.set_resolution(24)
    assert next(iter(loader))[0].shape[1:] == (3, 24, 24)


@pytest.mark.parametrize("kind", ["dali", "torch", "folder"])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_exactly_once_over_three_epochs(kind, world, synthetic_shards, synthetic_root):
    # Batch 7 does not divide the shares (96/2 = 48, 96/3 = 32): partial last batches on every rank.
    cfg = _cfg(_path(kind, synthetic_shards, synthetic_root), batch_size=7)
    loaders = [_make(kind, cfg, rank=r, world=world) for r in range(world)]
    orders = []
    for epoch in range(3):
        seen, counts = collections.Counter(), []
        for loader in loaders:
            loader.set_epoch(epoch)
            batches = list(loader)
            counts.append(len(batches))
            for _, labels, keys in batches:
                assert len(keys) == len(labels) > 0
                seen.update(keys)
        assert set(counts) == {len(loaders[0])}, counts          # equal on every rank
        assert len(seen) == 96 and set(seen.values()) == {1}     # none missing, no duplicates
        assert sum(lo.num_samples for lo in loaders) == 96
        orders.append(list(seen))
    if world == 1:
        assert orders[0] != orders[1]  # reshuffled between epochs


@pytest.mark.parametrize("kind", ["dali", "torch"])
def test_uneven_shares_get_equal_nonempty_batches(kind, synthetic_shards):
    # 96 samples on 5 ranks: shares 19 or 20; batch 19 -> DALI alone would give four ranks an empty
    # second batch; the loaders split the last full batch instead.
    cfg = _cfg(synthetic_shards, batch_size=19)
    loaders = [_make(kind, cfg, rank=r, world=5) for r in range(5)]
    sizes = [[len(b[1]) for b in lo] for lo in loaders]
    assert all(len(s) == 2 and min(s) > 0 for s in sizes), sizes
    assert sum(map(sum, sizes)) == 96


@pytest.mark.parametrize("kind", ["dali", "torch"])
def test_drop_last(kind, synthetic_shards):
    cfg = _cfg(synthetic_shards, batch_size=10, drop_last=True)
    loaders = [_make(kind, cfg, rank=r, world=2) for r in range(2)]
    for lo in loaders:
        sizes = [len(b[1]) for b in lo]
        assert sizes == [10] * 4 == [10] * len(lo) and lo.num_samples == 40


@pytest.mark.parametrize("kind", ["dali", "torch"])
def test_same_seed_same_order(kind, synthetic_shards):
    def keys(seed):
        lo = _make(kind, _cfg(synthetic_shards, seed=seed))
        return [k for _ in range(2) for b in lo for k in b[2]]
    assert keys(5) == keys(5)
    assert keys(5) != keys(6)


def test_dali_set_epoch_out_of_sequence_rebuilds_deterministically(synthetic_shards):
    cfg = _cfg(synthetic_shards)
    a, b = _make("dali", cfg), _make("dali", cfg)
    a.set_epoch(4)
    b.set_epoch(4)
    assert [k for x in a for k in x[2]] == [k for x in b for k in x[2]]
    list(a)  # leaving an epoch early must not leak into the next one either
    a.set_epoch(5)
    it = iter(a)
    next(it)
    del it
    a.set_epoch(6)
    assert sorted(k for x in a for k in x[2]) == sorted(f"train_{i:08d}" for i in range(96))


# --- DALI vs torchvision ------------------------------------------------------------------------------

def test_validation_dali_matches_torchvision(synthetic_shards):
    """Same val images through both: DALI reproduces torchvision's Resize + CenterCrop geometry.
    Measured mean |diff| per image: 0.001 here, 0.0028 (max 0.0034) on 400 real ImageNet JPEGs
    (normalised units; 1/255 of range is 0.017). Tolerance 0.01 mean, 0.05 per image."""
    cfg = _cfg(synthetic_shards, val_resolution=64, dtype="float32", batch_size=16)
    dali_b = list(_make("dali", cfg, "val", train=False))
    torch_b = list(_make("torch", cfg, "val", train=False))
    diffs = []
    for (x1, y1, k1), (x2, y2, k2) in zip(dali_b, torch_b, strict=True):
        assert list(k1) == list(k2) and torch.equal(y1, y2)
        assert x1.shape == x2.shape == (len(y1), 3, 64, 64)
        diffs.append((x1 - x2).abs().flatten(1).mean(1))
    d = torch.cat(diffs)
    assert len(d) == 32 and d.mean() < 0.01 and d.max() < 0.05, d


@pytest.fixture(scope="module")
def gradient_shards(tmp_path_factory):
    """JPEGs whose red channel encodes x and green encodes y, so a crop's source window and a
    flip can be read back from the output pixels."""
    from imt.tools.make_shards import make_shards

    src = tmp_path_factory.mktemp("gradient")
    w, h = 400, 300
    xs, ys = np.meshgrid(np.linspace(0, 255, w), np.linspace(0, 255, h))
    img = np.stack([xs, ys, np.full_like(xs, 128)], -1).round().astype(np.uint8)
    for split, n in (("train", 120), ("val", 4)):
        d = src / split / "c0"
        d.mkdir(parents=True)
        for i in range(n):
            Image.fromarray(img).save(d / f"{i}.JPEG", quality=98)
    out = tmp_path_factory.mktemp("gradient_shards")
    make_shards(src, out, shard_samples=40, workers=1, seed=0, progress=False)
    return out, (w, h)


@pytest.mark.parametrize("kind", ["dali", "torch"])
def test_crop_area_aspect_and_flip_rate(kind, gradient_shards):
    path, (w, h) = gradient_shards
    cfg = _cfg(path, resolution=64, batch_size=40, dtype="float32", min_area=0.08)
    images = torch.cat([b[0] for b in _make(kind, cfg, keys=False)])
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    px = (images * std + mean) * 255  # back to 0..255
    red, green = px[:, 0], px[:, 1]
    left, right = red[:, :, 0].mean(1), red[:, :, -1].mean(1)
    top, bottom = green[:, 0, :].mean(1), green[:, -1, :].mean(1)
    flipped = left > right
    # Source window in pixels (one output pixel of slack at each edge: the filter's support).
    cw = ((left - right).abs() / 255 * (w - 1)) * 64 / 63
    ch = ((bottom - top) / 255 * (h - 1)) * 64 / 63
    area = cw * ch / (w * h)
    assert len(images) == 120
    assert area.min() > 0.08 * 0.85 and area.max() <= 1.02, (area.min(), area.max())
    assert area.std() > 0.1  # really random
    ratio = cw / ch
    assert ratio.min() > 0.75 * 0.9 and ratio.max() < 4 / 3 * 1.1, (ratio.min(), ratio.max())
    assert 0.3 < flipped.float().mean() < 0.7  # 120 fair coins: outside this in < 1e-5 of runs


# --- bad input ----------------------------------------------------------------------------------------

@pytest.fixture()
def shard_copy(synthetic_shards, tmp_path) -> Path:
    out = tmp_path / "shards"
    shutil.copytree(synthetic_shards, out)
    return out


@pytest.mark.parametrize("kind", ["dali", "torch"])
def test_missing_tar_and_index(kind, shard_copy, synthetic_shards):
    (shard_copy / "train-000001.tar").unlink()
    with pytest.raises(ManifestError, match="train-000001.tar: missing"):
        _make(kind, _cfg(shard_copy))
    shutil.copy(synthetic_shards / "train-000001.tar", shard_copy)
    (shard_copy / "val-000000.idx").unlink()
    with pytest.raises(ManifestError, match="val-000000.idx: missing"):
        _make(kind, _cfg(shard_copy), "val", train=False)


@pytest.mark.parametrize("kind", ["dali", "torch"])
def test_index_not_matching_tar(kind, shard_copy):
    a, b = shard_copy / "train-000000.idx", shard_copy / "train-000001.idx"
    a_text, b_text = a.read_text(), b.read_text()
    a.write_text(b_text)  # same sample count, other tar's offsets
    with pytest.raises(ManifestError, match=r"train-000000\.(idx|tar).*(does not match|index is stale)"
                                            r".*imt-verify-shards"):
        _make(kind, _cfg(shard_copy))
    a.write_text(a_text)
    with open(shard_copy / "train-000001.tar", "r+b") as f:
        f.truncate(4096)
    with pytest.raises(ManifestError, match="train-000001.tar: 4096 bytes.*truncated"):
        _make(kind, _cfg(shard_copy))


@pytest.mark.parametrize("kind", ["dali", "torch"])
@pytest.mark.parametrize("move", [512, -512, 7])
def test_index_entry_off_a_member_boundary_is_refused_before_dali_sees_it(kind, move, shard_copy):
    """A middle .jpg offset moved by 512 bytes made DALI segfault (3 of 6 runs); 512-byte moves stay aligned,
    so the check is that every member starts after the previous one and its header, from the index alone."""
    idx = shard_copy / "train-000001.idx"
    lines = idx.read_text().splitlines()
    f = lines[6].split()
    f[1] = str(int(f[1]) + move)
    lines[6] = " ".join(f)
    idx.write_text("\n".join(lines) + "\n")
    key = f[3].split(".")[0]
    with pytest.raises(ManifestError, match=rf"train-000001.idx line 7: {key}\.\w+ at byte .*is not where a member "
                                            r".* can start.*imt-verify-shards"):
        _make(kind, _cfg(shard_copy))


def test_dali_names_an_undecodable_sample_of_its_first_batches(shard_copy):
    """DALI decodes the first batches while the iterator is built: an error there used to escape as DALI's
    raw `nvImageCodec failure` (or libjpeg's message on the CPU), naming no sample."""
    from imt.pipeline.manifest import read_index

    offset, size, name = read_index(shard_copy / "val-000000.idx").sample(0)["jpg"]
    with open(shard_copy / "val-000000.tar", "r+b") as f:
        f.seek(offset)
        f.write(b"\0" * size)
    loader = _make("dali", _cfg(shard_copy), "val", train=False, keys=False)
    with pytest.raises(RuntimeError, match=rf"sample {name.split('.')[0]} in .*val-000000.tar does not decode"):
        next(iter(loader))


def test_foreign_empty_and_unset_manifest(shard_copy, tmp_path):
    man = shard_copy / "manifest.json"
    good = json.loads(man.read_text())
    man.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ManifestError, match="not an imt-shards manifest"):
        _make("dali", _cfg(shard_copy))
    man.write_text(json.dumps({**good, "splits": {"train": {"num_samples": 0, "shards": []}}}))
    with pytest.raises(ManifestError, match="split 'train' has no samples"):
        _make("dali", _cfg(shard_copy))
    with pytest.raises(ManifestError, match="manifest.json not found"):
        _make("torch", _cfg(tmp_path / "nothing"))
    with pytest.raises(ManifestError, match="DataConfig.path is empty"):
        _make("dali", _cfg(""))
    man.write_text(json.dumps(good))
    with pytest.raises(ManifestError, match="no split 'test'; available: train, val"):
        _make("dali", _cfg(shard_copy), "test", train=False)


@pytest.mark.parametrize("kind", ["dali", "torch"])
def test_undecodable_sample_names_shard_and_key(kind, shard_copy):
    line = (shard_copy / "train-000001.idx").read_text().splitlines()[6].split()
    offset, size, key = int(line[1]), int(line[2]), line[3].split(".")[0]
    with open(shard_copy / "train-000001.tar", "r+b") as f:
        f.seek(offset)
        f.write(b"\0" * size)
    loader = _make(kind, _cfg(shard_copy), keys=False)
    with pytest.raises(RuntimeError, match=rf"{key}.*train-000001.tar|train-000001.tar.*{key}") as e:
        list(loader)
    assert "imt-verify-shards" in str(e.value)


@pytest.mark.parametrize("kind", ["dali", "torch"])
def test_label_outside_the_classes_names_shard_and_key(kind, shard_copy):
    """An edited .lbl (200 with 8 classes) used to end in cross_entropy's `IndexError: Target 200 is out of
    bounds`, naming no sample; the loader stops first and names the shard and the key."""
    from imt.pipeline.manifest import read_index

    offset, _, name = read_index(shard_copy / "train-000001.idx").sample(5)["lbl"]
    with open(shard_copy / "train-000001.tar", "r+b") as f:
        f.seek(offset)
        f.write((200).to_bytes(8, "little", signed=True))
    key = name.split(".")[0]
    with pytest.raises(ManifestError, match=rf"sample {key} in .*train-000001.tar has label 200, outside \[0, 8\)"
                                            r".*imt-verify-shards"):
        list(_make(kind, _cfg(shard_copy), keys=False))


def test_validation_exif_rotated_matches_torchvision(tmp_path):
    """EXIF orientation is ignored by both loaders (as ImageFolder/PIL does), so the centre-crop
    geometry must come from the stored, unrotated width and height. Orientations 5-8 swap the two
    when honoured; a shape read with rotation but decoded without it squashes the image."""
    from imt.tools.make_shards import make_shards

    from tests.tools._shards import _orientation, _photo, jpeg

    for i, o in enumerate((1, 5, 6, 7, 8)):
        d = tmp_path / "src" / "val" / "c0"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{i}.JPEG").write_bytes(jpeg(_photo(i, size=(200, 100)), quality=95, exif=_orientation(o)))
    make_shards(tmp_path / "src", tmp_path / "out", workers=1, seed=0, progress=False)
    cfg = _cfg(tmp_path / "out", val_resolution=48, dtype="float32", batch_size=5)
    (x1, y1, k1), = list(_make("dali", cfg, "val", train=False))
    (x2, y2, k2), = list(_make("torch", cfg, "val", train=False))
    assert list(k1) == list(k2) and x1.shape == x2.shape == (5, 3, 48, 48)
    d = (x1 - x2).abs().flatten(1).mean(1)
    assert d.max() < 0.05, d


def test_dali_errors_that_are_not_bad_files_are_not_searched(monkeypatch):
    """Only decoder failures send DaliLoader looking for the bad sample (up to SEARCH_BUDGET_S); an
    out-of-memory error says what to lower at once, and other errors pass through unchanged."""
    from types import SimpleNamespace

    from imt.pipeline import dali

    monkeypatch.setattr(dali, "find_undecodable", lambda *a, **k: pytest.fail("searched the shards"))
    fake = SimpleNamespace(rank=1, cfg=_cfg("x"))
    oom = RuntimeError("Error in MIXED operator `nvidia.dali.fn.decoders.image_random_crop` ... "
                       "CUDA allocation failed: cudaErrorMemoryAllocation (out of memory)")
    msg = dali.DaliLoader._explain(fake, oom)
    assert "ran out of memory on rank 1" in msg and "--batch-size" in msg and "cudaErrorMemoryAllocation" in msg
    other = RuntimeError("Error in CPU operator `nvidia.dali.fn.readers.webdataset`: Permission denied")
    assert dali.DaliLoader._explain(fake, other) is None


def test_dali_refuses_what_would_give_a_rank_an_empty_batch(synthetic_shards):
    """val has 32 samples; 3 ranks at batch 1 get shares 10, 11, 11: rank 0 would need its single-sample last
    batch split in two. The torch loaders refuse this; DALI used to yield an empty batch."""
    with pytest.raises(ValueError, match="non-empty batches"):
        _make("dali", _cfg(synthetic_shards, batch_size=1), split="val", rank=0, world=3, train=False)


def test_dali_validation_pipeline_is_built_once_and_repeats(synthetic_shards, monkeypatch):
    loader = _make("dali", _cfg(synthetic_shards), split="val", train=False)
    builds = []
    real = loader._build
    monkeypatch.setattr(loader, "_build", lambda: (builds.append(1), real())[1])
    passes = [[k for b in loader for k in b[2]] for _ in range(3)]
    assert len(builds) == 1
    assert passes[0] == passes[1] == passes[2] and sorted(passes[0]) == sorted(set(passes[0]))
    assert len(passes[0]) == 32


def test_torch_loader_without_workers_leaves_the_trainers_rng_alone(synthetic_shards):
    lo = _make("torch", _cfg(synthetic_shards, workers=0), keys=False)
    torch.manual_seed(1)
    it = iter(lo)
    next(it)
    after_seed_1 = torch.rand(3)
    torch.manual_seed(2)
    it = iter(lo)
    next(it)
    assert not torch.equal(torch.rand(3), after_seed_1)  # the batch's own seed did not replace the trainer's


def test_folder_validation_labels_follow_the_training_classes(synthetic_root, tmp_path):
    """val/ lacking a class must not shift the others' labels; an unknown val class is refused."""
    root = tmp_path / "tree"
    shutil.copytree(synthetic_root, root)
    first = sorted(p.name for p in (root / "val").iterdir())[0]
    shutil.rmtree(root / "val" / first)
    train = _make("folder", _cfg(root), keys=False)
    val = _make("folder", _cfg(root), split="val", train=False, keys=True)
    assert val.classes == train.classes and len(val.classes) == 8
    for _, labels, keys in val:
        for label, key in zip(labels.tolist(), keys):
            assert train.classes[label] == key.split("/")[0]
    (root / "val" / "zebras").mkdir()
    shutil.copyfile(next((root / "train").rglob("*.JPEG")), root / "val" / "zebras" / "z.JPEG")
    with pytest.raises(ValueError, match="class folders that .* lacks \\(zebras\\)"):
        _make("folder", _cfg(root), split="val", train=False)


def test_folder_loader_refuses_a_shard_folder_and_the_cli_says_so(synthetic_shards, tmp_path):
    """`--loader folder` on a shard folder used to end in a FileNotFoundError traceback."""
    from click.testing import CliRunner

    from imt.train.run import main

    with pytest.raises(ManifestError, match="holds shards \\(manifest.json\\), not an ImageFolder tree.*--loader dali"):
        _make("folder", _cfg(synthetic_shards))
    r = CliRunner().invoke(main, ["--data", str(synthetic_shards), "--loader", "folder", "--out", str(tmp_path / "r"),
                                  "--device", "cpu", "--arch", "resnet18"])
    assert r.exit_code == 1 and "not an ImageFolder tree" in r.output and "Traceback" not in r.output, r.output
