"""Checks a run makes before training starts, beyond the cheap ones every loader makes (pipeline.manifest:
paths inside the folder, no shard listed twice, each shard's size and index tail).

`data.verify=true` (`--verify`): every shard of the train and val splits is hashed and re-read against
manifest.json by imt-verify-shards' own code (`tools.verify_shards.verify_shards`, without decoding the
images), so edited labels, a reordered or foreign class list, a swapped or re-made shard are refused before
the first step. It reads every byte twice (sha256, then the tar members), so it is opt-in; its cost is
measured and printed with each run.
"""
from __future__ import annotations

import time

from imt.pipeline.config import DataConfig
from imt.pipeline.manifest import ManifestError, load_manifest
from imt.train import dist

SPLITS = ("train", "val")


def verify_data(data: DataConfig, info: dist.DistInfo, say=print) -> float | None:
    """With data.verify: the first rank of every node checks the node's shards (a node may hold its own copy);
    every rank refuses together when any found a problem. Returns the seconds it took on this rank (None
    when it did not check)."""
    if not data.verify:
        return None
    problems, seconds = None, None
    if info.local_rank == 0:
        from imt.tools.verify_shards import verify_shards  # its one definition of what a good shard is

        t0 = time.perf_counter()
        problems = verify_shards(data.path, splits=SPLITS, decode=False, progress=info.is_main)
        seconds = time.perf_counter() - t0
        if not problems:
            m = load_manifest(data.path, check_files=False)
            shards = [s for name in SPLITS for s in m.split(name).shards]
            size = sum(s.tar.stat().st_size for s in shards)
            say(f"data.verify: {len(shards)} shards ({size / 1e9:.2f} GB) match {m.root / 'manifest.json'}: "
                f"hashed and re-read in {seconds:.1f} s ({size / 1e6 / max(seconds, 1e-9):.0f} MB/s)")
    found = [p for ps in dist.all_gather_object(problems, info) if ps for p in ps]
    if found:
        listed = "\n  ".join(found[:20]) + (f"\n  ... and {len(found) - 20} more" if len(found) > 20 else "")
        raise ManifestError(f"data.verify: {len(found)} problem(s) in the shards of {data.path}:\n  {listed}\n"
                            f"Remake them with `imt-make-shards --src <data> --out {data.path} --overwrite`")
    return seconds
