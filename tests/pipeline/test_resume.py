"""Stateful loaders: a loader stopped anywhere in an epoch and rebuilt from its state_dict() yields exactly what
the uninterrupted loader would have yielded next (keys, labels, and for DALI and torch the same pixels), for this
epoch and the following ones; a change of ranks splits the untrained rest of the epoch exactly once."""
from __future__ import annotations

import collections
import random

import pytest
import torch

from imt.pipeline.common import epoch_plan, num_batches, rank_batches
from imt.pipeline.config import DataConfig
from imt.train.dist import DistInfo

dali = pytest.importorskip("nvidia.dali")
from imt.pipeline.dali import DaliLoader  # noqa: E402
from imt.pipeline.synthetic import SyntheticLoader  # noqa: E402
from imt.pipeline.torch_baseline import FolderLoader, ShardLoader  # noqa: E402


def _cfg(path, **kw) -> DataConfig:
    base = dict(path=str(path), batch_size=8, resolution=32, val_resolution=32, workers=1, shuffle_buffer=32,
                dtype="float32", dali_device="cpu", seed=3)
    return DataConfig(**{**base, **kw})


def _make(kind, cfg, rank=0, world=1):
    dist = DistInfo(rank=rank, world_size=world)
    cls = {"dali": DaliLoader, "torch": ShardLoader, "folder": FolderLoader}[kind]
    return cls(cfg, "train", dist, train=True, keys=True)


def _epochs(loader, epochs, first=0):
    out = []
    for e in range(first, epochs):
        loader.set_epoch(e)
        out.append([(b[2], b[1], b[0]) for b in loader])
    return out


def _same(a, b, pixels=True):
    assert [k for x in a for k in x[0]] == [k for x in b for k in x[0]]
    assert all(torch.equal(x[1], y[1]) for x, y in zip(a, b))
    if pixels:
        diff = [i for i, (x, y) in enumerate(zip(a, b)) if not torch.equal(x[2], y[2])]
        assert not diff, f"batches {diff} differ in their pixels"


@pytest.mark.parametrize("kind", ["dali", "torch", "folder"])
@pytest.mark.parametrize("live", [True, False])
def test_resume_mid_epoch_is_exact(kind, live, synthetic_shards, synthetic_root):
    """Stopped at a random batch of epoch 2 (the iterator still open, or closed as the trainer's loop leaves
    it), a new loader given the state continues with exactly the uninterrupted batches, then the next epoch."""
    cfg = _cfg(synthetic_root if kind == "folder" else synthetic_shards, batch_size=7)
    whole = _epochs(_make(kind, cfg), 3)
    k = random.Random(f"{kind}{live}").randrange(1, len(whole[1]) - 1)  # 1 .. len-2 batches trained

    first = _make(kind, cfg)
    _epochs(first, 1)
    first.set_epoch(1)
    it = iter(first)
    head = [(b[2], b[1], b[0]) for _, b in zip(range(k), it)]
    if not live:
        del it  # closed: DALI drops its pipeline, keeping its checkpoint of this point
    state = first.state_dict()
    assert (state["epoch"], state["done"]) == (1, k)

    second = _make(kind, cfg)
    note = second.load_state_dict(state)
    assert f"epoch 2 continues at batch {k + 1}" in note
    second.set_epoch(1)
    assert second.position() == (k, len(second) - k)
    rest = [(b[2], b[1], b[0]) for b in second]
    _same(head + rest, whole[1], pixels=kind != "folder")
    _same(_epochs(second, 3, first=2)[0], whole[2], pixels=kind != "folder")


def test_dali_resume_at_an_epoch_boundary_continues_the_stream(synthetic_shards):
    """DALI's pipeline runs one stream across epochs: a checkpoint between epochs restores that stream, so the
    next epoch is the uninterrupted run's (a fresh pipeline would shuffle differently)."""
    cfg = _cfg(synthetic_shards)
    whole = _epochs(_make("dali", cfg), 3)
    first = _make("dali", cfg)
    _epochs(first, 1)
    state = first.state_dict()
    assert (state["epoch"], state["done"]) == (1, 0) and state["dali"]
    second = _make("dali", cfg)
    assert "continues the dali loader's sample stream" in second.load_state_dict(state)
    _same(_epochs(second, 3, first=1)[0], whole[1])
    fresh = _make("dali", cfg)
    fresh.set_epoch(1)
    assert [k for b in fresh for k in b[2]] != [k for x in whole[1] for k in x[0]]


