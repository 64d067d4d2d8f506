"""One command that proves the GPU path: `python -m imt.benchmarks.gpu_check` (or `imt-gpu-check`).

On a machine with a GPU it runs the checks below in priority order, each printing PASS/FAIL with its figure,
within --budget seconds (default 450: the whole call, data set included, fits 8 minutes on one H100/H200
with 16 cores); a check that would start after the budget is spent is listed as skipped. Without a GPU it
runs every part that can run on the CPU, at toy sizes, and lists the checks it skipped and why. All results go
to one JSON file (--json), rewritten after every check so a run cut short keeps what it measured. Exit status:
1 when a check failed, else 0.

    environment      versions, DALI and nvImageCodec import, precision "auto" resolved on this device
    dali_smoke       DALI gpu and cpu-decode batches: shape, dtype, channels-last, device; the validation
                     graph on the GPU vs on the CPU: same keys and labels, pixels close
    buffer_lifetime  DALI batches stay intact after the loader moves on (pipeline.dali.executor_args): torch's
                     stream is delayed with torch.cuda._sleep, each batch is copied behind the delay and
                     dropped while DALI produces more, the copies are compared with copies taken at once; the
                     same run with DALI's dynamic executor is reported as the control
    host_syncs       no host sync in a training step (train.loop.train_step + schedule + EMA, bf16 and fp16)
                     with each loader, nor in next(loader); evaluation syncs a fixed number of times however
                     many batches it sees (torch.cuda.set_sync_debug_mode)
    hw_decoder       DALI mixed pipeline alone at hw_decoder_load 0 / 0.65 / 1: images/sec and CPU time per
                     image (target: >= 20,000 img/s at 224 px)
    end_to_end       ResNet-50 and ResNet-18, eager and compiled, fed by dali-mixed, dali-cpu-decode and the
                     torch DataLoader vs the synthetic ceiling, with data wait (benchmarks.run's Step and
                     measure; targets: ResNet-50 >= 98% eager / 97% compiled, ResNet-18 compiled >= 90%)
    recompiles       train.model.compile_model over a progressive-resizing sequence: one static graph per
                     resolution
    dali_memory      device memory and host RSS of DALI's training and validation pipelines at 8 and 16
                     threads, and what shutting a pipeline down gives back

On the GPU machine we are lent (torch 2.11 cu130, no DALI), benchmarks/gpu_check.sh is the one command; its
header lists the calls that bring DALI over first (../shared/gpu/README.md).
"""
from __future__ import annotations

import dataclasses
import gc
import importlib
import importlib.util
import json
import os
import time
import traceback
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import click
import torch

from imt.benchmarks.common import BenchData, environment, prepare_data, stream, time_windows
from imt.benchmarks.shards import DEFAULT_SRC

# Targets of the benchmarks issue (fractions of the synthetic ceiling; pipeline alone in img/s).
TARGETS = {("resnet50", "eager"): 0.98, ("resnet50", "compile"): 0.97, ("resnet18", "compile"): 0.90}
PIPELINE_TARGET = 20_000


class Skip(Exception):
    """A check (or part of one) that cannot run here; the message says why."""


@dataclass(frozen=True)
class Sizes:
    batch: int
    resolution: int
    workers: int
    count: int          # samples in the benchmark data set
    warmup: int
    repeats: int
    batches: int        # per timed window


GPU_SIZES = Sizes(256, 224, min(16, os.cpu_count() or 1), 10_000, warmup=10, repeats=2, batches=15)
CPU_SIZES = Sizes(8, 32, 0, 64, warmup=1, repeats=1, batches=1)  # the code paths, in seconds: no figures


@dataclass
class Ctx:
    device: torch.device
    sizes: Sizes
    images: Path
    data_path: Path | None
    cache: Path
    deadline: float
    _data: BenchData | None = None

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def data(self) -> BenchData:
        if self._data is None:
            if self.data_path is not None:
                self._data = BenchData(self.data_path, None, str(self.data_path))
            else:
                self._data = prepare_data(self.images, self.sizes.count, self.cache, workers=os.cpu_count() or 1,
                                          log=lambda m: click.echo(f"  data: {m}", err=True))
        return self._data

    def data_cfg(self, **kw):
        from imt.pipeline.config import DataConfig

        s = self.sizes
        base = dict(path=str(self.data().shards), batch_size=s.batch, resolution=s.resolution,
                    val_resolution=s.resolution, workers=s.workers, shuffle_buffer=max(64, 4 * s.batch),
                    dtype="bfloat16" if self.cuda else "float32", drop_last=True)
        return DataConfig(**{**base, **kw})

    def dist(self):
        from imt.train.dist import DistInfo

        return DistInfo(device=self.device)


