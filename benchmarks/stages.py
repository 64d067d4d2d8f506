"""Where a CPU input pipeline's time goes, per stage, against the decode-only limit.

    python -m imt.benchmarks.stages --data work/bench-data/imagenet-sample-2000/shards --resolution 224

CPU-seconds per image (all threads of this one process: os.times), which moves far less than wall-clock
figures when other jobs share the cores, of each stage added in turn:

- decode-only: pipeline.torch_baseline.ShardSource.read (tar read by offset + torchvision.io.decode_jpeg,
  full image): the work of benchmarks.limit, the limit of every CPU pipeline;
- the DataLoader's stages, in one process with the product's own functions: + its RandomResizedCrop and
  flip (torch_baseline._transform), + normalisation to float (torch_baseline.normalise), + collation
  (torch.stack). What it pays on top (worker processes, shared-memory transfer) is the difference to its
  pipeline-only figure in benchmarks.run;
- DALI's CPU operators, one thread, batch `--batch-size`: full decode (fn.decoders.image), the region-of-
  interest decode the product uses (fn.decoders.image_random_crop: libjpeg-turbo skips rows and columns
  outside the crop), + the antialiased linear resize to the output size, + crop_mirror_normalize to float
  (flip, normalise): the stages of pipeline.dali's training graph, operator by operator; and the product's
  DaliLoader itself (its graph, its iterator's copy into torch) with one thread.

Also: the share of RandomResizedCrop crops at least 2x and 4x the output on both sides (libjpeg's DCT
scaling could then decode at 1/2 or 1/4 size), from the JPEG headers and torchvision's own crop sampler.
"""
from __future__ import annotations

import io
import json
import os
import sys
import time
from pathlib import Path

import click
import torch

from imt.pipeline.common import MEAN, STD, load_split
from imt.pipeline.config import DataConfig
from imt.pipeline.torch_baseline import ShardSource, _transform, normalise


def cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def per_image_ms(fn, n: int) -> float:
    c0 = cpu_seconds()
    fn()
    return 1000 * (cpu_seconds() - c0) / n


def torch_stages(source: ShardSource, cfg: DataConfig, n: int) -> dict:
    tf = _transform(True, cfg.resolution, cfg)
    idx = list(range(min(n, len(source))))
    n = len(idx)
    torch.manual_seed(0)
    for i in idx[:8]:  # warm the allocator and the page cache
        tf(source.read(i)[0])
    out = {"decode-only": per_image_ms(lambda: [source.read(i) for i in idx], n)}
    out["+ crop, resize, flip (uint8)"] = per_image_ms(lambda: [tf(source.read(i)[0]) for i in idx], n)

    def full():
        for s in range(0, n - cfg.batch_size + 1, cfg.batch_size):
            normalise(torch.stack([tf(source.read(i)[0]) for i in idx[s:s + cfg.batch_size]]), torch.float32)
    m = n // cfg.batch_size * cfg.batch_size
    out["+ collate, normalise to float32"] = per_image_ms(full, m)
    return out


def dali_stages(sp, cfg: DataConfig, batches: int) -> dict:
    from nvidia.dali import fn, pipeline_def, types

    size = cfg.resolution

    @pipeline_def
    def graph(stage: str):
        jpegs, labels = fn.readers.webdataset(paths=sp.tars, index_paths=sp.indexes, ext=["jpg", "lbl"],
                                              dtypes=[types.UINT8, types.INT64], random_shuffle=True,
                                              initial_fill=256, seed=1)
        if stage == "decode":
            return fn.decoders.image(jpegs, device="cpu", output_type=types.RGB, adjust_orientation=False), labels
        images = fn.decoders.image_random_crop(jpegs, device="cpu", output_type=types.RGB,
                                               random_area=[cfg.min_area, 1.0], random_aspect_ratio=[3 / 4, 4 / 3],
                                               num_attempts=10, adjust_orientation=False)
        if stage == "roi":
            return images, labels
        images = fn.resize(images, resize_x=size, resize_y=size, interp_type=types.INTERP_LINEAR, antialias=True)
        if stage == "resize":
            return images, labels
        return fn.crop_mirror_normalize(images, mirror=fn.random.coin_flip(probability=0.5),
                                        mean=[255 * m for m in MEAN], std=[255 * s for s in STD],
                                        dtype=types.FLOAT, output_layout="HWC"), labels

    out = {}
    labels = {"decode": "DALI full decode", "roi": "DALI ROI decode (image_random_crop)",
              "resize": "+ antialiased linear resize", "normalise": "+ crop_mirror_normalize to float32"}
    for stage, label in labels.items():
        pipe = graph(stage, batch_size=cfg.batch_size, num_threads=1, device_id=None, prefetch_queue_depth=1, seed=1)
        pipe.build()
        pipe.run()
        out[label] = per_image_ms(lambda: [pipe.run() for _ in range(batches)], batches * cfg.batch_size)
        del pipe
    return out


