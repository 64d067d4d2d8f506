"""Checkpoints: atomic, verifiable, loadable without unpickling code, and found again after a crash.

Layout in `<out>/checkpoints/`:
    epoch0003-step00001500.pt   (+ .sha256)   periodic: end of each epoch, or on SIGTERM/SIGINT mid-epoch
                                              (epochs numbered from 1, as on screen: epoch 3 done, or in progress)
    best.pt                     (+ .sha256)   the one with the best validation top-1 so far

Writing: torch.save to `<name>.tmp`, fsync, sha256 of the bytes into `<name>.sha256`, then os.replace, so a
reader sees either nothing or a complete file. torch's zip reader does not notice flipped bytes inside a
tensor (checked: one flipped byte in a 4 MB tensor loads silently with wrong values), hence the digest.

Reading: `torch.load(weights_only=True)`: only tensors and plain containers, never code. Everything is
stored in that form, including the RNG states (numpy's and Python's as integer tensors/lists).
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import random
import re
import shutil
import signal
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

PATTERN = re.compile(r"^epoch(\d{4})-step(\d{8})\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file and says why."""


# ---------------------------------------------------------------------------------------------- files
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _is_disk_full(exc: BaseException | None) -> bool:
    """ENOSPC/EDQUOT anywhere in the chain: torch.save into a file object reports a full disk as
    RuntimeError('... unexpected pos 704 vs 598') whose __context__ is the OSError (checked, torch 2.14)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


@contextlib.contextmanager
def _partial_files_removed(tmps: list[Path], needed: int, what: str):
    """On any failure remove the partial `tmps` (a killed save leaves none behind either: CheckpointDir
    removes *.tmp at start); a full disk becomes a CheckpointError saying how much room is needed."""
    try:
        yield
    except BaseException as exc:
        for tmp in tmps:
            tmp.unlink(missing_ok=True)
        if not _is_disk_full(exc):
            raise
        directory = tmps[0].parent
        free = shutil.disk_usage(directory).free
        raise CheckpointError(
            f"no space left on {directory}: {needed / 2**20:.0f} MB needed to save {what}, {free / 2**20:.0f} MB "
            "free. The partial file was removed and the checkpoints already there are kept. Free space there "
            "(or lower run.keep_last, or use another --out), then continue with --resume auto") from exc


def _tensors(obj: Any, prefix: str = ""):
    """(name, tensor) for every tensor in nested dicts/lists/tuples."""
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, (dict, list, tuple)):
        for k, v in (obj.items() if isinstance(obj, dict) else enumerate(obj)):
            yield from _tensors(v, f"{prefix}.{k}" if prefix else str(k))


def save_checkpoint(state: dict, path: str | Path) -> Path:
    """Atomically write `state` and its sha256 sidecar (the sidecar lands first; the .pt appears last)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    needed = sum(t.numel() * t.element_size() for _, t in _tensors(state))
    with _partial_files_removed([tmp, path.with_name(path.name + ".sha256.tmp")], needed, path.name):
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        digest = _sha256(tmp)
        _write_atomic(path.with_name(path.name + ".sha256"),
                      lambda f: f.write(f"{digest}  {path.name}\n".encode()))
        os.replace(tmp, path)
    _fsync_dir(path.parent)
    return path


def verify_sidecar(path: Path) -> bool:
    """Check `path` against its `.sha256` sidecar: CheckpointError on a mismatch, False when there is none."""
    sidecar = path.with_name(path.name + ".sha256")
    if not sidecar.is_file():
        return False
    text = sidecar.read_text().split()
    expected, actual = (text[0] if text else ""), _sha256(path)
    if actual != expected:
        raise CheckpointError(f"checkpoint {path} is corrupt: sha256 {actual[:16]}... does not match "
                              f"{sidecar.name} ({expected[:16]}...); it was modified or truncated after saving")
    return True


