"""What of DaliLoader's GPU paths can be checked without a GPU: how its pipelines are built for each
data.dali_device (executor, decoder, output dtype), and the CPU-only refusals."""
from __future__ import annotations

import pytest
import torch

from pipeline.config import DataConfig
from train.dist import DistInfo

pytest.importorskip("nvidia.dali")
from pipeline import dali  # noqa: E402

GPU = DistInfo(device=torch.device("cuda", 0))


class Built(Exception):
    """Raised by the recording _graph: the pipeline's arguments are all the test needs."""


def _build_args(monkeypatch, shards, dist=GPU, train=True, **cfg) -> dict:
    seen = {}

    def graph(*args, **kwargs):
        seen.update(kwargs)
        raise Built

    monkeypatch.setattr(dali, "_graph", graph)
    base = dict(path=str(shards), batch_size=8, resolution=32, val_resolution=32, workers=1, shuffle_buffer=32)
    loader = dali.DaliLoader(DataConfig(**{**base, **cfg}), "train" if train else "val", dist, train=train)
    with pytest.raises(Built):
        next(iter(loader))
    return seen


def test_gpu_outputs_come_from_the_classic_executor(monkeypatch, synthetic_shards):
    """exec_dynamic=False: the iterator copies each batch into a torch tensor on torch's stream (see
    dali.executor_args); DALI's zero-copy outputs could be recycled while torch still reads them."""
    args = _build_args(monkeypatch, synthetic_shards, dali_device="gpu")
    assert args["exec_dynamic"] is False and args["device_id"] == 0


def test_cpu_pipeline_keeps_the_dynamic_executor(synthetic_shards):
    cfg = DataConfig(path=str(synthetic_shards), batch_size=8, resolution=32, val_resolution=32, workers=1,
                     shuffle_buffer=32, dali_device="cpu", dtype="float32")
    loader = dali.DaliLoader(cfg, "val", DistInfo(), train=False)
    batches = iter(loader)
    images, labels = next(batches)
    assert loader._pipe.exec_dynamic is True and images.shape == (8, 3, 32, 32)
