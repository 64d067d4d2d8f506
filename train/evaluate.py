"""Evaluation: top-1/top-5 and a confusion matrix, counted on the device and summed across ranks.

Each rank evaluates its own share of the validation split (the loader contract: every sample exactly once
across ranks, no padding duplicates), so summing the counts gives exactly the single-process figures.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .dist import DistInfo, all_reduce_sum


@dataclass(frozen=True)
class EvalResult:
    top1: float            # percent
    top5: float            # percent (top-k with k = min(5, classes))
    loss: float
    count: int             # samples evaluated, all ranks
    confusion: torch.Tensor  # [true, predicted] counts, int64, CPU

    def as_dict(self) -> dict:
        return {"val_top1": self.top1, "val_top5": self.top5, "val_loss": self.loss, "val_count": self.count}


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> torch.Tensor:
    """Counts of samples whose label is among the k highest logits, for each k (a device tensor)."""
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices                 # N x kmax, best first
    hit = top.eq(labels[:, None])                          # at most one True per row
    return torch.stack([hit[:, :min(k, kmax)].sum() for k in ks])


@torch.no_grad()
def evaluate(model, loader, autocast, dist: DistInfo, num_classes: int, *, tta_flip: bool = False) -> EvalResult:
    """Top-1/top-5, mean cross-entropy and confusion matrix of `model` over this rank's share of `loader`,
    reduced across ranks. With `tta_flip` the logits of each image and its mirror are averaged."""
    model.eval()
    device = dist.device
    counts = torch.zeros(3, dtype=torch.int64, device=device)           # top1, top5, n
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=device)
    for images, labels in loader:
        with autocast:
            logits = model(images)
            if tta_flip:
                logits = logits + model(images.flip(3))  # W is dim 3 of NCHW (channels_last is a layout)
        logits = logits.float() / (2 if tta_flip else 1)
        counts[:2] += topk_correct(logits, labels)
        counts[2] += labels.numel()
        loss_sum += torch.nn.functional.cross_entropy(logits, labels, reduction="sum").double()
        # scatter_add_, not bincount: CUDA's bincount reads its input's min/max on the host (two syncs per batch).
        cells = labels * num_classes + logits.argmax(1)
        confusion.scatter_add_(0, cells, torch.ones_like(cells))
    for t in (counts, loss_sum, confusion):
        all_reduce_sum(t, dist)
    c1, c5, n = counts.tolist()
    return EvalResult(100.0 * c1 / max(n, 1), 100.0 * c5 / max(n, 1), loss_sum.item() / max(n, 1), n,
                      confusion.view(num_classes, num_classes).cpu())


def per_class_report(confusion: torch.Tensor, classes: list[str] | tuple[str, ...]) -> list[dict]:
    """Precision, recall, F1 and support per class from a [true, predicted] confusion matrix."""
    cm = confusion.double()
    tp = cm.diag()
    support, predicted = cm.sum(1), cm.sum(0)
    precision = torch.where(predicted > 0, tp / predicted.clamp(min=1), torch.zeros_like(tp))
    recall = torch.where(support > 0, tp / support.clamp(min=1), torch.zeros_like(tp))
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall).clamp(min=1e-12),
                     torch.zeros_like(tp))
    return [{"class": name, "precision": p, "recall": r, "f1": f, "support": int(s)}
            for name, p, r, f, s in zip(classes, precision.tolist(), recall.tolist(), f1.tolist(),
                                        support.tolist())]


def save_report(result: EvalResult, classes, out: str | Path, title: str = "") -> list[Path]:
    """Write per_class.json/.csv, confusion.csv and confusion.png (matplotlib) into `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = per_class_report(result.confusion, classes)
    macro = {k: sum(r[k] for r in rows) / max(len(rows), 1) for k in ("precision", "recall", "f1")}
    (out / "per_class.json").write_text(json.dumps(
        {"top1": result.top1, "top5": result.top5, "count": result.count, "macro": macro, "classes": rows},
        indent=1) + "\n")
    with open(out / "per_class.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["class", "precision", "recall", "f1", "support"])
        w.writeheader()
        w.writerows(rows)
    with open(out / "confusion.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["true\\predicted", *classes])
        for name, row in zip(classes, result.confusion.tolist()):
            w.writerow([name, *row])
    paths = [out / "per_class.json", out / "per_class.csv", out / "confusion.csv"]
    png = _plot_confusion(result.confusion, classes, out / "confusion.png", title)
    return paths + ([png] if png else [])


def _plot_confusion(confusion: torch.Tensor, classes, path: Path, title: str) -> Path | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # optional: the CSV holds the same numbers
        return None
    n = len(classes)
    rows = confusion.double()
    norm = rows / rows.sum(1, keepdim=True).clamp(min=1)  # per true class: recall on the diagonal
    size = min(4 + 0.4 * n, 20)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(norm.numpy(), cmap="Blues", vmin=0, vmax=1)
    if n <= 40:  # names and counts stay readable
        ax.set_xticks(range(n), classes, rotation=90, fontsize=8)
        ax.set_yticks(range(n), classes, fontsize=8)
        for i in range(n):
            for j in range(n):
                if confusion[i, j]:
                    ax.text(j, i, int(confusion[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or "confusion matrix (rows normalised)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
