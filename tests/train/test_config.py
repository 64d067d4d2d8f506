"""Config: recipes load and validate, overrides are typed, unknown keys are refused by name."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from imt.train.config import Config, ConfigError, from_dict, load_config, parse_override, recipe_names, resolve


@pytest.mark.parametrize("name", recipe_names())
def test_every_recipe_loads(name):
    cfg = load_config(name, {"data.path": "/data/shards"})
    assert cfg.run.epochs > 0 and cfg.data.batch_size > 0
    assert from_dict(cfg.to_dict()) == cfg  # config.json round-trips


def test_required_recipes_exist():
    names = set(recipe_names())
    assert {"resnet50_imagenet", "resnet50_fast", "resnet18_16ep", "imagenette_quick", "synthetic_quick"} <= names


def test_overrides_beat_recipe_and_are_typed():
    cfg = load_config("resnet50_imagenet", {"data.path": "x", "optim.lr": "0.2", "run.epochs": "3",
                                            "optim.milestones": "[1, 2]", "run.tta_flip": "true",
                                            "model.pretrained": "none"})
    assert cfg.optim.lr == 0.2 and cfg.run.epochs == 3 and cfg.optim.milestones == (1, 2)
    assert cfg.run.tta_flip is True and cfg.model.pretrained is None
    assert cfg.model.arch == "resnet50"  # from the recipe
    narrow = load_config(None, {"data.path": "x", "model.arch": "timm:resnet18",
                                "model.kwargs": parse_override("model.kwargs={channels: [32, 64, 128, 256]}")[1]})
    assert narrow.model.kwargs == {"channels": [32, 64, 128, 256]}
    with pytest.raises(ConfigError, match="model.kwargs: expected dict"):
        load_config(None, {"data.path": "x", "model.kwargs": "[32, 64]"})
    with pytest.raises(ConfigError, match="nor timm:<name>"):
        load_config(None, {"data.path": "x", "model.arch": "timm:resnet_nope"})


def test_parse_override():
    assert parse_override("optim.lr=0.5") == ("optim.lr", 0.5)
    assert parse_override("optim.milestones=[3, 6]") == ("optim.milestones", [3, 6])
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_override("lr0.5")


def test_unknown_key_names_key_and_valid_ones():
    with pytest.raises(ConfigError) as e:
        load_config(None, {"data.path": "x", "optim.learning_rate": 1})
    assert "optim.learning_rate" in str(e.value) and "momentum" in str(e.value)
    with pytest.raises(ConfigError, match="unknown override 'optimizer.lr'"):
        load_config(None, {"data.path": "x", "optimizer.lr": 1})


def test_unknown_key_in_recipe_file(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  path: x\nrun:\n  epoch: 3\n")
    with pytest.raises(ConfigError, match=r"run\.epoch;.*epochs"):
        load_config(bad)
    bad.write_text("trainer:\n  epochs: 3\n")
    with pytest.raises(ConfigError, match="unknown section 'trainer'"):
        load_config(bad)


def test_bad_values_are_refused():
    with pytest.raises(ConfigError, match="expected int"):
        load_config(None, {"data.path": "x", "run.epochs": "many"})
    with pytest.raises(ConfigError, match="optim.schedule"):
        load_config(None, {"data.path": "x", "optim.schedule": "exp"})
    with pytest.raises(ConfigError, match="torchvision classification model"):
        load_config(None, {"data.path": "x", "model.arch": "resnet51"})
    with pytest.raises(ConfigError, match="data.path is empty"):
        load_config(None, {})
    with pytest.raises(ConfigError, match="not found"):
        load_config("no_such_recipe", {"data.path": "x"})
    with pytest.raises(ConfigError, match="drop model.sync_bn"):
        load_config(None, {"data.path": "x", "model.pretrained": "w.pt", "model.freeze_bn": True,
                           "model.sync_bn": True})


def test_resolve_cpu_precision():
    cfg = load_config(None, {"data.loader": "synthetic"})
    r = resolve(cfg, torch.device("cpu"))
    assert r.precision.dtype in ("bfloat16", "float32") and r.data.dtype == r.precision.dtype
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        assert r.precision.dtype == "float32"  # emulated bf16 is ~15x slower here
    with pytest.raises(ConfigError, match="float16 needs a CUDA"):
        resolve(load_config(None, {"data.loader": "synthetic", "precision.dtype": "float16"}),
                torch.device("cpu"))
    assert isinstance(Config().to_json(), str)


@pytest.mark.parametrize("key,value,message", [
    ("run.max_steps_per_epoch", -1, "max_steps_per_epoch=-1"), ("optim.backbone_lr_mult", -1, "backbone_lr_mult=-1"),
    ("data.val_resize_ratio", 0, "val_resize_ratio=0"), ("data.min_area", 2, "min_area=2"),
    ("optim.momentum", -3, "momentum=-3"), ("optim.weight_decay", -1, "weight_decay=-1"),
    ("optim.optimizer", "adam", "expected one of sgd, adamw, lars, lamb"), ("optim.betas", [0.9], "two values"),
    ("optim.grad_clip", -1, "grad_clip=-1"), ("optim.grad_accum", 0, "grad_accum=0"), ("optim.cutmix", -1, "cutmix=-1"),
    ("data.auto_augment", "rand", "auto_augment=.rand."), ("data.random_erase", 1.5, "random_erase=1.5")])
def test_out_of_range_values_are_refused(key, value, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, {"data.loader": "synthetic", key: value})


@pytest.mark.parametrize("major,expected", [(7, "float16"), (8, "bfloat16"), (9, "bfloat16")])
@pytest.mark.parametrize("old_torch", [False, True])
def test_resolve_cuda_auto_precision_ignores_emulated_bf16(monkeypatch, major, expected, old_torch):
    """V100/T4 (capability 7) emulate bf16, and is_bf16_supported() says True there: auto must pick fp16."""
    def is_bf16_supported(including_emulation: bool = True):  # torch's semantics for a GPU of `major`
        return major >= 8 or including_emulation

    def old_is_bf16_supported():  # torch < 2.3 had no argument and counted emulation
        return True

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", old_is_bf16_supported if old_torch else is_bf16_supported)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, 0))
    cfg = load_config(None, {"data.loader": "synthetic"})
    r = resolve(cfg, torch.device("cuda", 0))
    assert r.precision.dtype == r.data.dtype == expected


def test_negative_workers_and_a_vit_at_another_size_are_refused():
    with pytest.raises(ConfigError, match=r"data.workers=-3: loader threads/processes per rank, 0 or more"):
        load_config(None, {"data.loader": "synthetic", "data.workers": -3})
    with pytest.raises(ConfigError, match=r"model.arch=vit_b_16 takes 224x224 px images only .* uses 64 px: pass "
                                          r"--resolution 224"):
        load_config(None, {"data.loader": "synthetic", "model.arch": "vit_b_16", "data.resolution": 64,
                           "data.val_resolution": 64})
    with pytest.raises(ConfigError, match=r"uses 128, 224 px"):  # a progressive-resizing ramp from 128 px
        load_config(None, {"data.loader": "synthetic", "model.arch": "vit_b_16", "run.start_res": 128})
    load_config(None, {"data.loader": "synthetic", "model.arch": "vit_b_16", "data.resolution": 224})
    load_config(None, {"data.loader": "synthetic", "model.arch": "resnet18", "data.resolution": 64})

def test_tune_overlay_sits_between_recipe_and_overrides(tmp_path):
    tune = tmp_path / "tune.yaml"
    tune.write_text("# imt-tune\ndata:\n  loader: torch\n  workers: 3\n  prefetch: 4\n")
    cfg = load_config("synthetic_quick", {"data.path": "x", "data.prefetch": 1}, overlays=(tune,))
    assert (cfg.data.loader, cfg.data.workers, cfg.data.prefetch) == ("torch", 3, 1)  # overlay over recipe, under --set
    assert cfg.data.batch_size == 32  # the recipe's, untouched
    with pytest.raises(ConfigError, match="no such file"):
        load_config("synthetic_quick", {"data.path": "x"}, overlays=(tmp_path / "missing.yaml",))


def test_threads_resolve_to_cores_left_by_the_loader(monkeypatch):
    import os

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    cpu = torch.device("cpu")
    assert resolve(load_config(None, {"data.path": "x", "data.workers": 6}), cpu).run.threads == 2
    assert resolve(load_config(None, {"data.path": "x", "data.workers": 8}), cpu).run.threads == 1
    assert resolve(load_config(None, {"data.loader": "synthetic"}), cpu).run.threads == 8
    assert resolve(load_config(None, {"data.path": "x", "run.threads": 3}), cpu).run.threads == 3
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # read once, by dist.setup (DistInfo.local_world_size), not here
    assert resolve(load_config(None, {"data.path": "x", "data.workers": 2}), cpu, 2).run.threads == 2
    with pytest.raises(ConfigError, match="run.threads"):
        load_config(None, {"data.path": "x", "run.threads": -1})


def test_data_wait_note_names_imt_tune_and_leaves_out_the_loaders_start_up():
    from imt.train.monitor import data_wait_note

    assert data_wait_note(0.5, 0.0, 10.0, "/data/shards") is None  # 5%
    note = data_wait_note(4.0, 0.0, 10.0, "/data/shards")
    assert "40%" in note and "imt-tune" in note and "--data /data/shards" in note and "--tune" in note
    # 4 s of a 20 s epoch waited, 3.6 of them for the first batch (workers starting): 0.4 / 16.4 s after it, 2%
    assert data_wait_note(4.0, 3.6, 20.0, "/data/shards") is None
    assert "25%" in data_wait_note(7.6, 3.6, 19.6, "/data/shards")  # 4 of the 16 s after the first batch


def test_remote_cache_settings_are_typed_and_checked():
    cfg = load_config(None, {"data.path": "s3://bucket/shards", "data.cache_limit": "200",
                             "data.cache_dir": "/scratch"})
    assert cfg.data.cache_limit == 200.0 and cfg.data.cache_dir == "/scratch"
    with pytest.raises(ConfigError, match="data.cache_limit=-1"):
        load_config(None, {"data.path": "x", "data.cache_limit": -1})
