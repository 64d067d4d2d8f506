"""`python tests/train/_record_keys.py <train.run options>` (or under torchrun): the real CLI, with the shard
loaders' (torch, dali) sample keys recorded. Each rank appends one JSON line per trained epoch part, {"rank", "epoch",
"keys"}, to $IMT_KEYS_LOG-rank<r>.jsonl. Used by the elastic-resume test to see which samples every rank
trained, across runs."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import imt.train.trainer as trainer  # noqa: E402
from imt.pipeline import dali, torch_baseline  # noqa: E402


class _KeyedShardLoader(torch_baseline.ShardLoader):
    def __init__(self, cfg, split, dist, *, train: bool, keys: bool = False, cache=None):
        super().__init__(cfg, split, dist, train=train, keys=train, cache=cache)
        self.rank = dist.rank

    def current_epoch(self) -> int:
        return self.dataset.epoch.value


class _KeyedDaliLoader(dali.DaliLoader):
    def __init__(self, cfg, split, dist, *, train: bool, keys: bool = False, cache=None):
        super().__init__(cfg, split, dist, train=train, keys=train, cache=cache)

    def current_epoch(self) -> int:
        return self.epoch


def _recording(real):
    def spy(net, loader, *args, **kwargs):
        keys: list[str] = []

        class Watched:
            def __len__(self):
                return len(loader)

            def __iter__(self):
                for images, labels, names in loader:
                    keys.extend(names)
                    yield images, labels
        try:
            return real(net, Watched(), *args, **kwargs)
        finally:
            with open(f"{os.environ['IMT_KEYS_LOG']}-rank{loader.rank}.jsonl", "a") as f:
                f.write(json.dumps({"rank": loader.rank, "epoch": loader.current_epoch(), "keys": keys}) + "\n")
    return spy


if __name__ == "__main__":
    torch_baseline.ShardLoader = _KeyedShardLoader
    dali.DaliLoader = _KeyedDaliLoader
    trainer.train_one_epoch = _recording(trainer.train_one_epoch)
    from imt.train.run import main
    main()
