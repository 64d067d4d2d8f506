"""What of DaliLoader's GPU paths can be checked without a GPU: how its pipelines are built for each
data.dali_device (executor, decoder, output dtype), and the CPU-only refusals."""
from __future__ import annotations

import pytest
import torch

from imt.pipeline.config import DataConfig
from imt.train.dist import DistInfo

pytest.importorskip("nvidia.dali")
from imt.pipeline import dali  # noqa: E402

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


@pytest.mark.parametrize("mode,device,expected", [
    ("auto", "cpu", ("cpu", False)), ("cpu", "cpu", ("cpu", False)), ("auto", "cuda", ("mixed", True)),
    ("gpu", "cuda", ("mixed", True)), ("cpu-decode", "cuda", ("cpu", True)), ("cpu", "cuda", ("cpu", False))])
def test_placement(mode, device, expected):
    assert dali.placement(DataConfig(dali_device=mode), torch.device(device)) == expected


@pytest.mark.parametrize("mode", ["gpu", "cpu-decode"])
def test_gpu_modes_refuse_a_cpu_training_device(mode):
    with pytest.raises(ValueError, match=f"dali_device='{mode}'.*training device is cpu.*dali_device='cpu'"):
        dali.placement(DataConfig(dali_device=mode), torch.device("cpu"))
    with pytest.raises(ValueError, match="expected one of auto, gpu, cpu-decode, cpu"):
        dali.placement(DataConfig(dali_device="hybrid"), torch.device("cpu"))


def _operators(shards, train: bool, decode: str, augment_gpu: bool) -> dict[str, str]:
    """Operator class -> device of the traced graph (tracing needs no GPU; building it would)."""
    from imt.pipeline.common import load_split

    _, split = load_split(shards, "train" if train else "val")
    cfg = DataConfig(path=str(shards), batch_size=4, resolution=32, val_resolution=32)
    pipe = dali._graph(split.tars, split.indexes, train=train, decode=decode, augment_gpu=augment_gpu,
                       out_type=dali.output_type(cfg, augment_gpu, torch.device("cuda")), size=32,
                       resize_shorter=36, cfg=cfg, shard_id=0, num_shards=1, reader_seed=1, order_seed=1,
                       keys=False, batch_size=4, num_threads=1, device_id=0, **dali.executor_args(augment_gpu))
    pipe._build_graph()
    # images, labels; with GPU outputs also the labels on the host (the range check reads them without a sync)
    devices = [out.device for out in pipe._graph_outputs]
    assert devices == (["gpu", "gpu", "cpu"] if augment_gpu else ["cpu", "cpu"])
    return {type(op._op).__name__: op._op.device for op in pipe._ops}


@pytest.mark.parametrize("train", [True, False])
def test_graphs_put_each_stage_where_the_mode_says(synthetic_shards, train):
    decoder = "ImageRandomCrop" if train else "Image"
    gpu = _operators(synthetic_shards, train, "mixed", True)
    assert gpu[decoder] == "mixed" and gpu["Resize"] == gpu["CropMirrorNormalize"] == "gpu"
    hybrid = _operators(synthetic_shards, train, "cpu", True)
    assert hybrid[decoder] == "cpu" and hybrid["Resize"] == hybrid["CropMirrorNormalize"] == "gpu"
    cpu = _operators(synthetic_shards, train, "cpu", False)
    assert {cpu[decoder], cpu["Resize"], cpu["CropMirrorNormalize"]} == {"cpu"}


def test_hybrid_mode_builds_a_gpu_pipeline_with_cpu_decoding(monkeypatch, synthetic_shards):
    args = _build_args(monkeypatch, synthetic_shards, dali_device="cpu-decode", dtype="bfloat16")
    assert (args["decode"], args["augment_gpu"], args["device_id"], args["exec_dynamic"]) == ("cpu", True, 0, False)
    assert args["out_type"] == dali.types.FLOAT16


def test_cpu_pipeline_feeding_a_gpu_emits_uint8(monkeypatch, synthetic_shards):
    args = _build_args(monkeypatch, synthetic_shards, dali_device="cpu", dtype="bfloat16")
    assert args["out_type"] == dali.types.UINT8 and args["device_id"] is None and "exec_dynamic" not in args


