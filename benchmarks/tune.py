"""imt-tune: the fastest loader settings for this machine, data and model, and where the time goes.

    imt-tune --recipe resnet50_fast --data /data/imagenet-shards --budget-s 300 --out work/tune
    imt-train --recipe resnet50_fast --data /data/imagenet-shards --tune work/tune/tune.yaml ...
    python -m imt.benchmarks.tune --arch resnet18 --resolution 112 --batch-size 64     # replicated real JPEGs

1. Diagnose, from three figures measured interleaved (benchmarks.run's machinery: pipeline.build_loader,
   train.loop.train_step): the ceiling (the training step fed synthetic tensors on the device), the loader
   alone, and end to end with the host's data-wait share; for CPU-decoding loaders also the decode-only limit
   (benchmarks.limit). The run is
   - model-bound when end to end reaches DIAG_NEAR of the ceiling: loader settings cannot help;
   - input-bound when the loader alone cannot deliver DIAG_NEAR of the ceiling (decode-bound when it already
     runs near the decode-only limit, else augmentation / copies: see benchmarks.stages);
   - host-bound when each alone is fast enough but together they are not (they compete for the host's cores).
   One paragraph says which, with the figures and what to change.
2. Search within --budget-s: a coordinate search over the loader (DALI on the GPU's decoders, DALI decoding
   on CPU threads and augmenting on the GPU, DALI all on the CPU, the DataLoader), workers (threads/processes), prefetch depth, on a GPU the hardware decoder's share, and
   with --batch-sizes the batch size. Each value of one setting is timed (end to end, or pipeline only with
   --objective pipeline) with the others at their best so far; then the candidates within CLOSE of the best
   (or whose windows overlap its windows) are re-timed in interleaved rounds until the best one's slowest window beats every other's fastest (the
   ranking is then "clear") or the budget ends ("not sure", with the overlap). A shared machine is noisy, so
   every figure keeps its windows: median and min-max.
3. Write <out>/tune.yaml (the overlay imt-train --tune applies), tune.json (every figure, the diagnosis, the
   environment) and tune.png (what was tried), after re-timing the recipe's settings against the tuned ones in
   interleaved rounds of one run, with the ratio.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import click
import torch
import yaml

from imt.benchmarks.common import BenchData, bench_data, bench_device, environment
from imt.benchmarks.limit import NAME as LIMIT
from imt.benchmarks.limit import DecodeOnly
from imt.benchmarks.run import CPU_DEFAULTS, GPU_DEFAULTS, Bench, Item, Step, ceiling_config, loader_config, \
    measure, say, unavailable
from imt.benchmarks.shards import DEFAULT_SRC
from imt.pipeline.config import DataConfig
from imt.pipeline.manifest import ManifestError, load_manifest
from imt.train.config import Config, ConfigError, load_config, parse_override, resolve

DIAG_NEAR = 0.9   # "reaches the ceiling": within 10% (run-to-run spread on a shared CPU is about that)
CLOSE = 0.10      # candidates within 10% of the best median (window-to-window noise on a shared CPU), or whose
                  # windows overlap the best's, are re-timed until their order is clear
SETTINGS = ("loader", "workers", "prefetch", "hw_decoder_load", "batch_size")


# ---- diagnosis ---------------------------------------------------------------------------------------

def classify(ceiling: dict, alone: dict, e2e: dict, data_wait: float, limit: dict | None = None) -> dict:
    """The verdict from the figures (summaries of img/s windows: median, min, max; data_wait as a share of wall
    time): kind, and one paragraph. A window is noise-prone on a shared machine, so "reaches" means any window
    of the figure reaches DIAG_NEAR of the ceiling's median, and "cannot feed" means none does."""
    c, a, e = ceiling["median"], alone["median"], e2e["median"]
    figs = (f"ceiling (synthetic input) {c:,.0f} img/s, loader alone {a:,.0f}, end to end {e:,.0f} "
            f"({100 * e / c:.0f}% of the ceiling; windows {e2e['min']:,.0f}-{e2e['max']:,.0f}), host waiting for "
            f"data {100 * data_wait:.0f}% of the time")
    if limit:
        figs += f", decode-only limit {limit['median']:,.0f} (the loader alone runs at {100 * a / limit['median']:.0f}% of it)"
    if e2e["max"] >= DIAG_NEAR * c:
        kind = "model-bound"
        what = ("The model is the limit: loader settings cannot make this faster. To go faster: torch.compile "
                "(--compile), bfloat16, a larger batch per GPU, channels-last kernels the model lacks, more GPUs.")
    elif alone["max"] < DIAG_NEAR * c:
        if limit and a >= 0.75 * limit["median"]:
            kind, stage = "input-bound", "decode"
            what = ("The loader cannot feed the model, and it already runs near the CPU's JPEG decoding limit: "
                    "decode on the GPU (data.loader=dali with a GPU: nvJPEG / hardware decoder), store smaller JPEGs "
                    "(re-shard at a lower size), train at lower resolution first (progressive resizing), or add cores.")
        else:
            kind, stage = "input-bound", "augmentation/transfer"
            what = ("The loader cannot feed the model and spends much of its time beyond decoding (crop, resize, "
                    "normalisation, copies; `python -m imt.benchmarks.stages` splits it): more workers/threads, a deeper "
                    "prefetch, DALI instead of the DataLoader, decoding on the GPU; the search below tries these.")
        return {"kind": kind, "stage": stage, "paragraph": f"Input-bound ({stage}): {figs}. {what}"}
    else:
        kind = "host-bound"
        what = ("Each part is fast enough alone but not together: the loader and the training step compete for the "
                "host (CPU cores, the Python thread, copies). Fewer loader workers or torch threads (--threads), "
                "pinned memory, DALI on the GPU to free CPU cores; the search below tries worker counts.")
    return {"kind": kind, "paragraph": f"{kind.capitalize()}: {figs}. {what}"}


