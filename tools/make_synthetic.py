"""Writes the embedded default dataset: procedurally drawn, learnable JPEG classes in the
ImageNet folder layout (<out>/train/<class>/*.JPEG, <out>/val/<class>/*.JPEG).

Each class is a periodic *texture* (stripes in three orientations, checkers, a dot grid, concentric
rings, a line grid, zigzags) drawn over most of the picture in a random colour, period, phase, line
width, tilt and contrast on a random background (flat, gradient or blurred clutter), so neither colour
nor position says anything: the class is the structure, which a small CNN picks up in a few hundred
updates. Textures rather than shapes, because the shape classes the dataset first had (circles, squares,
triangles, crosses) stayed near chance after the demo's 200 updates while the texture classes were learned
within a few epochs (benchmarks/RESULTS.md, "Demo recipe"). No two classes are mirror images of each other
(training flips horizontally), and periods keep >= 5 px after the recipe's downscaling to 64 px.
Sizes follow ImageNet's (mostly 500x375 / 375x500, some others), JPEG quality 90. The output is a pure
function of (seed, counts): the same call writes the same bytes.

    python -m imt.tools.make_synthetic --out work/synthetic
"""
from __future__ import annotations

import json
import math
import random
from pathlib import Path

import click
import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from imt.train.cli import CONTEXT

# Class names sort in this order, so labels (sorted names, as ImageFolder assigns them) are 0..N-1.
CLASSES = (
    "c0_hstripes",
    "c1_vstripes",
    "c2_diagonals",
    "c3_checkers",
    "c4_dots",
    "c5_rings",
    "c6_grid",
    "c7_zigzags",
)
# ImageNet sizes: about 3/4 of images are 500x375 or 375x500; the rest vary.
_SIZES = ((500, 375), (375, 500), (500, 333), (500, 500), (640, 480), (333, 500), (400, 300))
_SIZE_WEIGHTS = (0.5, 0.2, 0.1, 0.06, 0.06, 0.04, 0.04)
# Pattern period as a fraction of the shorter side: 0.10 x 375 px = 37 px, which the demo recipe's 64-px
# crops (40-100% of a 500x375 picture) shrink to 5.5-8.7 px and its validation resize (shorter side to
# 73 px) to 7.3 px. Periods from 0.08 and 60-100% opacity left more confused (RESULTS.md, "The demo learns").
_PERIOD = (0.10, 0.20)
_TILT = math.radians(10)  # the largest tilt of the axis-aligned classes; diagonals are 30-60 degrees off


def _colour(rng: random.Random, avoid=None) -> tuple[int, int, int]:
    while True:
        c = (rng.randrange(256), rng.randrange(256), rng.randrange(256))
        if avoid is None or sum(abs(a - b) for a, b in zip(c, avoid)) > 180:
            return c


def _background(rng: random.Random, size: tuple[int, int]) -> Image.Image:
    w, h = size
    kind = rng.random()
    base = _colour(rng)
    img = Image.new("RGB", size, base)
    if kind < 0.4:  # vertical gradient
        other = _colour(rng)
        d = ImageDraw.Draw(img)
        for y in range(h):
            t = y / max(h - 1, 1)
            d.line([(0, y), (w, y)], fill=tuple(int(a + (b - a) * t) for a, b in zip(base, other)))
    elif kind < 0.7:  # soft clutter
        d = ImageDraw.Draw(img)
        for _ in range(rng.randint(5, 15)):
            x, y = rng.randrange(w), rng.randrange(h)
            r = rng.randint(20, 120)
            d.ellipse([x - r, y - r * 0.6, x + r, y + r * 0.6], fill=_colour(rng))
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(8, 20)))
    return img


def _band(t: np.ndarray, duty: float) -> np.ndarray:
    """True where the periodic coordinate `t` (in periods) lies in the first `duty` of its period."""
    return (t - np.floor(t)) < duty


def _mask(name: str, rng: random.Random, w: int, h: int) -> np.ndarray:
    """The class's pattern as a boolean (h, w) array: where the pattern colour goes."""
    period = rng.uniform(*_PERIOD) * min(w, h)
    if name.endswith("diagonals"):
        angle = rng.choice((1, -1)) * rng.uniform(math.radians(30), math.radians(60))
    elif name.endswith("vstripes"):
        angle = math.pi / 2 + rng.uniform(-_TILT, _TILT)
    else:
        angle = rng.uniform(-_TILT, _TILT)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    # u runs along the pattern's rows, v across them, both in periods, with a random phase
    u = (x * math.cos(angle) + y * math.sin(angle)) / period + rng.random()
    v = (-x * math.sin(angle) + y * math.cos(angle)) / period + rng.random()
    if name.endswith(("hstripes", "vstripes", "diagonals")):
        return _band(v, rng.uniform(0.35, 0.6))
    if name.endswith("checkers"):
        return (np.floor(u) + np.floor(v)) % 2 == 0
    if name.endswith("dots"):
        r = rng.uniform(0.2, 0.33)
        return (u - np.round(u)) ** 2 + (v - np.round(v)) ** 2 < r * r
    if name.endswith("rings"):
        cx, cy = rng.uniform(0.2, 0.8) * w, rng.uniform(0.2, 0.8) * h
        return _band(np.hypot(x - cx, y - cy) / period + rng.random(), rng.uniform(0.35, 0.6))
    if name.endswith("grid"):
        lw = rng.uniform(0.15, 0.3)
        return _band(u, lw) | _band(v, lw)
    # zigzags: rows displaced by a triangle wave along them, wavelength 1.5-3 periods, peak-to-peak 0.8-1.6
    wavelength, amplitude = rng.uniform(1.5, 3.0), rng.uniform(0.8, 1.6)
    tri = np.abs((u / wavelength) % 1.0 - 0.5) * 2 * amplitude
    return _band(v + tri, rng.uniform(0.35, 0.55))


