"""Stateful loaders: a loader stopped anywhere in an epoch and rebuilt from its state_dict() yields exactly what
the uninterrupted loader would have yielded next (keys, labels, and for DALI and torch the same pixels), for this
epoch and the following ones; a change of ranks splits the untrained rest of the epoch exactly once."""
from __future__ import annotations

import collections
import random

import pytest
import torch

from imt.pipeline.common import combine_states, epoch_plan, num_batches, rank_batches
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


@pytest.mark.parametrize("kind,replays", [("torch", False), ("folder", False), ("dali", True)])
def test_a_state_from_before_the_31_bit_seeds_restarts_only_the_torch_loaders_epoch(kind, replays, synthetic_shards,
                                                                                     synthetic_root):
    """Version-1 states: the torch loaders' orders were seeded with 63 bits then, so their rest of the epoch would
    be another one (samples trained twice, others never): the epoch restarts, saying why. DALI's is unchanged."""
    cfg = _cfg(synthetic_root if kind == "folder" else synthetic_shards)
    first = _make(kind, cfg)
    first.set_epoch(0)
    next(iter(first))
    state = {**first.state_dict(), "version": 1}
    note = _make(kind, cfg).load_state_dict(state)
    if replays:
        assert "epoch 1 continues at batch 2" in note
    else:
        assert "restarts from its beginning" in note and "version 1" in note, note


@pytest.mark.parametrize("kind", ["dali", "torch"])
@pytest.mark.parametrize("before,after", [(2, 3), (3, 1)])
def test_elastic_loaders_train_the_rest_of_the_epoch_once(kind, before, after, synthetic_shards):
    """Ranks stopped after 2 batches of epoch 2; the states, combined as the trainer does, resumed on another
    number of ranks: every sample of the epoch trained exactly once, equal batch counts, the next epoch whole."""
    cfg = _cfg(synthetic_shards, batch_size=7)
    trained, states = [], []
    for r in range(before):
        lo = _make(kind, cfg, rank=r, world=before)
        _epochs(lo, 1)
        lo.set_epoch(1)
        it = iter(lo)
        trained += [k for _, b in zip(range(2), it) for k in b[2]]
        del it
        states.append(lo.state_dict())
    rest, counts, nxt = [], [], []
    for r in range(after):
        lo = _make(kind, cfg, rank=r, world=after)
        assert f"continues on {after} rank(s)" in lo.load_state_dict(combine_states(states, after, r))
        lo.set_epoch(1)
        start, left = lo.position()
        batches = list(lo)
        assert len(batches) == left and start == len(lo) - left and all(len(b[1]) for b in batches)
        counts.append(len(batches))
        rest += [k for b in batches for k in b[2]]
        lo.set_epoch(2)
        nxt += [k for b in lo for k in b[2]]
    assert len(set(counts)) == 1
    seen = collections.Counter(trained + rest)
    assert len(seen) == 96 and set(seen.values()) == {1}
    assert sorted(nxt) == sorted(seen)


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


def test_synthetic_loader_resumes_at_its_position():
    cfg = DataConfig(loader="synthetic", batch_size=8, resolution=16, synthetic_samples=44, synthetic_classes=3)
    lo = SyntheticLoader(cfg, "cpu", train=True)
    it = iter(lo)
    next(it), next(it)
    again = SyntheticLoader(cfg, "cpu", train=True)
    assert "continues at batch 3" in again.load_state_dict(lo.state_dict())
    assert again.position() == (2, 4) and [len(b[1]) for b in again] == [8, 8, 8, 4]
    assert [len(b[1]) for b in again] == [8] * 5 + [4]  # the next epoch is whole


def test_elastic_rest_too_small_for_every_rank_repeats_a_few_rather_than_losing_them():
    order = list(range(20))
    trained = [0, 1, 2, 3, 4, 5, 6, 7, 8] + [10, 11, 12, 13, 14, 15, 16, 17, 18]  # 2 ranks, 1 batch of 9 each
    rest = [epoch_plan(order, 3, r, 1, False, [(2, 9, 1)]) for r in range(3)]
    assert [len(p) for p in rest] == [1, 1, 1]
    seen = collections.Counter(trained + [i for p in rest for b in p for i in b])
    assert set(seen) == set(order) and sum(seen.values()) - len(order) <= 2


def test_dali_records_the_trained_samples_of_an_adopted_data_set_by_index(tmp_path, synthetic_root):
    """Adopted WebDataset tars keep their maker's keys (not <split>_<index>): the trained samples are found in
    the index files by name, so an elastic resume over them knows what is left."""
    pytest.importorskip("webdataset")
    from imt.pipeline.manifest import load_manifest, read_index
    from tests.tools.test_index_shards import wds_shards  # noqa: F401 - the fixture's maker
    from imt.tools.index_shards import index_shards

    root = wds_shards.__wrapped__(synthetic_root, tmp_path)[0]
    index_shards(root, progress=False)
    split = load_manifest(root).split("train")
    names = [n.rsplit(".", 1)[0] for s in split.shards for idx in [read_index(s.index)]
             for n in idx.names[idx.column("jpg")::len(idx.exts)]]
    lo = DaliLoader(_cfg(root), "train", DistInfo(), train=True, keys=True)
    lo.set_epoch(0)
    it = iter(lo)
    keys = [k for _, b in zip(range(2), it) for k in b[2]]
    state = lo.state_dict()
    trained = state["consumed"].tolist()
    assert len(set(trained)) == 16 and all(0 <= i < len(names) for i in trained)
    # keys=True's names drop everything after a key's first dot (c1_vstripes_0000.v2 -> c1_vstripes_0000)
    assert [names[i].split(".")[0] for i in trained] == keys