CHECKS: list[tuple[str, bool, Callable[[Ctx], tuple[bool, dict]]]] = []


def check(name: str, gpu_only: bool = False):
    def register(fn):
        CHECKS.append((name, gpu_only, fn))
        return fn
    return register


def _first_batch(loader):
    batches = iter(loader)
    try:
        return next(batches)
    finally:
        batches.close()


# ---- the checks, in priority order ----------------------------------------------------------------------

@check("environment")
def environment_check(ctx: Ctx) -> tuple[bool, dict]:
    modules = {m: importlib.util.find_spec(m) is not None for m in ("yaml", "click", "PIL", "numpy", "webdataset")}
    fig: dict = {"modules": modules, "torch": torch.__version__, "cuda": torch.version.cuda}
    for name, mod in (("dali", "nvidia.dali"), ("nvimgcodec", "nvidia.nvimgcodec")):
        try:
            fig[name] = getattr(importlib.import_module(mod), "__version__", "imported")
        except Exception as e:  # noqa: BLE001 - recorded, judged below
            fig[name] = f"not importable: {type(e).__name__}: {e}"
    from imt.train.config import cuda_bf16_native, load_config, resolve

    fig["precision_auto"] = resolve(load_config(None, {"data.loader": "synthetic"}), ctx.device).precision.dtype
    ok = all(modules[m] for m in ("yaml", "PIL", "numpy")) and not str(fig["dali"]).startswith("not importable")
    if ctx.cuda:
        major, minor = torch.cuda.get_device_capability(ctx.device)
        fig.update(gpu=torch.cuda.get_device_name(ctx.device), capability=f"{major}.{minor}",
                   bf16_native=cuda_bf16_native(ctx.device))
        ok = ok and fig["precision_auto"] == ("bfloat16" if major >= 8 else "float16")
    return ok, fig


@check("dali_smoke")
def dali_smoke(ctx: Ctx) -> tuple[bool, dict]:
    from imt.pipeline.common import torch_dtype
    from imt.pipeline.dali import DaliLoader

    dist, fig, ok = ctx.dist(), {}, True
    modes = ("gpu", "cpu-decode", "cpu") if ctx.cuda else ("cpu",)
    for mode in modes:
        cfg = ctx.data_cfg(dali_device=mode)
        images, labels = _first_batch(DaliLoader(cfg, "train", dist, train=True))
        r = cfg.resolution
        seen = {"shape": list(images.shape), "dtype": str(images.dtype), "device": str(images.device),
                "channels_last": images.is_contiguous(memory_format=torch.channels_last),
                "labels": f"{labels.dtype} on {labels.device}",
                "range": [round(float(images.min()), 2), round(float(images.max()), 2)]}
        good = (tuple(images.shape) == (cfg.batch_size, 3, r, r) and images.dtype == torch_dtype(cfg.dtype)
                and images.device.type == ctx.device.type and seen["channels_last"]
                and labels.dtype == torch.int64 and labels.device.type == ctx.device.type
                and -3.0 < seen["range"][0] and seen["range"][1] < 3.0)
        fig[mode] = {**seen, "ok": good}
        ok = ok and good
    if not ctx.cuda:
        fig["validation_gpu_vs_cpu"] = "skipped: needs a CUDA GPU"
        return ok, fig
    # Validation graph, GPU decode vs CPU decode (libjpeg-turbo), same samples in the same (stored) order.
    outs = {}
    for mode in ("gpu", "cpu"):
        cfg = ctx.data_cfg(dali_device=mode, batch_size=min(64, ctx.sizes.batch), dtype="float32")
        outs[mode] = _first_batch(DaliLoader(cfg, "train", dist, train=False, keys=True))
    (xg, yg, kg), (xc, yc, kc) = outs["gpu"], outs["cpu"]
    diff = (xg.float() - xc.float()).abs().flatten(1).mean(1)
    same = list(kg) == list(kc) and torch.equal(yg, yc)
    fig["validation_gpu_vs_cpu"] = {"same_keys_and_labels": same, "mean_abs_diff_max": round(float(diff.max()), 4),
                                    "mean_abs_diff_mean": round(float(diff.mean()), 4)}
    return ok and same and float(diff.max()) < 0.05, fig


