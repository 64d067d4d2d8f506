"""Helpers for the shard tests: read samples back, build odd and ILSVRC-style input trees."""
from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image


def read_tar(path: Path) -> list[dict]:
    """Samples of one tar in order: {key, jpg, cls, lbl, path}."""
    out = []
    with tarfile.open(path) as tar:
        for m in tar:
            key, ext = m.name.split(".", 1)
            if not out or out[-1]["key"] != key:
                out.append({"key": key})
            out[-1][ext] = tar.extractfile(m).read()
    return out


def files_of(root: Path) -> dict[str, bytes]:
    """Every file under root (relative name -> bytes), for byte-identity checks."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def manifest(root: Path) -> dict:
    return json.loads((root / "manifest.json").read_text())


def jpeg(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", **kw)
    return buf.getvalue()


def png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def _photo(seed: int, size=(160, 120)) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size[1], 0:size[0]]
    base = np.stack([x * 255 // size[0], y * 255 // size[1], (x + y) % 256], -1)
    noise = rng.integers(0, 40, (*base.shape[:2], 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB")


# name -> (bytes, expected outcome: "keep" | "convert" | "skip" | "ignore")
def odd_files(real_jpeg: bytes) -> dict[str, tuple[bytes, str]]:
    rgb = _photo(1)
    pal = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    pal.info["transparency"] = 0
    grey16 = Image.fromarray((np.arange(120 * 160, dtype=np.uint32).reshape(120, 160) * 3).astype(np.uint16))
    rgba = rgb.convert("RGBA")
    rgba.putalpha(Image.new("L", rgb.size, 0))  # fully transparent: must come out white
    return {
        "good_real.JPEG": (real_jpeg, "keep"),
        "good_synthetic.JPEG": (jpeg(rgb, quality=90), "keep"),
        "exif_rotated.JPEG": (jpeg(rgb, exif=_orientation(6)), "keep"),  # as ImageFolder: not rotated
        "cmyk.JPEG": (jpeg(rgb.convert("CMYK")), "convert"),
        "grey.JPEG": (jpeg(rgb.convert("L")), "convert"),
        "progressive.JPEG": (jpeg(rgb, progressive=True), "convert"),
        "png_named.JPEG": (png(rgb), "convert"),
        "palette_alpha.JPEG": (png(pal), "convert"),
        "transparent.png": (png(rgba), "convert"),
        "sixteen_bit.png": (png(grey16), "convert"),
        "gif_named.jpg": (_gif(rgb), "convert"),
        "truncated.JPEG": (real_jpeg[: len(real_jpeg) // 2], "skip"),
        "empty.JPEG": (b"", "skip"),
        "garbage.JPEG": (bytes(range(256)) * 20, "skip"),
        "notes.txt": (b"not an image\n", "ignore"),
        ".DS_Store": (b"\0\0\0\1Bud1", "ignore"),
    }


def _orientation(value: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = value
    return exif.tobytes()


def _gif(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "GIF")
    return buf.getvalue()


def write_tree(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)


def link_tree(root: Path, files: dict[str, Path]) -> None:
    """Symlinks rel -> real file (the shared images are never copied)."""
    for rel, target in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(target, p)


def dali_read(tars: list[str], idxs: list[str], num_samples: int, batch_size: int = 16):
    """(labels, image shapes) of every sample, read and decoded by a CPU-only DALI pipeline."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=batch_size, num_threads=1, device_id=None, seed=0)
    def pipe():
        jpg, lbl = fn.readers.webdataset(paths=tars, index_paths=idxs, ext=["jpg", "lbl"],
                                         dtypes=[types.UINT8, types.INT64], random_shuffle=False,
                                         pad_last_batch=True, name="reader")
        return fn.decoders.image(jpg, device="cpu", output_type=types.RGB), lbl

    p = pipe()
    p.build()
    labels, shapes = [], []
    while len(labels) < num_samples:
        images, lbl = p.run()
        for k in range(len(lbl)):
            labels.append(int(np.array(lbl.at(k)).reshape(-1)[0]))
            shapes.append(tuple(np.array(images.at(k)).shape))
    return labels[:num_samples], shapes[:num_samples]
