"""Export a trained or fine-tuned model for inference, with its class names.

    imt-export --checkpoint runs/x/checkpoints/best.pt --out exported/x

writes into `--out`:
- `model.pt`: {"model": state dict, "arch", "classes", "resolution", "resize_ratio", "mean", "std"}, loadable
  with `torch.load(weights_only=True)` and as `--pretrained` for a later fine-tuning run;
- `model.pt2`: the graph from `torch.export` (batch size dynamic), which runs without this project's code:
  `torch.export.load("model.pt2").module()(images)`; images are float32 NCHW, normalised with mean/std.
- `classes.json`: the class names in output order.
EMA weights are exported when the checkpoint has them (they are what evaluation reported).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # `python train/export.py`: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import click
import torch
from torch import nn

from pipeline.common import MEAN, STD
from train.transfer import PretrainedError, read_state


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def export_model(model: nn.Module, arch: str, classes: list[str], out: str | Path, resolution: int = 224,
                 resize_ratio: float = 0.875) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = model.float().eval().to("cpu", memory_format=torch.contiguous_format)
    bundle = {"model": model.state_dict(), "arch": arch, "classes": list(classes), "resolution": resolution,
              "resize_ratio": resize_ratio, "mean": list(MEAN), "std": list(STD)}
    _atomic_write(out / "model.pt", lambda p: torch.save(bundle, p))
    example = torch.randn(2, 3, resolution, resolution)
    batch = torch.export.Dim("batch", min=1, max=4096)
    with torch.no_grad():
        program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    _atomic_write(out / "model.pt2", lambda p: torch.export.save(program, p))
    _atomic_write(out / "classes.json", lambda p: p.write_text(json.dumps(list(classes), indent=1)))
    return out


def load_checkpoint_model(path: str | Path, use_ema: bool = True) -> tuple[nn.Module, dict]:
    """Rebuild the model of a checkpoint or export bundle (weights_only) and return it with its metadata."""
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(obj, dict) or "arch" not in obj or "classes" not in obj:
        raise PretrainedError(f"{path} is not a checkpoint of this project (no arch/classes inside)")
    from train.model import build_model  # lazy: exporting a live model needs no model registry

    state, meta = read_state(path)
    if use_ema and isinstance(obj.get("ema"), dict) and obj["ema"]:
        state = {k.removeprefix("module."): v for k, v in obj["ema"].items() if k != "n_averaged"}
    model = build_model(obj["arch"], len(obj["classes"]))
    model.load_state_dict(state)
    meta = dict(meta, resolution=obj.get("resolution"), resize_ratio=obj.get("resize_ratio"))
    return model.eval(), meta


@click.command(context_settings={"show_default": True})
@click.option("--checkpoint", required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False))
@click.option("--resolution", type=int, default=None, help="Input size; default: the run's validation size.")
@click.option("--ema/--no-ema", default=True, help="Export the EMA weights when the checkpoint has them.")
def main(checkpoint, out, resolution, ema):
    """Export a checkpoint as model.pt (weights + classes) and model.pt2 (torch.export graph)."""
    model, meta = load_checkpoint_model(checkpoint, use_ema=ema)
    obj = torch.load(checkpoint, map_location="cpu", weights_only=True)
    cfg = obj.get("config") or {}
    res = resolution or meta.get("resolution") or cfg.get("data", {}).get("val_resolution") or 224
    ratio = meta.get("resize_ratio") or cfg.get("data", {}).get("val_resize_ratio") or 0.875
    path = export_model(model, meta["arch"], list(meta["classes"]), out, int(res), float(ratio))
    click.echo(f"exported {meta['arch']} ({len(meta['classes'])} classes, {res}px) to {path}")


if __name__ == "__main__":
    main()