@pytest.mark.parametrize("kind", ["torch", "dali"])
def test_another_kind_or_seed_restarts_the_epoch_with_a_reason(kind, synthetic_shards):
    cfg = _cfg(synthetic_shards)
    first = _make(kind, cfg)
    first.set_epoch(0)
    it = iter(first)
    next(it)
    state = first.state_dict()
    other = _make("dali" if kind == "torch" else "torch", cfg)
    assert "restarts from its beginning" in other.load_state_dict(state) and other.position() == (0, len(other))
    reseeded = _make(kind, _cfg(synthetic_shards, seed=4))
    assert "the data or its order changed" in reseeded.load_state_dict(state)
    assert len([b for b in reseeded]) == len(reseeded)


def test_dali_refuses_another_world_mid_epoch(synthetic_shards):
    cfg = _cfg(synthetic_shards)
    first = _make("dali", cfg, rank=0, world=2)
    first.set_epoch(0)
    it = iter(first)
    next(it)
    second = _make("dali", cfg, rank=0, world=3)
    note = second.load_state_dict(first.state_dict())
    assert "restarts from its beginning" in note and "resumes mid-epoch only with the same" in note


@pytest.mark.parametrize("old,new,batch,new_batch", [(2, 3, 7, 7), (3, 1, 7, 7), (2, 2, 7, 5), (4, 3, 5, 8)])
def test_elastic_plan_covers_the_rest_of_the_epoch_once(old, new, batch, new_batch):
    """The pure rule: what the old ranks trained plus what the new ranks will, is the epoch, each sample once;
    every new rank has the same number of non-empty batches. Also after a second change of ranks."""
    order = random.Random(0).sample(range(203), 203)
    for done in range(0, num_batches(203, old, batch, False)):
        trained = [i for r in range(old) for b in rank_batches(order, old, r, batch, False)[:done] for i in b]
        rest = [epoch_plan(order, new, r, new_batch, False, [(old, batch, done)]) for r in range(new)]
        assert len({len(p) for p in rest}) == 1 and all(len(b) > 0 for p in rest for b in p)
        seen = collections.Counter(trained + [i for p in rest for b in p for i in b])
        assert set(seen) == set(order) and set(seen.values()) == {1}
        # stopped again after one batch of the new split, resumed on `old` ranks
        trained += [i for p in rest for i in (p[0] if p else [])]
        segs = [(old, batch, done), (new, new_batch, 1)]
        again = [epoch_plan(order, old, r, batch, False, segs) for r in range(old)]
        seen = collections.Counter(trained + [i for p in again for b in p for i in b])
        assert set(seen) == set(order) and set(seen.values()) == {1}


def test_elastic_torch_loaders_two_ranks_to_three(synthetic_shards):
    cfg = _cfg(synthetic_shards, batch_size=7)
    trained = []
    states = []
    for r in range(2):
        lo = _make("torch", cfg, rank=r, world=2)
        lo.set_epoch(1)
        it = iter(lo)
        trained += [k for _, b in zip(range(3), it) for k in b[2]]
        states.append(lo.state_dict())
    rest, counts = [], []
    for r in range(3):
        lo = _make("torch", cfg, rank=r, world=3)
        assert "continues on 3 rank(s)" in lo.load_state_dict(states[0])
        lo.set_epoch(1)
        start, left = lo.position()
        batches = list(lo)
        assert len(batches) == left and start == len(lo) - left
        counts.append(len(batches))
        rest += [k for b in batches for k in b[2]]
    assert len(set(counts)) == 1
    seen = collections.Counter(trained + rest)
    assert len(seen) == 96 and set(seen.values()) == {1}


def test_synthetic_loader_resumes_at_its_position():
    cfg = DataConfig(loader="synthetic", batch_size=8, resolution=16, synthetic_samples=44, synthetic_classes=3)
    lo = SyntheticLoader(cfg, "cpu", train=True)
    it = iter(lo)
    next(it), next(it)
    again = SyntheticLoader(cfg, "cpu", train=True)
    assert "continues at batch 3" in again.load_state_dict(lo.state_dict())
    assert again.position() == (2, 4) and [len(b[1]) for b in again] == [8, 8, 8, 4]
    assert [len(b[1]) for b in again] == [8] * 5 + [4]  # the next epoch is whole
