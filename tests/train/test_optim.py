"""Optimizers by name, gradient clipping and accumulation in the hot loop, mixup/cutmix on the device."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from imt.train.config import OptimConfig
from imt.train.loop import train_one_epoch, train_step
from imt.train.mix import build_mix
from imt.train.model import build_optimizer, param_groups
from imt.train.schedule import LRSchedule

CONSTANT = OptimConfig(warmup_epochs=0, schedule="step", milestones=())  # lr factor 1 throughout


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3))


def _parts(net, o: OptimConfig):
    opt = build_optimizer(o, param_groups(net, o.weight_decay))
    return opt, torch.amp.GradScaler("cpu", enabled=False), torch.autocast("cpu", enabled=False)


@pytest.mark.parametrize("name,cls", [("sgd", "SGD"), ("adamw", "AdamW"), ("lars", "Lars"), ("lamb", "Lamb")])
def test_every_optimizer_builds_and_lowers_the_loss(name, cls):
    net = _net()
    lr = {"sgd": 0.05, "lars": 5.0}.get(name, 0.01)  # LARS: the lr times the trust ratio (coefficient 0.001)
    o = OptimConfig(optimizer=name, lr=lr, weight_decay=1e-4)
    opt, scaler, autocast = _parts(net, o)
    assert type(opt).__name__ == cls and len(opt.param_groups) == 2  # decay / no-decay groups kept
    if name == "lamb":
        assert opt.defaults["max_grad_norm"] is None  # optim.grad_clip is the only clip
    if name == "lars":
        assert opt.defaults["trust_coeff"] == 0.001
    torch.manual_seed(1)
    x, y = torch.randn(32, 3, 2, 2), torch.randint(0, 3, (32,))
    losses = [train_step(net, x, y, nn.CrossEntropyLoss(), opt, scaler, autocast).item() for _ in range(60)]
    assert losses[-1] < 0.8 * losses[0]


def test_grad_clip_bounds_the_update():
    """SGD without momentum moves the weights by lr x gradient: with clipping, by at most lr x grad_clip."""
    net = _net()
    o = OptimConfig(lr=1.0, momentum=0.0, weight_decay=0.0)
    opt, scaler, autocast = _parts(net, o)
    before = torch.cat([p.detach().flatten().clone() for p in net.parameters()])
    x, y = 100 * torch.randn(16, 3, 2, 2), torch.randint(0, 3, (16,))
    train_step(net, x, y, nn.CrossEntropyLoss(), opt, scaler, autocast, grad_clip=0.01)
    moved = torch.cat([p.detach().flatten() for p in net.parameters()]) - before
    assert moved.norm().item() == pytest.approx(0.01, rel=1e-4)


def _epoch(batches, grad_accum: int, should_stop=lambda: False):
    net = _net()
    o = OptimConfig(lr=0.5, momentum=0.9, weight_decay=0.0)
    opt, scaler, autocast = _parts(net, o)
    sched = LRSchedule(opt, CONSTANT, peak=0.5, steps_per_epoch=len(batches), epochs=1)
    stats = train_one_epoch(net, batches, opt, sched, scaler, autocast, nn.CrossEntropyLoss(), steps=len(batches),
                            log_every=100, grad_accum=grad_accum, should_stop=should_stop)
    return net, stats


def test_gradient_accumulation_equals_the_big_batch():
    """Two updates over batches of 8 == the same two updates over four accumulated batches of 4 (no BN: the
    sum of the halves' mean gradients / 2 is the whole batch's mean gradient)."""
    torch.manual_seed(2)
    x, y = torch.randn(16, 3, 2, 2), torch.randint(0, 3, (16,))
    big, _ = _epoch([(x[:8], y[:8]), (x[8:], y[8:])], grad_accum=1)
    small, stats = _epoch([(x[i:i + 4], y[i:i + 4]) for i in range(0, 16, 4)], grad_accum=2)
    assert stats.steps == 4
    for a, b in zip(big.parameters(), small.parameters()):
        torch.testing.assert_close(a, b)
    odd, _ = _epoch([(x[i:i + 4], y[i:i + 4]) for i in range(0, 12, 4)] + [(x[12:], y[12:])], grad_accum=3)
    assert any(not torch.equal(a, b) for a, b in zip(odd.parameters(), _net().parameters()))  # last partial update ran


def test_a_stop_waits_for_the_end_of_the_update():
    torch.manual_seed(3)
    batches = [(torch.randn(4, 3, 2, 2), torch.randint(0, 3, (4,))) for _ in range(6)]
    _, stats = _epoch(batches, grad_accum=3, should_stop=lambda: True)
    assert stats.stopped and stats.steps == 3


def test_mix_is_off_by_default_and_makes_soft_labels_on_channels_last_batches():
    assert build_mix(OptimConfig(), 5) is None
    torch.manual_seed(0)
    x = torch.rand(8, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    labels = torch.arange(8, dtype=torch.int32) % 5  # DALI's label dtype
    mixed, soft = build_mix(OptimConfig(mixup=0.2), 5)(x, labels)
    assert soft.dtype == torch.float32 and soft.shape == (8, 5)
    torch.testing.assert_close(soft.sum(1), torch.ones(8))
    lam = soft[0, labels[0]].item() if labels[0] != labels[7] else None  # sample 0 is mixed with sample 7
    if lam is not None:
        torch.testing.assert_close(mixed[0], lam * x[0] + (1 - lam) * x[7])
    assert mixed.is_contiguous(memory_format=torch.channels_last)
    xb = x.to(torch.bfloat16)
    out, soft = build_mix(OptimConfig(cutmix=1.0), 5)(xb, labels)
    assert out.dtype == torch.bfloat16 and out.is_contiguous(memory_format=torch.channels_last)
    pasted = (out != xb).any(1).float().mean().item()  # the share of pixels pasted from the neighbour
    assert soft[0, labels[7]].item() == pytest.approx(pasted, abs=0.02)
    loss = nn.CrossEntropyLoss(label_smoothing=0.1)(torch.randn(8, 5), soft)  # soft targets work with smoothing
    assert torch.isfinite(loss)
