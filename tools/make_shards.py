"""Turns an ImageNet-style folder tree into shuffled WebDataset shards with DALI index files.

    python tools/make_shards.py --src DIR --out DIR [--split train --split val] [--workers 8]
    python -m imt.tools.make_shards ...            imt-make-shards ...

Inputs (`--src` holds one folder per split; by default every split folder found is made):
- class-per-folder splits, `<src>/<split>/<class>/**/<image>` (torchvision ImageFolder's layout;
  files directly in a split folder that has class folders are ignored, as ImageFolder does);
- the official ILSVRC2012 layout: `train/<wnid>/*.JPEG` plus the *flat* `val/` folder (no
  subfolders), labelled by `--val-labels` = either the devkit's
  `ILSVRC2012_validation_ground_truth.txt` (line i = ILSVRC2012_ID of ILSVRC2012_val_%08d, i) with
  `--meta meta.mat` from the same devkit (maps ILSVRC2012_IDs to wnids), or Kaggle's
  `LOC_val_solution.csv` (ImageId,PredictionString; the first token is the wnid).
Labels are indices into the sorted class names (folder names plus every wnid the label file
names), exactly as ImageFolder assigns them, so ImageNet indices match torchvision's models.
Hidden folders (.ipynb_checkpoints, ...) are not classes; their files count as ignored.
Symlinks: file symlinks and symlinked split or class folders are followed; directory symlinks below a
class folder are not, nor a split/class folder symlink that points at a folder holding it (a loop) or
at a folder another class took. What the listing could not or would not read (those symlinks, dangling
or looping file symlinks, unreadable folders, names that are not UTF-8) is listed per split in the
manifest's `left_out` with the reason, and printed; FIFOs, sockets and devices count as ignored.

Output: see pipeline/manifest.py and the README. Per sample `<split>_<NNNNNNNN>.jpg/.cls/.lbl/.path`:
`.cls` is the ASCII decimal label, `.lbl` the label as one little-endian int64 (8 bytes, read by
DALI's fn.readers.webdataset with dtypes=INT64 without parsing text), `.path` the UTF-8 source path
relative to --src. The key is the position in the split's seeded global shuffle (no dots).

Every file is opened and fully decoded by PIL (plus PIL's verify() for non-JPEG formats, where
it checks e.g. PNG chunk CRCs; for JPEG it does nothing). What is kept, converted or skipped:
- baseline (SOF0) 8-bit RGB JPEGs that end with an EOI marker: bytes copied unchanged;
- progressive / extended JPEGs, greyscale, CMYK/YCCK, palette, alpha, 16-bit, and other formats
  (PNG, GIF, BMP, WebP, TIFF, ... whatever the file is named): re-encoded as a baseline 4:2:0 RGB
  JPEG at quality 95 (or --quality), which PIL and nvJPEG's hardware decoder (baseline only)
  read. Alpha is composited on white; 16-bit samples keep their 8 high bits;
- EXIF orientation is left alone (bytes unchanged; converted images keep stored pixel order and
  drop EXIF), matching torchvision's ImageFolder, which ignores it. DALI's decoders rotate by
  EXIF unless `adjust_orientation=False`: 1 of the 400 imagenet-sample files carries a tag;
- empty, truncated or undecodable files are skipped and listed in the manifest with the reason;
- files without an image extension (.txt, .xml, .mat, hidden files, ...) are ignored and counted;
- unreadable files are skipped and listed like undecodable ones; a class folder that gives no sample
  (unreadable, empty, every file skipped) is an error unless --allow-empty-classes (then a warning).

Shards are cut at --shard-bytes (default 1 GB, ImageNet: ~140 train shards) or --shard-samples.
Without --shard-samples, small splits are still cut into at least MIN_SHARDS (8) shards of at least
MIN_SHARD_SAMPLES (256) samples, so 8 DataLoader workers or ranks each get whole shards.

Steps: list -> check every image (parallel, --workers processes) -> seeded shuffle -> assign
shards by exact tar size -> write each tar and its .idx in the same pass (parallel, one shard per
task) -> manifest.json. The output is a pure function of the input listing and the settings: any
--workers gives the same bytes. Each shard is written to a .tmp name and renamed (.idx first, so a
.tar never appears without its index); `.imt-progress.json` records the settings and the finished
shards, so re-running the same command after an interruption rewrites only what is missing and
ends with byte-identical output. Other settings in a used --out are refused unless --overwrite
(the settings include the absolute --src path, the label files' sha256 and a fingerprint of each
split's listing: path, label, size and mtime of every file, so shards of files that have since been
added, removed or modified are never kept next to shards of the new ones). Check results are
saved per split (.imt-cache/), so a resume after the check phase does not decode everything again;
converted images wait there too, and the folder is removed when the manifest is written.
"""
from __future__ import annotations

import errno
import hashlib
import io
import json
import multiprocessing as mp
import os
import random
import re
import shutil
import stat
import sys
import time
import warnings
import zlib
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a script (`python tools/make_shards.py`): import from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import click
import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError
from tqdm import tqdm

# The shard format's names: one definition, which the loaders read (importing it loads no torch).
from imt.pipeline.manifest import (FORMAT, INDEX_VERSION, MANIFEST_NAME, PROGRESS_NAME, VERSION, shard_stem,
                               shard_stem_pattern)
from imt.pipeline.orphans import exit_with_parent
from imt.train.cli import CONTEXT

IMAGE_EXTS = frozenset({".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".gif", ".tif", ".tiff",
                        ".webp", ".ppm", ".pgm", ".pbm", ".pnm"})
DEFAULT_QUALITY = 95
MIN_SHARDS = 8
MIN_SHARD_SAMPLES = 256
CACHE_NAME = ".imt-cache"
FAIL_AFTER_ENV = "IMT_MAKE_SHARDS_FAIL_AFTER"  # tests: raise after N shards (a deterministic "kill")
TAR_BLOCK = 512
TAR_RECORD = 10240


class ShardError(ValueError):
    """Bad arguments or an output folder we must not touch; the message says what to do."""


class BadImage(Exception):
    """An input that cannot become a sample; str() is the reason recorded in the manifest."""


class SimulatedInterrupt(RuntimeError):
    pass


