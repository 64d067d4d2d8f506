"""tools/make_synthetic.py: a pure function of (seed, counts), in ImageNet's layout and sizes."""
from __future__ import annotations

from pathlib import Path

from PIL import Image

from imt.tools.make_synthetic import CLASSES, make_synthetic


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    counts = make_synthetic(tmp_path / "a", train_per_class=2, val_per_class=1, num_classes=3, seed=5)
    make_synthetic(tmp_path / "b", train_per_class=2, val_per_class=1, num_classes=3, seed=5)
    make_synthetic(tmp_path / "c", train_per_class=2, val_per_class=1, num_classes=3, seed=6)
    a, b, c = (_files(tmp_path / x) for x in "abc")
    assert counts == {"train": 6, "val": 3} and len(a) == 9
    assert a == b
    assert a.keys() == c.keys() and all(a[k] != c[k] for k in a)


def test_layout_sizes_and_labels_follow_imagenet(synthetic_root):
    train = sorted(p.name for p in (synthetic_root / "train").iterdir())
    assert train == sorted(train) == list(CLASSES)  # folder order = label order, as ImageFolder sorts
    sizes = [Image.open(p).size for p in (synthetic_root / "train").rglob("*.JPEG")]
    assert len(sizes) == 96 and all(300 <= min(s) and max(s) <= 640 for s in sizes)
    assert sum(s in ((500, 375), (375, 500)) for s in sizes) >= len(sizes) // 2
    assert all(Image.open(p).mode == "RGB" for p in (synthetic_root / "val").rglob("*.JPEG"))


def test_counts_extend_without_rewriting(tmp_path):
    make_synthetic(tmp_path, train_per_class=1, val_per_class=0, num_classes=2, seed=0)
    first = _files(tmp_path)
    make_synthetic(tmp_path, train_per_class=2, val_per_class=0, num_classes=2, seed=0)
    after = _files(tmp_path)
    assert len(after) == 4 and all(after[k] == v for k, v in first.items())