def describe(exc: BaseException) -> str:
    """`Type: first line of the message` for an error message; some exceptions have no message at all
    (torch.load of a 0-byte file raises a bare EOFError)."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:300]}" if lines else type(exc).__name__


def read_tensors(path: Path, map_location: Any = "cpu") -> Any:
    """torch.load(weights_only=True) of a file that exists; CheckpointError naming the file otherwise. The one
    place that reads a checkpoint or weights file (resume, --pretrained, export and predict all come here)."""
    if path.stat().st_size == 0:  # a save or copy that never wrote a byte (disk full, killed cp)
        raise CheckpointError(f"{path} is empty (0 bytes): a save or copy that did not finish. Use an earlier "
                              "checkpoint (--resume auto picks the newest usable one)")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated zip, tampered pickle, pickled code (UnpicklingError)
        raise CheckpointError(f"cannot load {path} with weights_only=True ({describe(exc)}); it is corrupt, "
                              "truncated, or holds pickled code. Use an earlier checkpoint.") from exc


def nonfinite_tensors(obj: Any) -> list[str]:
    """Names of the floating-point tensors in `obj` (nested dicts/lists) that hold NaN or inf."""
    return [name for name, t in _tensors(obj) if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def refuse_nonfinite(obj: Any, path: Path) -> None:
    """CheckpointError when weights or optimizer state hold NaN/inf: training from them only spreads it."""
    bad = nonfinite_tensors(obj)
    if bad:
        raise CheckpointError(f"{path} holds NaN/inf values in {len(bad)} tensor(s) ({', '.join(bad[:3])}"
                              f"{', ...' if len(bad) > 3 else ''}): the training that wrote it had diverged. "
                              "Use an earlier checkpoint")


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict:
    """Verify (sha256 sidecar when present) and load with weights_only=True; CheckpointError otherwise,
    also for an empty file and for weights holding NaN/inf."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not verify_sidecar(path):
        warnings.warn(f"{path} has no {path.name}.sha256; loading it without an integrity check", stacklevel=2)
    state = read_tensors(path, map_location)
    if not isinstance(state, dict) or "model" not in state or "arch" not in state:
        raise CheckpointError(f"{path} is not a training checkpoint of this project (no model/arch inside)")
    refuse_nonfinite({k: state.get(k) for k in ("model", "ema", "optimizer")}, path)
    return state


