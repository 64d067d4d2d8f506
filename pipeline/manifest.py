"""Reads and checks `<out>/manifest.json`, written by tools/make_shards.py.

Every loader takes its shard and index paths from here, so a missing, partial or foreign folder
fails once, early, with a message that names the file and says what to run, instead of deep
inside DALI or webdataset.

    m = load_manifest("work/shards")
    m.split("train").shards[0].tar      # absolute Path of train-000000.tar
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FORMAT = "imt-shards"
VERSION = 1
MANIFEST_NAME = "manifest.json"
INDEX_VERSION = "v1.2"  # first token of a DALI wds2idx index file
SHARD_DIGITS = 6


def shard_stem(split: str, n: int) -> str:
    """`train-000012`: the name of shard n of a split, without `.tar` / `.idx` (the one definition)."""
    return f"{split}-{n:0{SHARD_DIGITS}d}"


def shard_stem_pattern(split: str) -> str:
    """A regular expression matching every `shard_stem(split, n)`."""
    return rf"{re.escape(split)}-\d{{{SHARD_DIGITS}}}"


PROGRESS_NAME = ".imt-progress.json"  # tools/make_shards.py's record of an unfinished run
# How a sample's label is found through its index line (Manifest.label_ext): "lbl", our shards' member
# holding the label as one little-endian int64; "lblsize", adopted shards (tools/index_shards.py), whose
# tars we may not write into: the label is the byte count of the component minus 1 (see that module).
LABEL_EXTS = ("lbl", "lblsize")


class ManifestError(ValueError):
    """A shard folder is missing, incomplete or not ours; the message says what to run."""


@dataclass(frozen=True)
class Shard:
    tar: Path
    index: Path
    num_samples: int
    sha256: str


@dataclass(frozen=True)
class Split:
    name: str
    num_samples: int
    shards: tuple[Shard, ...]
    skipped: tuple[dict, ...]

    @property
    def tars(self) -> list[str]:
        return [str(s.tar) for s in self.shards]

    @property
    def indexes(self) -> list[str]:
        return [str(s.index) for s in self.shards]


@dataclass(frozen=True)
class Manifest:
    root: Path
    classes: tuple[str, ...]
    settings: dict
    splits: dict[str, Split]
    label_ext: str = "lbl"

    @property
    def adopted(self) -> bool:
        """Shards made elsewhere (tools/index_shards.py): their keys and member names are the maker's."""
        return "adopted" in self.settings

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def split(self, name: str) -> Split:
        if name not in self.splits:
            raise ManifestError(
                f"{self.root / MANIFEST_NAME}: no split {name!r}; available: "
                f"{', '.join(sorted(self.splits)) or '(none)'}. Make it with "
                f"`python -m imt.tools.make_shards --src <data> --out {self.root} --split {name}`.")
        return self.splits[name]


def _remake_hint(root: Path) -> str:
    return f"re-run `python -m imt.tools.make_shards --src <data> --out {root}` (add --overwrite to rebuild)"


def read_index_count(path: Path) -> int:
    """Sample count from a wds2idx index header (`v1.2 <num_samples>`)."""
    with open(path, "rb") as f:
        return _index_count(f.readline().decode(errors="replace"), path)


def _index_count(head: str, path: Path) -> int:
    """The sample count of an index's header line; ManifestError naming the file for anything else."""
    fields = head.split()
    if len(fields) != 2 or fields[0] != INDEX_VERSION or not fields[1].isdigit():
        raise ManifestError(f"{path}: not a DALI {INDEX_VERSION} index file (header {fields!r})")
    return int(fields[1])


Component = tuple[int, int, str]  # (data offset in the tar, size in bytes, member name) of one file of a sample


