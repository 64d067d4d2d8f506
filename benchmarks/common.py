"""Pieces the benchmarks share: the benchmark data set (real JPEGs replicated and sharded, cached),
its statistics, the environment record, figure summaries and the timing windows.

Nothing here re-implements the product: shards come from tools.make_shards, batches from
pipeline.build_loader, steps from train.loop.train_step.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import io
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from imt.benchmarks.shards import DEFAULT_SRC, REPO, replicate

DATA_STAMP = "bench-data.json"  # what a cached data set was made from; reused only when it matches


@dataclass(frozen=True)
class BenchData:
    shards: Path            # folder written by tools.make_shards (manifest.json, train split)
    folder: Path | None     # ImageFolder root holding train/<class>/* (for loader="folder"), if any
    source: str             # where the images came from (for the record)


# ---- data ---------------------------------------------------------------------------------------

def _source_fingerprint(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.name}\0{f.stat().st_size}\n".encode())
    return h.hexdigest()[:16]


def prepare_data(images: Path, count: int, cache: Path, *, workers: int, log: Callable[[str], None]) -> BenchData:
    """`images` (flat *.JPEG named <wnid>_<name>.JPEG, like ../shared/data/imagenet-sample) replicated
    by symlinks to `count` files in a class-per-folder tree, sharded with tools.make_shards. Both live
    in `cache/<name>-<count>/` and are reused when the stamp (source listing, count, seed) matches, so
    a 30,000-sample GPU data set is made once. The tree is kept: it is the "folder" loader's input."""
    from imt.tools.make_shards import make_shards

    images = Path(images).resolve()
    files = sorted(images.glob("*.JPEG"))
    if not files:
        raise FileNotFoundError(f"--images {images}: no *.JPEG files there; point it at a flat folder of "
                                f"<wnid>_<name>.JPEG files such as {DEFAULT_SRC}, or pass --data <shards>")
    root = Path(cache) / f"{images.name}-{count}"
    stamp = {"images": str(images), "files": len(files), "fingerprint": _source_fingerprint(files),
             "count": count, "seed": 0}
    stamp_file = root / DATA_STAMP
    shards, tree = root / "shards", root / "tree"
    if stamp_file.is_file() and json.loads(stamp_file.read_text()) == stamp and (shards / "manifest.json").is_file():
        log(f"reusing {root} ({count} samples)")
        return BenchData(shards, tree, str(images))
    if root.exists():
        log(f"{root}: made from other images or settings; rebuilding it")
        shutil.rmtree(root)
    t0 = time.perf_counter()
    replicate(images, tree, count)
    make_shards(tree, shards, workers=workers, seed=0, progress=False)
    stamp_file.write_text(json.dumps(stamp, indent=1) + "\n")  # last: a half-made cache is never reused
    log(f"made {count} samples from {len(files)} JPEGs in {root} ({time.perf_counter() - t0:.0f} s)")
    return BenchData(shards, tree, str(images))


def bench_device(device: str) -> torch.device:
    """A benchmark command's --device (auto | cpu | cuda) as a torch device; cuda without one is refused."""
    import click

    if device == "cuda" and not torch.cuda.is_available():
        raise click.UsageError("--device cuda, but torch sees no CUDA device; use --device cpu")
    return torch.device("cuda:0" if (device == "cuda" or (device == "auto" and torch.cuda.is_available())) else "cpu")


