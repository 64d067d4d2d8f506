"""Training from shards on a web server through a cache smaller than the data set (pipeline/remote.py), against
the same loader on the local folder.

    python -m imt.benchmarks.stream --data work/imagenette-shards --cache-fraction 0.33 --epochs 3

Serves the parent of `--data` on 127.0.0.1 (http.server, as the tests do; `--url` reads a real store instead),
then runs `--epochs` training epochs of the chosen loader through `open_remote` with data.cache_limit set to
`--cache-fraction` of the data set's bytes, and prints per epoch: tars fetched, of how many, the largest the cache
folder got (sampled after every batch), images per second and wall seconds. Then one epoch of the same loader
on the local folder (the whole data set, globally shuffled). Wall-clock figures depend on the machine's load.
"""
from __future__ import annotations

import http.server
import json
import tempfile
import threading
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

import click

from imt.pipeline import remote
from imt.pipeline.config import DataConfig
from imt.train.dist import DistInfo


def _loader(kind: str, cfg: DataConfig, cache):
    if kind == "dali":
        from imt.pipeline.dali import DaliLoader
        return DaliLoader(cfg, "train", DistInfo(), train=True, cache=cache)
    from imt.pipeline.torch_baseline import ShardLoader
    return ShardLoader(cfg, "train", DistInfo(), train=True, cache=cache)


def _folder_bytes(folder: Path) -> int:
    total = 0
    for p in folder.iterdir() if folder.is_dir() else ():
        if p.suffix in (".tar", ".idx") or ".part" in p.name:
            try:
                total += p.stat().st_size
            except FileNotFoundError:
                pass
    return total


def _epoch(loader, epoch: int, watch: Path | None) -> dict:
    loader.set_epoch(epoch)
    t, images, peak = time.perf_counter(), 0, 0
    for _, labels in loader:
        images += len(labels)
        if watch is not None:
            peak = max(peak, _folder_bytes(watch))
    wall = time.perf_counter() - t
    return {"images": images, "wall_s": round(wall, 1), "images_per_s": round(images / wall, 1),
            **({"peak_cache_bytes": peak} if watch is not None else {})}


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--data", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="A shard folder (imt-make-shards); served over HTTP on 127.0.0.1 unless --url is given.")
@click.option("--url", default="", help="Read this URL (the same data set on a real store) instead of serving --data.")
@click.option("--loader", "kind", type=click.Choice(["torch", "dali"]), default="torch")
@click.option("--cache-fraction", type=click.FloatRange(0.01, 1.0), default=0.33,
              help="data.cache_limit as a share of the data set's tar and index bytes.")
@click.option("--epochs", type=click.IntRange(1), default=3)
@click.option("--workers", type=click.IntRange(0), default=2)
@click.option("--batch-size", type=click.IntRange(1), default=64)
@click.option("--resolution", type=click.IntRange(16), default=128)
def main(data, url, kind, cache_fraction, epochs, workers, batch_size, resolution):
    """Fetches per epoch and throughput of a data set streamed through a cache smaller than it."""
    server = None
    if not url:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(_Quiet, directory=str(data.parent)))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{server.server_address[1]}/{data.name}"
    try:
        with tempfile.TemporaryDirectory(prefix="imt-stream-") as tmp:
            specs = remote.ShardCache(url, Path(tmp) / "probe").shards()
            total = sum(s["bytes"] or 0 for s in specs.values())
            cfg = DataConfig(path=url, loader=kind, batch_size=batch_size, resolution=resolution, workers=workers,
                             dtype="float32", dali_device="cpu", cache_dir=str(Path(tmp) / "cache"),
                             cache_limit=total * cache_fraction / 2**30)
            path, cache = remote.open_remote(cfg)
            if cache is None:
                raise click.UsageError("the data set fits the cache: lower --cache-fraction")
            loader = _loader(kind, replace(cfg, path=path), cache)
            tars = sum(1 for n in specs if n.endswith(".tar") and "-train-" in n)
            rows = []
            for epoch in range(epochs):
                before = cache.fetches
                row = _epoch(loader, epoch, cache.dir)
                rows.append({"epoch": epoch + 1, "tars_fetched": cache.fetches - before, "train_tars": tars, **row})
                print(json.dumps(rows[-1]), flush=True)
            local = _epoch(_loader(kind, replace(cfg, path=str(data)), None), 0, None)
            print(json.dumps({"local_folder": local}), flush=True)
            print(json.dumps({"url": url, "loader": kind, "data_bytes": total, "cache_limit_bytes": cache.limit,
                              "window_bytes": cache.window_bytes(), "workers": workers, "batch_size": batch_size,
                              "resolution": resolution}))
    finally:
        if server is not None:
            server.shutdown()
            server.server_close()


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


if __name__ == "__main__":
    main()
