"""Checkpoints: round trip (weights_only), RNG states, tampering, truncation, pickled code, fallback to the
previous checkpoint, keep-last-K/best, and refusing a checkpoint of another model or class list."""
from __future__ import annotations

import pickle
import random
import signal
import warnings

import numpy as np
import pytest
import torch

from imt.train.checkpoint import (CheckpointDir, CheckpointError, StopFlag, check_compatible, find_resume,
                              list_checkpoints, load_checkpoint, rng_state, save_checkpoint, set_rng_state)


def _state(step=1):
    return {"model": {"w": torch.full((64, 64), float(step))}, "arch": "resnet18", "classes": ["a", "b"],
            "epoch": step, "step": step, "rng": [rng_state()], "config": {"run": {"epochs": 3}}}


def test_round_trip_is_weights_only(tmp_path):
    path = save_checkpoint(_state(3), tmp_path / "c.pt")
    assert not list(tmp_path.glob("*.tmp"))  # temporary files renamed away
    state = load_checkpoint(path)
    assert torch.equal(state["model"]["w"], torch.full((64, 64), 3.0)) and state["classes"] == ["a", "b"]
    torch.load(path, weights_only=True)  # plain torch can read it too


def test_rng_states_round_trip():
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    saved = rng_state()
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(2), np.random.seed(2), random.seed(2)
    set_rng_state(saved)
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1]) and random.random() == expected[2]


def test_flipped_byte_is_refused(tmp_path):
    path = save_checkpoint(_state(), tmp_path / "c.pt")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside the tensor payload: torch itself would load wrong values
    path.write_bytes(data)
    with pytest.raises(CheckpointError, match="corrupt: sha256"):
        load_checkpoint(path)


def test_truncated_is_refused(tmp_path):
    path = save_checkpoint(_state(), tmp_path / "c.pt")
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(path)
    (tmp_path / "c.pt.sha256").unlink()  # without the digest: torch's zip reader still refuses it
    with pytest.warns(UserWarning, match="without an integrity check"):
        with pytest.raises(CheckpointError, match="weights_only=True"):
            load_checkpoint(path)


class Payload:
    """Unpickling this would call print(): code a weights_only load must refuse to run."""

    def __reduce__(self):
        return (print, ("pwned",))


def test_pickled_code_is_refused_even_with_a_matching_digest(tmp_path, capsys):
    state = _state()
    state["extra"] = Payload()
    path = save_checkpoint(state, tmp_path / "c.pt")  # sidecar matches: the attacker rewrote both
    with pytest.raises(CheckpointError, match="pickled code"):
        load_checkpoint(path)
    assert "pwned" not in capsys.readouterr().out
    raw = tmp_path / "raw.pt"
    raw.write_bytes(pickle.dumps({"model": {}, "arch": "x"}))  # a plain pickle, not torch's zip format
    with pytest.warns(UserWarning):
        with pytest.raises(CheckpointError):
            load_checkpoint(raw)


