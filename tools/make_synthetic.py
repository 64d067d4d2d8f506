"""Writes the embedded default dataset: procedurally drawn, learnable JPEG classes in the
ImageNet folder layout (<out>/train/<class>/*.JPEG, <out>/val/<class>/*.JPEG).

Each class is a kind of *pattern* (shape family or texture), drawn in random colours, sizes,
positions and counts on random backgrounds, so a ResNet must learn shape and texture rather
than a single colour. Sizes follow ImageNet's (mostly 500x375 / 375x500, some others), JPEG
quality 90. The output is a pure function of (seed, counts): the same call writes the same bytes.

    python -m imt.tools.make_synthetic --out work/synthetic
"""
from __future__ import annotations

import math
import random
from pathlib import Path

import click
from PIL import Image, ImageDraw, ImageFilter

from imt.train.cli import CONTEXT

# Class names sort in this order, so labels (sorted names, as ImageFolder assigns them) are 0..N-1.
CLASSES = (
    "c0_circles",
    "c1_squares",
    "c2_triangles",
    "c3_stripes",
    "c4_checkers",
    "c5_rings",
    "c6_crosses",
    "c7_dots",
)
# ImageNet sizes: about 3/4 of images are 500x375 or 375x500; the rest vary.
_SIZES = ((500, 375), (375, 500), (500, 333), (500, 500), (640, 480), (333, 500), (400, 300))
_SIZE_WEIGHTS = (0.5, 0.2, 0.1, 0.06, 0.06, 0.04, 0.04)


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


def _poly(cx, cy, r, n, rot):
    return [(cx + r * math.cos(rot + 2 * math.pi * k / n), cy + r * math.sin(rot + 2 * math.pi * k / n)) for k in range(n)]


def draw_sample(label: int, rng: random.Random) -> Image.Image:
    size = rng.choices(_SIZES, _SIZE_WEIGHTS)[0]
    w, h = size
    img = _background(rng, size)
    bg_ref = img.getpixel((w // 2, h // 2))
    d = ImageDraw.Draw(img)
    fg = _colour(rng, avoid=bg_ref)
    s = min(w, h)
    name = CLASSES[label]
    if name.endswith(("circles", "squares", "triangles", "rings", "crosses")):
        for _ in range(rng.randint(1, 4)):
            r = rng.uniform(0.08, 0.25) * s
            cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
            col = fg if rng.random() < 0.6 else _colour(rng, avoid=bg_ref)
            rot = rng.uniform(0, 2 * math.pi)
            if name.endswith("circles"):
                d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=col)
            elif name.endswith("squares"):
                d.polygon(_poly(cx, cy, r * 1.2, 4, rot), fill=col)
            elif name.endswith("triangles"):
                d.polygon(_poly(cx, cy, r * 1.2, 3, rot), fill=col)
            elif name.endswith("rings"):
                d.ellipse([cx - r, cy - r, cx + r, cy + r], outline=col, width=max(3, int(r * 0.25)))
            else:  # crosses
                t = max(4, int(r * 0.35))
                for a in (rot, rot + math.pi / 2):
                    dx, dy = r * math.cos(a), r * math.sin(a)
                    d.line([(cx - dx, cy - dy), (cx + dx, cy + dy)], fill=col, width=t)
    elif name.endswith("stripes"):
        period = rng.uniform(0.05, 0.15) * s
        angle = rng.uniform(0, math.pi)
        layer = Image.new("L", (2 * (w + h), 2 * (w + h)), 0)
        ld = ImageDraw.Draw(layer)
        x = 0.0
        while x < layer.width:
            ld.rectangle([x, 0, x + period / 2, layer.height], fill=255)
            x += period
        layer = layer.rotate(math.degrees(angle)).crop((w, h, 2 * w, 2 * h))
        img.paste(Image.new("RGB", size, fg), (0, 0), layer)
    elif name.endswith("checkers"):
        cell = int(rng.uniform(0.06, 0.16) * s)
        x0, y0 = rng.randrange(w // 3), rng.randrange(h // 3)
        x1, y1 = rng.randrange(2 * w // 3, w), rng.randrange(2 * h // 3, h)
        for yi, y in enumerate(range(y0, y1, cell)):
            for xi, x in enumerate(range(x0, x1, cell)):
                if (xi + yi) % 2 == 0:
                    d.rectangle([x, y, x + cell - 1, y + cell - 1], fill=fg)
    else:  # dots: many small dots scattered over the picture
        r = rng.uniform(0.01, 0.03) * s
        for _ in range(rng.randint(40, 120)):
            cx, cy = rng.uniform(0, w), rng.uniform(0, h)
            d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg)
    if rng.random() < 0.3:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 2.0)))
    return img


def make_synthetic(out: str | Path, train_per_class: int = 100, val_per_class: int = 25,
                   num_classes: int = len(CLASSES), seed: int = 0, quality: int = 90) -> dict[str, int]:
    """Write the dataset and return {split: images written}. Existing identical files are kept."""
    if not 1 <= num_classes <= len(CLASSES):
        raise click.BadParameter(f"num_classes must be 1..{len(CLASSES)}")
    out = Path(out)
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
