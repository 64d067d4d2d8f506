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

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def split(self, name: str) -> Split:
        if name not in self.splits:
            raise ManifestError(
                f"{self.root / MANIFEST_NAME}: no split {name!r}; available: "
                f"{', '.join(sorted(self.splits)) or '(none)'}. Make it with "
                f"`python -m tools.make_shards --src <data> --out {self.root} --split {name}`.")
        return self.splits[name]


def _remake_hint(root: Path) -> str:
    return f"re-run `python -m tools.make_shards --src <data> --out {root}` (add --overwrite to rebuild)"


def read_index_count(path: Path) -> int:
    """Sample count from a wds2idx index header (`v1.2 <num_samples>`)."""
    with open(path, "rb") as f:
        head = f.readline().split()
    if len(head) != 2 or head[0].decode(errors="replace") != INDEX_VERSION or not head[1].isdigit():
        raise ManifestError(f"{path}: not a DALI {INDEX_VERSION} index file (header {head!r})")
    return int(head[1])


Component = tuple[int, int, str]  # (data offset in the tar, size in bytes, member name) of one file of a sample


def parse_index_line(line: str, where: str = "index") -> dict[str, Component]:
    """One sample's line of a wds2idx index, `<ext> <offset> <size> <name>` per component, as
    {ext: (offset, size, name)} in the line's order."""
    f = line.split()
    if not f or len(f) % 4:
        raise ManifestError(f"{where}: malformed index line {line.strip()!r} (expected `<ext> <offset> <size> "
                            "<name>` per component)")
    try:
        return {f[k]: (int(f[k + 1]), int(f[k + 2]), f[k + 3]) for k in range(0, len(f), 4)}
    except ValueError:
        raise ManifestError(f"{where}: malformed index line {line.strip()!r} (offset or size not a number)") from None


def read_index(path: Path) -> tuple[int, list[dict[str, Component]]]:
    """The one reader of index files: (count in the header, every sample's components). The header count is
    returned, not checked against the lines, so a caller can report both."""
    with open(path, encoding="utf-8", errors="replace") as f:
        head = f.readline().split()
        if len(head) != 2 or head[0] != INDEX_VERSION or not head[1].isdigit():
            raise ManifestError(f"{path}: not a DALI {INDEX_VERSION} index file (header {head!r})")
        return int(head[1]), [parse_index_line(line, f"{path} line {n}") for n, line in enumerate(f, 2)
                              if line.strip()]


def _check_shard(shard: Shard, root: Path) -> None:
    for p in (shard.tar, shard.index):
        if not p.is_file() or p.stat().st_size == 0:
            raise ManifestError(f"{p}: missing or empty, but listed in {root / MANIFEST_NAME}; "
                                f"{_remake_hint(root)}")
    n = read_index_count(shard.index)
    if n != shard.num_samples:
        raise ManifestError(f"{shard.index}: index lists {n} samples but the manifest says "
                            f"{shard.num_samples}; {_remake_hint(root)}")


def _inside(root: Path, name: object, where: Path) -> Path:
    """`root / name` for a file name the manifest lists; a path that leaves the folder (absolute, or with
    `..`) is refused: a tampered manifest must not make the loaders read files elsewhere."""
    rel = Path(str(name))
    if rel.is_absolute() or ".." in rel.parts or not rel.parts:
        raise ManifestError(f"{where}: lists {str(name)!r}, a path outside {root}; a manifest lists files inside "
                            f"its own folder only. It was edited or is not ours: {_remake_hint(root)}")
    return root / rel


def _parse_split(name: str, d: dict, root: Path, where: Path) -> Split:
    try:
        shards = tuple(Shard(tar=_inside(root, s["file"], where), index=_inside(root, s["index"], where),
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
        if root.is_dir() and any(root.glob("*.tar")):
            hint = " (tars are present: the shard maker was interrupted; re-run the same command to finish)"
        raise ManifestError(f"{where} not found{hint}. Make shards with "
                            f"`python -m tools.make_shards --src <data> --out {root}`.")
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
    except (KeyError, TypeError, AttributeError) as e:
        raise ManifestError(f"{where}: malformed ({e!r}); {_remake_hint(root)}") from e
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
                _check_shard(shard, root)
    return Manifest(root=root, classes=classes, settings=settings, splits=splits)
