"""The one uint8 -> normalised, channels-last step that loaders run on the device."""
from __future__ import annotations

import torch

from imt.pipeline.common import MEAN, STD, normalise


def test_normalise_values_layout_and_dtype():
    nhwc = torch.randint(0, 256, (2, 5, 7, 3), dtype=torch.uint8)
    for images in (nhwc.permute(0, 3, 1, 2), nhwc.permute(0, 3, 1, 2).contiguous()):  # DALI's view, a plain NCHW
        out = normalise(images, torch.float32)
        want = (images.float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
        assert out.dtype == torch.float32 and out.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
        assert normalise(images, torch.bfloat16).dtype == torch.bfloat16


def test_normalise_builds_its_constants_once_per_device(monkeypatch):
    """On a GPU each constant built in next(loader) is a blocking host-to-device copy."""
    images = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    normalise(images, torch.float32)  # the device's constants exist from here on
    made = []
    real = torch.tensor
    monkeypatch.setattr(torch, "tensor", lambda *a, **k: made.append(a) or real(*a, **k))
    for _ in range(3):
        normalise(images, torch.bfloat16)
    assert made == []
