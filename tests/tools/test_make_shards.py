"""tools/make_shards.py on the embedded dataset, real ImageNet files, odd files and ILSVRC layouts."""
from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import imt.pipeline.manifest as pm
from imt.tools import make_shards as ms
from imt.tools.make_shards import ShardError, SimulatedInterrupt, make_shards

from .._procs import HAS_PROC, children as _children, running as _running
from ._shards import dali_read, files_of, link_tree, manifest, odd_files, read_tar, write_tree

REPO = Path(__file__).resolve().parents[2]


def _all_samples(out: Path, split: str) -> list[dict]:
    m = pm.load_manifest(out)
    return [s for sh in m.split(split).shards for s in read_tar(sh.tar)]


# ---------------------------------------------------------------- the embedded dataset

def test_synthetic_counts_keys_labels(synthetic_shards, synthetic_root):
    m = pm.load_manifest(synthetic_shards)
    d = manifest(synthetic_shards)
    assert m.classes == tuple(sorted(p.name for p in (synthetic_root / "train").iterdir()))
    assert [s.num_samples for s in m.split("train").shards] == [40, 40, 16]
    assert m.split("val").num_samples == 32
    for name, split in d["splits"].items():
        assert split["inputs"] == split["num_samples"] + len(split["skipped"])  # inputs = written + skipped
        samples = _all_samples(synthetic_shards, name)
        assert [s["key"] for s in samples] == [f"{name}_{i:08d}" for i in range(split["num_samples"])]
        sources = sorted(s["path"].decode() for s in samples)
        assert sources == sorted(p.relative_to(synthetic_root).as_posix()
                                 for p in (synthetic_root / name).rglob("*.JPEG"))
        for s in samples:
            label = int(s["cls"])
            assert "." not in s["key"]
            assert np.frombuffer(s["lbl"], "<i8").tolist() == [label]
            assert s["path"].decode().split("/")[1] == m.classes[label]
            assert s["jpg"] == (synthetic_root / s["path"].decode()).read_bytes()  # good JPEGs copied as is


def test_classes_mixed_within_each_shard(synthetic_shards):
    m = pm.load_manifest(synthetic_shards)
    for shard in m.split("train").shards:
        labels = Counter(int(s["cls"]) for s in read_tar(shard.tar))
        # 40 samples from 8 classes of 12: an ordered (unshuffled) write would give 3-4 classes
        assert len(labels) >= 5 and max(labels.values()) <= 12, labels


def test_index_written_with_tar_matches_dali_wds2idx(synthetic_shards, tmp_path):
    """Our single-pass index equals the one DALI's own wds2idx computes from the finished tar."""
    wds2idx = pytest.importorskip("wds2idx")
    shard = pm.load_manifest(synthetic_shards).split("train").shards[0]
    with wds2idx.IndexCreator(str(shard.tar), str(tmp_path / "ref.idx"), verbose=False) as ic:
        ic.create_index()
    assert shard.index.read_text() == (tmp_path / "ref.idx").read_text()


def test_reads_back_through_webdataset(synthetic_shards):
    wds = pytest.importorskip("webdataset")
    m = pm.load_manifest(synthetic_shards)
    for name in m.splits:
        ds = wds.WebDataset(m.split(name).tars, shardshuffle=False).decode("pil").to_tuple("jpg", "cls", "path")
        got = [(img.size, label, path) for img, label, path in ds]
        assert len(got) == m.split(name).num_samples
        # webdataset decodes .cls to int; .path is not a known extension, so it stays bytes
        assert all(m.classes[label] == path.decode().split("/")[1] for _, label, path in got)


def test_reads_back_through_dali(synthetic_shards):
    pytest.importorskip("nvidia.dali")
    m = pm.load_manifest(synthetic_shards)
    split = m.split("train")
    labels, shapes = dali_read(split.tars, split.indexes, split.num_samples)
    assert labels == [int(s["cls"]) for s in _all_samples(synthetic_shards, "train")]
    assert all(len(s) == 3 and s[2] == 3 and min(s[:2]) >= 300 for s in shapes)


def test_workers_do_not_change_the_bytes(synthetic_shards, synthetic_root, tmp_path):
    make_shards(synthetic_root, tmp_path, shard_samples=40, workers=2, seed=0, progress=False)
    assert files_of(tmp_path) == files_of(synthetic_shards)


def test_seed_and_shard_size_change_the_layout(synthetic_root, tmp_path):
    a = make_shards(synthetic_root, tmp_path / "a", splits=["val"], shard_samples=10, progress=False)
    b = make_shards(synthetic_root, tmp_path / "b", splits=["val"], shard_samples=10, seed=1, progress=False)
    assert [s["num_samples"] for s in a["splits"]["val"]["shards"]] == [10, 10, 10, 2]
    paths = lambda out: [s["path"] for s in _all_samples(out, "val")]  # noqa: E731
    assert paths(tmp_path / "a") != paths(tmp_path / "b")
    assert sorted(paths(tmp_path / "a")) == sorted(paths(tmp_path / "b"))
    assert a["classes"] == b["classes"]


# ---------------------------------------------------------------- resume, refusal, overwrite