def _lifetime_run(ctx: Ctx, batches: int, spin_cycles: int) -> dict:
    """Copies of `batches` validation batches taken at once (reference), then taken behind a GPU delay
    after the loader has moved on; how many differ."""
    from imt.pipeline.dali import DaliLoader

    # float16: the batch is DALI's output as it is (no cast), so under the dynamic executor the tensors handed
    # out are DALI's own buffers: the control is as sensitive as it can be.
    cfg = ctx.data_cfg(dali_device="gpu", batch_size=min(64, ctx.sizes.batch), dtype="float16")
    loader = DaliLoader(cfg, "train", ctx.dist(), train=False)  # validation graph: the same order every pass
    if len(loader) < batches:
        raise Skip(f"the data set gives {len(loader)} batches of {cfg.batch_size}; {batches} needed")
    reference = []
    for i, (images, labels) in enumerate(loader):
        if i < batches:
            reference.append((images.clone(), labels.clone()))
            torch.cuda.synchronize()
    delayed = []
    for i, (images, labels) in enumerate(loader):
        if i < batches:
            torch.cuda._sleep(spin_cycles)                   # torch's stream is busy; the host runs ahead
            delayed.append((images.clone(), labels.clone()))  # queued behind the delay
            del images, labels                               # the last references go while the copies wait
    torch.cuda.synchronize()
    bad = sum(not (torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])) for a, b in zip(reference, delayed))
    return {"batches": batches, "differing": bad}


@check("buffer_lifetime", gpu_only=True)
def buffer_lifetime(ctx: Ctx) -> tuple[bool, dict]:
    from imt.pipeline import dali

    spin = 20_000_000  # GPU clock cycles per batch: about 10 ms at 2 GHz
    ours = _lifetime_run(ctx, 8, spin)
    real = dali.executor_args
    dali.executor_args = lambda gpu_outputs: {}  # the control: DALI 2.4's default (dynamic) executor
    try:
        control = _lifetime_run(ctx, 8, spin)
    except Exception as e:  # noqa: BLE001 - the control informs; it does not judge
        control = {"error": f"{type(e).__name__}: {e}"}
    finally:
        dali.executor_args = real
    return ours["differing"] == 0, {"classic_executor": ours, "control_dynamic_executor": control}


