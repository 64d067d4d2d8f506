"""train.ema.EMA: the same numbers as AveragedModel's EMA, no counter tensor, old checkpoints load."""
from __future__ import annotations

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from imt.train.ema import EMA


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))


def _train(model, emas, steps=6):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for i in range(steps):
        x, y = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(i)), torch.arange(8) % 5
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        for ema in emas:
            ema.update_parameters(model)


def test_ema_equals_averaged_models_ema_and_copies_integer_buffers():
    model = _model()
    ours = EMA(model, 0.8)
    ref = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.8), use_buffers=True)
    ref.update_parameters(model)  # AveragedModel copies at its first update; ours starts as that copy
    _train(model, [ours, ref])
    want, got = ref.module.state_dict(), ours.module.state_dict()
    floats = [k for k, v in want.items() if v.is_floating_point()]
    assert "1.running_mean" in floats and len(floats) == len(want) - 1
    for k in floats:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)
        assert not torch.equal(got[k], model.state_dict()[k]) or k == "1.running_var"  # averaged, not copied
    assert got["1.num_batches_tracked"] == model[1].num_batches_tracked == 6  # AveragedModel's lags: 5
    assert set(ours.state_dict()) == {f"module.{k}" for k in model.state_dict()}  # the checkpoint's "ema"


def test_ema_has_no_counter_and_reads_averaged_model_checkpoints():
    model = _model()
    ema = EMA(model, 0.5)
    assert all(not k.endswith("n_averaged") for k in ema.state_dict())
    assert set(ema.state_dict()) == {f"module.{k}" for k in model.state_dict()}
    old = AveragedModel(_model(), multi_avg_fn=get_ema_multi_avg_fn(0.5), use_buffers=True)
    with torch.no_grad():
        old.module[0].weight.add_(1.0)
    ema.load_state_dict(old.state_dict())  # what checkpoints of earlier runs hold: "module.*" + "n_averaged"
    assert torch.equal(ema.module[0].weight, old.module[0].weight)


def test_ema_follows_a_wrapped_model():
    """The loop passes the compiled (or DDP) wrapper; the EMA pairs with the module inside."""
    model = _model()
    ema = EMA(model, 0.5)
    wrapper = torch.compile(model)  # an OptimizedModule around `model` (nothing compiles until it is called)
    with torch.no_grad():
        model[0].weight.add_(2.0)
    ema.update_parameters(wrapper)
    torch.testing.assert_close(ema.module[0].weight, model[0].weight - 1.0)
