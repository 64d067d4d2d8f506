"""Classify image files with an exported model: top-k classes with probabilities.

    imt-predict --model exported/x photos/ cat.jpg --topk 5 [--device cuda] [--json]

`--model` is an export folder (imt-export) or a checkpoint. Folders are searched recursively for
images. A file that cannot be read or decoded gets a clear error on stderr and the rest are still
classified; the exit status is 1 when any file failed, so scripts notice.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import click
import torch
from PIL import Image
from torchvision.transforms import v2 as T

from imt.train.checkpoint import describe
from imt.train.cli import CONTEXT

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"}


@dataclass
class Predictor:
    model: torch.nn.Module
    classes: list[str]
    transform: T.Compose
    device: torch.device

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu") -> "Predictor":
        path = Path(path)
        dev = torch.device(device)
        graph = path / "model.pt2"
        if graph.is_file():  # an export folder with its graph: no model code needed
            from imt.train.state import Checkpoint
            raw = torch.load(path / "model.pt", map_location="cpu", weights_only=True)
            bundle = Checkpoint.from_dict(raw, path / "model.pt").meta()
            model = torch.export.load(graph).module()
        else:  # a checkpoint, or an export folder's model.pt: rebuilt with this project's model code
            from imt.train.export import load_checkpoint_model
            model, bundle = load_checkpoint_model(path / "model.pt" if path.is_dir() else path)
        res = int(bundle.get("resolution") or 224)
        ratio = float(bundle.get("resize_ratio") or 0.875)
        mean = bundle.get("mean") or [0.485, 0.456, 0.406]
        std = bundle.get("std") or [0.229, 0.224, 0.225]
        transform = T.Compose([T.ToImage(), T.Resize(int(res / ratio), antialias=True), T.CenterCrop(res),
                               T.ToDtype(torch.float32, scale=True), T.Normalize(mean, std)])
        return cls(model.to(dev), list(bundle["classes"]), transform, dev)

    def load_image(self, path: Path) -> torch.Tensor:
        with Image.open(path) as im:
            im.load()  # decode now, so a truncated file fails here with its own name
            return self.transform(im.convert("RGB"))

    @torch.no_grad()
    def predict(self, batch: torch.Tensor, topk: int = 5) -> list[list[tuple[str, float]]]:
        probs = self.model(batch.to(self.device)).float().softmax(dim=1)
        p, idx = probs.topk(min(topk, probs.shape[1]), dim=1)
        return [[(self.classes[i], float(q)) for q, i in zip(pr.tolist(), ix.tolist())] for pr, ix in zip(p, idx)]


def expand(paths: list[str]) -> list[Path]:
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        else:
            files.append(p)  # named explicitly: try it whatever its suffix, and report if it fails
    return files


@click.command(context_settings=CONTEXT)
@click.option("--model", "model_path", required=True, type=click.Path(exists=True),
              help="Export folder (imt-export) or checkpoint.")
@click.argument("paths", nargs=-1, required=True)
@click.option("--topk", default=5, type=click.IntRange(1))
@click.option("--device", default="cuda" if torch.cuda.is_available() else "cpu")
@click.option("--batch-size", default=32, type=click.IntRange(1))
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line instead of text.")
def main(model_path, paths, topk, device, batch_size, as_json):
    """Print the top-k classes of each image file (folders are searched recursively)."""
    try:
        predictor = Predictor.load(model_path, device)
    except Exception as exc:  # noqa: BLE001 - any load failure (missing, truncated, foreign file): one clear message
        raise click.ClickException(f"cannot load --model {model_path} ({describe(exc)}); pass an imt-export "
                                   "folder or a checkpoint of this project") from exc
    files, failed = expand(paths), 0
    if not files:
        raise click.UsageError(f"no image files found in {', '.join(paths)}")
    for start in range(0, len(files), batch_size):
        chunk, tensors = [], []
        for f in files[start:start + batch_size]:
            try:
                tensors.append(predictor.load_image(f))
                chunk.append(f)
            except Exception as exc:  # noqa: BLE001 - any unreadable file (even a decompression bomb) is reported, the rest classified
                failed += 1
                click.echo(f"error: {f}: cannot read as an image ({type(exc).__name__}: {exc})", err=True)
        if not tensors:
            continue
        for f, top in zip(chunk, predictor.predict(torch.stack(tensors), topk)):
            if as_json:
                click.echo(json.dumps({"path": str(f), "top": [{"class": c, "prob": round(p, 6)} for c, p in top]}))
            else:
                click.echo(f"{f}: " + ", ".join(f"{c} {p:.3f}" for c, p in top))
    click.echo(f"{len(files) - failed} classified, {failed} failed", err=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