def _count_syncs(fn: Callable[[], object]) -> int:
    """Synchronising CUDA calls torch makes inside fn (torch.cuda.set_sync_debug_mode('warn'))."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return sum("synchroniz" in str(w.message) for w in caught)


@check("host_syncs", gpu_only=True)
def host_syncs(ctx: Ctx) -> tuple[bool, dict]:
    from imt.benchmarks.run import loader_config
    from imt.pipeline import build_loader
    from imt.train.config import load_config, resolve
    from imt.train.ema import EMA
    from imt.train.evaluate import evaluate
    from imt.train.loop import train_step
    from imt.train.model import build_model, build_step_parts, prepare
    from imt.train.schedule import LRSchedule, peak_lr

    fig, ok = {}, True
    data = ctx.data()
    kinds = [("dali-mixed", "bfloat16"), ("dali-cpu-decode", "bfloat16"), ("dali-cpu", "bfloat16"),
             ("torch", "bfloat16"), ("synthetic", "bfloat16"), ("synthetic", "float16")]
    for kind, dtype in kinds:
        cfg = resolve(load_config(None, {"data.loader": "synthetic", "model.arch": "resnet18",
                                         "precision.dtype": dtype, "optim.ema_decay": 0.999}), ctx.device)
        dcfg = ctx.data_cfg(batch_size=64, resolution=128, dtype=cfg.precision.dtype)
        dcfg = replace(dcfg, loader="synthetic", synthetic_classes=10) if kind == "synthetic" else \
            loader_config(dcfg, kind, data)
        cfg = replace(cfg, data=dcfg)
        model = prepare(build_model("resnet18", 1000), ctx.device)
        parts = build_step_parts(cfg, model, ctx.device)
        schedule = LRSchedule(parts.optimizer, cfg.optim, peak_lr(cfg.optim, dcfg.batch_size), 100, 1)
        ema = EMA(model, cfg.optim.ema_decay)
        batches = stream(build_loader(dcfg, "train", ctx.dist(), train=True))
        box = {}

        def step():
            train_step(model, box["images"], box["labels"], parts.loss_fn, parts.optimizer, parts.scaler,
                       parts.autocast)
            schedule.step()
            ema.update_parameters(model)

        try:
            for _ in range(3):  # cudnn autotuning and first allocations sync; they are not per-step costs
                box["images"], box["labels"] = next(batches)
                step()
            torch.cuda.synchronize()
            loader_syncs = step_syncs = 0
            for _ in range(3):
                loader_syncs += _count_syncs(lambda: box.update(zip(("images", "labels"), next(batches))))
                step_syncs += _count_syncs(step)
        finally:
            batches.close()
        name = f"{kind} {dtype}"
        fig[name] = {"step_syncs": step_syncs, "loader_syncs": loader_syncs}
        ok = ok and step_syncs == 0 and loader_syncs == 0
        del model, parts, ema, batches
        gc.collect()
    # Evaluation: syncs once at the end (the reads of the counts), not per batch.
    model = prepare(build_model("resnet18", 10), ctx.device)
    auto = torch.autocast("cuda", dtype=torch.bfloat16)
    synth = [(torch.randn(32, 3, 64, 64, device=ctx.device).contiguous(memory_format=torch.channels_last),
              torch.randint(0, 10, (32,), device=ctx.device)) for _ in range(6)]
    evaluate(model, synth[:1], auto, ctx.dist(), 10)  # warm-up
    few, many = (_count_syncs(lambda: evaluate(model, synth[:k], auto, ctx.dist(), 10)) for k in (2, 6))
    fig["evaluate"] = {"syncs_2_batches": few, "syncs_6_batches": many}
    return ok and few == many, fig


@check("hw_decoder", gpu_only=True)
def hw_decoder(ctx: Ctx) -> tuple[bool, dict]:
    from imt.pipeline import build_loader

    fig = {}
    for load in (0.0, 0.65, 1.0):
        cfg = ctx.data_cfg(loader="dali", dali_device="gpu", hw_decoder_load=load)
        batches = stream(build_loader(cfg, "train", ctx.dist(), train=True))
        try:
            cpu0 = time.process_time()
            w = time_windows(batches, lambda images, labels: None, ctx.device, warmup=5, repeats=3,
                             per_repeat=ctx.sizes.batches)
            cpu = time.process_time() - cpu0
        finally:
            batches.close()
            gc.collect()
        images = (5 + 3 * ctx.sizes.batches) * cfg.batch_size
        fig[f"hw_decoder_load={load}"] = {"img_per_s": [round(x) for x in w.img_per_s],
                                          "cpu_ms_per_image": round(1000 * cpu / images, 3)}
    best = max(max(v["img_per_s"]) for v in fig.values())
    fig["target_img_per_s"], fig["best_img_per_s"] = PIPELINE_TARGET, best
    return best >= PIPELINE_TARGET, fig


@check("end_to_end")
def end_to_end(ctx: Ctx) -> tuple[bool, dict]:
    from imt.benchmarks.run import CEILING, Bench, Step, add_fractions, ceilings_of, measure, train_items
    from imt.pipeline.manifest import load_manifest
    from imt.train.config import load_config, resolve

    s, data = ctx.sizes, ctx.data()
    num_classes = load_manifest(data.shards).num_classes
    if ctx.cuda:
        plan = [("resnet50", "eager"), ("resnet50", "compile"), ("resnet18", "eager"), ("resnet18", "compile")]
        kinds = ["dali-mixed", "dali-cpu-decode", "torch"]
    else:  # toy sizes: the code path, not a figure
        plan, kinds = [("resnet18", "eager")], ["dali-cpu", "torch"]
    bench = Bench(loaders=tuple(kinds), sections=("train",), modes=("eager",), warmup=s.warmup, repeats=s.repeats,
                  batches=s.batches)
    fig, ok, errors = {}, True, []
    for arch, mode in plan:
        name = f"{arch} {mode}"
        if ctx.left() < (90 if mode == "compile" else 30):
            fig[name] = "skipped: time budget spent"
            continue
        cfg = resolve(load_config(None, {"data.loader": "synthetic", "model.arch": arch,
                                         "data.batch_size": s.batch, "data.resolution": s.resolution,
                                         "model.compile": mode == "compile"}), ctx.device)
        data_cfg = ctx.data_cfg(dtype=cfg.precision.dtype)
        step = Step(cfg, ctx.device, num_classes, compiled=mode == "compile")
        records = measure(train_items(data_cfg, kinds, {mode: step}, ctx.device, data, num_classes, {}, True),
                          ctx.device, bench, errors)
        add_fractions(records, ceilings_of(records))
        ceiling = ceilings_of(records).get(mode)
        row = {"ceiling_img_per_s": ceiling}
        for r in records:
            if r["loader"] == CEILING:
                continue
            row[r["loader"]] = ({"img_per_s": r["img_per_s"]["median"], "fraction": r.get("ceiling_fraction"),
                                 "data_wait": r["data_wait"]["median"]} if r["status"] == "ok" else
                                f"{r['status']}: {r.get('reason')}")
        target = TARGETS.get((arch, mode)) if ctx.cuda else None
        if target is not None:
            got = row.get("dali-mixed", {})
            row["target_dali_mixed"] = target
            ok = ok and isinstance(got, dict) and (got.get("fraction") or 0) >= target
        fig[name] = row
        del step
        gc.collect()
    if errors:
        fig["errors"] = errors
    return ok and not errors, fig


@check("recompiles")
def recompiles(ctx: Ctx) -> tuple[bool, dict]:
    from torch._dynamo.testing import CompileCounterWithBackend

    from imt.train.model import build_model, compile_model

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("eager")  # dynamo's decisions are the same for every backend
    if ctx.cuda:
        model, sizes = build_model("resnet18", 10), (64, 64, 96, 96, 64)
    else:  # tracing ResNet-18 takes tens of seconds on a shared 2-core CPU; the decisions are the same
        model, sizes = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                           torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                           torch.nn.Linear(8, 10)), (32, 32, 48, 32)
    model = model.to(ctx.device, memory_format=torch.channels_last)
    net = compile_model(model, shapes=len(set(sizes)), backend=counter)
    for px in sizes:
        x = torch.randn(4, 3, px, px, device=ctx.device).contiguous(memory_format=torch.channels_last)
        net(x).sum().backward()
    static = all(isinstance(d, int) for g in counter.graphs for n in g.graph.nodes
                 if n.op == "placeholder" and "example_value" in n.meta
                 for d in getattr(n.meta["example_value"], "shape", ()))
    torch._dynamo.reset()
    fig = {"resolutions": sorted(set(sizes)), "calls": len(sizes), "graphs": counter.frame_count,
           "all_static": static}
    return counter.frame_count == len(set(sizes)) and static, fig


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


@check("dali_memory", gpu_only=True)
def dali_memory(ctx: Ctx) -> tuple[bool, dict]:
    from nvidia.dali import backend

    from imt.pipeline.dali import DaliLoader

    fig = {}
    for threads in (8, 16):
        for split_train in (True, False):
            torch.cuda.synchronize()
            torch.cuda.empty_cache()  # torch's cached blocks would blur what DALI holds
            free0, rss0 = torch.cuda.mem_get_info(ctx.device)[0], _rss_mb()
            loader = DaliLoader(ctx.data_cfg(dali_device="gpu", workers=threads), "train", ctx.dist(),
                                train=split_train)
            batches = iter(loader)
            for _ in range(min(5, len(loader))):
                next(batches)
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            free1, rss1 = torch.cuda.mem_get_info(ctx.device)[0], _rss_mb()
            batches.close()  # leaves mid-epoch: the loader shuts its pipeline down
            del batches, loader
            gc.collect()
            if hasattr(backend, "ReleaseUnusedMemory"):
                backend.ReleaseUnusedMemory()
            free2 = torch.cuda.mem_get_info(ctx.device)[0]
            fig[f"{'train' if split_train else 'val'} {threads} threads"] = {
                "device_mb": round((free0 - free1) / 2**20), "host_rss_mb": round(rss1 - rss0),
                "device_mb_after_shutdown": round((free0 - free2) / 2**20)}
    return True, fig


# ---- the run -------------------------------------------------------------------------------------------

def run_checks(ctx: Ctx, only: tuple[str, ...], write: Callable[[list[dict]], None]) -> list[dict]:
    results = []
    for name, gpu_only, fn in CHECKS:
        if only and name not in only:
            continue
        rec: dict = {"check": name}
        t0 = time.perf_counter()
        if gpu_only and not ctx.cuda:
            rec.update(status="SKIP", reason="needs a CUDA GPU")
        elif ctx.left() <= 0:
            rec.update(status="SKIP", reason="time budget spent (raise --budget)")
        else:
            try:
                passed, figure = fn(ctx)
                rec.update(status="PASS" if passed else "FAIL", figure=figure)
            except Skip as e:
                rec.update(status="SKIP", reason=str(e))
            except Exception as e:  # noqa: BLE001 - a failing check is reported; the others still run
                rec.update(status="FAIL", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc(limit=8))
        rec["seconds"] = round(time.perf_counter() - t0, 1)
        shown = json.dumps(rec.get("figure", rec.get("reason", rec.get("error"))), default=str)
        click.echo(f"{rec['status']:4} {name:15} {rec['seconds']:6.1f}s  {shown[:400]}")
        results.append(rec)
        write(results)
    return results


@click.command(context_settings={"show_default": True, "help_option_names": ["-h", "--help"]})
@click.option("--images", type=click.Path(path_type=Path), default=DEFAULT_SRC,
              help="Flat folder of real <wnid>_<name>.JPEG files, replicated to --count and sharded (cached).")
@click.option("--data", "data_path", type=click.Path(path_type=Path), help="Use these shards (imt-make-shards "
              "output, train split) instead of --images.")
@click.option("--count", type=int, help="Samples in the data set [default: 10000 on a GPU, 64 on the CPU].")
@click.option("--cache", type=click.Path(path_type=Path), default=Path("runs/bench-cache"),
              help="Where the replicated, sharded data set is kept between runs.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=Path("gpu_check.json"),
              help="All results, rewritten after every check.")
@click.option("--budget", type=float, default=450.0, help="Seconds; a check that would start later is skipped.")
@click.option("--only", multiple=True, type=click.Choice([c[0] for c in CHECKS]), help="Run only these checks.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto")
def main(images, data_path, count, cache, json_path, budget, only, device):
    """Prove the GPU path (fixes, hybrid mode, throughput targets) in one run; on a CPU, its CPU parts."""
    start = time.monotonic()
    dev = torch.device("cuda" if (device == "cuda" or (device == "auto" and torch.cuda.is_available())) else "cpu")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise click.ClickException("--device cuda, but torch sees no CUDA device")
    sizes = GPU_SIZES if dev.type == "cuda" else CPU_SIZES
    if count:
        sizes = replace(sizes, count=count)
    ctx = Ctx(dev, sizes, Path(images), Path(data_path) if data_path else None, Path(cache), start + budget)
    doc = {"command": "python -m imt.benchmarks.gpu_check", "environment": environment(dev),
           "settings": {**dataclasses.asdict(sizes), "budget_s": budget, "data": str(data_path or images)},
           "gpu_figures_measured": dev.type == "cuda"}
    json_path = Path(json_path)
    json_path.parent.mkdir(parents=True, exist_ok=True)

    def write(results: list[dict]) -> None:
        doc.update(checks=results, wall_s=round(time.monotonic() - start, 1))
        tmp = json_path.with_name(json_path.name + ".tmp")
        tmp.write_text(json.dumps(doc, indent=1, default=str) + "\n")
        os.replace(tmp, json_path)

    click.echo(f"gpu_check on {dev} ({doc['environment'].get('gpu') or doc['environment']['cpu']}), budget {budget:.0f} s")
    results = run_checks(ctx, tuple(only), write)
    failed = [r["check"] for r in results if r["status"] == "FAIL"]
    skipped = [f"{r['check']} ({r['reason']})" for r in results if r["status"] == "SKIP"]
    click.echo(f"{len(results) - len(failed) - len(skipped)} passed, {len(failed)} failed"
               + (f" ({', '.join(failed)})" if failed else "") + f", {len(skipped)} skipped"
               + (f": {'; '.join(skipped)}" if skipped else "") + f"; {json_path} [{time.monotonic() - start:.0f} s]")
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