@dataclass(frozen=True)
class Index:
    """A parsed wds2idx index: one line per sample, `<ext> <offset> <size> <name>` per component, the same
    components in the same order on every line (as make_shards writes them). Offsets and sizes are arrays, so
    checking ImageNet's 1.28 M lines is a few vector operations, not a Python loop per line."""
    path: Path
    count: int                   # the header's sample count (callers compare it with len(self))
    exts: tuple[str, ...]        # component extensions, in line order
    offsets: np.ndarray          # int64 (samples, components): data offsets in the tar
    sizes: np.ndarray            # int64 (samples, components)
    names: list[str]             # member names, row-major (samples x components)

    def __len__(self) -> int:
        return len(self.offsets)

    def column(self, ext: str) -> int:
        if ext not in self.exts:
            raise ManifestError(f"{self.path}: samples have no .{ext} component (they have "
                                f"{', '.join(self.exts) or 'none'}); remake the shards with imt-make-shards")
        return self.exts.index(ext)

    def sample(self, i: int) -> dict[str, Component]:
        """{ext: (offset, size, name)} of sample i, in line order."""
        c = len(self.exts)
        return {e: (int(self.offsets[i, k]), int(self.sizes[i, k]), self.names[i * c + k])
                for k, e in enumerate(self.exts)}