def checkpoint_name(epoch: int, step: int) -> str:
    """`epoch`: the epoch as the screen and metrics.jsonl number it (from 1): the one just finished, or the one
    in progress for a mid-epoch save; `step`: global optimizer steps done. The state's "epoch" counts epochs
    completed, which is what a resume uses."""
    return f"epoch{epoch:04d}-step{step:08d}.pt"


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Periodic checkpoints, newest first: by epoch, then global step. Not by step alone: a resume with
    another batch or world size changes the steps per epoch, so a later epoch can have a smaller step."""
    d = Path(directory)
    if not d.is_dir():
        return []
    found = [((int(m.group(1)), int(m.group(2))), p) for p in d.iterdir() if (m := PATTERN.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def find_resume(directory: str | Path) -> tuple[Path, dict] | None:
    """The newest checkpoint in `directory` that loads; a corrupt newer one is skipped with a warning.
    None when there is none at all; CheckpointError when every one is corrupt (nothing is overwritten)."""
    candidates = list_checkpoints(directory)
    errors = []
    for path in candidates:
        try:
            return path, load_checkpoint(path)
        except CheckpointError as exc:
            warnings.warn(f"skipping {path.name}: {exc}; trying the previous checkpoint", stacklevel=2)
            errors.append(str(exc))
    if candidates:
        raise CheckpointError(f"no usable checkpoint in {directory}: " + " | ".join(errors))
    return None


def check_compatible(state: dict, arch: str, classes: list[str] | tuple[str, ...], source: str = "",
                     kwargs: dict | None = None) -> None:
    """Refuse a checkpoint whose model (arch, model.kwargs) or label set differs from this run's, saying what
    differs."""
    where = source or "checkpoint"
    if state.get("arch") != arch:
        raise CheckpointError(f"{where} holds a {state.get('arch')} but this run builds a {arch}; "
                              f"pass --arch {state.get('arch')} or start a new --out")
    theirs_kw, ours_kw = dict(state.get("model_kwargs") or {}), dict(kwargs or {})
    if theirs_kw != ours_kw:
        raise CheckpointError(f"{where} holds a {arch} built with model.kwargs={theirs_kw} but this run asks for "
                              f"{ours_kw}; pass --set 'model.kwargs={theirs_kw}' or start a new --out")
    theirs, ours = list(state.get("classes", [])), list(classes)
    if theirs != ours:
        if len(theirs) != len(ours):
            what = f"{len(theirs)} classes in the checkpoint vs {len(ours)} in the data"
        else:
            i = next(i for i, (a, b) in enumerate(zip(theirs, ours)) if a != b)
            what = f"class {i} is {theirs[i]!r} in the checkpoint but {ours[i]!r} in the data"
        extra = sorted(set(theirs) ^ set(ours))[:5]
        raise CheckpointError(f"{where} was trained on other classes: {what}"
                              + (f" (e.g. only in one of them: {', '.join(extra)})" if extra else "")
                              + "; use the same --data, or fine-tune from it with --pretrained <checkpoint>")


class CheckpointDir:
    """Periodic checkpoints with keep-last-K, plus best.pt. Only the main rank writes."""

    def __init__(self, directory: str | Path, keep_last: int, is_main: bool):
        self.dir, self.keep_last, self.is_main = Path(directory), keep_last, is_main
        if is_main:
            self.dir.mkdir(parents=True, exist_ok=True)
            for stale in self.dir.glob("*.tmp"):  # a save interrupted by a crash
                stale.unlink()

    def save(self, state: dict, epoch: int, step: int, best: bool = False) -> Path | None:
        if not self.is_main:
            return None
        path = save_checkpoint(state, self.dir / checkpoint_name(epoch, step))
        if best:
            self._copy(path, self.dir / "best.pt")
        for old in list_checkpoints(self.dir)[self.keep_last:]:
            if old == path:  # never the one just written
                continue
            old.unlink(missing_ok=True)
            old.with_name(old.name + ".sha256").unlink(missing_ok=True)
        return path

    @staticmethod
    def _copy(src: Path, dst: Path) -> None:
        """best.pt: a hard link where the file system allows (no second write), else a copy; atomic."""
        tmp, sidecar_tmp = dst.with_name(dst.name + ".tmp"), dst.with_name(dst.name + ".sha256.tmp")
        tmp.unlink(missing_ok=True)
        with _partial_files_removed([tmp, sidecar_tmp], src.stat().st_size, f"{dst.name} (a copy of {src.name})"):
            try:
                os.link(src, tmp)
            except OSError:
                shutil.copyfile(src, tmp)
            shutil.copyfile(src.with_name(src.name + ".sha256"), sidecar_tmp)
            os.replace(sidecar_tmp, dst.with_name(dst.name + ".sha256"))
            os.replace(tmp, dst)


# ------------------------------------------------------------------------------------------ RNG states
def rng_state() -> dict:
    """This process's RNG states as tensors and plain lists (weights_only-loadable)."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": py_version, "internal": torch.tensor(py_internal, dtype=torch.int64),
                   "gauss_next": py_gauss},
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"].cpu())
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(x) for x in p["internal"].tolist()), p["gauss_next"]))


# ------------------------------------------------------------------------------------------ preemption
class StopFlag:
    """Set by SIGTERM/SIGINT; the loop looks at it between steps, then the run saves and exits. A second
    SIGINT gets the default behaviour back (Ctrl-C twice kills at once)."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def request(self, signum: int = signal.SIGTERM) -> None:
        self.signum = signum

    def _handler(self, signum, frame) -> None:
        self.request(signum)
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, self._previous.get(signal.SIGINT, signal.default_int_handler))

    def install(self) -> "StopFlag":
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