# ---- candidates ----------------------------------------------------------------------------------------

DALI_KINDS = {"gpu": "dali-mixed", "cpu-decode": "dali-cpu-decode", "cpu": "dali-cpu"}  # data.dali_device -> name


def loader_kind(d: DataConfig, device: torch.device) -> str:
    """benchmarks.run's name for the loader these settings build on `device`."""
    if d.loader == "dali":
        mode = d.dali_device if d.dali_device != "auto" else ("gpu" if device.type == "cuda" else "cpu")
        return DALI_KINDS[mode]
    return d.loader


def search_space(d: DataConfig, device: torch.device, data: BenchData, batch_sizes: tuple[int, ...]) -> dict:
    """Values to try per setting (the recipe's own value always among them)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    workers = sorted({w for w in (1, 2, 4, 8, 12, 16, 24, 32) if w <= cpus} | {cpus, d.workers})
    kinds = [k for k in ("dali-mixed", "dali-cpu-decode", "dali-cpu", "torch") if not unavailable(k, device, data)]
    space = {"loader": [k for k in kinds] if loader_kind(d, device) in kinds else [loader_kind(d, device), *kinds],
             "workers": workers, "prefetch": sorted({1, 2, 3, 4, d.prefetch})}
    if "dali-mixed" in kinds:
        space["hw_decoder_load"] = sorted({0.0, 0.3, 0.65, 0.9, d.hw_decoder_load})
    if batch_sizes:
        space["batch_size"] = sorted(set(batch_sizes) | {d.batch_size})
    return space


def apply(d: DataConfig, setting: str, value, data: BenchData) -> DataConfig:
    if setting == "loader":
        return loader_config(d, value, data)
    return replace(d, **{setting: value})


def overlay(d: DataConfig, device: torch.device) -> dict:
    """The data settings the search decides, as imt-train's config keys."""
    out = {"loader": d.loader, "workers": d.workers, "prefetch": d.prefetch, "batch_size": d.batch_size}
    if d.loader == "dali":
        out["dali_device"] = {v: k for k, v in DALI_KINDS.items()}[loader_kind(d, device)]
        if loader_kind(d, device) == "dali-mixed":
            out["hw_decoder_load"] = d.hw_decoder_load
    return out