def draw_sample(label: int, rng: random.Random) -> Image.Image:
    size = rng.choices(_SIZES, _SIZE_WEIGHTS)[0]
    w, h = size
    img = _background(rng, size)
    fg = _colour(rng, avoid=img.getpixel((w // 2, h // 2)))
    # the pattern covers 75-100% of each side (so any crop of >= 40% of the area shows it), at 75-100% opacity
    pw, ph = int(w * rng.uniform(0.75, 1.0)), int(h * rng.uniform(0.75, 1.0))
    x0, y0 = rng.randint(0, w - pw), rng.randint(0, h - ph)
    alpha = np.where(_mask(CLASSES[label], rng, pw, ph), round(255 * rng.uniform(0.75, 1.0)), 0).astype(np.uint8)
    img.paste(Image.new("RGB", (pw, ph), fg), (x0, y0), Image.fromarray(alpha, "L"))
    if rng.random() < 0.3:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 2.0)))
    return img


# What a folder was drawn by: images are kept when their file exists, so a folder drawn by another version of
# the drawing (the shape classes before 2026-12-02) or another seed/quality would silently mix with this one.
DRAWING = "textures-1"
STAMP = ".imt-synthetic.json"


def _check_stamp(out: Path, seed: int, quality: int) -> None:
    """Refuse a folder drawn differently (named in the message with what to do); stamp a new one."""
    want = {"drawing": DRAWING, "seed": seed, "quality": quality}
    stamp = out / STAMP
    if stamp.is_file():
        have = json.loads(stamp.read_text())
        if have != want:
            raise click.ClickException(f"{out} was drawn with {have}, not {want}: delete it and the shards made "
                                       "from it (scripts/demo.sh: work/synthetic and work/shards), or give another --out")
        return
    foreign = sorted({p.name for split in ("train", "val") if (out / split).is_dir()
                      for p in (out / split).iterdir()} - set(CLASSES))
    if foreign:
        raise click.ClickException(f"{out} holds class folders this version does not draw ({', '.join(foreign[:4])}): "
                                   "an older make_synthetic made it; delete it and the shards made from it "
                                   "(scripts/demo.sh: work/synthetic and work/shards), or give another --out")
    out.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps(want))


def make_synthetic(out: str | Path, train_per_class: int = 100, val_per_class: int = 25,
                   num_classes: int = len(CLASSES), seed: int = 0, quality: int = 90) -> dict[str, int]:
    """Write the dataset and return {split: images written}. Existing identical files are kept."""
    if not 1 <= num_classes <= len(CLASSES):
        raise click.BadParameter(f"num_classes must be 1..{len(CLASSES)}")
    out = Path(out)
    _check_stamp(out, seed, quality)
    counts = {}
    for split_no, (split, per_class) in enumerate((("train", train_per_class), ("val", val_per_class))):
        n = 0
        for label, name in enumerate(CLASSES[:num_classes]):
            folder = out / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                # One RNG per image: any image can be regenerated alone, independent of counts.
                rng = random.Random(f"{seed}/{split_no}/{label}/{i}")
                path = folder / f"{name}_{split}_{i:05d}.JPEG"
                if not path.exists():
                    tmp = path.with_suffix(".tmp")
                    draw_sample(label, rng).save(tmp, "JPEG", quality=quality)
                    tmp.rename(path)  # atomic: an interrupted run never leaves a half image
                n += 1
        counts[split] = n
    return counts


@click.command(context_settings=CONTEXT)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output root.")
@click.option("--train-per-class", default=100, type=click.IntRange(1))
@click.option("--val-per-class", default=25, type=click.IntRange(0))
@click.option("--classes", "num_classes", default=len(CLASSES), type=click.IntRange(1, len(CLASSES)))
@click.option("--seed", default=0, type=int)
@click.option("--quality", default=90, type=click.IntRange(1, 100))
def main(out, train_per_class, val_per_class, num_classes, seed, quality):
    """Generate the embedded default dataset (ImageNet folder layout)."""
    counts = make_synthetic(out, train_per_class, val_per_class, num_classes, seed, quality)
    click.echo(f"wrote {counts} images in {num_classes} classes under {out}")


if __name__ == "__main__":
    main()
