"""Adopts WebDataset shards made elsewhere (e.g. the `imagenet-1k-wds` layout written by
`webdataset.ShardWriter`: `<key>.jpg` + `<key>.cls` + `<key>.json` per sample) as a data set this project
trains on, without rewriting a byte of them.

    imt-index-shards DIR                                   # splits from the tar names, labels from .cls
    imt-index-shards DIR --split train='imagenet1k-train-*.tar' --split val='imagenet1k-validation-*.tar'
    imt-index-shards DIR --label json:label --classes classes.txt --workers 8
    python -m imt.tools.index_shards ...

Every tar is read once: its members are grouped into samples, every image is fully decoded (as
tools/make_shards.py checks its inputs; `--no-decode` skips that), and beside the tars (or in --out) go:
- `<tar stem>.imt.idx`: a DALI wds2idx v1.2 index of the tar's usable samples, written by make_shards'
  `index_text`. Both loaders read samples only through it, so a sample left out of it is never read:
  that is how undecodable or unlabelled samples are skipped, by key, without touching the tar;
- `manifest.json` (pipeline/manifest.py): classes, per split its tars with sample counts and sha256,
  and the skipped samples with the reason, so `summary` prints the report make_shards prints.
The user's tars and any other file stay as they are; running it again replaces only these files.

Labels. DALI's webdataset reader takes each component of a sample from the sample's own tar, at a data
offset that must be a multiple of 512 (DALI 2.4 refuses anything else: "tar offset is not a multiple of
tar block size"), so a label can come neither from a file beside the tar nor from the number inside a .json
member. The index therefore gives each sample a component `lblsize` of `label + 1` bytes at offset 0 of its
own tar: DALI returns those bytes and pipeline/dali.py takes the label as their count minus one; the torch
loader reads the same count from the index. It costs at most `classes` bytes per sample from the tar's first
block (1 KB for ImageNet, against ~110 KB of JPEG). Where the label comes from (`--label`):
- `cls` (default): the `.cls` member, ASCII decimal (imagenet-1k-wds, and what ShardWriter writes for an int);
- `json:<field>`: a field of the `.json` member: an integer, or a class name looked up in `--classes`.
Class names: `--classes FILE` (one name per line, line i = label i), else the labels' numbers `0..max`.

Samples: members are grouped by key = the member name without its component's extension (`.jpg`, `.jpeg`,
`.cls`, `.json`), so keys with dots (`n01440764.10026.jpg`) stay whole; other members are ignored and
counted. Skipped and listed: a sample without an image or a label, a key seen before in the split
(duplicate: the first one is kept), a key with whitespace (an index line cannot name it), an image that
does not decode or is not a JPEG (the torch loader decodes JPEGs only; imt-make-shards converts such files).
Splits: `--split NAME=GLOB`, else from the names: `<prefix>-<split>-<number>.tar` or `<split>-<number>.tar`,
with `validation`/`valid` read as `val` (the trainer's name).
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
import multiprocessing as mp
import os
import re
import tarfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import click
from tqdm import tqdm

from imt.tools.make_shards import (FORMAT, MANIFEST_NAME, VERSION, BadImage, Convert, ShardError, _atomic_write, _imap,
                               check_image, index_text, summary)
from imt.train.cli import CONTEXT

INDEX_SUFFIX = ".imt.idx"
LABEL_EXT = "lblsize"  # pipeline/manifest.py LABEL_EXTS: label = the component's byte count - 1
IMAGE_EXTS = ("jpg", "jpeg", "jpe")
SPLIT_ALIASES = {"validation": "val", "valid": "val"}
_SPLIT_NAME = re.compile(r"^(?:.*[-_])?([A-Za-z]+)[-_]?\d+$")


def split_tars(root: Path, patterns: dict[str, str] | None) -> dict[str, list[Path]]:
    """{split: its tars, sorted}: from NAME=GLOB patterns, else from the tar names."""
    tars = sorted(p for p in root.iterdir() if p.suffix == ".tar" and p.is_file())
    if not tars:
        raise ShardError(f"{root} holds no .tar files")
    out: dict[str, list[Path]] = {}
    if patterns:
        for name, glob in patterns.items():
            out[name] = [p for p in tars if fnmatch.fnmatch(p.name, glob)]
            if not out[name]:
                raise ShardError(f"--split {name}={glob}: no tar in {root} matches")
        return out
    for p in tars:
        m = _SPLIT_NAME.match(p.stem)
        if not m:
            raise ShardError(f"cannot tell the split of {p.name} from its name; name them, e.g. "
                             f"--split train='*-train-*.tar' --split val='*-validation-*.tar'")
        name = m.group(1).lower()
        out.setdefault(SPLIT_ALIASES.get(name, name), []).append(p)
    return out


def _parse_label(spec: str) -> tuple[str, str | None]:
    if spec == "cls":
        return "cls", None
    if spec.startswith("json:") and len(spec) > 5:
        return "json", spec[5:]
    raise ShardError(f"--label {spec!r}: use 'cls' (the .cls member) or 'json:<field>' (a field of the .json)")


def _label(parts: dict, spec: str, class_index: dict[str, int] | None) -> int:
    """The sample's label; ValueError(reason) when it has none that can be used."""
    kind, field = _parse_label(spec)
    if kind not in parts:
        raise ValueError(f"no .{kind} member")
    raw = parts[kind]
    if kind == "cls":
        try:
            value = int(raw.decode("ascii").strip())
        except (UnicodeDecodeError, ValueError):
            raise ValueError(f".cls is not a decimal number ({raw[:20]!r})") from None
    else:
        try:
            value = json.loads(raw)[field]
        except (ValueError, KeyError, TypeError):
            raise ValueError(f".json has no field {field!r}") from None
        if isinstance(value, str):
            if class_index is None:
                raise ValueError(f".json {field}={value!r} is a name: pass --classes FILE to number the classes")
            if value not in class_index:
                raise ValueError(f"class {value!r} is not in --classes")
            value = class_index[value]
        elif not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f".json {field}={value!r} is neither a label number nor a class name")
    if value < 0 or (class_index is not None and value >= len(class_index)):
        raise ValueError(f"label {value} is outside 0..{len(class_index or ()) - 1 if class_index else 'inf'}")
    return value


