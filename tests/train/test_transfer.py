"""Transfer learning: pretrained loading, classifier replacement, freezing, export and predict (CPU)."""
from __future__ import annotations

import json
import pickle

import pytest
import torch
import torchvision
from PIL import Image

from imt.train.transfer import PretrainedError, freeze_bn_stats, head_names, load_pretrained, set_trainable


@pytest.fixture()
def r18_state(tmp_path):
    torch.manual_seed(0)
    src = torchvision.models.resnet18(num_classes=10)
    path = tmp_path / "resnet18-10.pth"
    torch.save(src.state_dict(), path)
    return src, path


def test_head_names_cover_common_families():
    assert head_names(torchvision.models.resnet18(num_classes=3)) == ["fc"]
    assert head_names(torchvision.models.vgg11(num_classes=3)) == ["classifier.6"]
    assert head_names(torchvision.models.densenet121(num_classes=3)) == ["classifier"]
    inc = torchvision.models.inception_v3(num_classes=3, aux_logits=True, init_weights=False)
    assert head_names(inc) == ["fc", "AuxLogits.fc"]
    goog = torchvision.models.googlenet(num_classes=3, aux_logits=True, init_weights=False)
    assert head_names(goog) == ["fc", "aux1.fc2", "aux2.fc2"]  # not aux*.fc1: a hidden layer, kept


def test_state_dict_loads_backbone_and_reports_replaced_head(r18_state):
    src, path = r18_state
    model = torchvision.models.resnet18(num_classes=5)
    fresh_fc = model.fc.weight.detach().clone()
    report = load_pretrained(model, path, "resnet18")
    assert set(report.replaced) == {"fc.weight", "fc.bias"}
    assert not report.missing and not report.unexpected and not report.mismatched
    assert torch.equal(model.conv1.weight, src.conv1.weight)
    assert torch.equal(model.layer4[1].bn2.running_var, src.layer4[1].bn2.running_var)
    assert torch.equal(model.fc.weight, fresh_fc)  # the new head keeps its own initialisation
    assert any("classifier replaced" in line and "fc.weight" in line for line in report.lines())


def test_wrapper_prefixes_and_our_checkpoint_format(r18_state, tmp_path):
    src, _ = r18_state
    ckpt = tmp_path / "ckpt.pt"
    state = {f"module._orig_mod.{k}": v for k, v in src.state_dict().items()}
    torch.save({"model": state, "arch": "resnet18", "classes": [f"c{i}" for i in range(10)], "epoch": 3}, ckpt)
    model = torchvision.models.resnet18(num_classes=10)
    report = load_pretrained(model, ckpt, "resnet18")
    assert not report.replaced and not report.missing
    assert torch.equal(model.fc.weight, src.fc.weight)
    with pytest.raises(PretrainedError, match="holds a resnet18 but the model is resnet34"):
        load_pretrained(torchvision.models.resnet34(num_classes=10), ckpt, "resnet34")


def test_same_count_other_classes_replaces_the_head(r18_state, tmp_path):
    """Pretrained on 5 classes, fine-tuned on 5 others: the old head's rows mean other classes, so it is
    replaced (and reported) although its shape fits; the same classes keep it."""
    src, _ = r18_state
    ckpt = tmp_path / "ckpt.pt"
    torch.save({"model": src.state_dict(), "arch": "resnet18", "classes": [f"old{i}" for i in range(10)]}, ckpt)
    model = torchvision.models.resnet18(num_classes=10)
    fresh_fc = model.fc.weight.detach().clone()
    report = load_pretrained(model, ckpt, "resnet18", classes=[f"new{i}" for i in range(10)])
    assert set(report.replaced) == {"fc.weight", "fc.bias"} and "fc.weight" not in report.loaded
    assert torch.equal(model.fc.weight, fresh_fc) and torch.equal(model.conv1.weight, src.conv1.weight)
    same = torchvision.models.resnet18(num_classes=10)
    assert not load_pretrained(same, ckpt, "resnet18", classes=[f"old{i}" for i in range(10)]).replaced
    assert torch.equal(same.fc.weight, src.fc.weight)


