"""The synthetic loader and build_loader's dispatch (no DALI, no shards needed)."""
from __future__ import annotations

import pytest
import torch

from imt.pipeline import build_loader
from imt.pipeline.config import DataConfig
from imt.train.dist import DistInfo


def test_synthetic_contract():
    cfg = DataConfig(loader="synthetic", batch_size=8, resolution=32, synthetic_samples=20,
                     synthetic_classes=10, dtype="float16")
    loader = build_loader(cfg, "train", DistInfo(), train=True)
    batches = list(loader)
    assert len(loader) == len(batches) == 3 and loader.num_samples == 20
    assert [b[0].shape[0] for b in batches] == [8, 8, 4]
    images, labels = batches[0]
    assert images.shape == (8, 3, 32, 32) and images.dtype == torch.float16
    assert images.is_contiguous(memory_format=torch.channels_last)
    assert labels.dtype == torch.int64 and 0 <= labels.min() and labels.max() < 10
    assert len(loader.classes) == 10 and loader.classes[0] == "class_0000"
    loader.set_epoch(1)
    loader.set_resolution(48)
    assert next(iter(loader))[0].shape == (8, 3, 48, 48)


def test_synthetic_default_length_and_val_resolution():
    cfg = DataConfig(loader="synthetic", batch_size=4, resolution=32, val_resolution=40)
    assert len(build_loader(cfg, "train", DistInfo(), train=True)) == 50
    assert next(iter(build_loader(cfg, "val", DistInfo(), train=False)))[0].shape[-1] == 40


def test_unknown_loader_and_dtype():
    with pytest.raises(ValueError, match="loader='nope'"):
        build_loader(DataConfig(loader="nope"), "train", DistInfo(), train=True)
    with pytest.raises(ValueError, match="dtype='int8'"):
        build_loader(DataConfig(loader="synthetic", dtype="int8"), "train", DistInfo(), train=True)


def test_synthetic_drop_last_like_the_other_loaders():
    cfg = DataConfig(loader="synthetic", batch_size=8, resolution=32, synthetic_samples=20, drop_last=True)
    loader = build_loader(cfg, "train", DistInfo(), train=True)
    assert [b[0].shape[0] for b in loader] == [8, 8] and len(loader) == 2 and loader.num_samples == 16
    assert len(build_loader(cfg, "val", DistInfo(), train=False)) == 3  # validation keeps every sample
    with pytest.raises(ValueError, match="less than one batch"):
        build_loader(DataConfig(loader="synthetic", batch_size=32, synthetic_samples=20, drop_last=True), "train",
                     DistInfo(), train=True)