def _scan_task(args) -> dict:
    """Worker: one tar's samples in member order: (key, image member, label) or (key, reason), its sha256."""
    tar_path, spec, class_index, decode = args
    h = hashlib.sha256()
    with open(tar_path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    size = Path(tar_path).stat().st_size
    order: list[str] = []
    samples: dict[str, dict] = {}
    ignored, repeated, dotted, current, again = 0, [], 0, None, False
    try:
        with tarfile.open(tar_path, "r:") as tar:
            for m in tar:
                if not m.isreg():
                    continue
                base = m.name.rsplit("/", 1)[-1]
                ext = next((e for e in (*IMAGE_EXTS, "cls", "json") if base.lower().endswith(f".{e}")), None)
                if ext is None or m.name.startswith(".") or base.startswith("."):
                    ignored += 1
                    continue
                key = m.name[:-len(ext) - 1]
                if key != current:  # a new group of members: a new sample, or another sample of a seen key
                    current, again = key, key in samples
                    if again:
                        repeated.append(key)
                    else:
                        samples[key] = {}
                        order.append(key)
                        dotted += "." in key.rsplit("/", 1)[-1]
                if again:
                    continue
                part = "img" if ext in IMAGE_EXTS else ext
                if part in samples[key]:
                    samples[key]["error"] = f"two {part} members ({m.name})"
                    continue
                samples[key][part] = (m.offset_data, m.size, m.name) if part == "img" else tar.extractfile(m).read()
                if part == "img" and decode:
                    samples[key]["data"] = tar.extractfile(m).read()
    except (tarfile.TarError, OSError) as e:
        raise ShardError(f"{tar_path} is not a readable tar ({e}); it cannot be adopted") from e
    out = []
    for key in order:
        parts = samples[key]
        try:
            if "error" in parts:
                raise ValueError(parts["error"])
            if "img" not in parts:
                raise ValueError("no image member (.jpg/.jpeg)")
            if any(c.isspace() for c in parts["img"][2]):
                raise ValueError("whitespace in the member name: a DALI index line cannot name it")
            label = _label(parts, spec, class_index)
            if label + 1 > size:
                raise ValueError(f"label {label} needs a {label + 1}-byte range in a {size}-byte tar")
            if decode:
                data = parts.pop("data")
                if not data.startswith(b"\xff\xd8"):
                    raise ValueError("not JPEG data: the torch loader decodes JPEGs only; convert the split "
                                     "with imt-make-shards")
                try:
                    check_image(data, Convert())
                except BadImage as e:
                    raise ValueError(str(e)) from None
            out.append((key, parts["img"], label))
        except ValueError as e:
            out.append((key, None, str(e)))
    return {"tar": str(tar_path), "sha256": h.hexdigest(), "bytes": size, "samples": out, "ignored": ignored,
            "repeated": repeated, "dotted": dotted}


def index_shards(root, *, out=None, splits: dict[str, str] | None = None, label: str = "cls",
                 classes_file=None, decode: bool = True, workers: int = 1, progress: bool = True) -> dict:
    """Index the WebDataset tars in `root` for both loaders; returns the manifest (also written)."""
    root = Path(root).resolve()
    out = Path(out).resolve() if out else root
    if not root.is_dir():
        raise ShardError(f"{root} is not a folder")
    _parse_label(label)
    out.mkdir(parents=True, exist_ok=True)
    existing = out / MANIFEST_NAME
    if existing.is_file():
        try:
            mine = "adopted" in json.loads(existing.read_text()).get("settings", {})
        except (ValueError, AttributeError):
            mine = False
        if not mine:
            raise ShardError(f"{existing} exists and is not an index written by imt-index-shards; it is left "
                             "alone: pass --out <another folder> for the index files and the manifest")
    classes = None
    if classes_file:
        names = [line.strip() for line in Path(classes_file).read_text().splitlines() if line.strip()]
        if len(set(names)) != len(names):
            raise ShardError(f"--classes {classes_file}: a class name is listed twice")
        classes = {n: i for i, n in enumerate(names)}
    by_split = split_tars(root, splits)
    tasks = [(str(p), label, classes, decode) for tars in by_split.values() for p in tars]
    pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) if workers > 1 else None
    try:
        scans = {}
        with tqdm(total=len(tasks), desc="index", unit="tar", disable=not progress) as bar:
            for scan in _imap(pool, _scan_task, tasks):
                scans[scan["tar"]] = scan
                bar.update()
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    split_info, top, dotted = {}, -1, 0
    for name, tars in by_split.items():
        seen: dict[str, str] = {}
        shards, skipped, inputs, ignored = [], [], 0, 0
        for tar in tars:
            scan = scans[str(tar)]
            ignored += scan["ignored"]
            dotted += scan["dotted"]
            lines = []
            for key in scan["repeated"]:
                inputs += 1
                skipped.append({"path": f"{tar.name}:{key}", "key": key,
                                "reason": f"duplicate key (its first sample, earlier in {tar.name}, is kept)"})
            for key, img, lab in scan["samples"]:
                inputs += 1
                if img is None:
                    skipped.append({"path": f"{tar.name}:{key}", "key": key, "reason": lab})
                elif key in seen:
                    skipped.append({"path": f"{tar.name}:{key}", "key": key,
                                    "reason": f"duplicate key (the sample in {seen[key]} is kept)"})
                else:
                    seen[key] = tar.name
                    top = max(top, lab)
                    lines.append([(LABEL_EXT, 0, lab + 1, f"{key}.{LABEL_EXT}"), ("jpg", *img)])
            if not lines:
                continue  # nothing usable in this tar: DALI cannot read an empty index
            index = out / f"{tar.stem}{INDEX_SUFFIX}"
            text = index_text(lines)
            _atomic_write(index, text.encode())
            shards.append({"file": os.path.relpath(tar, out), "index": index.name, "num_samples": len(lines),
                           "sha256": scan["sha256"], "bytes": scan["bytes"], "index_bytes": len(text.encode())})
        split_info[name] = {"num_samples": sum(s["num_samples"] for s in shards), "inputs": inputs,
                            "shards": shards, "skipped": skipped, "ignored": ignored, "converted": 0}
    names = list(classes) if classes else [str(i) for i in range(top + 1)]
    settings = {"adopted": {"source": str(root), "label": label, "decode": decode, "keys_with_dots": dotted,
                            "splits": {n: [os.path.relpath(t, out) for t in ts] for n, ts in by_split.items()},
                            "classes_file": ({"file": Path(classes_file).name,
                                              "sha256": hashlib.sha256(Path(classes_file).read_bytes()).hexdigest()}
                                             if classes_file else None)}}
    manifest = {"format": FORMAT, "version": VERSION, "classes": names, "label_ext": LABEL_EXT,
                "settings": settings, "splits": split_info}
    _atomic_write(existing, (json.dumps(manifest, indent=1) + "\n").encode())
    return manifest