class Tuner:
    def __init__(self, cfg: Config, data: BenchData, device: torch.device, bench: Bench, objective: str,
                 deadline: float):
        self.cfg, self.data, self.device, self.bench = cfg, data, device, bench
        self.objective, self.deadline = objective, deadline
        self.num_classes = load_manifest(data.shards).num_classes
        self.steps: dict[int, Step] = {}
        self.items: dict[str, Item] = {}   # one per distinct setting, accumulating windows
        self.errors: list[str] = []

    def step(self, batch_size: int) -> Step:  # one model per batch size (the ceiling moves with it)
        if batch_size not in self.steps:
            self.steps[batch_size] = Step(self.cfg, self.device, self.num_classes, compiled=self.cfg.model.compile)
        return self.steps[batch_size]

    def item(self, d: DataConfig, *, section: str | None = None) -> Item:
        section = section or ("train" if self.objective == "train" else "pipelines")
        key = f"{section} {sorted(overlay(d, self.device).items())}"
        if key not in self.items:
            rec = {"section": section, "loader": loader_kind(d, self.device), "settings": overlay(d, self.device)}
            self.items[key] = Item(rec, d, self.step(d.batch_size) if section == "train" else None)
        return self.items[key]

    def time(self, items: list[Item], rounds: int = 1) -> list[dict]:
        """`rounds` interleaved windows of each item (one fresh loader per window)."""
        bench = replace(self.bench, repeats=rounds, interleave=True)
        return measure(items, self.device, bench, self.errors)

    def left(self) -> float:
        return self.deadline - time.monotonic()


def median(it: Item) -> float:
    return statistics.median(it.rates) if it.rates else 0.0


def ranking_clear(best: Item, others: list[Item]) -> bool:
    return all(min(best.rates) > max(o.rates) for o in others if o.rates)


def search(t: Tuner, space: dict, window_s: float, reserve_s: float) -> tuple[DataConfig, list[dict]]:
    """Coordinate search, then interleaved re-timing of close candidates. Returns the best DataConfig and a
    log of the decisions."""
    best = t.cfg.data
    log = []
    for setting in SETTINGS:
        values = space.get(setting)
        if not values or len(values) < 2:
            continue
        cands = [apply(best, setting, v, t.data) for v in values]
        if t.left() - reserve_s < window_s * len(cands):
            log.append({"setting": setting, "skipped": f"budget: {t.left():.0f} s left"})
            say(f"tune: no budget left for {setting} ({t.left():.0f} s left)")
            continue
        say(f"tune: {setting} in {values}")
        items = [t.item(c) for c in cands]
        t.time(items)
        ok = [(c, it) for c, it in zip(cands, items) if it.rates]
        if not ok:
            continue
        # Re-time the close ones, interleaved, until the order is clear or the budget ends.
        rounds = 1
        while True:
            ok.sort(key=lambda ci: -median(ci[1]))
            top = ok[0][1]
            close = [it for _, it in ok[1:]
                     if median(it) >= (1 - CLOSE) * median(top) or max(it.rates) >= min(top.rates)]
            if len(top.rates) < 2 and len(ok) > 1 and not close:
                # One window is one moment of a machine whose load drifts (the candidates were timed one after
                # another): the leader and the runner-up get at least one interleaved round more.
                close = [ok[1][1]]
            clear = not close or (len(top.rates) >= 2 and ranking_clear(top, close))
            if clear or rounds >= 5 or t.left() - reserve_s < window_s * (1 + len(close)):
                break
            t.time([top, *close])
            rounds += 1
        best = ok[0][0]
        entry = {"setting": setting, "chosen": overlay(best, t.device).get(setting, getattr(best, setting, None)),
                 "tried": [{"value": overlay(c, t.device).get(setting), "img_per_s": sorted(it.rates)} for c, it in ok],
                 "close": len(close), "ranking": "clear" if clear else "not sure (overlapping windows)"}
        if setting == "loader":
            entry["chosen"] = loader_kind(best, t.device)
            for row, (c, _) in zip(entry["tried"], ok):
                row["value"] = loader_kind(c, t.device)
        log.append(entry)
        say(f"tune: {setting} -> {entry['chosen']} ({entry['ranking']})")
    return best, log