@dataclass(frozen=True)
class Convert:
    """How images are checked and re-encoded (part of the settings that decide the bytes)."""
    max_side: int | None = None
    quality: int | None = None  # None: keep good JPEGs, convert the rest at DEFAULT_QUALITY


@dataclass(frozen=True)
class Item:
    """One listed input file of a split, in sorted listing order."""
    rel: str            # path relative to --src, '/'-separated
    label: int          # -1: no label (flat split and the label file does not name it)
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class Checked:
    """Validation result of one Item: final size/crc of the sample's JPEG bytes or a skip reason."""
    size: int = 0
    crc: int = 0
    converted: str | None = None  # why it was re-encoded
    skipped: str | None = None    # why it was dropped


# --------------------------------------------------------------------------- image checks

def _jpeg_sof(data: bytes) -> int | None:
    """The SOFn marker of a JPEG (0xC0 = baseline), by walking the segments before the scan."""
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        m = data[i + 1]
        if m == 0xFF:  # fill byte
            i += 1
            continue
        if m == 0x01 or 0xD0 <= m <= 0xD8:  # markers without a length
            i += 2
            continue
        if 0xC0 <= m <= 0xCF and m not in (0xC4, 0xC8, 0xCC):
            return m
        if m == 0xDA:
            return None
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return None


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(im)
        if im.mode.startswith("I;16") or (im.mode == "I" and a.max(initial=0) > 255):
            a = a.astype(np.int64) >> 8  # 16-bit samples: keep the high byte
        im = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "L")
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        out = Image.new("RGB", im.size, (255, 255, 255))
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    return im if im.mode == "RGB" else im.convert("RGB")


def check_image(data: bytes, conv: Convert) -> tuple[bytes | None, str | None]:
    """Verify and fully decode `data`. Returns (None, None) to keep the bytes unchanged, or
    (new baseline RGB JPEG bytes, reason). Raises BadImage(reason) for unusable input."""
    if not data:
        raise BadImage("empty file")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            im = Image.open(io.BytesIO(data))
            if im.format != "JPEG":  # PIL's verify() checks PNG CRCs etc. but is a no-op for JPEG,
                im.verify()          # where the full decode below is the check; skipping the re-open
                im = Image.open(io.BytesIO(data))  # saves ~0.12 ms of 2.5 ms per ImageNet JPEG
            im.load()  # full decode: truncated or corrupt scan data raises here
        except UnidentifiedImageError:
            raise BadImage("not a recognised image format") from None
        except Image.DecompressionBombError as e:
            raise BadImage(f"too large: {e}") from None
        except Exception as e:  # noqa: BLE001 - PIL raises many types for bad data; none may stop the run
            kind = "truncated" if "truncated" in str(e) else "undecodable"
            raise BadImage(f"{kind} {getattr(e, '__class__').__name__}: {e}") from None
    fmt = im.format or "unknown"
    reasons = []
    if fmt not in ("JPEG", "MPO"):
        reasons.append(f"{fmt} data")
    else:
        if im.mode != "RGB":
            reasons.append(f"{im.mode} JPEG")
        sof = _jpeg_sof(data)
        if sof != 0xC0:
            reasons.append("progressive JPEG" if sof == 0xC2 else f"non-baseline JPEG (SOF {sof})")
        if not data.rstrip(b"\0").endswith(b"\xff\xd9"):
            reasons.append("no JPEG end marker")
    if fmt not in ("JPEG", "MPO") and im.mode != "RGB":
        reasons.append(f"mode {im.mode}")
    if conv.max_side and max(im.size) > conv.max_side:
        reasons.append(f"resized to {conv.max_side}")
    if conv.quality is not None and not reasons:
        reasons.append(f"re-encoded at quality {conv.quality}")
    if not reasons:
        return None, None
    return _encode(im, conv), ", ".join(reasons)


