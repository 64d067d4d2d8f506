"""DataConfig: everything that decides what the loaders produce. Lives with the pipelines
(train/config.py re-exports it) so `pipeline` never imports the trainer."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DataConfig:
    # Folder written by tools/make_shards (manifest.json + <split>-NNNNNN.tar/.idx), or, for
    # loader="folder", an ImageFolder root holding <split>/<class>/*.JPEG.
    path: str = ""
    # dali: DALI pipeline (mixed GPU decode where a GPU exists, CPU operators otherwise)
    # torch: torchvision transforms + DataLoader over the same shards (webdataset)
    # folder: torchvision ImageFolder + DataLoader (the classic baseline)
    # synthetic: tensors made once on the device (model-bound ceiling)
    loader: str = "dali"
    batch_size: int = 256            # per rank
    resolution: int = 224            # training crop size (progressive resizing changes it per epoch)
    val_resolution: int = 224        # centre-crop size at evaluation
    val_resize_ratio: float = 0.875  # shorter side resized to val_resolution / ratio before the crop
    min_area: float = 0.08           # RandomResizedCrop area range [min_area, 1]
    workers: int = 8                 # DALI threads or DataLoader workers per rank
    prefetch: int = 2                # DALI prefetch queue depth / DataLoader prefetch_factor
    hw_decoder_load: float = 0.65    # share of JPEGs sent to the A100/H100 hardware decoder
    shuffle_buffer: int = 4096       # DALI reader random_shuffle buffer (initial_fill)
    dtype: str = "bfloat16"          # output image dtype: bfloat16 | float16 | float32
    drop_last: bool = False          # train: drop the partial last batch instead of yielding it
    dali_device: str = "auto"        # auto | gpu | cpu-decode | cpu  (where DALI's stages run: pipeline/dali.py)
    seed: int = 0
    verify: bool = False             # hash every shard against manifest.json before training (train.preflight)
    synthetic_samples: int = 0       # synthetic loader: samples per epoch per rank (0: 50 batches)
    synthetic_classes: int = 1000    # synthetic loader: label range
    # Training augmentations after crop + flip, the same in the DALI and torch pipelines (pipeline.augment):
    # auto_augment "" (off) | randaugment (RandAugment, num_ops 2, magnitude 9 of 31 bins: torchvision's
    # references and timm's rand-m9) | trivialaugment (TrivialAugmentWide); random_erase = probability of
    # erasing one rectangle (2-33% of the area, aspect 0.3-3.3) to the mean colour (torchvision's references: 0.1
    # with RandAugment / TrivialAugment; timm's ImageNet recipes 0.25).
    auto_augment: str = ""
    randaugment_ops: int = 2
    randaugment_magnitude: int = 9
    random_erase: float = 0.0
    # path s3://, gs://, http(s)://: shards are fetched into this folder (pipeline/remote.py), at most
    # cache_limit GiB of them (0: no limit; a larger data set is streamed in windows of half of it, shuffled
    # within each: common.windowed_order); "" = $XDG_CACHE_HOME/imt/shards (~/.cache/imt/shards).
    cache_dir: str = ""
    cache_limit: float = 0.0
