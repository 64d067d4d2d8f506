"""RandAugment / TrivialAugmentWide and random erasing, one definition of their settings for both
pipelines: torchvision.transforms.v2 in the torch loader (per sample, uint8, in the workers) and
nvidia.dali.auto_aug + fn.erase in the DALI graph. Same operations, magnitude ranges, fill and
interpolation, so the loaders train on statistically the same images (tests/pipeline/test_augment.py
measures it):

- RandAugment: the 14 operations of torchvision's v2.RandAugment and DALI's rand_augment suite (identity,
  shear/translate x/y, rotate, brightness, color, contrast, sharpness, posterize, solarize, autocontrast,
  equalize) with torchvision's ranges: translation up to 150/331 of the image side, which DALI takes as
  max_translate_rel with the image shape. TrivialAugmentWide: 32 px translation in both (DALI's default
  when no shape is given).
- Fill 128 grey for the pixels geometric operations uncover (DALI's default; torchvision's is black) and
  bilinear interpolation (DALI's; torchvision defaults to nearest): each side takes the other's default.
- Random erasing: torchvision's RandomErasing (area 2-33%, log-uniform aspect 0.3-3.3), applied by
  torchvision's references after Normalize with value 0, i.e. to the mean colour: the torch loader erases
  its uint8 image to round(255 * MEAN), DALI its normalised output to 0. torchvision retries a rectangle
  that does not fit (up to 10 times); DALI clips its sides to the image instead (at most 1.04x the side
  with these ranges, in a few % of the draws).
"""
from __future__ import annotations

import math

from .common import MEAN
from .config import DataConfig

AUTO_AUGMENTS = ("", "randaugment", "trivialaugment")
FILL = 128
RANDAUGMENT_TRANSLATE = 150 / 331  # torchvision's _augmentation_space: 150 / 331 * image side
ERASE_SCALE, ERASE_RATIO = (0.02, 0.33), (0.3, 3.3)
NUM_MAGNITUDE_BINS = 31


def check(cfg: DataConfig) -> list[str]:
    """Problems with the augmentation settings, each saying what to set (empty: fine)."""
    problems = []
    if cfg.auto_augment not in AUTO_AUGMENTS:
        problems.append(f"data.auto_augment={cfg.auto_augment!r}: expected randaugment, trivialaugment or '' (off)")
    if not 0 <= cfg.randaugment_magnitude < NUM_MAGNITUDE_BINS:
        problems.append(f"data.randaugment_magnitude={cfg.randaugment_magnitude}: a bin in 0-{NUM_MAGNITUDE_BINS - 1}"
                        " (9 in torchvision's references)")
    if cfg.randaugment_ops < 0:
        problems.append(f"data.randaugment_ops={cfg.randaugment_ops}: operations per image, >= 0 (2 by default)")
    if not 0.0 <= cfg.random_erase <= 1.0:
        problems.append(f"data.random_erase={cfg.random_erase}: a probability in [0, 1]")
    return problems


def torch_transforms(cfg: DataConfig) -> list:
    """v2 transforms for a uint8 C x H x W training image after crop and flip."""
    from torchvision.transforms import InterpolationMode, v2

    out = []
    if cfg.auto_augment == "randaugment":
        out.append(v2.RandAugment(num_ops=cfg.randaugment_ops, magnitude=cfg.randaugment_magnitude,
                                  num_magnitude_bins=NUM_MAGNITUDE_BINS, interpolation=InterpolationMode.BILINEAR,
                                  fill=FILL))
    elif cfg.auto_augment == "trivialaugment":
        out.append(v2.TrivialAugmentWide(num_magnitude_bins=NUM_MAGNITUDE_BINS,
                                         interpolation=InterpolationMode.BILINEAR, fill=FILL))
    if cfg.random_erase:
        out.append(v2.RandomErasing(p=cfg.random_erase, scale=ERASE_SCALE, ratio=ERASE_RATIO,
                                    value=[round(255 * m) for m in MEAN]))
    return out


def dali_auto_augment(images, cfg: DataConfig, size: int, seed: int):
    """DALI's auto_aug on a batch of uint8 HWC size x size images (needs enable_conditionals=True)."""
    if cfg.auto_augment == "randaugment":
        from nvidia.dali.auto_aug import rand_augment
        return rand_augment.rand_augment(images, n=cfg.randaugment_ops, m=cfg.randaugment_magnitude,
                                         num_magnitude_bins=NUM_MAGNITUDE_BINS, shape=(size, size),
                                         max_translate_rel=RANDAUGMENT_TRANSLATE, fill_value=FILL, seed=seed)
    if cfg.auto_augment == "trivialaugment":
        from nvidia.dali.auto_aug import trivial_augment
        return trivial_augment.trivial_augment_wide(images, num_magnitude_bins=NUM_MAGNITUDE_BINS,
                                                    fill_value=FILL, seed=seed)
    return images


def dali_random_erase(images, cfg: DataConfig, fill: float | list[float] = 0.0):
    """fn.erase of one random rectangle per sample, with probability cfg.random_erase, to `fill`: 0 is the mean
    colour of a normalised HWC image; a uint8 graph (normalised later, on the GPU) passes the mean's uint8
    values. A sample that is not erased gets a rectangle of size 0."""
    if not cfg.random_erase:
        return images
    from nvidia.dali import fn, types
    from nvidia.dali import math as dmath

    area = fn.random.uniform(range=ERASE_SCALE)
    aspect = dmath.exp(fn.random.uniform(range=(math.log(ERASE_RATIO[0]), math.log(ERASE_RATIO[1]))))
    on = fn.cast(fn.random.coin_flip(probability=cfg.random_erase), dtype=types.FLOAT)
    h = dmath.min(dmath.sqrt(area * aspect), 1.0)
    w = dmath.min(dmath.sqrt(area / aspect), 1.0)
    y = fn.random.uniform(range=(0.0, 1.0)) * (1.0 - h)
    x = fn.random.uniform(range=(0.0, 1.0)) * (1.0 - w)
    return fn.erase(images, anchor=fn.stack(y, x), shape=fn.stack(h * on, w * on), axis_names="HW",
                    normalized_anchor=True, normalized_shape=True, fill_value=fill)