def test_interrupted_run_resumes_to_identical_output(synthetic_root, tmp_path, monkeypatch):
    ref, out = tmp_path / "ref", tmp_path / "out"
    make_shards(synthetic_root, ref, shard_samples=20, progress=False)
    monkeypatch.setenv(ms.FAIL_AFTER_ENV, "2")
    with pytest.raises(SimulatedInterrupt):
        make_shards(synthetic_root, out, shard_samples=20, progress=False)
    assert not (out / "manifest.json").exists() and (out / ms.PROGRESS_NAME).exists()
    assert sorted(p.name for p in out.glob("*.tar")) == ["train-000000.tar", "train-000001.tar"]
    with pytest.raises(pm.ManifestError, match="interrupted"):
        pm.load_manifest(out)
    # Damage the state further, as a hard kill could: a half-written temp shard, and a finished
    # shard whose tar got cut short.
    (out / "train-000002.tar.tmp").write_bytes(b"half a shard")
    with open(out / "train-000001.tar", "r+b") as f:
        f.truncate(1000)
    monkeypatch.delenv(ms.FAIL_AFTER_ENV)
    make_shards(synthetic_root, out, shard_samples=20, progress=False)
    assert files_of(out) == files_of(ref)  # shards, indexes and manifest; no progress/cache left


def test_killed_subprocess_resumes_to_identical_output(synthetic_root, tmp_path):
    """A real interruption: the CLI process dies after its first shard (exit 1), then re-runs."""
    ref, out = tmp_path / "ref", tmp_path / "out"
    make_shards(synthetic_root, ref, splits=["val"], shard_samples=8, workers=2, progress=False)
    cmd = [sys.executable, str(REPO / "tools" / "make_shards.py"), "--src", str(synthetic_root), "--out",
           str(out), "--split", "val", "--shard-samples", "8", "--workers", "2", "--no-progress"]
    r = subprocess.run(cmd, env={**os.environ, ms.FAIL_AFTER_ENV: "1"}, capture_output=True, text=True)
    assert r.returncode != 0 and "SimulatedInterrupt" in r.stderr
    assert not (out / "manifest.json").exists()
    r = subprocess.run(cmd, capture_output=True, text=True, check=True)
    assert "val: 32 inputs = 32 written + 0 skipped" in r.stdout
    assert files_of(out) == files_of(ref)


def test_other_settings_are_refused_unless_overwrite(synthetic_root, tmp_path):
    out = tmp_path / "out"
    first = make_shards(synthetic_root, out, splits=["val"], shard_samples=10, progress=False)
    before = files_of(out)
    assert make_shards(synthetic_root, out, splits=["val"], shard_samples=10, progress=False) == first
    assert files_of(out) == before  # same command again: nothing rewritten
    with pytest.raises(ShardError, match=r"seed: 0 -> 1.*--overwrite"):
        make_shards(synthetic_root, out, splits=["val"], shard_samples=10, seed=1, progress=False)
    with pytest.raises(ShardError, match="shard_samples: 10 -> 16"):
        make_shards(synthetic_root, out, splits=["val"], shard_samples=16, progress=False)
    assert files_of(out) == before
    m = make_shards(synthetic_root, out, splits=["val"], shard_samples=16, overwrite=True, progress=False)
    assert [s["num_samples"] for s in m["splits"]["val"]["shards"]] == [16, 16]
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "val-000000.idx", "val-000000.tar",
                                                    "val-000001.idx", "val-000001.tar"]


def test_changed_source_files_are_refused_unless_overwrite(synthetic_root, tmp_path, monkeypatch):
    """Files added or modified since a run (finished or interrupted) must not be mixed into its shards:
    shards whose sample counts still fit would otherwise be kept, holding the old files."""
    src = tmp_path / "src"
    shutil.copytree(synthetic_root, src)
    out = tmp_path / "out"
    make_shards(src, out, splits=["val"], shard_samples=10, progress=False)
    before = files_of(out)
    extra = src / "val" / sorted(p.name for p in (src / "val").iterdir())[0] / "added.jpg"
    shutil.copyfile(next((src / "train").rglob("*.JPEG")), extra)
    with pytest.raises(ShardError, match=r"files under --src/val were added, removed or modified.*--overwrite"):
        make_shards(src, out, splits=["val"], shard_samples=10, progress=False)
    assert files_of(out) == before

    extra.unlink()  # back to the files the shards hold: accepted again, nothing rewritten
    assert make_shards(src, out, splits=["val"], shard_samples=10, progress=False)["splits"]["val"]
    assert files_of(out) == before

    interrupted = tmp_path / "interrupted"
    monkeypatch.setenv(ms.FAIL_AFTER_ENV, "1")
    with pytest.raises(SimulatedInterrupt):
        make_shards(src, interrupted, splits=["val"], shard_samples=10, progress=False)
    monkeypatch.delenv(ms.FAIL_AFTER_ENV)
    victim = next((src / "val").rglob("*.JPEG"))
    os.utime(victim, ns=(victim.stat().st_atime_ns, victim.stat().st_mtime_ns + 10**9))  # re-saved in place
    with pytest.raises(ShardError, match="an unfinished run of other files"):
        make_shards(src, interrupted, splits=["val"], shard_samples=10, progress=False)
    m = make_shards(src, interrupted, splits=["val"], shard_samples=10, overwrite=True, progress=False)
    assert m["splits"]["val"]["num_samples"] == 32


