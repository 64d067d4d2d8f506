"""Top-1/top-5 and the per-class report against hand computations, including a real 2-rank gloo reduction."""
from __future__ import annotations

import contextlib
import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from imt.train.dist import DistInfo
from imt.train.evaluate import evaluate, per_class_report, save_report, topk_correct

# 6 classes; 5 samples. Ranking of each row (best first) written out so the expected counts can be read off.
LOGITS = torch.tensor([
    [9., 8, 7, 6, 5, 4],   # ranking 0,1,2,3,4,5  label 0 -> top1, top5
    [1., 9, 8, 7, 6, 5],   # ranking 1,2,3,4,5,0  label 0 -> neither (6th)
    [1., 2, 9, 3, 4, 5],   # ranking 2,5,4,3,1,0  label 1 -> top5 only (5th)
    [5., 4, 3, 9, 2, 1],   # ranking 3,0,1,2,4,5  label 3 -> top1
    [0., 0, 1, 2, 3, 4],   # ranking 5,4,3,2,(0|1) label 4 -> top5 (2nd)
])
LABELS = torch.tensor([0, 0, 1, 3, 4])


class Fixed(torch.nn.Module):
    """Returns the logits stored for the sample index carried in the image tensor."""

    def __init__(self, logits):
        super().__init__()
        self.register_buffer("logits", logits)

    def forward(self, x):
        return self.logits[x[:, 0, 0, 0].long()]


def _batches(idx, bs=2):
    for i in range(0, len(idx), bs):
        ids = torch.tensor(idx[i:i + bs])
        yield ids.float().view(-1, 1, 1, 1).expand(-1, 3, 2, 2), LABELS[ids]


def test_topk_correct_by_hand():
    assert topk_correct(LOGITS, LABELS).tolist() == [2, 4]
    assert topk_correct(LOGITS[:, :3], LABELS.clamp(max=2), ks=(1, 5)).tolist()[1] == 5  # k capped at classes


def test_evaluate_by_hand():
    r = evaluate(Fixed(LOGITS), list(_batches(list(range(5)))), contextlib.nullcontext(), DistInfo(), 6)
    assert (r.top1, r.top5, r.count) == (40.0, 80.0, 5)
    expected_loss = torch.nn.functional.cross_entropy(LOGITS, LABELS).item()
    assert r.loss == pytest.approx(expected_loss, rel=1e-6)
    assert r.confusion[0, 0] == 1 and r.confusion[0, 1] == 1 and r.confusion[1, 2] == 1
    assert r.confusion[3, 3] == 1 and r.confusion[4, 5] == 1 and r.confusion.sum() == 5


def test_flip_tta_averages_logits():
    class Asym(torch.nn.Module):  # the mirror image predicts the other class
        def forward(self, x):
            left, right = x[..., 0].mean((1, 2)), x[..., -1].mean((1, 2))
            return torch.stack([left, right], 1)
    x = torch.zeros(1, 3, 2, 2)
    x[..., 0] = 2.0
    plain = evaluate(Asym(), [(x, torch.tensor([0]))], contextlib.nullcontext(), DistInfo(), 2)
    tta = evaluate(Asym(), [(x, torch.tensor([0]))], contextlib.nullcontext(), DistInfo(), 2, tta_flip=True)
    assert plain.top1 == 100.0 and plain.loss < tta.loss == pytest.approx(torch.log(torch.tensor(2.)).item())


def test_per_class_report_by_hand(tmp_path):
    cm = torch.tensor([[3, 1, 0], [0, 2, 2], [0, 0, 0]])  # rows true, cols predicted
    rows = per_class_report(cm, ["a", "b", "c"])
    assert rows[0]["precision"] == 1.0 and rows[0]["recall"] == 0.75
    assert rows[1]["precision"] == pytest.approx(2 / 3) and rows[1]["recall"] == 0.5
    assert rows[1]["f1"] == pytest.approx(2 * (2 / 3) * 0.5 / (2 / 3 + 0.5))
    assert rows[2] == {"class": "c", "precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    r = evaluate(Fixed(LOGITS), list(_batches(list(range(5)))), contextlib.nullcontext(), DistInfo(), 6)
    files = save_report(r, [f"k{i}" for i in range(6)], tmp_path)
    assert {p.name for p in files} >= {"per_class.json", "per_class.csv", "confusion.csv"}
    assert json.loads((tmp_path / "per_class.json").read_text())["top1"] == 40.0


def _rank(rank, world, port, shares, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        info = DistInfo(rank=rank, world_size=world)
        r = evaluate(Fixed(LOGITS), list(_batches(shares[rank])), contextlib.nullcontext(), info, 6)
        torch.save({"top1": r.top1, "top5": r.top5, "count": r.count, "cm": r.confusion}, f"{out}/{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_two_rank_reduction_equals_single_process(tmp_path):
    """Two gloo processes each evaluate a disjoint, uneven share; the reduced counts equal the whole."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    shares = [[0, 2, 4], [1, 3]]
    mp.start_processes(_rank, args=(2, port, shares, str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    single = evaluate(Fixed(LOGITS), list(_batches(list(range(5)))), contextlib.nullcontext(), DistInfo(), 6)
    for rank in range(2):
        r = torch.load(tmp_path / f"{rank}.pt", weights_only=True)
        assert (r["top1"], r["top5"], r["count"]) == (single.top1, single.top5, 5)
        assert torch.equal(r["cm"], single.confusion)


def test_confusion_is_counted_without_bincount(monkeypatch):
    """CUDA's bincount syncs with the host twice per batch; the counts must come from scatter_add_ and
    match a count by hand."""
    monkeypatch.setattr(torch, "bincount", lambda *a, **k: pytest.fail("evaluate called torch.bincount"))
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(50, 7, generator=g), torch.randint(0, 7, (50,), generator=g)

    class Model(torch.nn.Module):
        def forward(self, x):
            return logits[x[:, 0, 0, 0].long()]

    batches = [(torch.arange(i, min(i + 8, 50)).float().view(-1, 1, 1, 1).expand(-1, 3, 2, 2), labels[i:i + 8])
               for i in range(0, 50, 8)]
    r = evaluate(Model(), batches, contextlib.nullcontext(), DistInfo(), 7)
    want = torch.zeros(7, 7, dtype=torch.int64)
    for t, p in zip(labels.tolist(), logits.argmax(1).tolist()):
        want[t, p] += 1
    assert torch.equal(r.confusion, want) and r.count == 50
