"""Shard-making throughput on real ImageNet JPEGs (tools/make_shards.make_shards, end to end).

    python -m imt.benchmarks.shards --count 10000 --workers 1 --workers 2 [--profile]

Replicates ../shared/data/imagenet-sample (400 files, one per class) by symlinks into a
class-per-folder tree of --count files in a temp folder, then times make_shards (list, verify +
full decode of every file, shuffle, write tars + indexes + manifest) once per --workers value.
Prints images/sec (wall clock) and images per CPU-second (all processes: wall-clock figures move
when other jobs share the cores, CPU-seconds much less), and writes the figures and resolved
settings to --json. The 400 source files stay in the page cache, so this measures CPU cost, not
disk reads.
"""
from __future__ import annotations

import cProfile
import io
import json
import os
import platform
import pstats
import shutil
import tempfile
import time
from pathlib import Path

import click
from PIL import Image

from imt.tools.make_shards import Convert, check_image, make_shards
from imt.train.cli import CONTEXT

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SRC = Path(os.environ.get("IMT_SHARED_DATA", REPO.parent / "shared" / "data")) / "imagenet-sample"


def replicate(src: Path, root: Path, count: int) -> int:
    """train/<wnid>/<name>_<copy>.JPEG symlinks, `count` in all; returns the total source bytes."""
    files = sorted(src.glob("*.JPEG"))
    if not files:
        raise click.ClickException(f"no *.JPEG in {src}")
    total = 0
    for k in range(count):
        f = files[k % len(files)]
        d = root / "train" / f.name.split("_")[0]
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{f.stem}_{k // len(files):04d}.JPEG").symlink_to(f)
        total += f.stat().st_size
    return total


def per_image_costs(src: Path, reps: int = 3) -> dict:
    """Milliseconds per image, one process, bytes in memory: PIL's decode alone, and the whole
    check (make_shards.check_image: parse, decode, baseline/EOI checks, conversion when needed).
    Their gap to 1000 / (img/s per worker) is the cost of listing, reading, tar writing, hashing."""
    datas = [f.read_bytes() for f in sorted(src.glob("*.JPEG"))]
    t0 = time.perf_counter()
    for _ in range(reps):
        for d in datas:
            Image.open(io.BytesIO(d)).load()
    t1 = time.perf_counter()
    for _ in range(reps):
        for d in datas:
            check_image(d, Convert())
    t2 = time.perf_counter()
    n = reps * len(datas)
    return {"pil_decode_ms": round((t1 - t0) / n * 1e3, 3), "check_image_ms": round((t2 - t1) / n * 1e3, 3)}


def run_once(src: Path, out: Path, workers: int, seed: int, profile: bool) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    prof = cProfile.Profile() if profile else None
    c0 = os.times()
    t0 = time.perf_counter()
    if prof:
        prof.enable()
    m = make_shards(src, out, workers=workers, seed=seed, progress=False)
    if prof:
        prof.disable()
    dt = time.perf_counter() - t0
    c1 = os.times()  # children's CPU counts once the pool has been joined, as make_shards does
    cpu = sum(getattr(c1, k) - getattr(c0, k) for k in ("user", "system", "children_user", "children_system"))
    split = m["splits"]["train"]
    if prof:
        click.echo(f"--- cProfile, workers={workers} (main process only; workers>1 hides the work) ---")
        pstats.Stats(prof).sort_stats("tottime").print_stats(15)
    return {"workers": workers, "seconds": round(dt, 3), "images": split["inputs"],
            "img_per_s": round(split["inputs"] / dt, 1), "img_per_s_per_worker": round(split["inputs"] / dt / workers, 1),
            "cpu_seconds": round(cpu, 2), "img_per_cpu_s": round(split["inputs"] / cpu, 1),
            "written": split["num_samples"], "skipped": len(split["skipped"]), "converted": split["converted"],
            "shards": len(split["shards"]), "bytes_written": sum(s["bytes"] for s in split["shards"])}


@click.command(context_settings=CONTEXT)
@click.option("--count", default=10_000, type=click.IntRange(1), help="Files in the replicated tree.")
@click.option("--workers", "workers_list", multiple=True, type=click.IntRange(1), default=(1, 2),
              help="Worker counts to time (repeatable).")
@click.option("--src", default=str(DEFAULT_SRC), type=click.Path(exists=True, file_okay=False))
@click.option("--tmp", default=None, help="Scratch folder (default: the system temp folder).")
@click.option("--seed", default=0, type=int)
@click.option("--cost-reps", default=3, type=click.IntRange(0),
              help="Passes over the 400 files to time decode and check per image (0: skip).")
@click.option("--profile", is_flag=True, help="cProfile each run and print the top functions.")
@click.option("--json", "json_path", default=str(Path(__file__).with_name("shards.json")),
              help="Where to write the results.")
def main(count, workers_list, src, tmp, seed, cost_reps, profile, json_path):
    """Time make_shards on imagenet-sample replicated to --count files."""
    with tempfile.TemporaryDirectory(prefix="imt-bench-shards-", dir=tmp) as d:
        tree, out = Path(d) / "src", Path(d) / "out"
        src_bytes = replicate(Path(src), tree, count)
        costs = per_image_costs(Path(src), cost_reps) if cost_reps else {}
        if costs:
            click.echo(f"per image, 1 process: PIL decode {costs['pil_decode_ms']:.2f} ms, full check "
                       f"{costs['check_image_ms']:.2f} ms (ceiling {1e3 / costs['check_image_ms']:.0f} img/s/worker)")
        runs = []
        for w in workers_list:
            r = run_once(tree, out, w, seed, profile)
            runs.append(r)
            click.echo(f"workers={w}: {r['images']} images in {r['seconds']:.1f} s = {r['img_per_s']:.0f} img/s "
                       f"({r['img_per_s_per_worker']:.0f} per worker; {r['img_per_cpu_s']:.0f} per CPU-second, "
                       f"all processes); {r['converted']} converted, "
                       f"{r['shards']} shards, {r['bytes_written'] / 1e9:.2f} GB")
    base = runs[0]["img_per_s"] / runs[0]["workers"]
    for r in runs:
        r["scaling_vs_first"] = round(r["img_per_s"] / base / r["workers"], 3)
    result = {"benchmark": "shards", "count": count, "src": str(src), "source_bytes": src_bytes,
              "settings": {"seed": seed, "shard_bytes": 1_000_000_000, "shard_samples": None,
                           "max_side": None, "quality": None, "validation": "full PIL decode of every file (+ verify() for non-JPEG)"},
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                          "python": platform.python_version()},
              "per_image": costs, "runs": runs}
    Path(json_path).write_text(json.dumps(result, indent=1) + "\n")
    click.echo(f"wrote {json_path}")


if __name__ == "__main__":
    main()