def test_uint8_output_normalised_by_torch_equals_dalis_normalisation(monkeypatch, synthetic_shards):
    """The uint8 graph + pipeline.common.normalise (what a GPU gets from dali_device=cpu), run on the CPU,
    gives DALI's own float32 normalisation."""
    cfg = DataConfig(path=str(synthetic_shards), batch_size=8, resolution=32, val_resolution=32, workers=1,
                     shuffle_buffer=32, dali_device="cpu", dtype="float32")
    want = [b[0] for b in dali.DaliLoader(cfg, "val", DistInfo(), train=False)]
    monkeypatch.setattr(dali, "output_type", lambda *a: dali.types.UINT8)
    loader = dali.DaliLoader(cfg, "val", DistInfo(), train=False)
    got = [b[0] for b in loader]
    assert loader.out_type == dali.types.UINT8 and len(got) == len(want) == 4
    for g, w in zip(got, want):
        assert g.dtype == torch.float32 and g.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(g, w, rtol=0, atol=1e-5)


def test_validation_decoder_gets_dalis_default_paddings():
    """nvJPEG's paddings are per thread (211 MB device + 2 x 140 MB pinned host each): training only."""
    cfg = DataConfig(hw_decoder_load=0.5)
    train, val = dali.decoder_args(cfg, "mixed", True), dali.decoder_args(cfg, "mixed", False)
    assert train["device_memory_padding"] == dali.DEVICE_MEMORY_PADDING and train["preallocate_width_hint"] > 0
    assert val == {"device": "mixed", "hw_decoder_load": 0.5}
    assert dali.decoder_args(cfg, "cpu", True) == {"device": "cpu"}


def test_rebuild_shuts_the_old_pipeline_down_first(monkeypatch, synthetic_shards):
    """A resolution change rebuilds the training pipeline: the old one's decoder buffers are released
    before the new pipeline is made, not whenever Python collects it."""
    cfg = DataConfig(path=str(synthetic_shards), batch_size=8, resolution=32, val_resolution=32, workers=1,
                     shuffle_buffer=32, dali_device="cpu", dtype="float32")
    loader = dali.DaliLoader(cfg, "train", DistInfo(), train=True)
    for _ in loader:
        pass
    old = loader._pipe
    real, seen = dali._graph, []
    monkeypatch.setattr(dali, "_graph", lambda *a, **k: (seen.append(old._pipe is None), real(*a, **k))[1])
    loader.set_resolution(48)
    assert next(iter(loader))[0].shape[-1] == 48
    assert seen == [True]  # shut down (DALI's backend pipeline gone) when the new graph was defined


@pytest.mark.parametrize("said", [
    "Error in MIXED operator `nvidia.dali.fn.decoders.image_random_crop`: dlopen libnvimgcodec.so failed!. "
    "Please install nvimagecodec: ... `pip install nvidia-nvimgcodec-cu13`",
    "Error in CPU operator `nvidia.dali.fn.decoders.image`: libnvjpeg.so.12: cannot open shared object file"])
def test_missing_decoder_library_is_said_without_searching(monkeypatch, said):
    from types import SimpleNamespace

    monkeypatch.setattr(dali, "find_undecodable", lambda *a, **k: pytest.fail("searched the shards"))
    msg = dali.DaliLoader._explain(SimpleNamespace(rank=0, cfg=DataConfig()), RuntimeError(said))
    assert "could not load a library" in msg and "pip install nvidia-nvimgcodec-cu12" in msg and said in msg


def test_decoder_errors_that_are_not_decode_failures_pass_through(monkeypatch):
    from types import SimpleNamespace

    monkeypatch.setattr(dali, "find_undecodable", lambda *a, **k: pytest.fail("searched the shards"))
    err = RuntimeError("Error in MIXED operator `nvidia.dali.fn.decoders.image`: CUDA error "
                       "cudaErrorIllegalAddress: an illegal memory access was encountered")
    assert dali.DaliLoader._explain(SimpleNamespace(rank=0, cfg=DataConfig()), err) is None