def dali_loader_ms(cfg: DataConfig, batches: int) -> float:
    from imt.pipeline.dali import DaliLoader
    from imt.train.dist import single

    loader = DaliLoader(cfg, "train", single(torch.device("cpu")), train=True)
    it = iter(loader)
    next(it)
    got = 0

    def run():
        nonlocal got
        for _ in range(batches):
            got += next(it)[0].shape[0]
    ms = per_image_ms(run, batches * cfg.batch_size)
    it.close()
    return ms


def dct_scaling_share(source: ShardSource, px: int, n: int) -> dict:
    """Share of torchvision RandomResizedCrop crops (scale 0.08-1) whose both sides are >= 2x / 4x px."""
    from PIL import Image
    from torchvision.transforms import v2

    torch.manual_seed(0)
    twice = four = total = 0
    for i in range(min(n, len(source))):
        si, off, size, _, _ = source.entries[i]
        with open(source.tars[si], "rb") as f:
            f.seek(off)
            with Image.open(io.BytesIO(f.read(size))) as im:
                w, h = im.size
        _, _, ch, cw = v2.RandomResizedCrop.get_params(torch.empty(1, h, w), [0.08, 1.0], [3 / 4, 4 / 3])
        twice += min(ch, cw) >= 2 * px
        four += min(ch, cw) >= 4 * px
        total += 1
    return {"crops": total, "at_least_2x": round(twice / total, 4), "at_least_4x": round(four / total, 4)}


@click.command(context_settings={"show_default": True})
@click.option("--data", "data_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="Shards with a train split (benchmarks.run builds them under work/bench-data).")
@click.option("--resolution", default=224, type=click.IntRange(16))
@click.option("--batch-size", default=64, type=click.IntRange(1))
@click.option("--images", default=512, type=click.IntRange(1), help="Images per stage figure.")
@click.option("--json", "json_path", default=None, type=click.Path(dir_okay=False))
def main(data_dir, resolution, batch_size, images, json_path):
    """CPU-milliseconds per image of each stage of the CPU pipelines, against decode-only."""
    torch.set_num_threads(1)
    cfg = DataConfig(path=str(data_dir), loader="dali", dali_device="cpu", batch_size=batch_size,
                     resolution=resolution, workers=1, prefetch=1, dtype="float32", drop_last=True)
    manifest, sp = load_split(data_dir, "train")
    source = ShardSource(sp, manifest.num_classes, manifest.label_ext)
    batches = max(1, images // batch_size)
    load0 = os.getloadavg()[0]
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "resolution": resolution,
              "batch_size": batch_size, "images": images, "torch_dataloader_stages_ms": torch_stages(source, cfg, images)}
    try:
        result["dali_stages_ms"] = dali_stages(sp, cfg, batches)
        result["dali_loader_ms"] = dali_loader_ms(cfg, batches)
    except ImportError:
        result["dali_stages_ms"] = "nvidia-dali is not installed"
    result["dct_scaling"] = {px: dct_scaling_share(source, px, images) for px in sorted({resolution, 112, 224})}
    result["load_average"] = [round(load0, 2), round(os.getloadavg()[0], 2)]
    limit = result["torch_dataloader_stages_ms"]["decode-only"]
    click.echo(f"CPU-ms per image, {resolution} px, batch {batch_size}, {images} images per figure, load average "
               f"{result['load_average']} (a shared machine inflates CPU time too, less than wall time):")
    for section in ("torch_dataloader_stages_ms", "dali_stages_ms"):
        if isinstance(result[section], dict):
            for k, v in result[section].items():
                click.echo(f"  {section.split('_')[0]:6s} {k:45s} {v:6.2f} ms  ({100 * limit / v:5.1f}% of decode-only)")
    if "dali_loader_ms" in result:
        v = result["dali_loader_ms"]
        click.echo(f"  dali   {'DaliLoader (graph + iterator copy), 1 thread':45s} {v:6.2f} ms  ({100 * limit / v:5.1f}% of decode-only)")
    for px, d in result["dct_scaling"].items():
        click.echo(f"  RandomResizedCrop at {px} px: {100 * d['at_least_2x']:.1f}% of crops >= 2x the output on both "
                   f"sides, {100 * d['at_least_4x']:.1f}% >= 4x")
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