def _encode(im: Image.Image, conv: Convert) -> bytes:
    icc = im.info.get("icc_profile") if im.mode == "RGB" else None  # a grey/CMYK profile is wrong for RGB
    im = _to_rgb(im)
    if conv.max_side and max(im.size) > conv.max_side:
        s = conv.max_side / max(im.size)
        im = im.resize((max(1, round(im.width * s)), max(1, round(im.height * s))),
                       Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    extra = {"icc_profile": icc} if icc else {}
    im.save(buf, "JPEG", quality=conv.quality or DEFAULT_QUALITY, subsampling=2,
            progressive=False, optimize=False, **extra)
    return buf.getvalue()


# --------------------------------------------------------------------------- listing

# Symlinks (the rules are in the module docstring): a tree of file links, or of linked class folders, is a
# usual way to make a subset, so those are followed; following every directory link turned a
# `train/c0/uplink -> ..` loop's 6 images into 246 samples, 120 of them under another class's label.

@dataclass
class Listing:
    """What the listing of one split found."""
    items: list[Item] = field(default_factory=list)
    ignored: int = 0  # non-image names, loose files beside class folders, non-regular files (FIFOs, sockets, ...)
    left_out: list[dict] = field(default_factory=list)  # {path, reason}: paths not listed, and why

    def leave(self, p: Path, src: Path, reason: str) -> None:
        self.left_out.append({"path": _shown(p, src), "reason": reason})

    def image_stat(self, p: Path, src: Path) -> os.stat_result | None:
        """The stat of `p` if it is a regular image file to list; otherwise None, and it is counted as
        ignored (another name, a FIFO, ...) or left out with the reason (dangling or looping symlink, ...)."""
        if not _is_image_name(p):
            self.ignored += 1
            return None
        if not _is_utf8(p.name):
            self.leave(p, src, _NOT_UTF8)
            return None
        try:
            st = p.stat()
        except OSError as e:
            self.leave(p, src, _os_reason(e))
            return None
        if not stat.S_ISREG(st.st_mode):  # reading a FIFO would block for ever
            self.ignored += 1
            return None
        return st

    def walk(self, folder: Path, src: Path) -> list[tuple[Path, os.stat_result]]:
        """(path, stat) of the image files under `folder` in os.walk's order: a folder's files sorted by
        name, then its subfolders, sorted. Directory symlinks below `folder` are left out, not followed."""
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            self.leave(folder, src, f"unreadable folder: {e.strerror}")
            return []
        files, subdirs = [], []
        for e in entries:
            p = Path(e.path)
            if e.is_dir(follow_symlinks=False):
                subdirs.append(p)
            elif e.is_symlink() and p.is_dir():
                self.leave(p, src, "directory symlink: not followed below a class folder")
            elif (st := self.image_stat(p, src)) is not None:
                files.append((p, st))
        for d in subdirs:
            if _is_utf8(d.name):
                files += self.walk(d, src)
            else:
                self.leave(d, src, _NOT_UTF8)
        return files


_NOT_UTF8 = "name is not valid UTF-8: rename it (e.g. `convmv -f latin1 -t utf8 --notest`)"


def _is_utf8(name: str) -> bool:
    try:
        name.encode()
    except UnicodeEncodeError:  # os.fsdecode turned its undecodable bytes into lone surrogates
        return False
    return True


def _shown(p: Path, src: Path) -> str:
    """`p` relative to --src, '/'-separated, for the manifest and messages; bytes of a non-UTF-8 name as \\xNN."""
    return p.relative_to(src).as_posix().encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _os_reason(e: OSError) -> str:
    if e.errno == errno.ELOOP:
        return "symlink loop"
    if e.errno == errno.ENOENT:
        return "dangling symlink (its target does not exist)"
    return f"unreadable: {e.strerror}"


def _is_image_name(p: Path) -> bool:
    return not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTS


def read_val_labels(labels: Path, meta: Path | None) -> dict[str, str]:
    """{image stem: wnid} from Kaggle's LOC_val_solution.csv or the devkit's ground truth + meta.mat."""
    labels = Path(labels)
    if labels.suffix.lower() == ".csv":
        out = {}
        for line in labels.read_text().splitlines()[1:]:
            if line.strip():
                image_id, pred = line.split(",", 1)
                out[image_id.strip()] = pred.split()[0]
        return out
    if meta is None:
        raise ShardError(f"{labels} is a devkit ground-truth file: also pass --meta <devkit>/data/meta.mat "
                         "to map its ILSVRC2012_IDs to wnids (or use Kaggle's LOC_val_solution.csv)")
    try:
        import scipy.io  # only needed for this layout
    except ImportError as e:
        raise ShardError(f"reading {meta} needs scipy: `pip install scipy` (or use Kaggle's "
                         "LOC_val_solution.csv, which needs nothing)") from e

    synsets = scipy.io.loadmat(str(meta), squeeze_me=True)["synsets"]
    id_to_wnid = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets if int(s["num_children"]) == 0}
    out = {}
    for i, line in enumerate(labels.read_text().split(), start=1):
        if int(line) not in id_to_wnid:
            raise ShardError(f"{labels}: line {i} names ILSVRC2012_ID {line}, not a leaf class in {meta}")
        out[f"ILSVRC2012_val_{i:08d}"] = id_to_wnid[int(line)]
    return out


def _image_id(p: Path) -> str:
    """The id a label file names a flat-folder image by: ILSVRC2012_val_00000001.JPEG -> ILSVRC2012_val_00000001."""
    return p.name.split(".")[0]


