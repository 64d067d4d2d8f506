"""Reads and checks `<out>/manifest.json`, written by tools/make_shards.py.

Every loader takes its shard and index paths from here, so a missing, partial or foreign folder
fails once, early, with a message that names the file and says what to run, instead of deep
inside DALI or webdataset.

    m = load_manifest("work/shards")
    m.split("train").shards[0].tar      # absolute Path of train-000000.tar
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

FORMAT = "imt-shards"
VERSION = 1
MANIFEST_NAME = "manifest.json"
INDEX_VERSION = "v1.2"  # first token of a DALI wds2idx index file
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
        head = f.readline().split()
    if len(head) != 2 or head[0].decode(errors="replace") != INDEX_VERSION or not head[1].isdigit():
        raise ManifestError(f"{path}: not a DALI {INDEX_VERSION} index file (header {head!r})")
    return int(head[1])


def read_index(path: Path) -> list[dict[str, tuple[int, int, str]]]:
    """The samples of a wds2idx v1.2 index, in order: {ext: (data offset, size, member name)} each."""
    with open(path) as f:
        read_index_count(path)
        next(f)
        out = []
        for line in f:
            if not line.strip():
                continue
            p = line.split()
            if len(p) % 4:
                raise ManifestError(f"{path}: malformed index line {line.strip()!r}")
            out.append({ext: (int(off), int(size), name) for ext, off, size, name in
                        zip(p[0::4], p[1::4], p[2::4], p[3::4])})
    return out


def _check_shard(shard: Shard, root: Path) -> None:
    for p in (shard.tar, shard.index):
        if not p.is_file() or p.stat().st_size == 0:
            raise ManifestError(f"{p}: missing or empty, but listed in {root / MANIFEST_NAME}; "
                                f"{_remake_hint(root)}")
    n = read_index_count(shard.index)
    if n != shard.num_samples:
        raise ManifestError(f"{shard.index}: index lists {n} samples but the manifest says "
                            f"{shard.num_samples}; {_remake_hint(root)}")


def _parse_split(name: str, d: dict, root: Path, where: Path) -> Split:
    try:
        shards = tuple(Shard(tar=root / s["file"], index=root / s["index"],
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


def load_manifest(root: str | Path, *, check_files: bool = True) -> Manifest:
    """Parse `<root>/manifest.json`. With check_files, every tar and idx must exist and be
    non-empty and each idx header must agree with the manifest's count (cheap: one line each)."""
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
        splits = {name: _parse_split(name, s, root, where) for name, s in d["splits"].items()}
        settings = dict(d.get("settings", {}))
        label_ext = str(d.get("label_ext", "lbl"))
    except (KeyError, TypeError, AttributeError) as e:
        raise ManifestError(f"{where}: malformed ({e!r}); {_remake_hint(root)}") from e
    if label_ext not in LABEL_EXTS:
        raise ManifestError(f"{where}: label_ext {label_ext!r}, this code reads {', '.join(LABEL_EXTS)}; "
                            f"{_remake_hint(root)}")
    if check_files:
        for split in splits.values():
            for shard in split.shards:
                _check_shard(shard, root)
    return Manifest(root=root, classes=classes, settings=settings, splits=splits, label_ext=label_ext)
