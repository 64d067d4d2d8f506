"""Models by name, zero-init residuals, auxiliary-logit losses, wrapper unwrapping."""
from __future__ import annotations

import pytest
import torch

from imt.train.config import load_config
from imt.train.model import build_model, loss_function, param_groups, prepare, unwrap, zero_init_last_bn


def test_resnet_zero_init_and_channels_last():
    model = build_model("resnet18", 5, zero_init_residual=True)
    assert model.fc.out_features == 5
    assert all(not b.bn2.weight.detach().any() for layer in (model.layer1, model.layer4) for b in layer)
    assert zero_init_last_bn(build_model("resnet50", 3)) == 16  # Bottleneck blocks of ResNet-50
    assert zero_init_last_bn(build_model("vgg11", 3)) == 0
    m = prepare(model, torch.device("cpu"))
    assert m.conv1.weight.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("arch", ["inception_v3", "googlenet"])
def test_auxiliary_logits_enter_the_loss(arch):
    torch.manual_seed(0)
    model = build_model(arch, 4).train()
    px = 299 if arch == "inception_v3" else 96  # Inception's auxiliary head needs its native 299 px
    out = model(torch.randn(2, 3, px, px))
    assert not isinstance(out, torch.Tensor)  # a namedtuple with auxiliary logits in training mode
    labels = torch.tensor([0, 3])
    loss = loss_function(arch, 0.0)(out, labels)
    main = torch.nn.functional.cross_entropy(out[0], labels)
    assert loss.item() > main.item()  # auxiliary terms added
    loss.backward()
    assert loss_function(arch, 0.0)(model.eval()(torch.randn(2, 3, px, px)), labels).ndim == 0


def test_timm_models_with_constructor_arguments():
    """timm:<name> builds timm's model; model.kwargs reach its constructor (a half-width ResNet-18, and the CPU
    recipe's one-block-per-stage ResNet-10); zero_init_residual reaches timm's blocks both ways; a wrong keyword
    names the fix."""
    narrow = build_model("timm:resnet18", 10, zero_init_residual=True,
                         kwargs={"channels": [32, 64, 128, 256]})
    assert narrow.fc.in_features == 256 and narrow.layer1[0].conv1.out_channels == 32
    assert 2.5e6 < sum(p.numel() for p in narrow.parameters()) < 3.0e6  # about a quarter of ResNet-18's 11.2 M
    assert all(not b.bn2.weight.detach().any() for b in narrow.layer1)
    recipe = load_config("cpu_small", {"data.path": "unused"}).model
    ten = build_model(recipe.arch, 10, zero_init_residual=recipe.zero_init_residual, kwargs=recipe.kwargs)
    assert [len(getattr(ten, f"layer{i}")) for i in range(1, 5)] == [1, 1, 1, 1] and ten.fc.in_features == 256
    plain = build_model("timm:resnet18", 10, zero_init_residual=False)
    assert all(b.bn2.weight.detach().all() for b in plain.layer1)
    assert zero_init_last_bn(plain) == 8 and not plain.layer4[1].bn2.weight.detach().any()
    build_model("timm:mobilenetv3_small_050", 3, zero_init_residual=False)  # takes no zero_init_last: still builds
    out = prepare(narrow, torch.device("cpu")).train()(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 10)
    with pytest.raises(ValueError, match=r"model.kwargs \{'channels'.*do not fit resnet18.*model.kwargs=\{\}"):
        build_model("resnet18", 3, kwargs={"channels": [32, 64, 128, 256]})
    with pytest.raises(ValueError, match="timm.list_models"):
        build_model("timm:resnet_nope", 3)


def test_unknown_arch_and_unwrap():
    with pytest.raises(ValueError, match="list_models"):
        build_model("resnet51", 3)
    model = torch.nn.Linear(2, 2)
    assert unwrap(torch.compile(model)) is model


def test_frozen_parameters_are_left_out():
    model = build_model("resnet18", 3)
    for p in model.parameters():
        p.requires_grad_(False)
    model.fc.weight.requires_grad_(True)
    groups = param_groups(model, 1e-4)
    assert [len(g["params"]) for g in groups] == [1]


@pytest.mark.parametrize("device,fused", [("cpu", None), ("cuda", True)])
def test_sgd_is_fused_on_cuda_only(monkeypatch, device, fused):
    """On CUDA the fused SGD takes GradScaler's found_inf on the device (no .item() per fp16 step)."""
    from imt.train.config import load_config, resolve
    from imt.train.model import build_step_parts

    made = {}

    class SGD(torch.optim.SGD):
        def __init__(self, params, **kw):
            made.update(kw)
            super().__init__(params, **{**kw, "fused": None})  # built on the CPU here either way

    monkeypatch.setattr(torch.optim, "SGD", SGD)
    cfg = resolve(load_config(None, {"data.loader": "synthetic", "precision.dtype": "float32"}), torch.device("cpu"))
    build_step_parts(cfg, torch.nn.Linear(3, 2), torch.device(device))
    assert made["fused"] is fused


def test_compiled_training_makes_one_static_graph_per_resolution():
    """Progressive resizing presents a few resolutions: each gets its own static graph, and going back to an
    earlier one reuses it (torch's default dynamic=None would recompile the second one with symbolic sizes
    and run every later shape through that graph)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    from imt.train.model import compile_model

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("eager")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 2))
    net = compile_model(model, shapes=3, backend=counter)
    for px in (16, 16, 24, 24, 16, 32, 32):
        net(torch.randn(4, 3, px, px)).sum().backward()
    assert counter.frame_count == 3
    for graph in counter.graphs:
        sizes = [d for n in graph.graph.nodes if n.op == "placeholder" and "example_value" in n.meta
                 for d in getattr(n.meta["example_value"], "shape", ())]
        assert sizes and all(isinstance(d, int) for d in sizes), sizes  # no symbolic sizes
    torch._dynamo.reset()


def test_compiled_training_drops_the_partial_last_batch():
    from imt.train.config import load_config, resolve

    cfg = load_config(None, {"data.loader": "synthetic", "model.compile": True, "precision.dtype": "float32"})
    assert cfg.data.drop_last is False and resolve(cfg, torch.device("cpu")).data.drop_last is True
    eager = load_config(None, {"data.loader": "synthetic", "precision.dtype": "float32"})
    assert resolve(eager, torch.device("cpu")).data.drop_last is False