def test_overwrite_deletes_only_what_make_shards_wrote(synthetic_root, tmp_path, monkeypatch):
    out = tmp_path / "out"
    make_shards(synthetic_root, out, splits=["val"], shard_samples=10, progress=False)
    foreign = {"important-backup.tar": b"tar", "photos.idx": b"idx", "results.tmp": b"tmp",
               "val-backup.tar": b"v", "train-000000.tar": b"a shard of a split this run did not make"}
    write_tree(out, foreign)
    before = files_of(out)
    with pytest.raises(ShardError, match=r"did not write: important-backup.tar, photos.idx, results.tmp, "
                                         r"train-000000.tar, val-backup.tar\. .*nothing was deleted"):
        make_shards(synthetic_root, out, splits=["val"], shard_samples=16, overwrite=True, progress=False)
    assert files_of(out) == before
    for name in foreign:
        (out / name).unlink()
    m = make_shards(synthetic_root, out, splits=["val"], shard_samples=16, overwrite=True, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json"] + [
        f"val-00000{i}.{x}" for i in range(len(m["splits"]["val"]["shards"])) for x in ("idx", "tar")]

    # Resuming an interrupted run removes its own half-written files only.
    monkeypatch.setenv(ms.FAIL_AFTER_ENV, "1")
    with pytest.raises(SimulatedInterrupt):
        make_shards(synthetic_root, tmp_path / "cut", splits=["val"], shard_samples=10, progress=False)
    monkeypatch.delenv(ms.FAIL_AFTER_ENV)
    write_tree(tmp_path / "cut", {"results.tmp": b"keep me", "val-000003.tar.tmp": b"half a shard"})
    make_shards(synthetic_root, tmp_path / "cut", splits=["val"], shard_samples=10, progress=False)
    assert (tmp_path / "cut" / "results.tmp").read_bytes() == b"keep me"
    assert not (tmp_path / "cut" / "val-000003.tar.tmp").exists()

    # A manifest.json that make_shards did not write is never read as ours, nor deleted.
    other = tmp_path / "other"
    write_tree(other, {"manifest.json": b'{"album": "holidays"}', "a.tar": b"x"})
    for overwrite in (False, True):
        with pytest.raises(ShardError, match=r"manifest.json was not written by make_shards"):
            make_shards(synthetic_root, other, splits=["val"], overwrite=overwrite, progress=False)
    assert sorted(p.name for p in other.iterdir()) == ["a.tar", "manifest.json"]