def _split_option(ctx, param, values) -> dict[str, str] | None:
    out = {}
    for v in values:
        name, sep, glob = v.partition("=")
        if not sep or not name or not glob:
            raise click.BadParameter(f"{v!r}: expected NAME=GLOB, e.g. train='imagenet1k-train-*.tar'")
        out[name] = glob
    return out or None


@click.command(context_settings=CONTEXT)
@click.argument("root", type=click.Path(exists=True, file_okay=False))
@click.option("--split", "splits", multiple=True, callback=_split_option, metavar="NAME=GLOB",
              help="Tars of a split (repeatable) [default: from the names: *-train-*.tar, *-validation-*.tar -> "
                   "train, val]")
@click.option("--label", default="cls", help="Where labels are: 'cls' (the .cls member) or 'json:<field>'.")
@click.option("--classes", "classes_file", type=click.Path(exists=True, dir_okay=False),
              help="Class names, one per line in label order [default: the label numbers 0..max].")
@click.option("--out", type=click.Path(file_okay=False),
              help="Folder for the index files and manifest.json [default: ROOT, beside the tars].")
@click.option("--decode/--no-decode", default=True, help="Decode every image to find the broken ones.")
@click.option("--workers", default=os.cpu_count() or 1, type=click.IntRange(1), help="Processes (one tar each).")
@click.option("--progress/--no-progress", default=True, help="Progress bar.")
def main(root, splits, label, classes_file, out, decode, workers, progress):
    """Index the WebDataset tars in ROOT (made elsewhere) so imt-train reads them as they are."""
    t0 = time.perf_counter()
    try:
        manifest = index_shards(root, out=out, splits=splits, label=label, classes_file=classes_file,
                                decode=decode, workers=workers, progress=progress)
    except ShardError as e:
        raise click.ClickException(str(e)) from None
    click.echo(summary(manifest).replace(" written + ", " indexed + "))
    dotted = manifest["settings"]["adopted"]["keys_with_dots"]
    if dotted:
        click.echo(f"{dotted} keys contain dots: grouped by their components' extensions, so they stay whole")
    click.echo(f"{out or root}: indexed in {time.perf_counter() - t0:.1f} s; train with "
               f"`imt-train --data {out or root}`")


if __name__ == "__main__":
    from imt.tools.index_shards import main as _main  # workers pickle functions of the package module

    _main()
