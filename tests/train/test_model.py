"""Models by name, zero-init residuals, auxiliary-logit losses, wrapper unwrapping."""
from __future__ import annotations

import pytest
import torch

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