def test_foreign_output_folder_is_refused(synthetic_root, tmp_path):
    (tmp_path / "thesis.pdf").write_bytes(b"%PDF")
    with pytest.raises(ShardError, match="not empty"):
        make_shards(synthetic_root, tmp_path, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["thesis.pdf"]


# ---------------------------------------------------------------- odd inputs

@pytest.fixture(scope="module")
def odd_shards(tmp_path_factory, imagenet_sample):
    real = sorted(imagenet_sample.glob("*.JPEG"))[0].read_bytes()
    expected = odd_files(real)
    src = tmp_path_factory.mktemp("odd_src")
    files = {}
    for i, (name, (data, _)) in enumerate(expected.items()):
        files[f"train/{'ab'[i % 2]}_class/{name}"] = data  # two classes
    files["train/readme.txt"] = b"loose file beside the class folders\n"
    files["train/.ipynb_checkpoints/x.JPEG"] = expected["good_synthetic.JPEG"][0]  # not a class
    write_tree(src, files)
    out = tmp_path_factory.mktemp("odd_out")
    m = make_shards(src, out, shard_samples=5, progress=False)
    return src, out, m, expected


def test_odd_inputs_are_converted_skipped_or_ignored(odd_shards):
    src, out, m, expected = odd_shards
    split = m["splits"]["train"]
    want = Counter(v for _, v in expected.values())
    assert split["inputs"] == want["keep"] + want["convert"] + want["skip"]
    assert split["inputs"] == split["num_samples"] + len(split["skipped"])
    assert split["num_samples"] == want["keep"] + want["convert"]
    assert split["converted"] == want["convert"]
    assert split["ignored"] == want["ignore"] + 2  # + the loose readme.txt and the hidden folder's file
    assert m["classes"] == ["a_class", "b_class"]
    reasons = {Path(s["path"]).name: s["reason"] for s in split["skipped"]}
    assert reasons.keys() == {n for n, (_, v) in expected.items() if v == "skip"}
    assert reasons["empty.JPEG"] == "empty file"
    assert reasons["truncated.JPEG"].startswith("truncated")
    assert reasons["garbage.JPEG"] == "not a recognised image format"
    assert all(s["path"].startswith("train/") for s in split["skipped"])


def test_converted_inputs_are_baseline_rgb_jpegs(odd_shards):
    src, out, m, expected = odd_shards
    samples = {Path(s["path"].decode()).name: s for s in _all_samples(out, "train")}
    for name, s in samples.items():
        data = s["jpg"]
        im = Image.open(io.BytesIO(data))
        im.load()
        assert (im.format, im.mode, ms._jpeg_sof(data)) == ("JPEG", "RGB", 0xC0), name
        keep = expected[name][1] == "keep"
        assert (data == (src / s["path"].decode()).read_bytes()) == keep, name
    white = np.asarray(Image.open(io.BytesIO(samples["transparent.png"]["jpg"])))
    assert white.min() >= 250  # transparent pixels composited on white, not black
    grey16 = np.asarray(Image.open(io.BytesIO(samples["sixteen_bit.png"]["jpg"])).convert("L"), np.int32)
    assert abs(grey16[-1, -1] - (119 * 160 + 159) * 3 // 256) <= 3  # high byte kept, not clipped at 255
    assert 40 < grey16.mean() < 200


def test_converted_inputs_decode_in_dali(odd_shards):
    pytest.importorskip("nvidia.dali")
    _, out, m, _ = odd_shards
    split = pm.load_manifest(out).split("train")
    labels, shapes = dali_read(split.tars, split.indexes, split.num_samples, batch_size=4)
    assert labels == [int(s["cls"]) for s in _all_samples(out, "train")]
    assert all(s[2] == 3 for s in shapes)


def test_max_side_and_quality_reencode_everything(synthetic_root, tmp_path):
    m = make_shards(synthetic_root, tmp_path, splits=["val"], max_side=128, quality=80, progress=False)
    assert m["splits"]["val"]["converted"] == m["splits"]["val"]["num_samples"] == 32
    for s in _all_samples(tmp_path, "val"):
        im = Image.open(io.BytesIO(s["jpg"]))
        assert max(im.size) == 128 and ms._jpeg_sof(s["jpg"]) == 0xC0


# ---------------------------------------------------------------- symlinks, FIFOs, odd names, permissions

def _jpegs(synthetic_root: Path, n: int) -> list[bytes]:
    return [f.read_bytes() for f in sorted((synthetic_root / "train").rglob("*.JPEG"))[:n]]


def _labels_match_folders(out: Path) -> None:
    from imt.tools.verify_shards import verify_shards

    m = pm.load_manifest(out)
    for name in m.splits:
        for s in _all_samples(out, name):
            assert m.classes[int(s["cls"])] == s["path"].decode().split("/")[1], s["path"]
    assert verify_shards(out, progress=False) == []


def test_directory_symlink_loops_are_not_followed(synthetic_root, tmp_path):
    """`train/c0/uplink -> ..` once turned 6 images into 246 samples, 120 of them with another class's label."""
    src, elsewhere = tmp_path / "src", tmp_path / "elsewhere"
    imgs = _jpegs(synthetic_root, 8)
    write_tree(src, {f"train/c{i % 2}/{i}.JPEG": d for i, d in enumerate(imgs[:6])})
    write_tree(elsewhere, {"x/6.JPEG": imgs[6], "x/7.JPEG": imgs[7]})
    (src / "train" / "c0" / "uplink").symlink_to("..")             # below a class: never followed
    (src / "train" / "c1" / "sub").mkdir()
    (src / "train" / "c1" / "sub" / "self").symlink_to(".")
    (src / "train" / "loop").symlink_to(".")                       # a "class" holding the split
    (src / "train" / "c2").symlink_to(src / "train" / "c1")        # a second name for c1
    (src / "train" / "c3").symlink_to(elsewhere / "x")             # a linked class folder: followed
    (src / "again").symlink_to(".")                                # a "split" holding --src
    m = make_shards(src, tmp_path / "out", progress=False)
    assert list(m["splits"]) == ["train"] and m["classes"] == ["c0", "c1", "c3"]
    train = m["splits"]["train"]
    assert (train["inputs"], train["num_samples"]) == (8, 8)
    reasons = {lo["path"]: lo["reason"] for lo in train["left_out"]}
    assert reasons.keys() == {"train/c0/uplink", "train/c1/sub/self", "train/loop", "train/c2"}
    assert "not followed" in reasons["train/c0/uplink"] and "loop" in reasons["train/loop"]
    assert reasons["train/c2"].startswith("the same folder as c1/")
    _labels_match_folders(tmp_path / "out")
    assert "left out train/c0/uplink: directory symlink" in ms.summary(m)
    with pytest.raises(ShardError, match=r"again points at .*, which holds --src \(a directory symlink loop\)"):
        make_shards(src, tmp_path / "out2", splits=["again"], progress=False)


def test_fifos_broken_symlinks_and_odd_names_do_not_stop_the_run(synthetic_root, tmp_path):
    """A FIFO named pipe.jpg hung the run for ever; a file symlink loop, a dangling symlink and a non-UTF-8
    name each ended it with a traceback. Run as a subprocess so that a hang fails instead of blocking."""
    src = tmp_path / "src"
    a, b, c = _jpegs(synthetic_root, 3)
    write_tree(src, {"train/c0/a.JPEG": a, "train/c1/b.JPEG": b, "train/c1/café and space.JPEG": c})
    c0 = src / "train" / "c0"
    os.mkfifo(c0 / "pipe.jpg")
    (c0 / "dangling.jpg").symlink_to(c0 / "gone.jpg")
    (c0 / "loop.jpg").symlink_to("loop.jpg")
    (c0 / "b.JPEG").symlink_to(src / "train" / "c1" / "b.JPEG")  # a file symlink: followed
    for folder in (os.fsencode(src / "train") + b"/n\xe9", os.fsencode(c0) + b"/sub\xe9"):  # a class, a subfolder
        os.mkdir(folder)
        with open(folder + b"/x.jpg", "wb") as f:
            f.write(a)
    with open(os.fsencode(c0) + b"/caf\xe9.jpg", "wb") as f:  # Latin-1 name, not UTF-8
        f.write(a)
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "imt.tools.make_shards", "--src", str(src), "--out", str(out),
                        "--workers", "2", "--no-progress"], cwd=REPO, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr
    train = manifest(out)["splits"]["train"]
    assert (train["inputs"], train["num_samples"], train["skipped"], train["ignored"]) == (4, 4, [], 1)  # the FIFO
    assert {lo["path"]: lo["reason"] for lo in train["left_out"]} == {
        "train/c0/dangling.jpg": "dangling symlink (its target does not exist)",
        "train/c0/loop.jpg": "symlink loop",
        "train/c0/caf\\xe9.jpg": ms._NOT_UTF8, "train/c0/sub\\xe9": ms._NOT_UTF8,
        "train/n\\xe9": f"folder {ms._NOT_UTF8}"}
    assert manifest(out)["classes"] == ["c0", "c1"]
    assert "left out train/c0/caf\\xe9.jpg: name is not valid UTF-8" in r.stdout
    _labels_match_folders(out)
    # A FIFO put where a listed file was is refused when read, not waited on.
    assert ms._check_task((0, str(c0 / "pipe.jpg"), str(tmp_path / "c.jpg"), ms.Convert()))[1].skipped == \
        "not a regular file"


def _class_tree(src: Path, synthetic_root: Path) -> None:
    a, b, c = _jpegs(synthetic_root, 3)
    write_tree(src, {"train/c0/a.JPEG": a, "train/c1/b.JPEG": b, "train/c1/c.JPEG": c, "train/c2/x.JPEG": a,
                     "train/empty/notes.txt": b"no images here", "train/broken/bad.JPEG": b"not a jpeg"})


def _deny(monkeypatch, *paths: Path) -> None:
    """Reads of `paths` fail with EACCES, as under mode 000 without root's override (these tests run as root
    too, where chmod would not stop a read)."""
    denied = {str(p) for p in paths}
    scandir, listdir, open_ = os.scandir, os.listdir, os.open

    def deny(path):
        if isinstance(path, (str, os.PathLike)) and os.fspath(path) in denied:
            raise PermissionError(13, "Permission denied", os.fspath(path))

    monkeypatch.setattr(os, "scandir", lambda path=".": deny(path) or scandir(path))
    monkeypatch.setattr(os, "listdir", lambda path=".": deny(path) or listdir(path))
    monkeypatch.setattr(os, "open", lambda path, *a, **k: deny(path) or open_(path, *a, **k))


def test_unreadable_or_empty_class_folders_are_refused_or_listed(synthetic_root, tmp_path, monkeypatch, capsys):
    """An unreadable class folder was dropped silently (exit 0, a class with 0 samples)."""
    src = tmp_path / "src"
    _class_tree(src, synthetic_root)
    _deny(monkeypatch, src / "train" / "c0", src / "train" / "c1" / "c.JPEG")
    with pytest.raises(ShardError, match=r"2 class folder\(s\) hold no image files: train/c0/ \(unreadable folder: "
                                         r"Permission denied\), train/empty/\. .*--allow-empty-classes"):
        make_shards(src, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()  # refused before any output
    (src / "train" / "empty").rename(src / ".empty")  # hidden: not a class
    with pytest.raises(ShardError, match=r"1 class folder\(s\) hold no image files: train/c0/ \(unreadable"):
        make_shards(src, tmp_path / "out", progress=False)
    m = make_shards(src, tmp_path / "out", allow_empty_classes=True, progress=False)
    assert "warning: 1 class folder(s) hold no image files: train/c0/" in capsys.readouterr().err
    train = m["splits"]["train"]
    assert m["classes"] == ["broken", "c0", "c1", "c2"]
    assert train["left_out"] == [{"path": "train/c0", "reason": "unreadable folder: Permission denied"}]
    assert {sk["path"]: sk["reason"] for sk in train["skipped"]} == {
        "train/c1/c.JPEG": "unreadable: Permission denied", "train/broken/bad.JPEG": "not a recognised image format"}
    # A class folder whose every file is skipped is refused after the check; allowed, the run resumes.
    monkeypatch.undo()
    _deny(monkeypatch, src / "train")
    with pytest.raises(ShardError, match=r"train: cannot list the split folder \(Permission denied\); make it "):
        make_shards(src, tmp_path / "out2", progress=False)
    monkeypatch.undo()
    with pytest.raises(ShardError, match=r"1 class folder\(s\) have no usable image \(every file was skipped\): "
                                         r"train/broken/ \(not a recognised image format\)"):
        make_shards(src, tmp_path / "out2", progress=False)
    m = make_shards(src, tmp_path / "out2", allow_empty_classes=True, progress=False)
    assert m["splits"]["train"]["num_samples"] == 4 and m["classes"] == ["broken", "c0", "c1", "c2"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads mode-000 folders; the test above simulates EACCES")
def test_mode_000_class_folder_is_refused(synthetic_root, tmp_path):
    src = tmp_path / "src"
    _class_tree(src, synthetic_root)
    shutil.rmtree(src / "train" / "empty")
    (src / "train" / "c0").chmod(0)
    try:
        with pytest.raises(ShardError, match=r"train/c0/ \(unreadable folder: Permission denied\)"):
            make_shards(src, tmp_path / "out", progress=False)
    finally:
        (src / "train" / "c0").chmod(0o755)


def test_empty_splits_and_datasets_of_no_images_are_errors(synthetic_root, tmp_path, capsys):
    """An empty split folder was told it had "the ILSVRC2012 flat val layout"; 0 images exited 0."""
    from click.testing import CliRunner

    src = tmp_path / "src"
    (src / "val").mkdir(parents=True)
    r = CliRunner().invoke(ms.main, ["--src", str(src), "--out", str(tmp_path / "o"), "--no-progress"])
    assert r.exit_code == 1 and "holds no images" in r.output and "ILSVRC2012" not in r.output, r.output
    with pytest.raises(ShardError, match=r"val holds no image files and no class folders: put <class>/<image>"):
        make_shards(src, tmp_path / "o", splits=["val"], progress=False)
    write_tree(src, {"train/c0/a.JPEG": _jpegs(synthetic_root, 1)[0]})
    m = make_shards(src, tmp_path / "o", progress=False)  # the empty split found by default is left out
    assert "leaving out split 'val': " in capsys.readouterr().err
    assert list(m["splits"]) == ["train"] and m["splits"]["train"]["num_samples"] == 1

    write_tree(src, {"test/c0/notes.txt": b"", "bad/c0/bad.JPEG": b"not a jpeg"})
    (src / "dangling" / "c0").mkdir(parents=True)
    (src / "dangling" / "c0" / "x.JPEG").symlink_to(src / "gone.JPEG")
    with pytest.raises(ShardError, match=r"split 'test' has no image file that can be read: fix"):
        make_shards(src, tmp_path / "o2", splits=["test"], allow_empty_classes=True, progress=False)
    with pytest.raises(ShardError, match=r"split 'dangling' has no image file that can be read \(1 paths left out, "
                                         r"e.g. dangling/c0/x.JPEG: dangling symlink"):
        make_shards(src, tmp_path / "o2", splits=["dangling"], progress=False)
    with pytest.raises(ShardError, match=r"every one of the 1 files of split 'bad' was skipped \(e.g. bad/c0/bad.JPEG: "
                                         r"not a recognised image format\)"):
        make_shards(src, tmp_path / "o2", splits=["bad"], allow_empty_classes=True, progress=False)


# ---------------------------------------------------------------- real ImageNet files and layouts

def test_real_imagenet_sample_two_workers(imagenet_sample, tmp_path):
    """All 400 real files, one class folder each: odd-but-valid ones (greyscale) are converted."""
    files = sorted(imagenet_sample.glob("*.JPEG"))
    link_tree(tmp_path / "src", {f"train/{f.name.split('_')[0]}/{f.name}": f for f in files})
    m = make_shards(tmp_path / "src", tmp_path / "out", workers=2, shard_bytes=8_000_000, progress=False)
    split = m["splits"]["train"]
    assert (split["num_samples"], split["skipped"], split["ignored"]) == (400, [], 0)
    assert m["classes"] == sorted(f.name.split("_")[0] for f in files)
    odd = sum(Image.open(f).mode != "RGB" or "progressive" in Image.open(f).info for f in files)
    assert split["converted"] == odd > 0
    assert all(sh["bytes"] <= 8_000_000 for sh in split["shards"]) and len(split["shards"]) >= 5
    for s in _all_samples(tmp_path / "out", "train"):
        assert m["classes"][int(s["cls"])] == s["path"].decode().split("/")[1]


def _ilsvrc_tree(root: Path, imagenet_sample: Path) -> tuple[list[str], dict[str, str]]:
    """train/<wnid>/ for 30 classes and a flat val/ of 12 images (ILSVRC2012_val_%08d.JPEG)."""
    files = sorted(imagenet_sample.glob("*.JPEG"))
    train, val = files[:30], files[:30:3][:10] + files[30:32]
    link_tree(root, {f"train/{f.name.split('_')[0]}/{f.name}": f for f in train})
    truth = {f"ILSVRC2012_val_{i:08d}": f.name.split("_")[0] for i, f in enumerate(val, 1)}
    link_tree(root, {f"val/{k}.JPEG": f for k, f in zip(truth, val)})
    (root / "val" / "ILSVRC2012_val_00000099.JPEG").symlink_to(files[40])  # no label anywhere
    (root / "val" / "readme.txt").write_text("flat val\n")
    return [f.name.split("_")[0] for f in files], truth


def _check_val(m: dict, out: Path, truth: dict[str, str]) -> None:
    assert m["classes"] == sorted(set(m["classes"]))
    val = m["splits"]["val"]
    assert (val["inputs"], val["num_samples"], val["ignored"]) == (13, 12, 1)
    assert val["skipped"] == [{"path": "val/ILSVRC2012_val_00000099.JPEG",
                               "reason": "no label for this file in --val-labels"}]
    for s in _all_samples(out, "val"):
        stem = Path(s["path"].decode()).stem
        assert m["classes"][int(s["cls"])] == truth[stem]


def test_ilsvrc_layout_with_kaggle_csv(imagenet_sample, tmp_path):
    wnids, truth = _ilsvrc_tree(tmp_path / "src", imagenet_sample)
    csv = tmp_path / "LOC_val_solution.csv"
    csv.write_text("ImageId,PredictionString\n" + "".join(
        f"{k},{w} 10 20 110 120 {w} 5 5 50 50 \n" for k, w in reversed(truth.items())))
    m = make_shards(tmp_path / "src", tmp_path / "out", val_labels=csv, progress=False)
    assert m["classes"] == sorted(set(wnids[:32]))  # train folders + wnids named by the csv
    assert m["settings"]["source"]["layout"] == {"train": "class-folders", "val": "flat"}
    _check_val(m, tmp_path / "out", truth)


def test_val_labels_are_found_in_src_when_not_in_cwd(imagenet_sample, tmp_path, monkeypatch):
    """The README's `--val-labels LOC_val_solution.csv` names the file in the data set's folder."""
    wnids, truth = _ilsvrc_tree(tmp_path / "src", imagenet_sample)
    (tmp_path / "src" / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n" + "".join(
        f"{k},{w} 1 2 3 4\n" for k, w in truth.items()))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    m = make_shards(tmp_path / "src", tmp_path / "out", val_labels="LOC_val_solution.csv", progress=False)
    _check_val(m, tmp_path / "out", truth)
    with pytest.raises(ShardError, match="no such file in the current directory .* or in --src"):
        make_shards(tmp_path / "src", tmp_path / "out2", val_labels="nope.csv", progress=False)


def test_ilsvrc_layout_with_devkit_ground_truth(imagenet_sample, tmp_path):
    scipy_io = pytest.importorskip("scipy.io")
    wnids, truth = _ilsvrc_tree(tmp_path / "src", imagenet_sample)
    # meta.mat: ILSVRC2012_IDs deliberately not in wnid order (as in the real devkit), plus a
    # non-leaf synset that must not become a class.
    leaves = sorted(set(wnids[:40]), reverse=True)
    dtype = [("ILSVRC2012_ID", "O"), ("WNID", "O"), ("num_children", "O")]
    synsets = np.array([(i, w, 0) for i, w in enumerate(leaves, 1)] + [(1001, "n00001740", 3)], dtype=dtype)
    scipy_io.savemat(tmp_path / "meta.mat", {"synsets": synsets})
    ids = {w: i for i, w in enumerate(leaves, 1)}
    gt = tmp_path / "ILSVRC2012_validation_ground_truth.txt"
    gt.write_text("".join(f"{ids[w]}\n" for w in truth.values()))
    with pytest.raises(ShardError, match="--meta"):
        make_shards(tmp_path / "src", tmp_path / "out", val_labels=gt, progress=False)
    m = make_shards(tmp_path / "src", tmp_path / "out2", val_labels=gt, meta=tmp_path / "meta.mat",
                    progress=False)
    _check_val(m, tmp_path / "out2", truth)


def test_flat_split_without_labels_is_refused(imagenet_sample, tmp_path):
    _ilsvrc_tree(tmp_path / "src", imagenet_sample)
    with pytest.raises(ShardError, match="--val-labels"):
        make_shards(tmp_path / "src", tmp_path / "out", progress=False)
    m = make_shards(tmp_path / "src", tmp_path / "out", splits=["train"], progress=False)
    assert list(m["splits"]) == ["train"]



def test_kaggle_unlabelled_test_split_is_left_out(imagenet_sample, tmp_path):
    """Kaggle's tree has a flat, unlabelled test/ beside val/: found by default, it is left out with a
    message (not sharded as thousands of skips); named with --split, it is refused."""
    wnids, truth = _ilsvrc_tree(tmp_path / "src", imagenet_sample)
    files = sorted(imagenet_sample.glob("*.JPEG"))
    link_tree(tmp_path / "src", {f"test/ILSVRC2012_test_{i:08d}.JPEG": f for i, f in enumerate(files[:5], 1)})
    csv = tmp_path / "LOC_val_solution.csv"
    csv.write_text("ImageId,PredictionString\n" + "".join(f"{k},{w} 1 2 3 4\n" for k, w in truth.items()))
    m = make_shards(tmp_path / "src", tmp_path / "out", val_labels=csv, progress=False)
    assert list(m["splits"]) == ["train", "val"]
    _check_val(m, tmp_path / "out", truth)
    with pytest.raises(ShardError, match="unlabelled test set"):
        make_shards(tmp_path / "src", tmp_path / "out2", splits=["test", "val"], val_labels=csv, progress=False)


def test_split_order_and_out_inside_src(synthetic_root, tmp_path):
    """The order splits are named in changes nothing (a resume with them swapped is the same run), and an
    --out inside --src is not taken for a split when the command is run again."""
    src = tmp_path / "src"
    shutil.copytree(synthetic_root, src)
    out = src / "shards"
    first = make_shards(src, out, splits=["val", "train"], shard_samples=40, progress=False)
    assert list(first["splits"]) == ["train", "val"]
    assert make_shards(src, out, shard_samples=40, progress=False) == first
    assert make_shards(src, out, splits=["train", "val"], shard_samples=40, progress=False) == first


# ---------------------------------------------------------------- pieces and CLI

def test_assign_shards_by_bytes_and_count():
    assert ms.assign_shards([100] * 10, 10_000, 4) == [range(0, 4), range(4, 8), range(8, 10)]
    # 1024 end-of-archive bytes + 3 samples of 3000 = 10024 > 10000: shards of two
    assert ms.assign_shards([3000] * 5, 10_000, 100) == [range(0, 2), range(2, 4), range(4, 5)]
    assert ms.assign_shards([3000] * 5, 10_024, 100) == [range(0, 3), range(3, 5)]  # exactly full
    assert ms.assign_shards([50_000, 10], 1_000, 100) == [range(0, 1), range(1, 2)]  # never empty
    assert ms.assign_shards([], 1_000, 10) == []
    assert ms.default_shard_samples(96) == 256 and ms.default_shard_samples(4000) == 500
    assert ms.default_shard_samples(1_281_167) == 160_146  # ImageNet: the 1 GB cap decides


@pytest.mark.parametrize("name,size", [("train_00000000.jpg", 7020), ("val_00000001.cls", 0), ("a" * 100, 8**11 - 1)])
def test_tar_header_equals_tarfiles(name, size):
    import tarfile

    ti = tarfile.TarInfo(name)
    ti.size, ti.mode, ti.mtime, ti.uid, ti.gid, ti.uname, ti.gname = size, 0o644, 0, 0, 0, "", ""
    assert ms._tar_header(name, size) == ti.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict")


def test_format_names_come_from_pipeline_manifest_without_torch():
    """One definition of the format's names; importing it must not load torch (2.3 s in every worker)."""
    assert (ms.FORMAT, ms.VERSION, ms.MANIFEST_NAME, ms.INDEX_VERSION, ms.PROGRESS_NAME, ms.shard_stem) == (
        pm.FORMAT, pm.VERSION, pm.MANIFEST_NAME, pm.INDEX_VERSION, pm.PROGRESS_NAME, pm.shard_stem)
    code = "import sys, tools.make_shards, pipeline.orphans; assert 'torch' not in sys.modules, 'torch loaded'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})


def test_bad_arguments_say_what_to_do(synthetic_root, tmp_path):
    with pytest.raises(ShardError, match="split 'test' not found"):
        make_shards(synthetic_root, tmp_path, splits=["test"], progress=False)
    with pytest.raises(ShardError, match="quality"):
        make_shards(synthetic_root, tmp_path, quality=0, progress=False)


@pytest.mark.skipif(not HAS_PROC, reason="reads processes from /proc (Linux)")
def test_workers_and_resource_tracker_end_when_the_main_process_is_killed(tmp_path):
    """kill -9 of make_shards left its workers and the resource tracker running (9 of 9 trials)."""
    code = ("import os, sys, time\nfrom tools import make_shards as ms\npool = ms._pool(2)\n"
            "busy = [pool.submit(time.sleep, 300) for _ in range(2)]\n"
            "while len(pool._processes) < 2: time.sleep(0.05)\nprint('ready', flush=True)\ntime.sleep(300)\n")
    main = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    kids: set[int] = set()
    try:
        assert main.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 30
        while len(kids := _children(main.pid)) < 3 and time.monotonic() < deadline:  # 2 workers + the tracker
            time.sleep(0.1)
        assert len(kids) == 3, kids
        time.sleep(1.0)  # let the workers reach their task
        main.kill()
        main.wait()
        deadline = time.monotonic() + 10
        while any(map(_running, kids)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [k for k in kids if _running(k)], "processes outlived the killed main process"
    finally:
        main.kill()
        for k in kids:
            if _running(k):
                os.kill(k, signal.SIGKILL)


def test_cli_module_and_entry_point(synthetic_root, tmp_path):
    from click.testing import CliRunner

    r = CliRunner().invoke(ms.main, ["--src", str(synthetic_root), "--out", str(tmp_path / "o"),
                                     "--split", "val", "--workers", "1", "--shard-samples", "10",
                                     "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "val: 32 inputs = 32 written + 0 skipped (0 non-image files ignored); 0 converted; 4 shards" \
        in r.output
    r = CliRunner().invoke(ms.main, ["--src", str(synthetic_root), "--out", str(tmp_path / "o"),
                                     "--split", "val", "--seed", "3", "--no-progress"])
    assert r.exit_code == 1 and "--overwrite" in r.output
    exe = Path(sys.executable).parent / "imt-make-shards"
    if not exe.exists():
        pytest.skip("imt-make-shards not installed (pip install -e .)")
    assert "--shard-bytes" in subprocess.run([str(exe), "--help"], capture_output=True, text=True).stdout