def test_auto_resume_falls_back_past_a_corrupt_newest(tmp_path):
    ck = CheckpointDir(tmp_path, keep_last=5, is_main=True)
    for step in (4, 8, 12):
        ck.save(_state(step), epoch=step // 4, step=step)
    newest = list_checkpoints(tmp_path)[0]
    assert newest.name == "epoch0003-step00000012.pt"
    newest.write_bytes(newest.read_bytes()[:-100])
    with pytest.warns(UserWarning, match="skipping epoch0003-step00000012.pt"):
        path, state = find_resume(tmp_path)
    assert path.name == "epoch0002-step00000008.pt" and state["step"] == 8
    for p in list_checkpoints(tmp_path):
        p.write_bytes(b"garbage")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(CheckpointError, match="no usable checkpoint"):
            find_resume(tmp_path)
    assert find_resume(tmp_path / "empty") is None


def test_keep_last_and_best(tmp_path):
    ck = CheckpointDir(tmp_path, keep_last=2, is_main=True)
    for step in range(1, 6):
        ck.save(_state(step), epoch=step, step=step, best=step == 2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["epoch0005-step00000005.pt", "epoch0004-step00000004.pt"]
    assert load_checkpoint(tmp_path / "best.pt")["step"] == 2
    assert sorted(p.name for p in tmp_path.glob("*.sha256")) == sorted(
        ["best.pt.sha256", "epoch0005-step00000005.pt.sha256", "epoch0004-step00000004.pt.sha256"])
    assert CheckpointDir(tmp_path / "other", 2, is_main=False).save(_state(), 1, 1) is None


def test_incompatible_checkpoint_says_what_differs():
    state = _state()
    check_compatible(state, "resnet18", ["a", "b"])
    with pytest.raises(CheckpointError, match="holds a resnet18 but this run builds a resnet50"):
        check_compatible(state, "resnet50", ["a", "b"])
    with pytest.raises(CheckpointError, match="2 classes in the checkpoint vs 3"):
        check_compatible(state, "resnet18", ["a", "b", "c"])
    with pytest.raises(CheckpointError, match="class 1 is 'b' in the checkpoint but 'z'"):
        check_compatible(state, "resnet18", ["a", "z"])
    narrow = {**state, "arch": "timm:resnet18", "model_kwargs": {"channels": [32, 64, 128, 256]}}
    check_compatible(narrow, "timm:resnet18", ["a", "b"], kwargs={"channels": [32, 64, 128, 256]})
    with pytest.raises(CheckpointError, match=r"built with model.kwargs=\{'channels'.*asks for \{\}"):
        check_compatible(narrow, "timm:resnet18", ["a", "b"])


def test_stop_flag_handler():
    flag = StopFlag().install()
    try:
        assert not flag.requested
        signal.raise_signal(signal.SIGTERM)  # the handler only records it
        assert flag.requested and flag.signum == signal.SIGTERM
    finally:
        flag.restore()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_resume_auto_under_ddp_loads_rank0s_choice(tmp_path, monkeypatch):
    """Rank 0 picks the checkpoint and the others load that file; a rank that cannot see it (--out not
    shared between nodes) says so, and rank 0's 'nothing usable' reaches every rank instead of a hang."""
    from imt.train import dist
    from imt.train.checkpoint import save_checkpoint
    from imt.train.dist import DistInfo
    from imt.train.trainer import agree_on_resume

    rank1 = DistInfo(rank=1, world_size=2)
    ckpt = save_checkpoint({"model": {}, "arch": "resnet18", "step": 7}, tmp_path / "epoch0001-step00000007.pt")
    monkeypatch.setattr(dist, "broadcast_object", lambda obj, info, src=0: (str(ckpt), None))
    path, state = agree_on_resume(tmp_path / "elsewhere", rank1)  # its own folder is empty: rank 0's file wins
    assert path == ckpt and state["step"] == 7

    monkeypatch.setattr(dist, "broadcast_object", lambda obj, info, src=0: (str(tmp_path / "node0-only.pt"), None))
    with pytest.raises(CheckpointError, match="rank 1 cannot read .*node0-only.pt.*shares"):
        agree_on_resume(tmp_path, rank1)
    monkeypatch.setattr(dist, "broadcast_object", lambda obj, info, src=0: (None, "no usable checkpoint in x"))
    with pytest.raises(CheckpointError, match="no usable checkpoint in x"):
        agree_on_resume(tmp_path, rank1)
    monkeypatch.setattr(dist, "broadcast_object", lambda obj, info, src=0: obj)  # rank 0, one process
    assert agree_on_resume(tmp_path / "empty", DistInfo()) is None
    assert agree_on_resume(tmp_path, DistInfo())[0] == ckpt


def test_empty_checkpoint_is_skipped_by_auto_and_refused_by_name(tmp_path):
    """A 0-byte file (a save or copy that never wrote; torch.load raises an EOFError without a message):
    --resume auto falls back to the previous checkpoint, an explicit path is refused, both saying why."""
    ck = CheckpointDir(tmp_path, keep_last=5, is_main=True)
    for step in (4, 8):
        ck.save(_state(step), epoch=step // 4, step=step)
    newest = list_checkpoints(tmp_path)[0]
    newest.write_bytes(b"")
    newest.with_name(newest.name + ".sha256").unlink()  # a bare copy: no digest to catch it first
    with pytest.warns(UserWarning, match=r"skipping epoch0002-step00000008.pt: .* is empty \(0 bytes\)"):
        path, state = find_resume(tmp_path)
    assert path.name == "epoch0001-step00000004.pt" and state["step"] == 4
    with pytest.warns(UserWarning, match="without an integrity check"):
        with pytest.raises(CheckpointError, match=r"empty \(0 bytes\).*earlier checkpoint"):
            load_checkpoint(newest)


def test_empty_or_nonfinite_pretrained_is_refused(tmp_path):
    import torchvision

    from imt.train.transfer import PretrainedError, load_pretrained

    zero = tmp_path / "zero.pt"
    zero.write_bytes(b"")
    with pytest.raises(PretrainedError, match=r"empty \(0 bytes\)"):
        load_pretrained(torchvision.models.resnet18(num_classes=2), zero, "resnet18")
    weights = torchvision.models.resnet18(num_classes=2).state_dict()
    weights["layer2.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    torch.save(weights, tmp_path / "nan.pth")
    with pytest.raises(PretrainedError, match=r"NaN/inf values in 1 tensor\(s\) \(layer2.0.conv1.weight\)"):
        load_pretrained(torchvision.models.resnet18(num_classes=2), tmp_path / "nan.pth", "resnet18")


def test_nonfinite_checkpoint_is_refused_and_auto_falls_back(tmp_path):
    ck = CheckpointDir(tmp_path, keep_last=5, is_main=True)
    ck.save(_state(4), epoch=1, step=4)
    bad = _state(8)
    bad["model"]["w"][3, 5] = float("inf")
    ck.save(bad, epoch=2, step=8)  # sidecar matches: the values themselves are broken
    with pytest.raises(CheckpointError, match=r"NaN/inf values in 1 tensor\(s\) \(model.w\)"):
        load_checkpoint(tmp_path / "epoch0002-step00000008.pt")
    with pytest.warns(UserWarning, match="skipping epoch0002-step00000008.pt"):
        assert find_resume(tmp_path)[1]["step"] == 4


def test_disk_full_while_saving_keeps_the_previous_and_removes_the_partial(tmp_path, monkeypatch):
    """The disk fills part-way through torch.save (it then raises 'unexpected pos ...' with the OSError only
    as its context): the error says where and how much, no .tmp is left, the previous checkpoint stays."""
    import errno
    import io

    from imt.train import checkpoint

    ck = CheckpointDir(tmp_path, keep_last=1, is_main=True)
    ck.save(_state(4), epoch=1, step=4, best=True)

    class FullDisk(io.FileIO):
        def write(self, data):
            if self.tell() + len(data) > 4096:
                raise OSError(errno.ENOSPC, "No space left on device")
            return super().write(data)

    monkeypatch.setattr(checkpoint, "open", lambda p, mode="r": FullDisk(p, mode) if "w" in mode else open(p, mode),
                        raising=False)
    big = _state(8)
    big["model"]["w"] = torch.zeros(512, 1024)  # 2 MB
    with pytest.raises(CheckpointError, match=rf"no space left on {tmp_path}: 2 MB needed .* MB free"):
        ck.save(big, epoch=2, step=8, best=True)
    assert not list(tmp_path.glob("*.tmp"))
    assert [p.name for p in list_checkpoints(tmp_path)] == ["epoch0001-step00000004.pt"]
    assert load_checkpoint(tmp_path / "epoch0001-step00000004.pt")["step"] == 4
    assert load_checkpoint(tmp_path / "best.pt")["step"] == 4
