"""Time from a fresh loader to the first batch of a resumed epoch, at two positions in the epoch, for each
loader: "skip" draws and discards the batches already trained (what train/loop.py did before loaders had a
state), "state" restores the loader's state_dict() (index into the epoch's plan; DALI's own checkpoint).

    python -m imt.benchmarks.resume --data work/shards20k --folder work/synthetic20k --at 0.1 --at 0.9

The states are made beforehand by a loader that really ran to that position (untimed). Each figure times:
building the loader, load_state_dict (or nothing), set_epoch, and the first batch (after skipping, for skip).
Model building and checkpoint reading, the same either way, are not included.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import replace

import click

from imt.pipeline import build_loader
from imt.pipeline.config import DataConfig
from imt.train.dist import single

EPOCH = 1  # resume inside the second epoch (DALI's stream has then gone through one reset)


def _first_batch(cfg: DataConfig, state: dict | None, skip: int) -> float:
    t = time.perf_counter()
    loader = build_loader(cfg, "train", single("cpu"), train=True)
    if state is not None:
        loader.load_state_dict(state)
    loader.set_epoch(EPOCH)
    it = iter(loader)
    for _ in range(skip):
        next(it)
    next(it)
    seconds = time.perf_counter() - t
    del it, loader
    return seconds


def _state_at(cfg: DataConfig, k: int) -> dict:
    loader = build_loader(cfg, "train", single("cpu"), train=True)
    loader.set_epoch(EPOCH)
    it = iter(loader)
    for _ in range(k):
        next(it)
    state = loader.state_dict()
    del it, loader
    return state


@click.command()
@click.option("--data", required=True, help="Shard folder (dali, torch loaders).")
@click.option("--folder", "folder_root", default=None, help="ImageFolder root (folder loader); omit to skip it.")
@click.option("--loader", "loaders", multiple=True, default=("dali", "torch", "folder"))
@click.option("--at", "fractions", multiple=True, type=float, default=(0.1, 0.9))
@click.option("--batch-size", default=64)
@click.option("--resolution", default=64)
@click.option("--workers", default=2)
@click.option("--repeats", default=3)
def main(data, folder_root, loaders, fractions, batch_size, resolution, workers, repeats):
    rows = []
    for kind in loaders:
        if kind == "folder" and not folder_root:
            continue
        cfg = DataConfig(path=folder_root if kind == "folder" else data, loader=kind, batch_size=batch_size,
                         resolution=resolution, val_resolution=resolution, workers=workers, dtype="float32",
                         dali_device="cpu")
        n = len(build_loader(cfg, "train", single("cpu"), train=True))
        for frac in fractions:
            k = int(frac * n)
            state = _state_at(cfg, k)
            for how in ("skip", "state"):
                times = [_first_batch(replace(cfg), state if how == "state" else None, k if how == "skip" else 0)
                         for _ in range(repeats)]
                rows.append((kind, frac, k, n, how, times))
                click.echo(f"{kind:7s} {frac:4.0%} (batch {k}/{n}) {how:5s}: median {statistics.median(times):7.2f} s "
                           f"[{', '.join(f'{t:.2f}' for t in times)}]", err=True)
    click.echo("| loader | position | resume by | seconds to the first batch (median) | runs |")
    click.echo("|---|---|---|---:|---|")
    for kind, frac, k, n, how, times in rows:
        click.echo(f"| {kind} | {frac:.0%} (batch {k} of {n}) | {how} | {statistics.median(times):.2f} | "
                   f"{', '.join(f'{t:.2f}' for t in times)} |")


if __name__ == "__main__":
    main()
