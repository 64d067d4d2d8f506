"""Does the trainer learn? ResNet-18 from scratch at low resolution on Imagenette (10 classes, chance 10%),
on the CPU, in a few minutes; prints the validation top-1 per epoch and a Markdown block for RESULTS.md.
Exits with status 1 when the final top-1 is not above --min-top1.

    python -m imt.benchmarks.learning                      # ../shared/data/imagenette-224, folder loader
    python -m imt.benchmarks.learning --loader dali --data work/imagenette-shards --epochs 6

It runs the real trainer (train.run.train with a config built from the options), nothing copied.
"""
from __future__ import annotations

import datetime
import json
import os
import sys
import time
from pathlib import Path

import click
import torch

from imt.train.cli import CONTEXT
from imt.train.config import load_config
from imt.train.run import train

REPO = Path(__file__).resolve().parents[1]
IMAGENETTE = REPO.parent / "shared" / "data" / "imagenette-224"


def run(data: Path = IMAGENETTE, loader: str = "folder", arch: str = "resnet18", resolution: int = 64,
        epochs: int = 4, batch_size: int = 64, lr: float = 0.8, workers: int = 2, threads: int = 0,
        out: Path | None = None, seed: int = 0) -> dict:
    """Train and evaluate; returns the trainer's summary plus the metrics rows and wall time."""
    if threads:
        torch.set_num_threads(threads)
    out = out or REPO / "runs" / f"learning-{arch}-{resolution}px-{loader}-{time.strftime('%Y%m%d-%H%M%S')}"
    cfg = load_config(None, {
        "data.path": str(data), "data.loader": loader, "data.batch_size": batch_size,
        "data.resolution": resolution, "data.val_resolution": resolution, "data.workers": workers,
        "data.min_area": 0.25, "data.dali_device": "auto", "data.seed": seed,
        "model.arch": arch, "optim.lr": lr, "optim.warmup_epochs": 1, "optim.schedule": "linear",
        "optim.label_smoothing": 0.1, "optim.weight_decay": 5e-5,
        "run.epochs": epochs, "run.out": str(out), "run.seed": seed, "run.log_every": 10,
        "run.tensorboard": False, "run.keep_last": 1})
    t0 = time.perf_counter()
    summary = train(cfg)
    summary["wall_s"] = time.perf_counter() - t0
    summary["rows"] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return summary


@click.command(context_settings=CONTEXT)
@click.option("--data", type=click.Path(exists=True, file_okay=False, path_type=Path), default=IMAGENETTE,
              help="Imagenette root (train/, val/) for --loader folder, or its shards for dali/torch.")
@click.option("--loader", type=click.Choice(["folder", "torch", "dali"]), default="folder")
@click.option("--arch", default="resnet18")
@click.option("--resolution", type=int, default=64)
@click.option("--epochs", type=int, default=4)
@click.option("--batch-size", type=int, default=64)
@click.option("--lr", type=float, default=0.8, help="Per 256 images (peak 0.2 at batch 64).")
@click.option("--workers", type=int, default=2)
@click.option("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None)
@click.option("--min-top1", type=float, default=10.0, help="Fail unless the final top-1 (%) is above this.")
def main(data, loader, arch, resolution, epochs, batch_size, lr, workers, threads, out, min_top1):
    """Train from scratch on Imagenette and check that validation top-1 beats chance."""
    s = run(data, loader, arch, resolution, epochs, batch_size, lr, workers, threads, out)
    final = s["final"]["val_top1"]
    cmd = "python -m imt.benchmarks.learning " + " ".join(sys.argv[1:])
    rows = "\n".join(f"| {r['epoch']} | {r['train_loss']:.3f} | {r['val_top1']:.1f} | {r['val_top5']:.1f} | "
                     f"{r['images_per_sec']:.0f} | {100 * r['data_wait_fraction']:.0f}% | {r['epoch_time']:.0f} |"
                     for r in s["rows"])
    click.echo(f"""
## Learning check: {arch} from scratch on Imagenette at {resolution} px, {datetime.date.today()}
Machine: {"GPU " + torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU machine"}, {os.cpu_count()} cores, \
{torch.get_num_threads()} torch thread(s)
(precision auto -> float32 on CPUs without native bf16). {loader} loader, batch {batch_size}, peak lr
{lr * batch_size / 256:.3g}, linear schedule with 1 warm-up epoch, label smoothing 0.1, {epochs} epochs.

    {cmd}

| epoch | train loss | val top-1 % | val top-5 % | train img/s | data wait | epoch s |
|---|---|---|---|---|---|---|
{rows}

Final val top-1 **{final:.1f}%** (chance 10%) on {s['final']['val_count']} images; wall time {s['wall_s'] / 60:.1f} min.
""")
    if final <= min_top1:
        click.echo(f"FAIL: final top-1 {final:.1f}% is not above {min_top1}%", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