def test_our_checkpoint_gives_its_ema_weights_and_is_verified(r18_state, tmp_path):
    """A checkpoint with EMA weights starts fine-tuning from them (evaluation reported their accuracy), and
    says so; a checkpoint whose sha256 sidecar no longer matches is refused, not loaded."""
    from torch.optim.swa_utils import AveragedModel

    from imt.train.checkpoint import save_checkpoint

    src, _ = r18_state
    ema = AveragedModel(torchvision.models.resnet18(num_classes=10), use_buffers=True)  # other random weights
    state = {"model": src.state_dict(), "ema": ema.state_dict(), "arch": "resnet18",
             "classes": [f"c{i}" for i in range(10)]}
    ckpt = save_checkpoint(state, tmp_path / "best.pt")
    model = torchvision.models.resnet18(num_classes=10)
    report = load_pretrained(model, ckpt, "resnet18", classes=state["classes"])
    assert report.source.endswith("(EMA weights)") and not report.unexpected and not report.missing
    assert torch.equal(model.conv1.weight, ema.module.conv1.weight)
    assert torch.equal(model.layer1[0].bn1.running_mean, ema.module.layer1[0].bn1.running_mean)

    torch.save({**state, "ema": {}}, tmp_path / "raw.pt")  # no EMA in the run: its own weights
    report = load_pretrained(model, tmp_path / "raw.pt", "resnet18", classes=state["classes"])
    assert report.source.endswith("(raw weights)") and torch.equal(model.conv1.weight, src.conv1.weight)

    data = bytearray(ckpt.read_bytes())
    data[len(data) // 2] ^= 0xFF
    ckpt.write_bytes(bytes(data))
    with pytest.raises(PretrainedError, match="corrupt: sha256"):
        load_pretrained(model, ckpt, "resnet18")


def test_unexpected_and_missing_keys_are_named(r18_state, tmp_path):
    src, _ = r18_state
    state = src.state_dict()
    state.pop("layer1.0.conv1.weight")
    state["extra.weight"] = torch.zeros(3)
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    report = load_pretrained(torchvision.models.resnet18(num_classes=10), path, "resnet18")
    assert report.missing == ("layer1.0.conv1.weight",)
    assert report.unexpected == ("extra.weight",)


def test_foreign_or_code_bearing_files_are_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    evil = tmp_path / "evil.pth"
    evil.write_bytes(pickle.dumps({"fc.weight": Evil()}, protocol=2))  # torch.save's protocol
    with pytest.raises(PretrainedError, match="weights_only=True"):
        load_pretrained(torchvision.models.resnet18(num_classes=2), evil, "resnet18")
    other = tmp_path / "other.pth"
    torch.save(torchvision.models.vgg11(num_classes=2).state_dict(), other)
    with pytest.raises(PretrainedError, match="no tensor .* fits"):
        load_pretrained(torchvision.models.resnet18(num_classes=2), other, "resnet18")
    with pytest.raises(PretrainedError, match="no such file"):
        load_pretrained(torchvision.models.resnet18(num_classes=2), tmp_path / "nope.pth", "resnet18")


class _LightningConfig:  # a user's class in Lightning's hyper_parameters: not built by weights_only=True
    def __init__(self, lr):
        self.lr = lr


def _shifted(state: dict, by: float) -> dict:
    return {k: (v + by if v.is_floating_point() else v) for k, v in state.items()}


def test_timm_checkpoint_gives_its_ema_weights(r18_state, tmp_path):
    """timm's train.py saves state_dict, state_dict_ema and args (an argparse.Namespace) with version 2."""
    import argparse

    src, _ = r18_state
    opt = torch.optim.SGD(src.parameters(), lr=0.1, momentum=0.9)
    ema = _shifted(src.state_dict(), 1.0)
    path = tmp_path / "timm-last.pth.tar"
    torch.save({"epoch": 9, "arch": "resnet18", "state_dict": src.state_dict(), "optimizer": opt.state_dict(),
                "version": 2, "args": argparse.Namespace(model="resnet18", lr=0.1, epochs=10, mean=None),
                "metric": 71.5, "state_dict_ema": {f"module.{k}": v for k, v in ema.items()}}, path)
    model = torchvision.models.resnet18(num_classes=10)
    report = load_pretrained(model, path, "resnet18")
    assert not report.missing and not report.unexpected and not report.replaced
    assert torch.equal(model.conv1.weight, ema["conv1.weight"])
    assert "timm" in report.source and "EMA weights" in report.source and "arch resnet18" in report.source


def test_lightning_checkpoint_strips_the_module_attribute(r18_state, tmp_path):
    """Lightning nests the weights under the LightningModule's attribute (`model.`, `net.`); other modules of
    it (a weighted loss) are reported as unexpected, not loaded."""
    src, _ = r18_state
    opt = torch.optim.SGD(src.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, 30)
    for attr in ("model", "net"):
        state = {f"{attr}.{k}": v for k, v in src.state_dict().items()}
        state["criterion.weight"] = torch.ones(10)
        path = tmp_path / f"lightning-{attr}.ckpt"
        torch.save({"epoch": 4, "global_step": 120, "pytorch-lightning_version": "2.5.1", "state_dict": state,
                    "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"total": {"ready": 5}}}},
                    "callbacks": {"ModelCheckpoint{'monitor': 'val_acc'}": {"best_model_score": torch.tensor(0.7),
                                                                          "dirpath": "/runs/x"}},
                    "optimizer_states": [opt.state_dict()], "lr_schedulers": [sched.state_dict()],
                    "hparams_name": "kwargs", "hyper_parameters": {"lr": 0.1, "arch": "resnet18"}}, path)
        model = torchvision.models.resnet18(num_classes=5)
        report = load_pretrained(model, path, "resnet18")
        assert torch.equal(model.layer4[1].conv2.weight, src.layer4[1].conv2.weight)
        assert set(report.replaced) == {"fc.weight", "fc.bias"} and not report.missing
        assert report.unexpected == ("criterion.weight",)
        assert "Lightning" in report.source and f"under '{attr}.'" in report.source


def test_torchvision_references_checkpoint_with_args_and_model_ema(r18_state, tmp_path):
    """references/classification/train.py: model, optimizer, lr_scheduler, epoch, args (Namespace), and
    model_ema (an AveragedModel: module. prefix and n_averaged)."""
    import argparse

    from torch.optim.swa_utils import AveragedModel

    src, _ = r18_state
    averaged = AveragedModel(src)
    with torch.no_grad():
        for p in averaged.module.parameters():
            p.add_(0.5)
    opt = torch.optim.SGD(src.parameters(), lr=0.5)
    path = tmp_path / "checkpoint.pth"
    args = argparse.Namespace(model="resnet18", lr=0.5, epochs=600, weights=None, data_path="/datasets01/imagenet")
    torch.save({"model": src.state_dict(), "optimizer": opt.state_dict(),
                "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 30).state_dict(), "epoch": 599,
                "args": args, "model_ema": averaged.state_dict()}, path)
    model = torchvision.models.resnet18(num_classes=10)
    report = load_pretrained(model, path, "resnet18")
    assert torch.equal(model.conv1.weight, averaged.module.conv1.weight)
    assert not report.unexpected and not report.missing  # n_averaged dropped, module. stripped
    assert "torchvision references" in report.source and "EMA" in report.source
    from imt.train.transfer import read_state

    raw, meta = read_state(path, "resnet18", ema=False)
    assert meta["weights"] == "raw" and torch.equal(raw["conv1.weight"], src.conv1.weight)


def test_foreign_checkpoint_with_other_pickled_classes_is_refused_with_how_to_convert(r18_state, tmp_path):
    src, _ = r18_state
    path = tmp_path / "lightning.ckpt"
    torch.save({"pytorch-lightning_version": "2.5.1", "state_dict": src.state_dict(),
                "hyper_parameters": {"config": _LightningConfig(0.1)}}, path)
    with pytest.raises(PretrainedError, match=r"_LightningConfig.*weights_only=False.*torch.save") as info:
        load_pretrained(torchvision.models.resnet18(num_classes=10), path, "resnet18")
    assert len(str(info.value)) < 600  # not torch's thousand-character message
    junk = tmp_path / "opt.pth"
    torch.save({"optimizer": {"lr": 0.1}}, junk)
    with pytest.raises(PretrainedError, match="no state dict of tensors.*top-level keys: optimizer"):
        load_pretrained(torchvision.models.resnet18(num_classes=10), junk, "resnet18")


def test_torchvision_name_uses_hub_cache_only(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(PretrainedError, match=r"resnet18-f37072fd\.pth.*nothing is downloaded|nothing is downloaded.*resnet18-f37072fd\.pth"):
        load_pretrained(torchvision.models.resnet18(num_classes=2), "torchvision:resnet18", "resnet18")
    # A file placed in the cache is used, without any network access.
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(torchvision.models.resnet18().state_dict(), cache / "resnet18-f37072fd.pth")
    report = load_pretrained(torchvision.models.resnet18(num_classes=2), "torchvision:ResNet18_Weights.IMAGENET1K_V1",
                             "resnet18")
    assert set(report.replaced) == {"fc.weight", "fc.bias"}


def test_linear_probe_trains_only_the_head_and_freezes_bn():
    model = torchvision.models.resnet18(num_classes=4)
    trainable = set_trainable(model, "linear")
    assert trainable == ["fc.weight", "fc.bias"]
    model.train()
    assert not model.bn1.training and model.fc.training
    before = model.bn1.running_mean.clone()
    model(torch.randn(4, 3, 32, 32)).sum().backward()
    assert torch.equal(model.bn1.running_mean, before)
    assert model.conv1.weight.grad is None and model.fc.weight.grad is not None


def test_full_finetune_with_frozen_bn_keeps_statistics_but_trains_affine():
    model = torchvision.models.resnet18(num_classes=4)
    assert freeze_bn_stats(model) == 20
    set_trainable(model, "full")
    model.train()
    before = model.layer1[0].bn1.running_var.clone()
    model(torch.randn(4, 3, 32, 32)).sum().backward()
    assert torch.equal(model.layer1[0].bn1.running_var, before)
    assert model.layer1[0].bn1.weight.grad is not None
    # state-dict layout is unchanged, so checkpoints stay interchangeable
    assert set(model.state_dict()) == set(torchvision.models.resnet18(num_classes=4).state_dict())


def test_export_and_predict_round_trip(tmp_path):
    from click.testing import CliRunner

    from imt.train.export import export_model
    from imt.train.predict import Predictor, main as predict_main

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=3).eval()
    classes = ["apple", "banana", "cherry"]
    out = export_model(model, "resnet18", classes, tmp_path / "exp", resolution=64)
    assert json.loads((out / "classes.json").read_text()) == classes
    bundle = torch.load(out / "model.pt", weights_only=True)
    assert bundle["arch"] == "resnet18" and bundle["classes"] == classes and bundle["model_kwargs"] == {}
    # both graphs give the model's logits, at a batch size other than the one they were traced with
    x5 = torch.randn(5, 3, 64, 64)
    with torch.no_grad():
        want = model(x5)
        assert torch.allclose(torch.export.load(out / "model.pt2").module()(x5), want, atol=1e-4)
    import onnxruntime
    session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(["logits"], {"images": x5.numpy()})[0]
    assert torch.allclose(torch.from_numpy(got), want, atol=1e-4)

    images = tmp_path / "imgs"
    images.mkdir()
    for i in range(3):
        Image.new("RGB", (90 + 10 * i, 70), (40 * i, 100, 200)).save(images / f"ok{i}.jpg")
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (images / "notes.txt").write_text("ignored: not an image suffix")

    pred = Predictor.load(out, "cpu")
    x = pred.load_image(images / "ok0.jpg").unsqueeze(0)
    with torch.no_grad():
        expected = model(x).softmax(1)
    top = pred.predict(x, topk=3)[0]
    assert [c for c, _ in top] == [classes[i] for i in expected[0].argsort(descending=True).tolist()]
    assert abs(sum(p for _, p in top) - 1.0) < 1e-4

    result = CliRunner().invoke(predict_main, ["--model", str(out), str(images), "--topk", "2", "--json"])
    assert result.exit_code == 1  # one file failed, and says so
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert sorted(line["path"].rsplit("/", 1)[1] for line in lines) == ["ok0.jpg", "ok1.jpg", "ok2.jpg"]
    assert all(len(line["top"]) == 2 for line in lines)
    assert "broken.jpg: cannot read as an image" in result.stderr


def test_export_cli_from_a_training_checkpoint(tmp_path):
    """imt-export on what the trainer writes: EMA weights by default (what evaluation reported), the run's
    validation size and classes; --no-ema takes the raw weights; predict reads the checkpoint directly too. The
    model is a narrow timm ResNet (model.kwargs), which the checkpoint and the export must rebuild."""
    from click.testing import CliRunner

    from imt.train.config import load_config
    from imt.train.export import main as export_main
    from imt.train.predict import Predictor
    from imt.train.run import train

    narrow = {"channels": [16, 32, 64, 128]}
    cfg = load_config(None, {"model.arch": "timm:resnet18", "model.kwargs": narrow, "data.loader": "synthetic",
                             "data.synthetic_samples": 16,
                             "data.synthetic_classes": 3, "data.dtype": "float32", "data.batch_size": 8,
                             "data.resolution": 32, "data.val_resolution": 40, "data.workers": 1,
                             "optim.warmup_epochs": 0, "optim.ema_decay": 0.5, "run.epochs": 1,
                             "run.tensorboard": False, "run.device": "cpu", "run.out": str(tmp_path / "run")})
    train(cfg)
    ckpt = tmp_path / "run" / "checkpoints" / "best.pt"
    state = torch.load(ckpt, weights_only=True)
    r = CliRunner().invoke(export_main, ["--checkpoint", str(ckpt), "--out", str(tmp_path / "exp")])
    assert r.exit_code == 0, r.output
    assert "model.onnx" in r.output and "40px" in r.output
    bundle = torch.load(tmp_path / "exp" / "model.pt", weights_only=True)
    assert bundle["classes"] == state["classes"] and bundle["resolution"] == 40
    assert state["model_kwargs"] == bundle["model_kwargs"] == narrow and bundle["arch"] == "timm:resnet18"
    ema = {k.removeprefix("module."): v for k, v in state["ema"].items() if k != "n_averaged"}
    assert not torch.equal(ema["conv1.weight"], state["model"]["conv1.weight"])  # so the check below means something
    assert torch.equal(bundle["model"]["conv1.weight"], ema["conv1.weight"])

    r = CliRunner().invoke(export_main, ["--checkpoint", str(ckpt), "--out", str(tmp_path / "exp"), "--no-ema",
                                         "--no-onnx"])
    assert r.exit_code == 0, r.output
    raw = torch.load(tmp_path / "exp" / "model.pt", weights_only=True)
    assert torch.equal(raw["model"]["conv1.weight"], state["model"]["conv1.weight"])
    assert not (tmp_path / "exp" / "model.onnx").exists()  # the EMA graph would no longer match model.pt

    pred = Predictor.load(ckpt, "cpu")
    assert pred.classes == state["classes"] and pred.transform(Image.new("RGB", (80, 60))).shape == (3, 40, 40)
    assert Predictor.load(tmp_path / "exp" / "model.pt", "cpu").model.layer1[0].conv1.out_channels == 16  # rebuilt


def test_export_and_predict_name_a_file_they_cannot_load(tmp_path):
    from click.testing import CliRunner

    from imt.train.export import main as export_main
    from imt.train.predict import main as predict_main

    bad = tmp_path / "best.pt"
    bad.write_bytes(b"PK\x03\x04 cut short")
    r = CliRunner().invoke(export_main, ["--checkpoint", str(bad), "--out", str(tmp_path / "exp")])
    assert r.exit_code == 1 and "cannot load" in r.output and str(bad) in r.output and r.exception.__class__ is SystemExit
    img = tmp_path / "a.jpg"
    Image.new("RGB", (40, 40)).save(img)
    r = CliRunner().invoke(predict_main, ["--model", str(bad), str(img)])
    assert r.exit_code == 1 and "cannot load --model" in r.output and r.exception.__class__ is SystemExit