def _class_folders(folder: Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """(class folders of a split, sorted; folders that cannot be classes, with the reason). Hidden ones
    (.ipynb_checkpoints, ...) are not classes: ImageFolder would make them one and then fail on it; their
    files are counted as ignored. Symlinks: see the module docstring."""
    try:
        entries = sorted(folder.iterdir())
    except OSError as e:
        raise ShardError(f"{folder}: cannot list the split folder ({e.strerror}); make it readable, or leave "
                         "it out by naming the splits to make with --split") from None
    classes, refused, taken, real_split = [], [], {}, folder.resolve()
    for p in entries:
        if p.name.startswith(".") or not p.is_dir():
            continue
        real = p.resolve()
        if not _is_utf8(p.name):
            refused.append((p, f"folder {_NOT_UTF8}"))
        elif real == real_split or real in real_split.parents:
            refused.append((p, f"directory symlink loop: points at {real}, which holds this split"))
        elif real in taken:
            refused.append((p, f"the same folder as {taken[real].name}/ (a symlink): its files are listed "
                               f"once, under {taken[real].name}"))
        else:
            taken[real] = p
            classes.append(p)
    return classes, refused


def _class_dirs(folder: Path) -> list[Path]:
    return _class_folders(folder)[0]


def _split_layout(folder: Path) -> str:
    """"class-folders", "flat" (image files, no class folders: ILSVRC2012's val/) or "empty" (neither)."""
    if _class_dirs(folder):
        return "class-folders"
    return "flat" if any(_is_image_name(p) and not p.is_dir() for p in folder.iterdir()) else "empty"


def list_split(src: Path, split: str, class_index: dict[str, int],
               flat_labels: dict[str, str] | None) -> Listing:
    """The image items of a split in sorted order, with what was ignored and left out."""
    folder = src / split
    listing = Listing()

    def add(p: Path, label: int, st: os.stat_result):
        listing.items.append(Item(p.relative_to(src).as_posix(), label, st.st_size, st.st_mtime_ns))

    if _split_layout(folder) == "flat":
        if flat_labels is None:
            raise ShardError(f"{folder} has no class folders (the ILSVRC2012 flat val layout): pass "
                             "--val-labels LOC_val_solution.csv, or the devkit ground truth with --meta")
        for p in sorted(folder.iterdir()):
            if not p.is_dir() and (st := listing.image_stat(p, src)) is not None:
                wnid = flat_labels.get(_image_id(p))
                add(p, class_index[wnid] if wnid is not None else -1, st)
        return listing
    classes, refused = _class_folders(folder)
    for p, why in refused:
        listing.leave(p, src, why)
    refused = {p for p, _ in refused}
    for p in sorted(folder.iterdir()):
        if p in classes:
            for f, st in listing.walk(p, src):
                add(f, class_index[p.name], st)
        elif p in refused:
            continue
        elif p.is_dir() and p.is_symlink():
            listing.leave(p, src, "directory symlink: not followed (a hidden folder, not a class)")
        elif p.is_dir():  # a hidden folder: its files are ignored, as ImageFolder does
            listing.ignored += len(listing.walk(p, src))
        elif listing.image_stat(p, src) is not None:  # a loose image beside class folders (ImageFolder ignores it)
            listing.ignored += 1
    return listing


def find_splits(src: Path, splits, out: Path | None = None) -> list[str]:
    """The split folders to make, sorted (the order they are named in does not change the output).
    `out` is never a split, also when it lies inside `src`."""
    found, loops, root = [], {}, src.resolve()
    for p in sorted(src.iterdir()):
        if p.is_dir() and not p.name.startswith(".") and p != out:
            real = p.resolve()
            if real == root or real in root.parents:
                loops[p.name] = f"{p} points at {real}, which holds --src (a directory symlink loop)"
            else:
                found.append(p.name)
    for s in splits or ():
        if s in loops:
            raise ShardError(f"split {s!r}: {loops[s]}; it cannot be a split")
    for name, why in loops.items():
        click.echo(f"leaving out {name!r}: {why}", err=True)
    if not splits:
        splits = found
    for s in splits:
        if s not in found:
            raise ShardError(f"split {s!r} not found under {src} (found: {', '.join(found) or 'nothing'})")
        if not s.replace("_", "").replace("-", "").isalnum():
            raise ShardError(f"split name {s!r}: use letters, digits, '_' or '-' (keys must have no dots)")
    if not splits:
        raise ShardError(f"{src} holds no split folders; expected e.g. {src}/train/<class>/*.JPEG")
    return sorted(set(splits))


# --------------------------------------------------------------------------- workers

def _cache_file(out: Path, split: str, i: int) -> Path:
    return out / CACHE_NAME / split / f"{i:08d}.jpg"


def _read_regular(path) -> bytes:
    """The bytes of a regular file; a FIFO or device found at `path` raises BadImage instead of blocking."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # no effect on a regular file
    with open(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise BadImage("not a regular file")
        return f.read()


def _check_task(args) -> tuple[int, Checked]:
    """Worker: validate one file; converted bytes go to the cache (not back through the pipe)."""
    i, path, cache, conv = args
    try:
        data = _read_regular(path)
        new, reason = check_image(data, conv)
    except BadImage as e:
        return i, Checked(skipped=str(e))
    except OSError as e:
        return i, Checked(skipped=_os_reason(e))
    if new is None:
        return i, Checked(size=len(data), crc=zlib.crc32(data))
    _atomic_write(Path(cache), new)
    return i, Checked(size=len(new), crc=zlib.crc32(new), converted=reason)


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _sample_bytes(src: Path, out: Path, split: str, i: int, rel: str, chk: Checked, conv: Convert) -> bytes:
    """Final JPEG bytes of a sample: the source file, or the cached (or redone) conversion."""
    try:
        if chk.converted is None:
            data = _read_regular(src / rel)
        else:
            cache = _cache_file(out, split, i)
            try:
                data = cache.read_bytes()
            except FileNotFoundError:  # cache lost (e.g. resumed after a crash): conversion is deterministic
                data = check_image(_read_regular(src / rel), conv)[0] or b""
    except (BadImage, OSError) as e:
        raise ShardError(f"{src / rel} changed while shards were being made ({e}); re-run with --overwrite") from None
    if len(data) != chk.size or zlib.crc32(data) != chk.crc:
        raise ShardError(f"{src / rel} changed while shards were being made; re-run with --overwrite")
    return data


def _tar_header(name: str, size: int) -> bytes:
    """The ustar header tarfile.TarInfo(name, size, mode 0644, mtime 0, uid/gid 0).tobuf(USTAR)
    writes, built directly: tarfile's generic path cost 0.09 ms a member, 4 members a sample."""
    raw = name.encode()
    if len(raw) > 100 or size >= 8**11:
        raise ValueError(f"tar member {name!r} ({size} bytes) does not fit a ustar header")
    head = (raw.ljust(100, b"\0") + b"0000644\0" + b"0000000\0" * 2 + b"%011o\0" % size
            + b"00000000000\0" + b" " * 8 + b"0" + b"\0" * 100 + b"ustar\x0000" + b"\0" * 64
            + b"\0" * 16 + b"\0" * 155)  # uname, gname; devmajor/minor left empty as tarfile does
    head = head.ljust(TAR_BLOCK, b"\0")
    chksum = b"%06o\0 " % sum(head)
    return head[:148] + chksum + head[156:]


def _pad(n: int) -> int:
    return -n % TAR_BLOCK


def _members(key: str, data: bytes, label: int, rel: str) -> list[tuple[str, bytes]]:
    return [(f"{key}.jpg", data), (f"{key}.cls", str(label).encode()),
            (f"{key}.lbl", label.to_bytes(8, "little", signed=True)), (f"{key}.path", rel.encode())]


def _sample_tar_size(size: int, label: int, rel: str) -> int:
    sizes = (size, len(str(label)), 8, len(rel.encode()))
    return sum(TAR_BLOCK + s + _pad(s) for s in sizes)


def _tar_end(pos: int) -> bytes:
    end = pos + 2 * TAR_BLOCK
    return b"\0" * (2 * TAR_BLOCK + (-end % TAR_RECORD))  # end blocks, padded to a record like tar


def index_text(samples: list[list[tuple[str, int, int, str]]]) -> str:
    """A DALI wds2idx v1.2 index: the header, then one line per sample of `ext offset size member` per
    component (offsets of the member's data, which DALI requires to be multiples of 512)."""
    return f"{INDEX_VERSION} {len(samples)}\n" + "".join(
        " ".join(f"{ext} {off} {size} {name}" for ext, off, size, name in sample) + "\n" for sample in samples)


def _write_task(args) -> dict:
    """Worker: write one shard's tar and .idx in one pass (offsets counted as we go), then rename."""
    src, out, split, name, samples, conv = args
    tar_path, idx_path = out / f"{name}.tar", out / f"{name}.idx"
    tar_tmp, idx_tmp = out / f"{name}.tar.tmp", out / f"{name}.idx.tmp"
    sha, pos, lines = hashlib.sha256(), 0, []
    with open(tar_tmp, "wb") as f:
        def put(b: bytes):
            nonlocal pos
            f.write(b)
            sha.update(b)
            pos += len(b)

        for key, i, rel, label, chk in samples:
            data = _sample_bytes(src, out, split, i, rel, chk, conv)
            parts = []
            for member, payload in _members(key, data, label, rel):
                put(_tar_header(member, len(payload)))
                parts.append((member.split(".", 1)[1], pos, len(payload), member))
                put(payload)
                put(b"\0" * _pad(len(payload)))
            lines.append(parts)
        put(_tar_end(pos))
    idx = index_text(lines)
    idx_tmp.write_text(idx)
    os.replace(idx_tmp, idx_path)  # index first: a visible .tar always has its .idx
    os.replace(tar_tmp, tar_path)
    return {"file": tar_path.name, "index": idx_path.name, "num_samples": len(samples),
            "sha256": sha.hexdigest(), "bytes": pos, "index_bytes": len(idx.encode())}


# --------------------------------------------------------------------------- planning

def assign_shards(sample_sizes: list[int], shard_bytes: int, shard_samples: int) -> list[range]:
    """Cut the shuffled samples into consecutive shards: a shard closes before the sample that
    would take its tar past shard_bytes, or at shard_samples samples (never empty)."""
    shards, start, cur = [], 0, 2 * TAR_BLOCK
    for j, s in enumerate(sample_sizes):
        if j > start and (cur + s > shard_bytes or j - start >= shard_samples):
            shards.append(range(start, j))
            start, cur = j, 2 * TAR_BLOCK
        cur += s
    if len(sample_sizes) > start:
        shards.append(range(start, len(sample_sizes)))
    return shards


def default_shard_samples(n: int) -> int:
    return max(MIN_SHARD_SAMPLES, -(-n // MIN_SHARDS))


def _listing_fingerprint(items: list[Item]) -> str:
    h = hashlib.sha256()
    for it in items:
        h.update(f"{it.rel}\t{it.label}\t{it.size}\t{it.mtime_ns}\n".encode())
    return h.hexdigest()


def _load_plan(out: Path, split: str, fingerprint: str) -> list[Checked] | None:
    p = out / CACHE_NAME / f"{split}.plan.json"
    if not p.is_file():
        return None
    d = json.loads(p.read_text())
    if d["fingerprint"] != fingerprint:
        raise ShardError(f"the files under --src/{split} changed since the interrupted run in {out}; "
                         "re-run with --overwrite to start again")
    return [Checked(*r) for r in d["results"]]


def _save_plan(out: Path, split: str, fingerprint: str, results: list[Checked]) -> None:
    rows = [[c.size, c.crc, c.converted, c.skipped] for c in results]
    _atomic_write(out / CACHE_NAME / f"{split}.plan.json",
                  json.dumps({"fingerprint": fingerprint, "results": rows}).encode())


# --------------------------------------------------------------------------- output folder

def _is_tmp(p: Path) -> bool:
    """A half-written file: `<name>.tmp` (shards) or `<name>.tmp<pid>` (_atomic_write); see _ours."""
    return re.fullmatch(r".+\.tmp\d*", p.name) is not None


def _ours(name: str, splits) -> bool:
    """Whether make_shards writes a file of this name in --out for a run of `splits`: the manifest, the
    progress file, the check cache, each `<split>-NNNNNN.tar/.idx` and their half-written `.tmp` names.
    Nothing else in --out is ever deleted (a user's `backup.tar` or `notes.tmp` included)."""
    ours = rf"({re.escape(MANIFEST_NAME)}|{re.escape(PROGRESS_NAME)})(\.tmp\d+)?|{re.escape(CACHE_NAME)}"
    shards = "|".join(shard_stem_pattern(s) for s in splits)
    return re.fullmatch(ours, name) is not None or (
        bool(shards) and re.fullmatch(rf"({shards})\.(tar|idx)(\.tmp)?", name) is not None)


def _read_record(path: Path) -> dict | None:
    """The manifest or progress file at `path` if make_shards wrote it; None if there is none."""
    if not path.exists():
        return None
    try:
        d = json.loads(path.read_bytes())
    except (OSError, ValueError) as e:
        d = e
    key = "format" if path.name == MANIFEST_NAME else "done"
    if not isinstance(d, dict) or not isinstance(d.get("settings", {}), dict) or key not in d or (
            key == "format" and d["format"] != FORMAT):
        raise ShardError(f"{path} was not written by make_shards ({d!r:.80}); it is left alone: move it away "
                         "or use another --out")
    return d


def _remove_ours(out: Path, progress: dict | None, manifest: dict | None) -> None:
    """--overwrite: delete what the recorded run wrote, or refuse (deleting nothing) if anything else is there."""
    splits = set((progress or {}).get("settings", {}).get("splits", ()))
    splits |= set((manifest or {}).get("settings", {}).get("splits", ())) | set((manifest or {}).get("splits", ()))
    foreign = sorted(p.name for p in out.iterdir() if not _ours(p.name, splits))
    if foreign:
        more = f" and {len(foreign) - 10} more" if len(foreign) > 10 else ""
        raise ShardError(f"{out} holds files make_shards did not write: {', '.join(foreign[:10])}{more}. "
                         "--overwrite deletes only the shards, indexes and manifest of an earlier run, so "
                         "nothing was deleted: move those files away, or use another --out")
    for p in out.iterdir():
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _settings_diff(old: dict, new: dict) -> str:
    old, new = _flatten(old), _flatten(new)
    keys = sorted(set(old) | set(new))
    return "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k))


_USE_ANOTHER_OUT = "use another --out, or pass --overwrite to delete its shards and start again"


def _without_listing(settings: dict) -> dict:
    return {**settings, "source": {k: v for k, v in settings.get("source", {}).items() if k != "listing"}}


def _refuse_other(out: Path, what: str, saved: dict, settings: dict) -> None:
    """ShardError unless `saved` (the settings `out` was made with) are `settings`, files included."""
    if "listing" not in saved.get("source", {}):  # made before listings were recorded: compare the rest
        settings = _without_listing(settings)
    if saved == settings:
        return
    if _without_listing(saved) == _without_listing(settings):  # same settings, other files
        old, new = saved["source"]["listing"], settings["source"]["listing"]
        split = next(k for k in new if old.get(k) != new[k])
        raise ShardError(f"{out} holds {what} of other files: files under --src/{split} were added, removed or "
                         f"modified since (listing {old.get(split)} -> {new[split]}); its shards would mix old "
                         "and new files. Pass --overwrite to remake every shard from the files there now, or "
                         "use another --out")
    raise ShardError(f"{out} holds {what} with other settings ({_settings_diff(saved, settings)}); {_USE_ANOTHER_OUT}")


def _prepare_out(out: Path, settings: dict, overwrite: bool) -> tuple[dict, dict | None]:
    """Returns (finished shards from an interrupted run, complete manifest or None)."""
    out.mkdir(parents=True, exist_ok=True)
    prog, man = _read_record(out / PROGRESS_NAME), _read_record(out / MANIFEST_NAME)
    if overwrite:
        _remove_ours(out, prog, man)
        return {}, None
    if prog is not None:
        saved = prog
        _refuse_other(out, "an unfinished run", saved["settings"], settings)
        return saved["done"], None
    if man is not None:
        saved = man
        _refuse_other(out, "shards", saved.get("settings") or {}, settings)
        done = {s["file"]: s for sp in saved["splits"].values() for s in sp["shards"]}
        return done, saved
    if any(True for _ in out.iterdir()):
        raise ShardError(f"{out} is not empty and holds no shard run; {_USE_ANOTHER_OUT}")
    return {}, None


def _is_done(out: Path, rec: dict | None) -> bool:
    """Cheap check of a finished shard: both files present with the recorded sizes."""
    if not rec:
        return False
    tar, idx = out / rec["file"], out / rec["index"]
    return (tar.is_file() and idx.is_file() and tar.stat().st_size == rec["bytes"]
            and idx.stat().st_size == rec["index_bytes"])


def _save_progress(out: Path, settings: dict, done: dict) -> None:
    _atomic_write(out / PROGRESS_NAME, json.dumps({"settings": settings, "done": done}, indent=1).encode())


# --------------------------------------------------------------------------- driver

def _imap(pool, fn, tasks, chunksize=1):
    # ProcessPoolExecutor, not multiprocessing.Pool: when a worker dies (OOM killer) Pool replaces
    # it and waits forever for the lost task; the executor raises BrokenProcessPool instead.
    if pool is None:
        return map(fn, tasks)
    return pool.map(fn, tasks, chunksize=chunksize)


def _empty_classes(src: Path, split: str, labels, class_index: dict[str, int], why: list[dict],
                   among: set[int] | None = None) -> list[str]:
    """The class folders of a split (with a label in `among`, if given) that none of `labels` falls in, each
    with the first reason in `why` ({path, reason}: what was left out or skipped) given for a path in it."""
    counts, empty = Counter(labels), []
    for d in _class_dirs(src / split):
        if counts[class_index[d.name]] == 0 and (among is None or class_index[d.name] in among):
            rel = f"{split}/{d.name}"
            reason = next((w["reason"] for w in why if w["path"] == rel or w["path"].startswith(rel + "/")), None)
            empty.append(f"{rel}/" + (f" ({reason})" if reason else ""))
    return empty


def _refuse_empty_classes(empty: list[str], what: str, allow: bool) -> None:
    """A class folder that gives no sample is an error, unless allowed (then a warning): it is almost always
    an unreadable folder or a failed copy, and the class would stay in the class list, never seen in training."""
    if not empty:
        return
    named = ", ".join(empty[:10]) + (f" and {len(empty) - 10} more" if len(empty) > 10 else "")
    if allow:
        click.echo(f"warning: {len(empty)} class folder(s) {what}: {named}; kept as classes without samples "
                   "(--allow-empty-classes)", err=True)
        return
    raise ShardError(f"{len(empty)} class folder(s) {what}: {named}. Make the images readable (or remove the "
                     "folder), or pass --allow-empty-classes to keep each as a class without samples")


def _pool(workers: int) -> ProcessPoolExecutor | None:
    """The worker processes (None: work in this process). Spawned, not forked: the caller may hold threads
    (torch, DALI) that a forked child would inherit locked. They die with this process, also on kill -9,
    which left them running before (and the resource tracker with them: it ends once they are gone)."""
    if workers <= 1:
        return None
    return ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=exit_with_parent,
                               initargs=(os.getpid(),))


def _make_split(src: Path, out: Path, split: str, listing: Listing, fingerprint: str,
                settings: dict, conv: Convert, done: dict, pool, workers: int, progress: bool,
                fail_after: list, class_index: dict[str, int], allow_empty_classes: bool) -> dict:
    items = listing.items
    results = _load_plan(out, split, fingerprint)
    if results is None:  # check every file; results land by index, so worker order does not matter
        results = [None] * len(items)
        tasks = ((i, str(src / it.rel), str(_cache_file(out, split, i)), conv) for i, it in enumerate(items))
        chunk = max(1, min(64, len(items) // (workers * 8) or 1))
        with tqdm(total=len(items), desc=f"{split}: check", unit="img", disable=not progress,
                  smoothing=0.05) as bar:
            for i, chk in _imap(pool, _check_task, tasks, chunk):
                if chk.skipped is None and items[i].label < 0:
                    chk = Checked(skipped="no label for this file in --val-labels")
                results[i] = chk
                bar.update()
        _save_plan(out, split, fingerprint, results)

    good = [i for i, c in enumerate(results) if c.skipped is None]
    if not good:
        raise ShardError(f"every one of the {len(items)} files of split {split!r} was skipped (e.g. {items[0].rel}: "
                         f"{results[0].skipped}): a split of 0 samples cannot be trained or evaluated on")
    if settings["source"]["layout"][split] == "class-folders":
        skipped = [{"path": items[i].rel, "reason": c.skipped} for i, c in enumerate(results) if c.skipped]
        listed = {it.label for it in items}  # (the folders without any file were reported by the listing)
        _refuse_empty_classes(_empty_classes(src, split, (items[i].label for i in good), class_index, skipped,
                                             listed), "have no usable image (every file was skipped)",
                              allow_empty_classes)
    random.Random(f"imt-shards/{settings['seed']}/{split}").shuffle(good)
    sizes = [_sample_tar_size(results[i].size, items[i].label, items[i].rel) for i in good]
    cap = settings["shard_samples"] or default_shard_samples(len(good))
    shards = assign_shards(sizes, settings["shard_bytes"], cap)

    specs, records = [], {}
    for n, r in enumerate(shards):
        name = shard_stem(split, n)
        if _is_done(out, done.get(f"{name}.tar")) and done[f"{name}.tar"]["num_samples"] == len(r):
            records[name] = done[f"{name}.tar"]
            continue
        samples = [(f"{split}_{j:08d}", good[j], items[good[j]].rel, items[good[j]].label, results[good[j]])
                   for j in r]
        specs.append((src, out, split, name, samples, conv))
    with tqdm(total=len(good), initial=sum(r["num_samples"] for r in records.values()),
              desc=f"{split}: write", unit="img", disable=not progress, smoothing=0.05) as bar:
        for rec in _imap(pool, _write_task, specs):
            records[rec["file"][:-4]] = rec
            done[rec["file"]] = rec
            _save_progress(out, settings, done)
            bar.update(rec["num_samples"])
            fail_after[0] -= 1
            if fail_after[0] == 0:
                raise SimulatedInterrupt(f"{FAIL_AFTER_ENV}: stopping after a shard, as asked")
    return {
        "num_samples": len(good),
        "inputs": len(items),
        "shards": [records[shard_stem(split, n)] for n in range(len(shards))],
        "skipped": [{"path": items[i].rel, "reason": c.skipped} for i, c in enumerate(results) if c.skipped],
        "ignored": listing.ignored,
        "left_out": listing.left_out,
        "converted": sum(c.converted is not None for c in results if c.skipped is None),
    }


def _check_args(shard_bytes, shard_samples, workers, max_side, quality) -> None:
    if shard_bytes < 64 * 1024:
        raise ShardError(f"shard_bytes={shard_bytes}: use at least 65536 (default 1e9)")
    if shard_samples is not None and shard_samples < 1:
        raise ShardError(f"shard_samples={shard_samples}: must be >= 1")
    if workers < 1:
        raise ShardError(f"workers={workers}: must be >= 1")
    if max_side is not None and max_side < 16:
        raise ShardError(f"max_side={max_side}: must be >= 16")
    if quality is not None and not 1 <= quality <= 100:
        raise ShardError(f"quality={quality}: must be 1..100")


def _file_sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _beside_src(path, src: Path, option: str) -> Path | None:
    """A label file as given (relative to the current directory), else relative to --src: the devkit's and
    Kaggle's files sit in the data set's own folder, where the README's `--val-labels LOC_val_solution.csv`
    means them."""
    if path is None:
        return None
    given = Path(path)
    for candidate in (given, src / given):
        if candidate.is_file():
            return candidate
    raise ShardError(f"{option} {path}: no such file in the current directory ({Path.cwd()}) or in --src {src}; "
                     "pass its full path")


def make_shards(src, out, *, splits=None, shard_bytes: int = 1_000_000_000, shard_samples: int | None = None,
                workers: int = 1, seed: int = 0, max_side: int | None = None, quality: int | None = None,
                overwrite: bool = False, progress: bool = True, val_labels=None, meta=None,
                allow_empty_classes: bool = False) -> dict:
    """Make (or finish) the shards of `src` in `out`; returns the manifest dict (also written).
    A class folder that gives no sample is a ShardError unless allow_empty_classes (then a warning)."""
    src, out = Path(src).resolve(), Path(out).resolve()
    if not src.is_dir():
        raise ShardError(f"--src {src} is not a folder")
    _check_args(shard_bytes, shard_samples, workers, max_side, quality)
    explicit = bool(splits)
    splits = find_splits(src, splits, out)
    layouts = {s: _split_layout(src / s) for s in splits}

    def leave_out(s: str, why: str, fix: str) -> None:
        """A split found by default is left out with a message; one named with --split is an error."""
        if explicit:
            raise ShardError(f"{why}: {fix}")
        click.echo(f"leaving out split {s!r}: {why}", err=True)
        splits.remove(s)
        del layouts[s]

    for s in [s for s in splits if layouts[s] == "empty"]:
        leave_out(s, f"{src / s} holds no image files and no class folders",
                  "put <class>/<image> folders in it, or leave it out of --split")
    if not splits:
        raise ShardError(f"{src} holds no images: expected e.g. {src}/train/<class>/*.JPEG")
    flat = [s for s in splits if layouts[s] == "flat"]
    if flat and not val_labels:
        raise ShardError(f"{src / flat[0]} has no class folders (the ILSVRC2012 flat val layout): pass "
                         "--val-labels LOC_val_solution.csv, or the devkit ground truth with --meta, "
                         f"or leave it out with --split")
    val_labels, meta = _beside_src(val_labels, src, "--val-labels"), _beside_src(meta, src, "--meta")
    flat_labels = read_val_labels(val_labels, meta) if flat else None
    for s in flat:
        if not any(_image_id(p) in flat_labels for p in (src / s).iterdir()):
            # Kaggle's layout has an unlabelled flat test/ beside val/: never shard it as 100,000 skips.
            leave_out(s, f"no file in {src / s} is named in {val_labels} (an unlabelled test set?)",
                      "leave it out, naming the splits to make with --split")
    names = {p.name for s in splits if layouts[s] == "class-folders" for p in _class_dirs(src / s)}
    if flat_labels:
        names |= set(flat_labels.values())
    classes = sorted(names)
    class_index = {c: i for i, c in enumerate(classes)}

    source = {"path": str(src), "layout": layouts}
    if flat_labels:
        source["val_labels"] = {"file": Path(val_labels).name, "sha256": _file_sha(val_labels)}
        if meta:
            source["meta"] = {"file": Path(meta).name, "sha256": _file_sha(meta)}
    listed = {s: list_split(src, s, class_index, flat_labels if layouts[s] == "flat" else None) for s in splits}
    for s, listing in listed.items():  # before any output: an unreadable class folder is found in seconds
        if not listing.items:
            lo = listing.left_out
            why = f" ({len(lo)} paths left out, e.g. {lo[0]['path']}: {lo[0]['reason']})" if lo else ""
            raise ShardError(f"split {s!r} has no image file that can be read{why}: fix that, or leave the split "
                             "out by naming the splits to make with --split")
        if layouts[s] == "class-folders":
            _refuse_empty_classes(_empty_classes(src, s, (it.label for it in listing.items), class_index,
                                                 listing.left_out), "hold no image files", allow_empty_classes)
    # What the shards are made of: a resume or re-run over changed files must not keep shards of the old ones.
    fingerprints = {s: _listing_fingerprint(listing.items) for s, listing in listed.items()}
    source["listing"] = {s: f[:16] for s, f in fingerprints.items()}
    settings = {"seed": seed, "shard_bytes": shard_bytes, "shard_samples": shard_samples,
                "min_shards": MIN_SHARDS if shard_samples is None else None,
                "max_side": max_side, "quality": quality, "convert_quality": quality or DEFAULT_QUALITY,
                "splits": list(splits), "source": source}
    settings = json.loads(json.dumps(settings))  # the JSON form, as saved, so comparisons are exact
    done, complete = _prepare_out(out, settings, overwrite)
    if complete is not None and all(_is_done(out, r) for r in done.values()):
        if progress:
            click.echo(f"{out}: already complete with these settings (pass --overwrite to remake)")
        return complete
    for p in out.iterdir():  # half-written files of an interrupted run
        if _is_tmp(p) and _ours(p.name, splits) and p.is_file():
            p.unlink()
    _save_progress(out, settings, done)

    conv = Convert(max_side=max_side, quality=quality)
    fail_after = [int(os.environ.get(FAIL_AFTER_ENV, "0") or 0)]
    pool = _pool(workers)
    load_truncated, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False  # must raise
    try:
        split_info = {}
        for s in splits:
            split_info[s] = _make_split(src, out, s, listed[s], fingerprints[s], settings, conv, done, pool,
                                        workers, progress, fail_after, class_index, allow_empty_classes)
    except BrokenProcessPool as e:
        raise ShardError(f"a worker process died ({e}; out of memory?); finished shards are kept: "
                         "re-run the same command to resume, perhaps with fewer --workers") from e
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = load_truncated
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    manifest = {"format": FORMAT, "version": VERSION, "classes": classes, "settings": settings,
                "splits": split_info}
    _atomic_write(out / MANIFEST_NAME, (json.dumps(manifest, indent=1) + "\n").encode())
    (out / PROGRESS_NAME).unlink(missing_ok=True)
    shutil.rmtree(out / CACHE_NAME, ignore_errors=True)
    return manifest


def summary(manifest: dict) -> str:
    lines = []
    for name, s in manifest["splits"].items():
        lines.append(f"{name}: {s['inputs']} inputs = {s['num_samples']} written + {len(s['skipped'])} skipped"
                     f" ({s['ignored']} non-image files ignored); {s['converted']} converted; "
                     f"{len(s['shards'])} shards")
        for sk in s["skipped"][:10]:
            lines.append(f"  skipped {sk['path']}: {sk['reason']}")
        if len(s["skipped"]) > 10:
            lines.append(f"  ... {len(s['skipped']) - 10} more skipped (see manifest.json)")
        left_out = s.get("left_out", [])
        if left_out:
            lines.append(f"  {len(left_out)} paths left out of the listing:")
        for lo in left_out[:10]:
            lines.append(f"  left out {lo['path']}: {lo['reason']}")
        if len(left_out) > 10:
            lines.append(f"  ... {len(left_out) - 10} more left out (see manifest.json)")
    lines.append(f"{len(manifest['classes'])} classes")
    return "\n".join(lines)


@click.command(context_settings=CONTEXT)
@click.option("--src", required=True, type=click.Path(exists=True, file_okay=False),
              help="Folder with one subfolder per split (train/, val/, ...).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder for shards.")
@click.option("--split", "splits", multiple=True, help="Split to make (repeatable); default: all found.")
@click.option("--workers", default=os.cpu_count() or 1, type=click.IntRange(1),
              help="Worker processes (output is identical for any count).")
@click.option("--seed", default=0, type=int, help="Seed of the global shuffle.")
@click.option("--shard-bytes", default=1_000_000_000, type=click.IntRange(65536), help="Max tar size.")
@click.option("--shard-samples", default=None, type=click.IntRange(1),
              help=f"Max samples per shard [default: none; small splits get >= {MIN_SHARDS} shards "
                   f"of >= {MIN_SHARD_SAMPLES}]")
@click.option("--max-side", default=None, type=click.IntRange(16), help="Resize so the longer side is <= N.")
@click.option("--quality", default=None, type=click.IntRange(1, 100),
              help=f"Re-encode every image at this JPEG quality [default: keep good JPEGs, "
                   f"convert others at {DEFAULT_QUALITY}]")
@click.option("--val-labels", default=None, type=click.Path(dir_okay=False),
              help="Labels of a flat (ILSVRC2012) val folder: LOC_val_solution.csv or the devkit's "
                   "ILSVRC2012_validation_ground_truth.txt (with --meta); looked for in the current "
                   "directory, then in --src.")
@click.option("--meta", default=None, type=click.Path(dir_okay=False),
              help="The devkit's data/meta.mat (ILSVRC2012_ID -> wnid); looked for like --val-labels.")
@click.option("--overwrite", is_flag=True, help="Delete shards of another run in --out and start again.")
@click.option("--allow-empty-classes", is_flag=True,
              help="Keep a class folder that gives no sample (unreadable, empty, every file skipped) as a class "
                   "without samples, with a warning [default: refuse]")
@click.option("--progress/--no-progress", default=True, help="Progress bars.")
def main(src, out, splits, workers, seed, shard_bytes, shard_samples, max_side, quality, val_labels, meta,
         overwrite, allow_empty_classes, progress):
    """Make shuffled WebDataset shards + DALI indexes + manifest.json from an ImageNet-style tree."""
    t0 = time.perf_counter()
    try:
        manifest = make_shards(src, out, splits=splits or None, shard_bytes=shard_bytes,
                               shard_samples=shard_samples, workers=workers, seed=seed, max_side=max_side,
                               quality=quality, overwrite=overwrite, progress=progress,
                               val_labels=val_labels, meta=meta, allow_empty_classes=allow_empty_classes)
    except ShardError as e:
        raise click.ClickException(str(e)) from None
    dt = time.perf_counter() - t0
    n = sum(s["inputs"] for s in manifest["splits"].values())
    click.echo(summary(manifest))
    click.echo(f"{out}: {n} images in {dt:.1f} s ({n / max(dt, 1e-9):.0f} img/s, {workers} workers)")


if __name__ == "__main__":
    from imt.tools.make_shards import main as _main  # workers pickle functions of the package module

    _main()