# ---- output --------------------------------------------------------------------------------------------

def write_yaml(path: Path, d: DataConfig, device: torch.device, result: dict) -> None:
    ratio = result["default_vs_tuned"].get("ratio")
    head = [f"# imt-tune, {result['date']}: loader settings for {result['environment']['cpu']}"
            f"{' + ' + result['environment']['gpu'] if result['environment']['gpu'] else ''}"
            f" ({result['environment']['cpus_usable']} usable cores), {result['model']['arch']} at "
            f"{result['model']['resolution']} px, data {result['data']}.",
            f"# Diagnosis: {result['diagnosis']['kind']}. Tuned vs the recipe's settings, re-timed interleaved: "
            + (f"{ratio:.2f}x ({result['objective']})." if ratio else "not measured."),
            "# Apply with: imt-train --recipe <recipe> --data <shards> --tune " + str(path)]
    path.write_text("\n".join(head) + "\n" + yaml.safe_dump({"data": overlay(d, device)}, sort_keys=False))


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(f"{s['setting']}={r['value']}", r["img_per_s"]) for s in result["search"] if "tried" in s
            for r in s["tried"] if r["img_per_s"]]
    dv = result["default_vs_tuned"]
    rows += [(f"{name} (final)", dv[name]["runs"]) for name in ("default", "tuned") if dv.get(name)]
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(rows) + 1.5), dpi=100)
    meds = [statistics.median(v) for _, v in rows]
    lo = [m - min(v) for m, (_, v) in zip(meds, rows)]
    hi = [max(v) - m for m, (_, v) in zip(meds, rows)]
    ax.barh(range(len(rows)), meds, xerr=[lo, hi], capsize=3,
            color=["tab:orange" if "(final)" in n else "tab:blue" for n, _ in rows])
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([n for n, _ in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(f"images / second ({result['objective']}; median, min-max of windows)")
    ax.set_title(f"imt-tune: {result['diagnosis']['kind']}, tuned {dv.get('ratio') or 0:.2f}x the recipe", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def summary(it: Item) -> dict | None:
    if not it.rates:
        return None
    s = sorted(it.rates)
    return {"median": round(statistics.median(s), 2), "min": round(s[0], 2), "max": round(s[-1], 2),
            "runs": [round(x, 2) for x in it.rates]}


# ---- the run ---------------------------------------------------------------------------------------------

def tune(cfg: Config, data: BenchData, device: torch.device, bench: Bench, budget_s: float, objective: str,
         batch_sizes: tuple[int, ...], out: Path) -> dict:
    t0 = time.monotonic()
    t = Tuner(cfg, data, device, bench, objective, t0 + budget_s)
    d = cfg.data
    if d.loader == "synthetic":  # its labels must fit the model's classes
        d = replace(d, synthetic_classes=t.num_classes)
        t.cfg = cfg = replace(cfg, data=d)
    kind = loader_kind(d, device)
    why = unavailable(kind, device, data)
    if why:
        raise click.UsageError(f"the recipe's loader {kind} cannot run here: {why}")
    say(f"tune: diagnosing {cfg.model.arch}, batch {d.batch_size}, {d.resolution} px, {kind} loader on {device}")
    ceiling = Item({"section": "train", "loader": "synthetic"}, ceiling_config(d, t.num_classes), t.step(d.batch_size))
    alone, e2e = t.item(d, section="pipelines"), t.item(d, section="train")
    diag_items = [ceiling, alone, e2e]
    limit = None
    if kind in ("dali-cpu", "dali-cpu-decode", "torch", "folder"):  # they decode on the CPU
        limit = Item({"section": "pipelines", "loader": LIMIT}, d, build=DecodeOnly)
        diag_items.append(limit)
    t.time(diag_items)
    t.time([ceiling, alone, e2e])  # a second interleaved round (the limit's worker start is too dear to repeat)
    if not (ceiling.rates and alone.rates and e2e.rates):
        raise click.ClickException("the diagnosis could not be measured (fix the settings it names, e.g. a larger "
                                   "--resolution for this model, and run again): " + "; ".join(t.errors))
    # Seconds per window of what the search times (loader start and warm-up included).
    timed = e2e if objective == "train" else alone
    window_s = timed.seconds / max(1, len(timed.rates))
    wait = statistics.median(e2e.waits)
    diag = classify(summary(ceiling), summary(alone), summary(e2e), wait, summary(limit) if limit else None)
    diag["figures"] = {"ceiling": summary(ceiling), "loader_alone": summary(alone), "end_to_end": summary(e2e),
                       "data_wait": round(wait, 4), "decode_only": summary(limit) if limit else None}
    say("tune: " + diag["paragraph"])

    # The final default-vs-tuned comparison needs at least one interleaved round (2 windows): keep it back.
    reserve = 2 * window_s
    # The synthetic loader is the ceiling itself: nothing to search.
    space = search_space(d, device, data, batch_sizes) if kind != "synthetic" else {}
    best, log = search(t, space, window_s, reserve)
    default_item, tuned_item = t.item(d), t.item(best)
    finals = {"default": Item(dict(default_item.record), d, default_item.work),
              "tuned": Item(dict(tuned_item.record), best, tuned_item.work)}
    same = overlay(best, device) == overlay(d, device)
    rounds = max(1, min(3, int(max(0.0, t.left()) // (2 * window_s)))) if not same else 0
    if rounds:
        say(f"tune: default vs tuned, {rounds} interleaved round(s)")
        t.time(list(finals.values()), rounds=rounds)
    dv = {"default": summary(finals["default"]) if rounds else summary(default_item),
          "tuned": summary(finals["tuned"]) if rounds else summary(default_item),
          "rounds": rounds, "same_settings": same}
    if dv["default"] and dv["tuned"]:
        dv["ratio"] = round(dv["tuned"]["median"] / dv["default"]["median"], 3)
    return {"tool": "imt-tune", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "environment": environment(device), "data": str(data.shards), "objective": objective,
            "budget_s": budget_s, "seconds": round(time.monotonic() - t0, 1),
            "model": {"arch": cfg.model.arch, "resolution": d.resolution, "batch_size": d.batch_size,
                      "precision": cfg.precision.dtype, "threads": torch.get_num_threads()},
            "recipe_settings": overlay(d, device), "tuned_settings": overlay(best, device),
            "diagnosis": diag, "space": space, "search": log, "default_vs_tuned": dv, "errors": t.errors}


@click.command(context_settings={"show_default": True, "help_option_names": ["-h", "--help"]})
@click.option("--recipe", default=None, help="The training recipe whose loader settings are the starting point.")
@click.option("--data", "data_dir", default=None, type=click.Path(exists=True, file_okay=False),
              help="Shards (imt-make-shards output). Default: --count real JPEGs replicated from --images.")
@click.option("--images", default=str(DEFAULT_SRC), type=click.Path(file_okay=False))
@click.option("--count", default=None, type=click.IntRange(1),
              help=f"[default: {CPU_DEFAULTS.count} on CPU, {GPU_DEFAULTS.count} on GPU]")
@click.option("--cache", default="work/bench-data", type=click.Path(file_okay=False))
@click.option("--arch", default=None, help="[default: the recipe's, else benchmarks.run's for the device]")
@click.option("--batch-size", default=None, type=click.IntRange(1))
@click.option("--resolution", default=None, type=click.IntRange(16))
@click.option("--loader", default=None, type=click.Choice(["dali", "torch", "folder", "synthetic"]),
              help="Starting loader [default: the recipe's].")
@click.option("--device", default="auto", type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--budget-s", default=180.0, type=click.FloatRange(10), help="Seconds for the whole run.")
@click.option("--objective", default="train", type=click.Choice(["train", "pipeline"]),
              help="train: end-to-end images/sec with the model; pipeline: the loader alone (cheaper per window).")
@click.option("--batch-sizes", default="", help="Comma-separated batch sizes to try too (memory permitting).")
@click.option("--warmup", default=2, type=click.IntRange(0), help="Untimed batches per window.")
@click.option("--batches", default=None, type=click.IntRange(1), help="Batches per timed window [default: 5 CPU, 30 GPU].")
@click.option("--threads", default=None, type=click.IntRange(1), help="torch threads [default: as imt-train's auto].")
@click.option("--set", "sets", multiple=True, metavar="SECTION.KEY=VALUE")
@click.option("--out", default="work/tune", type=click.Path(file_okay=False), help="tune.yaml, tune.json, tune.png here.")
def main(recipe, data_dir, images, count, cache, arch, batch_size, resolution, loader, device, budget_s, objective,
         batch_sizes, warmup, batches, threads, sets, out):
    """Diagnose what limits training throughput here, search the loader's settings, write them as a YAML overlay."""
    dev = bench_device(device)
    defaults = GPU_DEFAULTS if dev.type == "cuda" else CPU_DEFAULTS
    data = bench_data(data_dir, images, count or defaults.count, cache, say)
    overrides = {"data.path": str(data.shards), "data.drop_last": True, "run.device": dev.type}
    if not recipe:
        overrides.update({"model.arch": defaults.arch, "data.batch_size": defaults.batch_size,
                          "data.resolution": defaults.resolution, "data.workers": os.cpu_count() or 1})
    for key, value in (("model.arch", arch), ("data.batch_size", batch_size), ("data.resolution", resolution),
                       ("data.loader", loader), ("run.threads", threads)):
        if value is not None:
            overrides[key] = value
    try:
        overrides.update(parse_override(s) for s in sets)
        cfg = resolve(load_config(recipe, overrides), dev)
        sizes = tuple(int(b) for b in batch_sizes.split(",") if b.strip())
    except (ConfigError, ValueError) as e:
        raise click.UsageError(str(e))
    torch.set_num_threads(cfg.run.threads)
    bench = Bench(loaders=(), sections=(), modes=("eager",), warmup=warmup, repeats=1,
                  batches=batches or (30 if dev.type == "cuda" else 5))
    out = Path(out)
    try:
        result = tune(cfg, data, dev, bench, budget_s, objective, sizes, out)
    except ManifestError as e:
        raise click.UsageError(str(e))
    out.mkdir(parents=True, exist_ok=True)
    (out / "tune.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    write_yaml(out / "tune.yaml", _best_config(cfg, result), dev, result)
    plot(result, out / "tune.png")
    dv = result["default_vs_tuned"]
    click.echo(result["diagnosis"]["paragraph"])
    click.echo(f"tuned settings: {result['tuned_settings']} (recipe: {result['recipe_settings']})")
    if dv.get("ratio"):
        click.echo(f"default {dv['default']['median']:,.1f} img/s ({dv['default']['min']:,.0f}-{dv['default']['max']:,.0f}) "
                   f"vs tuned {dv['tuned']['median']:,.1f} ({dv['tuned']['min']:,.0f}-{dv['tuned']['max']:,.0f}), "
                   f"{dv['rounds']} interleaved round(s): {dv['ratio']:.2f}x ({objective})")
    elif dv.get("same_settings"):
        click.echo("the recipe's settings were already the fastest tried")
    click.echo(f"wrote {out / 'tune.yaml'} (imt-train --tune {out / 'tune.yaml'}), {out / 'tune.json'}, {out / 'tune.png'}")
    if result["errors"]:
        say("FAILED measurements (excluded):\n  " + "\n  ".join(result["errors"]))


def _best_config(cfg: Config, result: dict) -> DataConfig:
    s = result["tuned_settings"]
    return replace(cfg.data, **{k: v for k, v in s.items()})


if __name__ == "__main__":
    sys.exit(main())
