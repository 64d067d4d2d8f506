"""Input pipelines behind one contract (see pipeline.common.Loader):

    loader = build_loader(cfg, "train", dist, train=True)
    for images, labels in loader: ...   # normalised, channels-last, cfg.dtype, on dist.device

Backends are imported lazily so that the synthetic loader works without DALI or webdataset.
"""
from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from .config import DataConfig

if TYPE_CHECKING:
    from imt.train.dist import DistInfo

    from .common import Loader

LOADERS = ("dali", "torch", "folder", "synthetic")


def build_loader(cfg: DataConfig, split: str, dist: "DistInfo", *, train: bool) -> Loader:
    """The loader for `split` of `cfg.path` on this rank (dist.rank of dist.world_size)."""
    if cfg.loader == "synthetic":
        from .synthetic import SyntheticLoader
        return SyntheticLoader(cfg, dist.device, train=train, rank=dist.rank)
    cache = None
    if cfg.loader in ("dali", "torch"):  # shards on object storage or a web server: read a local copy
        from .remote import open_remote
        # cache: a data set larger than data.cache_limit, streamed through it (shared by this node's ranks)
        path, cache = open_remote(cfg, dist.local_world_size)
        cfg = replace(cfg, path=path)
    if cfg.loader == "dali":
        from .dali import DaliLoader
        return DaliLoader(cfg, split, dist, train=train, cache=cache)
    if cfg.loader == "torch":
        from .torch_baseline import ShardLoader
        return ShardLoader(cfg, split, dist, train=train, cache=cache)
    if cfg.loader == "folder":
        from .torch_baseline import FolderLoader
        return FolderLoader(cfg, split, dist, train=train)
    raise ValueError(f"DataConfig.loader={cfg.loader!r}: expected one of {', '.join(LOADERS)}")


def __getattr__(name: str):
    # `Loader` lives with torch (pipeline.common): importing `pipeline` eagerly cost 2.3-9.8 s, paid by every
    # spawned make_shards worker that imports pipeline.manifest or pipeline.orphans (benchmarks/RESULTS.md).
    if name == "Loader":
        from .common import Loader
        return Loader
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["DataConfig", "Loader", "LOADERS", "build_loader"]
