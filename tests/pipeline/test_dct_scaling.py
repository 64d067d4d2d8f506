"""The torch baseline's training crop decodes at 1/2-1/8 scale (libjpeg DCT scaling through PIL's draft) when the
crop is at least twice the output, and gives the pixels a full decode + torchvision's resized_crop gives."""
from __future__ import annotations

import torch
from PIL import Image
from PIL.JpegImagePlugin import JpegImageFile
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import RandomResizedCrop
from torchvision.transforms.v2 import functional as F

from imt.pipeline.config import DataConfig
from imt.pipeline.torch_baseline import dct_scale, train_sample


class Files:
    """The raw/decode half of a sample source, over JPEG files."""

    def __init__(self, paths):
        self.paths = paths

    def raw(self, i):
        return torch.frombuffer(bytearray(self.paths[i].read_bytes()), dtype=torch.uint8), i

    def decode(self, i, data):
        return decode_jpeg(data, mode=ImageReadMode.RGB)


def test_dct_scale():
    assert dct_scale(223, 500, 112) == 1 and dct_scale(224, 500, 112) == 2
    assert dct_scale(448, 448, 112) == 4 and dct_scale(4000, 4000, 112) == 8 and dct_scale(300, 300, 224) == 1


def test_scaled_decode_matches_full_decode_crop(imagenet_sample, monkeypatch):
    drafts = []
    draft = JpegImageFile.draft
    monkeypatch.setattr(JpegImageFile, "draft", lambda self, *a: drafts.append(a) or draft(self, *a))
    src = Files(sorted(imagenet_sample.glob("*.JPEG"))[:24])
    cfg, px = DataConfig(min_area=0.08), 64
    for i in range(len(src.paths)):
        torch.manual_seed(i)
        img, label = train_sample(src, i, px, cfg)
        torch.manual_seed(i)
        with Image.open(src.paths[i]) as im:
            top, left, h, w = RandomResizedCrop.get_params(im, [0.08, 1.0], [3 / 4, 4 / 3])
        ref = F.resized_crop(src.decode(i, src.raw(i)[0]), top, left, h, w, [px, px], antialias=True)
        if torch.rand(1) < 0.5:
            ref = F.horizontal_flip(ref)
        assert label == i and img.shape == ref.shape == (3, px, px) and img.dtype == torch.uint8
        # DCT-domain downscaling is not the same filter as a bilinear one: close, not equal.
        assert (img.float() - ref.float()).abs().mean() < 6, (src.paths[i].name, dct_scale(h, w, px))
    assert len(drafts) >= 12  # most crops of ~500x375 images are >= 128 px on both sides
