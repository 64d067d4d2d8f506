"""Export a trained or fine-tuned model for inference, with its class names.

    imt-export --checkpoint runs/x/checkpoints/best.pt --out exported/x

writes into `--out`:
- `model.pt`: {"model": state dict, "arch", "model_kwargs", "classes", "resolution", "resize_ratio", "mean", "std"}, loadable
  with `torch.load(weights_only=True)` and as `--pretrained` for a later fine-tuning run;
- `model.onnx`: the ONNX graph (input "images", output "logits", batch size dynamic) for serving without
  torch: onnxruntime, TensorRT, Triton. `onnxruntime.InferenceSession("model.onnx").run(None, {"images": x})`.
- `model.pt2`: the graph from `torch.export` (batch size dynamic), which runs with torch but without this
  project's code: `torch.export.load("model.pt2").module()(images)`; imt-predict uses it.
- `classes.json`: the class names in output order.
Images are float32 NCHW RGB in [0, 1], normalised with the bundle's mean/std, resized so the short side is
resolution / resize_ratio and centre-cropped to resolution (what validation did).
EMA weights are exported when the checkpoint has them (they are what evaluation reported).
Not TorchScript: torch 2.14 deprecates torch.jit (FutureWarning on trace and load) in favour of torch.export.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import click
import torch
from torch import nn

from imt.pipeline.common import MEAN, STD
from imt.train.cli import CONTEXT
from imt.train.state import Checkpoint
from imt.train.transfer import PretrainedError, read_state


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f"{path.stem}.partial{path.suffix}")  # same suffix: torch.export.save warns otherwise
    write(tmp)
    os.replace(tmp, path)


class ExportError(RuntimeError):
    """A graph format could not be written; the message names the files that were."""


def export_onnx(model: nn.Module, example: torch.Tensor, batch: torch.export.Dim, path: Path) -> None:
    try:
        import onnxscript  # noqa: F401 - torch.onnx's exporter needs it; say so before tracing
    except ImportError as exc:
        raise ExportError(f"writing {path.name} needs onnx and onnxscript: pip install onnx onnxscript "
                          "(or export with --no-onnx)") from exc
    try:
        with torch.no_grad():
            program = torch.onnx.export(model, (example,), dynamo=True, dynamic_shapes=({0: batch},),
                                        input_names=["images"], output_names=["logits"], verbose=False)
    except Exception as exc:  # noqa: BLE001 - an operator the ONNX exporter lacks, for instance
        raise ExportError(f"ONNX export failed ({type(exc).__name__}: {exc}); model.pt, model.pt2 and "
                          f"classes.json in {path.parent} are written and usable. Retry with --no-onnx to skip "
                          "ONNX.") from exc
    _atomic_write(path, lambda p: program.save(str(p)))


def export_model(model: nn.Module, arch: str, classes: list[str], out: str | Path, resolution: int = 224,
                 resize_ratio: float = 0.875, onnx: bool = True, model_kwargs: dict | None = None) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = model.float().eval().to("cpu", memory_format=torch.contiguous_format)
    bundle = Checkpoint(model=model.state_dict(), arch=arch, model_kwargs=dict(model_kwargs or {}),
                        classes=list(classes), resolution=resolution,
                        resize_ratio=resize_ratio, mean=list(MEAN), std=list(STD)).bundle()
    _atomic_write(out / "model.pt", lambda p: torch.save(bundle, p))
    example = torch.randn(2, 3, resolution, resolution)
    batch = torch.export.Dim("batch", min=1, max=4096)
    with torch.no_grad():
        program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    _atomic_write(out / "model.pt2", lambda p: torch.export.save(program, p))
    _atomic_write(out / "classes.json", lambda p: p.write_text(json.dumps(list(classes), indent=1)))
    if onnx:  # last: if it fails, model.pt, model.pt2 and classes.json are already there and usable
        export_onnx(model, example, batch, out / "model.onnx")
    else:  # an older export's graph in the same folder would no longer match model.pt
        (out / "model.onnx").unlink(missing_ok=True)
    return out


def load_checkpoint_model(path: str | Path, use_ema: bool = True) -> tuple[nn.Module, dict]:
    """Rebuild the model of a checkpoint or export bundle (read once, weights_only, sha256-checked) and return
    it with its metadata (arch, classes, and resolution, resize_ratio, config, mean, std where saved)."""
    from imt.train.model import build_model  # lazy: exporting a live model needs no model registry

    state, meta = read_state(path, ema=use_ema)
    if "arch" not in meta or "classes" not in meta:
        raise PretrainedError(f"{path} is not a checkpoint of this project (no arch/classes inside)")
    model = build_model(meta["arch"], len(meta["classes"]), kwargs=meta.get("model_kwargs"))
    model.load_state_dict(state)
    return model.eval(), meta


@click.command(context_settings=CONTEXT)
@click.option("--checkpoint", required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False))
@click.option("--resolution", type=int, default=None, help="Input size; default: the run's validation size.")
@click.option("--ema/--no-ema", default=True, help="Export the EMA weights when the checkpoint has them.")
@click.option("--onnx/--no-onnx", default=True, help="Also write model.onnx.")
def main(checkpoint, out, resolution, ema, onnx):
    """Export a checkpoint as model.pt (weights + classes), model.onnx and model.pt2 (graphs)."""
    try:
        model, meta = load_checkpoint_model(checkpoint, use_ema=ema)
    except PretrainedError as exc:
        raise click.ClickException(str(exc)) from exc
    cfg = meta.get("config") or {}
    res = resolution or meta.get("resolution") or cfg.get("data", {}).get("val_resolution") or 224
    ratio = meta.get("resize_ratio") or cfg.get("data", {}).get("val_resize_ratio") or 0.875
    try:
        path = export_model(model, meta["arch"], list(meta["classes"]), out, int(res), float(ratio), onnx,
                            meta.get("model_kwargs"))
    except ExportError as exc:
        raise click.ClickException(str(exc)) from exc
    files = ", ".join(p.name for p in sorted(path.iterdir()) if ".partial." not in p.name)
    click.echo(f"exported {meta['arch']} ({len(meta['classes'])} classes, {res}px) to {path}: {files}")


if __name__ == "__main__":
    main()
