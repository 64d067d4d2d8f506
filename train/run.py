"""Train a torchvision classifier on shards (or a folder, or synthetic tensors): the CLI and its wiring.

One process:
    python train/run.py --recipe synthetic_quick --data work/shards --out runs/quick
    python -m imt.train.run --recipe resnet50_fast --data /data/imagenet-shards --out runs/r50
    imt-train --recipe resnet18_16ep --data ... --set optim.lr=0.6 --set run.tta_flip=true

One node, 8 GPUs:
    torchrun --nproc_per_node 8 -m imt.train.run --recipe resnet50_imagenet --data /data/shards --out runs/r50

Two nodes, 8 GPUs each (run the same command on both; `host` is a node every node can reach, e.g. node 0;
--out must be on a shared file system for --resume auto, and only global rank 0 writes to it):
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint host:29500 \\
        --rdzv_id r50-run1 -m imt.train.run --recipe resnet50_imagenet --data /data/shards --out /shared/runs/r50

--batch-size is per GPU; the learning rate scales with the global batch (optim.lr is per 256 images).
SIGTERM/SIGINT (preemption) saves a checkpoint at the next step boundary (under torchrun the ranks agree
at every step, over a gloo group: set GLOO_SOCKET_IFNAME where nodes have several network interfaces) and
exits with 143/130; `--resume auto` continues from it.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script (`python train/run.py`): import from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import click

from imt.pipeline import LOADERS
from imt.train.checkpoint import CheckpointError
from imt.train.cli import CONTEXT, recipe_default
from imt.train.config import ConfigError, load_config, parse_override
from imt.train.loop import NonFiniteLoss
from imt.train.trainer import seed_everything, train  # noqa: F401 - the API scripts and benchmarks import from here


def print_summary(summary: dict) -> None:
    if "stopped" in summary or summary["rank"] != 0:
        return
    best, final = summary["best"], summary["final"] or {}
    lines = [f"done: {summary['arch']}, {summary['epochs']} epochs, {summary['wall_time'] / 60:.1f} min, "
             f"{summary['world_size']} rank(s)"]
    if final:
        lines.append(f"  final  val top-1 {final['val_top1']:.2f}%  top-5 {final['val_top5']:.2f}%  "
                     f"({final['val_count']} images)")
        lines.append(f"  best   val top-1 {best['val_top1']:.2f}%  (epoch {best['epoch']})")
    if summary["images_per_sec"]:
        lines.append(f"  train throughput {summary['images_per_sec']:.0f} img/s (mean over epochs)")
    if summary["world_size"] > 1:
        lines.append(f"  ranks agree on the final weights: {summary['ranks_agree']}")
    out = Path(summary["out"])
    lines.append(f"  files: {out / 'metrics.jsonl'}, {out / 'checkpoints'}/ (best.pt), {out / 'report'}/ "
                 f"(per-class P/R/F1, confusion), {out / 'config.json'}, {out / 'tensorboard'}/")
    click.echo("\n".join(lines))


@click.command(context_settings=CONTEXT)
@click.option("--recipe", help="YAML recipe: a path or a name in recipes/ (e.g. resnet50_fast).")
@click.option("--data", "data_path", show_default=recipe_default('data.path'),
              help="Shard folder from imt-make-shards (train and val splits); for "
              "--loader folder an ImageFolder root with train/ and val/.")
@click.option("--arch", show_default=recipe_default('model.arch'),
              help="torchvision model name (resnet18/34/50/101/152, vgg16_bn, densenet121, ...) or timm:<name> "
              "(timm.list_models()); constructor arguments: --set 'model.kwargs={...}'.")
@click.option("--epochs", show_default=recipe_default('run.epochs'), type=int)
@click.option("--batch-size", show_default=recipe_default('data.batch_size'),
              type=int, help="Per rank (GPU); the lr scales with the global batch.")
@click.option("--lr", show_default=recipe_default('optim.lr'),
              type=float, help="Peak learning rate per 256 images of global batch.")
@click.option("--resolution", show_default=recipe_default('data.resolution'),
              type=int, help="Final training resolution (end of any progressive ramp) and "
              "validation crop, in pixels.")
@click.option("--loader", show_default=recipe_default('data.loader'), type=click.Choice(LOADERS))
@click.option("--out", show_default=recipe_default('run.out'),
              help="Run directory (config.json, metrics.jsonl, checkpoints/, report/, tensorboard/).")
@click.option("--resume", show_default=recipe_default('run.resume'),
              help="'auto' (newest valid checkpoint in --out) or a checkpoint path.")
@click.option("--precision", show_default=recipe_default('precision.dtype'),
              type=click.Choice(["auto", "bfloat16", "float16", "float32"]))
@click.option("--workers", show_default=recipe_default('data.workers'),
              type=int, help="Loader threads/processes per rank.")
@click.option("--compile/--no-compile", "compile_", show_default=recipe_default('model.compile'),
              default=None, help="torch.compile the model.")
@click.option("--seed", show_default=recipe_default('run.seed'), type=int)
@click.option("--device", show_default=recipe_default('run.device'), type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--pretrained", show_default=recipe_default('model.pretrained'),
              help="Start from these weights: one of our checkpoints, a torchvision state dict "
              "file, a timm / Lightning / torchvision-references checkpoint, or torchvision:<arch> from the torch "
              "hub cache (nothing is downloaded). The classifier is replaced when the classes differ; every key "
              "that does not fit is reported.")
@click.option("--finetune", show_default=recipe_default('model.finetune'),
              type=click.Choice(["full", "linear"]), help="With --pretrained: 'full' trains "
              "everything (backbone at optim.backbone_lr_mult x the lr), 'linear' only the new classifier.")
@click.option("--freeze-bn/--no-freeze-bn", show_default=recipe_default('model.freeze_bn'),
              default=None, help="Keep BN statistics at their pretrained values.")
@click.option("--verify", is_flag=True, default=None, help="Before training, hash every shard against manifest.json "
              "(data.verify=true; the cost is printed).")
@click.option("--tune", "tune", type=click.Path(exists=True, dir_okay=False),
              help="Loader settings written by imt-tune (a YAML overlay): applied over the recipe, under the options.")
@click.option("--threads", show_default=recipe_default('run.threads'), type=click.IntRange(0),
              help="torch threads per rank; 0 = auto: this rank's cores minus data.workers, at least 1 (torch's own "
              "default spins against the loader on busy CPUs).")
@click.option("--set", "sets", multiple=True, metavar="SECTION.KEY=VALUE",
              help="Override any config key, e.g. --set optim.ema_decay=0.9999 --set run.tta_flip=true.")
def main(recipe, data_path, arch, epochs, batch_size, lr, resolution, loader, out, resume, precision, workers,
         compile_, seed, device, pretrained, finetune, freeze_bn, verify, tune, threads, sets):
    """Train an image classifier; metrics, checkpoints and reports go to --out."""
    options = {"data.path": data_path, "model.arch": arch, "run.epochs": epochs, "data.batch_size": batch_size,
               "optim.lr": lr, "data.resolution": resolution, "data.val_resolution": resolution,
               "run.end_res": resolution,  # a progressive-resizing ramp ends at the final size
               "data.loader": loader, "run.out": out, "run.resume": resume, "precision.dtype": precision,
               "data.workers": workers, "model.compile": compile_, "run.seed": seed, "data.seed": seed,
               "run.device": device, "model.pretrained": pretrained, "model.finetune": finetune,
               "model.freeze_bn": freeze_bn, "data.verify": verify, "run.threads": threads}
    overrides = {k: v for k, v in options.items() if v is not None}
    try:
        overrides.update(parse_override(s) for s in sets)  # --set wins over the named options
        cfg = load_config(recipe, overrides, overlays=(tune,) if tune else ())
        summary = train(cfg)
    except (ConfigError, CheckpointError, NonFiniteLoss) as exc:
        raise click.ClickException(f"{type(exc).__name__}: {exc}") from None
    except Exception as exc:
        if type(exc).__name__ in ("ManifestError", "PretrainedError"):  # the message says what to do
            raise click.ClickException(f"{type(exc).__name__}: {exc}") from None
        raise
    print_summary(summary)
    if "stopped" in summary:
        sys.exit(128 + int(summary["stopped"]))


if __name__ == "__main__":
    main()
