"""tools/make_synthetic.py: a pure function of (seed, counts), in ImageNet's layout and sizes."""
from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imt.tools.make_synthetic import CLASSES, _mask, make_synthetic


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*.JPEG")) if p.is_file()}


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


def _dominant_frequency(mask: np.ndarray) -> tuple[float, float]:
    """(period in pixels, angle of the frequency vector from the vertical axis in degrees, 0-90) of the
    strongest non-constant component of a pattern mask."""
    h, w = mask.shape
    power = np.abs(np.fft.rfft2(mask - mask.mean())) ** 2
    power[0, 0] = 0
    fy, fx = np.unravel_index(np.argmax(power), power.shape)
    fy = fy if fy <= h // 2 else fy - h  # rfft2: rows hold positive then negative frequencies
    cy, cx = fy / h, fx / w  # cycles per pixel
    return 1 / math.hypot(cx, cy), math.degrees(math.atan2(abs(cx), abs(cy)))


@pytest.mark.parametrize("name", CLASSES)
def test_each_class_is_a_texture_the_demo_can_see(name):
    """The demo crops 40-100% of a picture to 64 px: a 500x375 picture shrinks by 64 / 433 or more, and the
    pattern's period must stay >= 3 px there. Training flips horizontally, so no class may be the mirror
    image of another: stripes are horizontal, vertical (each within 10 degrees) or diagonal (either way,
    30-60 degrees), which a flip maps onto themselves. (FFT bins of a 500x375 picture are ~5 degrees wide.)"""
    w, h = 500, 375
    for i in range(6):
        mask = _mask(name, random.Random(f"test/{name}/{i}"), w, h)
        assert 0.08 < mask.mean() < 0.75, "pattern and background both show"
        period, angle = _dominant_frequency(mask.astype(np.float64))
        assert period * 64 / math.sqrt(w * h) >= 3.0, (name, i, period)
        if name.endswith("hstripes"):
            assert angle <= 15, (i, angle)
        elif name.endswith("vstripes"):
            assert angle >= 75, (i, angle)
        elif name.endswith("diagonals"):
            assert 25 <= angle <= 65, (i, angle)


def test_a_folder_drawn_otherwise_is_refused_not_mixed(tmp_path):
    """Existing images are kept, so a folder from the old shape drawing or another seed would mix with this
    one: refused with what to do."""
    import click
    from imt.tools.make_synthetic import make_synthetic

    old = tmp_path / "old"
    (old / "train" / "c0_circles").mkdir(parents=True)  # the shape classes before 2026-12-02
    with pytest.raises(click.ClickException, match="c0_circles.*delete it"):
        make_synthetic(old, 1, 0, num_classes=1)
    make_synthetic(tmp_path / "new", 1, 0, num_classes=1, seed=0)
    make_synthetic(tmp_path / "new", 1, 0, num_classes=1, seed=0)  # the same drawing again: fine
    with pytest.raises(click.ClickException, match="seed"):
        make_synthetic(tmp_path / "new", 1, 0, num_classes=1, seed=1)
