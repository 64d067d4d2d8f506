"""Re-reads every shard and index file against manifest.json and decodes every image.

    python -m imt.tools.verify_shards work/shards        imt-verify-shards work/shards [--split val]

Checks, per shard: the tar's sha256 and sample count; members are regular files, grouped as
`<split>_<NNNNNNNN>` + .jpg/.cls/.lbl/.path in that order, keys dot-free and numbered 0..N-1
across the split's shards; each .idx line names exactly the tar's members with their data offsets
and sizes; .cls is a label in range and equals the int64 in .lbl; .path's class folder (for
class-per-folder splits) is the class of that label; the .jpg is a baseline RGB JPEG that PIL
decodes fully. Also flags .tar/.idx files in the folder that the manifest does not list.
Exit status 1 when anything is wrong, listing every problem.
"""
from __future__ import annotations

import hashlib
import io
import re
import sys
import tarfile
import warnings
from pathlib import Path

import click
from PIL import Image
from tqdm import tqdm

from imt.pipeline.manifest import Manifest, ManifestError, Shard, load_manifest, read_index, shard_stem_pattern
from imt.train.cli import CONTEXT
from imt.tools.make_shards import _jpeg_sof

COMPONENTS = ("jpg", "cls", "lbl", "path")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _read_tar(path: Path) -> list[tuple[str, int, int, bytes]]:
    """(name, data offset, size, data) of every member, in order; non-regular members raise."""
    out = []
    with tarfile.open(path, "r:") as tar:
        for m in tar:
            if not m.isreg():
                raise ValueError(f"member {m.name!r} is not a regular file")
            out.append((m.name, m.offset_data, m.size, tar.extractfile(m).read()))
    return out


def _check_image(data: bytes) -> str | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            im = Image.open(io.BytesIO(data))
            im.load()
    except Exception as e:  # noqa: BLE001
        return f"does not decode ({e})"
    if im.format not in ("JPEG", "MPO") or im.mode != "RGB":
        return f"is {im.format} {im.mode}, not an RGB JPEG"
    if _jpeg_sof(data) != 0xC0:
        return "is not a baseline JPEG"
    return None


def _check_shard(m: Manifest, split: str, shard: Shard, first: int, layout: str, decode: bool,
                 bar) -> list[str]:
    where = shard.tar.name
    problems = []
    if _sha256(shard.tar) != shard.sha256:
        problems.append(f"{where}: sha256 differs from the manifest")
    try:
        members = _read_tar(shard.tar)
        index = read_index(shard.index)
        count, index = index.count, [index.sample(i) for i in range(len(index))]
    except (OSError, ValueError, tarfile.TarError) as e:
        return problems + [f"{where}: unreadable ({e})"]
    groups: list[list[tuple[str, int, int, bytes]]] = []
    for mem in members:
        key = mem[0].split(".", 1)[0]
        if groups and groups[-1][0][0].split(".", 1)[0] == key:
            groups[-1].append(mem)
        else:
            groups.append([mem])
    if not (len(groups) == count == len(index) == shard.num_samples):
        problems.append(f"{where}: {len(groups)} samples in the tar, {count} in the index header, "
                        f"{len(index)} index lines, {shard.num_samples} in the manifest")
    for n, (group, entry) in enumerate(zip(groups, index)):
        key = f"{split}_{first + n:08d}"
        names = [g[0] for g in group]
        if names != [f"{key}.{c}" for c in COMPONENTS]:
            problems.append(f"{where}: sample {n} has members {names}, expected {key}.{{{','.join(COMPONENTS)}}}")
            continue
        if [(name.split(".", 1)[1], (off, size, name)) for name, off, size, _ in group] != list(entry.items()):
            problems.append(f"{where}: index line {n + 1} does not match the tar members of {key}")
        data = {name.split(".", 1)[1]: payload for name, _, _, payload in group}
        try:
            label = int(data["cls"].decode("ascii"))
            lbl = int.from_bytes(data["lbl"], "little", signed=True)
            path = data["path"].decode("utf-8")
        except (UnicodeDecodeError, ValueError) as e:
            problems.append(f"{where}: {key} has an unreadable label or path ({e})")
            continue
        if len(data["lbl"]) != 8 or lbl != label or not 0 <= label < m.num_classes:
            problems.append(f"{where}: {key} .cls={label} .lbl={lbl}: must agree and lie in [0, {m.num_classes})")
        elif layout == "class-folders" and path.split("/")[1:2] != [m.classes[label]]:
            problems.append(f"{where}: {key} from {path} has label {label} ({m.classes[label]})")
        if decode and (err := _check_image(data["jpg"])):
            problems.append(f"{where}: {key} ({path}) {err}")
        bar.update()
    return problems


def verify_shards(root, *, splits=None, decode: bool = True, progress: bool = True) -> list[str]:
    """Every problem found in the shard folder `root` (empty list: all good)."""
    try:
        m = load_manifest(root, check_files=True)
    except ManifestError as e:
        return [str(e)]
    if m.adopted:  # their members are the maker's, not ours: what can be checked, imt-index-shards checks
        return [f"{m.root}: shards adopted by imt-index-shards; re-run `imt-index-shards "
                f"{m.settings['adopted'].get('source', m.root)}` to check them again"]
    problems = []
    listed = {p.name for s in m.splits.values() for sh in s.shards for p in (sh.tar, sh.index)}
    stray = sorted(p.name for p in m.root.iterdir() if p.suffix in (".tar", ".idx") and p.name not in listed)
    if stray:
        problems.append(f"{m.root}: files not in the manifest: {', '.join(stray)}")
    layouts = m.settings.get("source", {}).get("layout", {})
    for name in splits or m.splits:
        try:
            split = m.split(name)
        except ManifestError as e:
            problems.append(str(e))
            continue
        first = 0
        with tqdm(total=split.num_samples, desc=f"verify {name}", unit="img", disable=not progress) as bar:
            for shard in split.shards:
                if not re.fullmatch(rf"{shard_stem_pattern(name)}\.tar", shard.tar.name):
                    problems.append(f"{shard.tar.name}: unexpected shard name in split {name}")
                problems += _check_shard(m, name, shard, first, layouts.get(name, ""), decode, bar)
                first += shard.num_samples
    return problems


@click.command(context_settings=CONTEXT)
@click.argument("root", type=click.Path(exists=True, file_okay=False))
@click.option("--split", "splits", multiple=True, help="Split to check (repeatable); default: all.")
@click.option("--decode/--no-decode", default=True, show_default=True, help="Decode every image.")
@click.option("--progress/--no-progress", default=True)
def main(root, splits, decode, progress):
    """Check the shards in ROOT against its manifest.json; exit status 1 on any problem."""
    problems = verify_shards(root, splits=splits or None, decode=decode, progress=progress)
    for p in problems:
        click.echo(p, err=True)
    if problems:
        click.echo(f"{len(problems)} problem(s) in {root}; remake with "
                   f"`python -m imt.tools.make_shards --src <data> --out {root} --overwrite`", err=True)
        sys.exit(1)
    click.echo(f"{root}: all shards match the manifest")


if __name__ == "__main__":
    from imt.tools.verify_shards import main as _main

    _main()
