"""What the main rank shows and records: a progress bar (or plain lines when stderr is not a terminal),
`<out>/metrics.jsonl`, and TensorBoard scalars. Other ranks get no-op objects."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from tqdm import tqdm

from .loop import LogPoint


class Progress:
    """One bar per epoch on a terminal; one line per log point otherwise (CI logs, nohup, files)."""

    def __init__(self, enabled: bool, world_size: int = 1):
        self.enabled, self.world_size = enabled, world_size
        self.tty = enabled and sys.stderr.isatty()
        self.bar: tqdm | None = None
        self.done = 0
        self.epoch = 0

    def start(self, epoch: int, epochs: int, steps: int, resolution: int, skip: int = 0) -> None:
        self.epoch, self.done = epoch, skip
        if self.tty:
            self.bar = tqdm(total=steps, initial=skip, desc=f"epoch {epoch + 1}/{epochs} {resolution}px",
                            dynamic_ncols=True, leave=False)

    def log(self, p: LogPoint) -> None:
        if not self.enabled:
            return
        ips = p.images_per_sec * self.world_size
        if self.bar is not None:
            self.bar.update(p.step - self.done)
            self.bar.set_postfix(loss=f"{p.loss:.3f}", lr=f"{p.lr:.3g}", img_s=f"{ips:.0f}")
        else:
            print(f"  epoch {self.epoch + 1} step {p.step}: loss {p.loss:.4f} lr {p.lr:.4g} {ips:.0f} img/s",
                  flush=True)
        self.done = p.step

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def write(self, msg: str) -> None:
        if self.enabled:
            (self.bar.write if self.bar is not None else print)(msg)
            sys.stdout.flush()


class MetricsLog:
    """Appends one JSON object per epoch to metrics.jsonl and mirrors numbers to TensorBoard."""

    def __init__(self, out: Path, enabled: bool, tensorboard: bool, start_epoch: int = 0):
        self.enabled = enabled
        self.path = out / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        out.mkdir(parents=True, exist_ok=True)
        self._truncate(start_epoch)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(out / "tensorboard"))

    def _truncate(self, start_epoch: int) -> None:
        """On resume, drop rows of epochs that will be run again (written after the last checkpoint)."""
        if not self.path.is_file():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("epoch", 0) <= start_epoch:
                    keep.append(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash
        self.path.write_text("".join(f"{line}\n" for line in keep))

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "epoch" and v is not None:
                    self.tb.add_scalar(k, v, row["epoch"])
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


DATA_WAIT_NOTE = 0.10  # above this share of an epoch blocked on the loader, the first epoch says what to run


def data_wait_note(wait: float, first_wait: float, seconds: float, data_path: str) -> str | None:
    """One line after the first epoch when the input pipeline held the model back, or None. Judged without the
    first batch's wait, the loader's one-off start-up: on the 2-core CPUs the folder loader's worker, starting
    beside the training ranks, made epoch 1 wait for data 17-24% of the time against 2-5% in every later epoch
    and 3-4% in epoch 1 after its first batch (RESULTS.md 2026-12-03); no loader setting changes that."""
    steady = (wait - first_wait) / max(seconds - first_wait, 1e-9)
    if steady <= DATA_WAIT_NOTE:
        return None
    return (f"note: the model waited for data {100 * steady:.0f}% of this epoch after its first batch (more than "
            f"{100 * DATA_WAIT_NOTE:.0f}%: input-bound). Run `imt-tune --recipe <this recipe> --data {data_path}` to "
            "find faster loader settings for this machine, then train with `--tune <the YAML it writes>`")