def bench_data(data_dir: str | None, images: str, count: int, cache: str, log: Callable[[str], None],
               folder: str | None = None) -> BenchData:
    """--data DIR as it is, else `images` replicated to `count` and sharded (prepare_data); `folder`: an
    ImageFolder tree for the folder loader instead of the replicated one."""
    import click
    from dataclasses import replace

    if data_dir:
        return BenchData(Path(data_dir).resolve(), Path(folder).resolve() if folder else None, str(data_dir))
    try:
        # make_shards' worker processes take ~2 s each to start: not worth it for a tiny set.
        data = prepare_data(Path(images), count, Path(cache), workers=min(os.cpu_count() or 1, 1 + count // 1000),
                            log=log)
    except FileNotFoundError as e:
        raise click.UsageError(str(e))
    return replace(data, folder=Path(folder).resolve()) if folder else data


def dataset_stats(shards: Path, split: str = "train", max_headers: int = 1000) -> dict:
    """Sample count and mean JPEG bytes (from the index files: every sample), mean width/height (JPEG
    headers of the first `max_headers` samples in index order: decode cost scales with pixels)."""
    from PIL import Image

    from imt.pipeline.manifest import load_manifest, read_index

    m = load_manifest(shards)
    sp = m.split(split)
    sizes, dims = [], []
    for shard in sp.shards:
        index = read_index(shard.index)
        with open(shard.tar, "rb") as tar:
            for i in range(len(index)):
                off, size, _ = index.sample(i)["jpg"]
                sizes.append(size)
                if len(dims) < max_headers:
                    tar.seek(off)
                    with Image.open(io.BytesIO(tar.read(size))) as im:
                        dims.append(im.size)
    return {"split": split, "samples": sp.num_samples, "shards": len(sp.shards), "classes": m.num_classes,
            "mean_jpeg_bytes": round(statistics.fmean(sizes)) if sizes else 0,
            "mean_width": round(statistics.fmean(w for w, _ in dims), 1) if dims else 0,
            "mean_height": round(statistics.fmean(h for _, h in dims), 1) if dims else 0,
            "mean_megapixels": round(statistics.fmean(w * h for w, h in dims) / 1e6, 4) if dims else 0,
            "headers_read": len(dims)}


# ---- environment --------------------------------------------------------------------------------

def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _dali_version() -> str | None:
    try:
        import nvidia.dali as dali
        return dali.__version__
    except ImportError:
        return None


def git_commit() -> dict:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
    try:
        return {"commit": git("rev-parse", "HEAD") or None, "dirty": bool(git("status", "--porcelain"))}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_name() -> str:
    """What a report's "Machine:" line names: the GPU, else the CPU model (CPU figures differ by model: the CPU
    learning check ran 2x faster on a Xeon with AMX bfloat16 than on an AMD EPYC in float32, RESULTS.md)."""
    return "GPU " + torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU " + cpu_model()


def environment(device: torch.device) -> dict:
    cuda = device.type == "cuda"
    return {
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if cuda else None,
        "cuda": torch.version.cuda if cuda else None,
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {"torch": torch.__version__, "torchvision": _version("torchvision"),
                     "nvidia-dali": _dali_version(), "webdataset": _version("webdataset"),
                     "numpy": _version("numpy"), "pillow": _version("pillow")},
        "git": git_commit(),
        "argv": [Path(sys.argv[0]).name, *sys.argv[1:]],
    }


# ---- figures ------------------------------------------------------------------------------------

def summarise(runs: list[float]) -> dict:
    """Median and spread of one figure's repeats (min/max always; quartiles when there are 4+)."""
    s = sorted(runs)
    out = {"median": round(statistics.median(s), 2), "min": round(s[0], 2), "max": round(s[-1], 2),
           "runs": [round(x, 2) for x in runs]}
    if len(s) >= 4:
        q = statistics.quantiles(s, n=4)
        out.update(q1=round(q[0], 2), q3=round(q[2], 2))
    return out


def stream(loader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches across epoch boundaries (set_epoch before each epoch, as the trainer does), so a timing
    window may span an epoch end, as training does. Closing the generator leaves the epoch cleanly."""
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        n = 0
        for batch in loader:
            n += 1
            yield batch[0], batch[1]
        if n == 0:
            raise RuntimeError(f"{type(loader).__name__} yielded no batches for epoch {epoch}")
        epoch += 1


def sync(device: torch.device) -> None:
    """Only at timing boundaries: the host runs ahead of the GPU, so a window ends when the device does."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class Windows:
    img_per_s: list[float]     # one figure per timed window (repeat)
    data_wait: list[float]     # fraction of each window's wall time the host spent blocked in next(loader)
    images: int                # images per window (last window)


def time_windows(batches: Iterator, work: Callable[[torch.Tensor, torch.Tensor], object], device: torch.device,
                 *, warmup: int, repeats: int, per_repeat: int) -> Windows:
    """`warmup` untimed batches (pipeline start, worker spawn, cudnn autotune, torch.compile), then
    `repeats` windows of `per_repeat` batches each, back to back on one stream. The device is synchronised
    at the window edges only, never per step, so the host can run ahead exactly as in training."""
    for _ in range(warmup):
        work(*next(batches))
    sync(device)
    rates, waits, n = [], [], 0
    for _ in range(repeats):
        n, wait = 0, 0.0
        t0 = time.perf_counter()
        for _ in range(per_repeat):
            t = time.perf_counter()
            images, labels = next(batches)
            wait += time.perf_counter() - t
            work(images, labels)
            n += images.shape[0]
        sync(device)
        dt = time.perf_counter() - t0
        rates.append(n / dt)
        waits.append(wait / dt)
    return Windows(rates, waits, n)