def read_index(path: Path) -> Index:
    """The one reader of index files (loaders, imt-verify-shards, benchmarks). ManifestError naming the file
    and line for a bad header, a malformed line or lines with other components than the first."""
    path = Path(path)
    head, _, body = path.read_text(encoding="utf-8", errors="replace").partition("\n")
    count = _index_count(head, path)
    tokens = body.split()
    first = body.lstrip().split("\n", 1)[0].split()
    width, exts = len(first), tuple(first[0::4])
    rows = len(tokens) // width if width else 0
    uniform = (width % 4 == 0 and len(tokens) == width * rows  # then the count check below settles it
               and all(tokens[k::width].count(exts[k // 4]) == rows for k in range(0, width, 4)))
    if width and not uniform:  # name the first line that differs (the slow way; only on this error)
        for n, line in enumerate(body.splitlines(), 2):
            f = line.split()
            if f and (len(f) != width or width % 4 or tuple(f[0::4]) != exts):
                raise ManifestError(f"{path} line {n}: {line.strip()[:200]!r} is not `<ext> <offset> <size> <name>` "
                                    f"for each of the components of the first line ({', '.join(exts)}); remake the "
                                    "shards with imt-make-shards")
        raise ManifestError(f"{path}: lines hold different numbers of fields; remake the shards with imt-make-shards")
    c = len(exts)
    if not rows:
        return Index(path, count, exts, np.zeros((0, 0), np.int64), np.zeros((0, 0), np.int64), [])
    try:
        offsets = np.array([tokens[k + 1::width] for k in range(0, width, 4)], dtype=np.int64).T.reshape(-1, c)
        sizes = np.array([tokens[k + 2::width] for k in range(0, width, 4)], dtype=np.int64).T.reshape(-1, c)
    except ValueError:
        raise ManifestError(f"{path}: an offset or size is not a number; remake the shards with imt-make-shards"
                            ) from None
    names = tokens[3::4]
    return Index(path, count, exts, offsets, sizes, names)


def _check_shard(shard: Shard, root: Path, check_tars: bool = True) -> None:
    for p in (shard.tar, shard.index) if check_tars else (shard.index,):
        if not p.is_file() or p.stat().st_size == 0:
            raise ManifestError(f"{p}: missing or empty, but listed in {root / MANIFEST_NAME}; "
                                f"{_remake_hint(root)}")
    n = read_index_count(shard.index)
    if n != shard.num_samples:
        raise ManifestError(f"{shard.index}: index lists {n} samples but the manifest says "
                            f"{shard.num_samples}; {_remake_hint(root)}")


def _inside(root: Path, name: object, where: Path, tars: Path | None = None) -> Path:
    """`root / name` for a file name the manifest lists; a path that leaves the folder (absolute, or with
    `..`) is refused: a tampered manifest must not make the loaders read files elsewhere. `tars`: the folder
    of the user's tars that an adopted data set (tools/index_shards.py --out elsewhere) lists relative to
    root; a tar path may lead there, and nowhere else."""
    rel = Path(str(name))
    if tars is not None and not rel.is_absolute() and rel.parts:
        target = Path(os.path.normpath(root / rel))
        if target.is_relative_to(os.path.normpath(tars)) or target.is_relative_to(os.path.normpath(root)):
            return root / rel
    elif not (rel.is_absolute() or ".." in rel.parts or not rel.parts):
        return root / rel
    raise ManifestError(f"{where}: lists {str(name)!r}, a path outside {root}"
                        + (f" and {tars}" if tars is not None else "") + "; a manifest lists files inside "
                        f"its own folder only. It was edited or is not ours: {_remake_hint(root)}")


def _parse_split(name: str, d: dict, root: Path, where: Path, tars: Path | None = None) -> Split:
    try:
        shards = tuple(Shard(tar=_inside(root, s["file"], where, tars), index=_inside(root, s["index"], where),
                             num_samples=int(s["num_samples"]), sha256=str(s["sha256"]))
                       for s in d["shards"])
        split = Split(name=name, num_samples=int(d["num_samples"]), shards=shards,
                      skipped=tuple(d.get("skipped", ())))
    except (KeyError, TypeError, ValueError) as e:
        raise ManifestError(f"{where}: split {name!r} is malformed ({e!r}); {_remake_hint(root)}") from e
    total = sum(s.num_samples for s in shards)
    if total != split.num_samples:
        raise ManifestError(f"{where}: split {name!r} says {split.num_samples} samples but its shards "
                            f"hold {total}; {_remake_hint(root)}")
    return split


def load_manifest(root: str | Path, *, check_files: bool = True, check_tars: bool = True) -> Manifest:
    """Parse `<root>/manifest.json`. With check_files, every tar and idx must exist and be
    non-empty and each idx header must agree with the manifest's count (cheap: one line each).
    `check_tars` False: the tars are not there yet (streamed from object storage, pipeline/remote.py)."""
    root = Path(root).resolve()
    where = root / MANIFEST_NAME
    if not where.is_file():
        hint = ""
        if (root / PROGRESS_NAME).is_file():
            hint = " (the shard maker was interrupted; re-run the same command to finish)"
        elif root.is_dir() and any(root.glob("*.tar")):  # e.g. written by webdataset.ShardWriter
            hint = (f" (the .tar files there were not made by imt-make-shards: index them where they are, "
                    f"without rewriting them, with `imt-index-shards {root}`)")
        raise ManifestError(f"{where} not found{hint}. Make shards with "
                            f"`python -m imt.tools.make_shards --src <data> --out {root}`.")
    try:
        d = json.loads(where.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ManifestError(f"{where}: unreadable ({e}); {_remake_hint(root)}") from e
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise ManifestError(f"{where}: not an {FORMAT} manifest; {_remake_hint(root)}")
    if d.get("version") != VERSION:
        raise ManifestError(f"{where}: version {d.get('version')!r}, this code reads {VERSION}; "
                            f"{_remake_hint(root)}")
    try:
        classes = tuple(str(c) for c in d["classes"])
        settings = dict(d.get("settings", {}))
        source = settings.get("adopted", {}).get("source") if isinstance(settings.get("adopted"), dict) else None
        tars = Path(source) if source else None  # an adopted data set's tars (tools/index_shards.py)
        splits = {name: _parse_split(name, s, root, where, tars) for name, s in d["splits"].items()}
        label_ext = str(d.get("label_ext", "lbl"))
    except (KeyError, TypeError, AttributeError) as e:
        raise ManifestError(f"{where}: malformed ({e!r}); {_remake_hint(root)}") from e
    if label_ext not in LABEL_EXTS:
        raise ManifestError(f"{where}: label_ext {label_ext!r}, this code reads {', '.join(LABEL_EXTS)}; "
                            f"{_remake_hint(root)}")
    seen: dict[Path, str] = {}
    for split in splits.values():  # one file read twice would count its samples twice (or leak train into val)
        for p in (path for shard in split.shards for path in (shard.tar, shard.index)):
            if p in seen:
                raise ManifestError(f"{where}: {p.name} is listed twice (in split {seen[p]!r} and in split "
                                    f"{split.name!r}); {_remake_hint(root)}")
            seen[p] = split.name
    if check_files:
        for split in splits.values():
            for shard in split.shards:
                _check_shard(shard, root, check_tars)
    return Manifest(root=root, classes=classes, settings=settings, splits=splits, label_ext=label_ext)
