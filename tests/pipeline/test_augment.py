"""RandAugment / TrivialAugment and random erasing: the DALI graph and the torch loader apply them with the
same semantics, measured on the statistics of what each loader yields over the same shards and seed."""
from __future__ import annotations

import pytest
import torch

from imt.pipeline.augment import check
from imt.pipeline.common import MEAN, STD
from imt.pipeline.config import DataConfig
from imt.train.dist import DistInfo

pytest.importorskip("nvidia.dali")
from imt.pipeline.dali import DaliLoader  # noqa: E402
from imt.pipeline.torch_baseline import ShardLoader  # noqa: E402

# DALI's auto_aug calls deprecated aliases of its own operators
pytestmark = pytest.mark.filterwarnings("ignore:This operator was moved out from the experimental phase")
GREY = ((128 / 255 - torch.tensor(MEAN)) / torch.tensor(STD)).view(1, 3, 1, 1)  # the geometric ops' fill
ERASED_AREA = 0.1745  # E[h * w / image area] of torchvision's RandomErasing ranges (numerical, both variants)


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _stats(kind: str, shards, epochs: int, **aug) -> dict:
    """Per-image statistics of `epochs` epochs of training batches. min_area=1: crops hardly change the
    pixels, so what differs from the plain loader is the augmentation."""
    cfg = DataConfig(path=str(shards), batch_size=16, resolution=64, val_resolution=64, workers=1,
                     shuffle_buffer=32, dtype="float32", dali_device="cpu", seed=3, min_area=1.0, **aug)
    loader = (DaliLoader if kind == "dali" else ShardLoader)(cfg, "train", DistInfo(), train=True)
    xs = []
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        xs += [x.float() for x, _ in loader]
    x = torch.cat(xs)
    means = x.mean((1, 2, 3))
    return {"n": len(x), "erased": (x.abs() < 0.01).all(1).float().mean().item(),
            "grey": ((x - GREY).abs() < 0.02).all(1).float().mean().item(),
            "mean": means.mean().item(), "sd_of_mean": means.std().item()}


def test_random_erasing_agrees_between_dali_and_torch(synthetic_shards):
    plain = _stats("dali", synthetic_shards, 1)
    dali, torch_ = (_stats(k, synthetic_shards, 3, random_erase=0.5) for k in ("dali", "torch"))
    assert plain["erased"] == 0.0 and dali["n"] == torch_["n"] == 288
    for s in (dali, torch_):  # p x E[area] = 0.087; the standard error over 288 images is 0.0064
        assert s["erased"] == pytest.approx(0.5 * ERASED_AREA, abs=0.02)
    assert abs(dali["erased"] - torch_["erased"]) < 0.03


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["randaugment", "trivialaugment"])
def test_auto_augment_agrees_between_dali_and_torch(synthetic_shards, policy):
    """Measured (seed 3, 288 images of 64 px) on the shape drawing: share of fill-grey pixels DALI 0.040 /
    torch 0.042 (RandAugment), 0.076 / 0.083 (TrivialAugment), 0 without; spread of the per-image mean 0.64 /
    0.66 and 0.62 / 0.59 against 0.56 without. On the texture drawing (2026-12-02): grey 0.043 / 0.042 and
    0.083 / 0.083; spread 0.525 / 0.493 and 0.575 / 0.509 against 0.481 without (high-contrast textures vary
    less in brightness under colour operations). The spreads' tolerance, 0.09, is three standard errors of
    the difference of two standard deviations of ~0.5 over 288 images (0.5 / sqrt(287) = 0.03)."""
    plain = _stats("torch", synthetic_shards, 3)
    dali, torch_ = (_stats(k, synthetic_shards, 3, auto_augment=policy) for k in ("dali", "torch"))
    assert plain["grey"] < 0.001  # no fill: only the odd natural pixel happens to be that grey (2.5e-6 seen)
    assert dali["grey"] > 0.02 and torch_["grey"] > 0.02  # geometric operations ran, filled with 128
    assert dali["grey"] == pytest.approx(torch_["grey"], rel=0.25)
    for s in (dali, torch_):  # colour operations spread the images' brightness
        assert s["sd_of_mean"] > plain["sd_of_mean"]
    assert abs(dali["sd_of_mean"] - torch_["sd_of_mean"]) < 0.09
    assert abs(dali["mean"] - torch_["mean"]) < 0.1  # standard error of each: 0.037


def test_bad_settings_say_what_to_set():
    assert check(DataConfig()) == []
    problems = check(DataConfig(auto_augment="autoaugment", randaugment_magnitude=31, random_erase=2))
    assert len(problems) == 3 and "randaugment, trivialaugment" in problems[0] and "0-30" in problems[1]
