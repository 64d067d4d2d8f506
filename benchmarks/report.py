"""benchmarks.run's result dict as Markdown tables and as a PNG bar chart."""
from __future__ import annotations

from pathlib import Path


def _fig(rec: dict) -> str:
    s = rec.get("img_per_s")
    if rec.get("status") != "ok" or not s:
        return f"{rec.get('status')}: {rec.get('reason', '')}"
    return f"{s['median']:,.1f}"


def _spread(rec: dict) -> str:
    s = rec.get("img_per_s")
    if rec.get("status") != "ok" or not s:
        return ""
    iqr = f"; IQR {s['q1']:,.0f}-{s['q3']:,.0f}" if "q1" in s else ""
    return f"{s['min']:,.0f}-{s['max']:,.0f}{iqr}"


def _pct(x) -> str:
    return "" if x is None else f"{100 * x:.1f}%"


def _ratio(x) -> str:
    return "" if x is None else f"{x:.2f}x"


def _wait(rec: dict) -> str:
    w = rec.get("data_wait")
    return "" if not w else _pct(w["median"])


def _setting(result: dict) -> str:
    s, e = result["settings"], result["environment"]
    ds = result["dataset"]
    where = e["gpu"] or f"CPU ({e['cpus_usable']} cores)"
    return (f"{where}; {s['arch']}, {s['precision']}, batch {s['batch_size']}, {s['resolution']} px, "
            f"{s['workers']} workers/threads, prefetch {s['prefetch']}; {ds['samples']:,} samples "
            f"(mean {ds['mean_jpeg_bytes'] / 1e3:.0f} KB, {ds['mean_width']:.0f}x{ds['mean_height']:.0f} px); "
            f"{s['warmup_batches']} warm-up + {s['repeats']} x {s['batches_per_repeat']} batches per figure; "
            f"load average {e['load_average']} -> {e.get('load_average_end')}")


def markdown(result: dict) -> str:
    out = [f"**{_setting(result)}**", ""]
    if result["pipelines"]:
        out += ["Pipeline only (images/sec; decode-only = full-image libjpeg-turbo decoding of the same JPEGs in as "
                "many processes, the limit of every CPU pipeline):", "",
                "| loader | img/s (median) | min-max | % of decode-only | x eager ceiling |", "|---|---:|---|---:|---:|"]
        for r in result["pipelines"]:
            limit = "100% (limit)" if r["loader"] == "decode-only" and r["status"] == "ok" else _pct(r.get("limit_fraction"))
            out.append(f"| {r['loader']} | {_fig(r)} | {_spread(r)} | {limit} | {_ratio(r.get('ceiling_ratio_eager'))} |")
        out.append("")
    if result["train"]:
        out += ["End to end (train_step fed by each loader; ceiling = synthetic tensors on the device):", "",
                "| mode | loader | img/s (median) | min-max | % of ceiling | data wait |",
                "|---|---|---:|---|---:|---:|"]
        for r in result["train"]:
            frac = "100% (ceiling)" if r["loader"] == "synthetic" and r["status"] == "ok" else _pct(r.get("ceiling_fraction"))
            out.append(f"| {r['mode']} | {r['loader']} | {_fig(r)} | {_spread(r)} | {frac} | {_wait(r)} |")
        out.append("")
    if result["sweeps"]:
        out += ["Sweeps:", "", "| setting | section | mode | loader | img/s (median) | min-max | % of ceiling |",
                "|---|---|---|---|---:|---|---:|"]
        for r in result["sweeps"]:
            (name, value), = r["sweep"].items()
            setting = f"{name} (all values)" if value is None else f"{name}={value}"
            frac = "ceiling" if r["loader"] == "synthetic" and r["status"] == "ok" else _pct(r.get("ceiling_fraction"))
            out.append(f"| {setting} | {r['section']} | {r.get('mode', '')} | {r['loader']} | {_fig(r)} | "
                       f"{_spread(r)} | {frac} |")
        out.append("")
    p = result.get("profile")
    if p and p.get("status") == "ok":
        sp = p["split"]
        parts = [f"wall {sp['wall_s']:.3f} s", f"host blocked on data {sp['data_wait_s']:.3f} s "
                 f"({_pct(sp['data_wait_fraction'])})", f"host in train_step {sp['step_host_s']:.3f} s"]
        for k, label in (("gpu_kernels_s", "GPU kernels"), ("h2d_copy_s", "host-to-device copies"),
                         ("host_sync_s", "host waiting in synchronize")):
            if k in sp:
                parts.append(f"{label} {sp[k]:.3f} s")
        out += [f"Profile ({p['loader']}, {p['mode']}, {p['steps']} steps): " + "; ".join(parts) + ".", ""]
    elif p:
        out += [f"Profile ({p['loader']}): {p['status']}: {p.get('reason', '')}", ""]
    return "\n".join(out)


def plot(result: dict, path: str | Path) -> None:
    """Grouped bars per loader (pipeline only; end to end per mode), min-max error bars, the ceiling of
    each mode as a horizontal line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loaders = list(dict.fromkeys(r["loader"] for r in result["pipelines"] + result["train"]
                                 if r["loader"] != "synthetic"))
    series = [("pipeline only", {r["loader"]: r for r in result["pipelines"]})]
    for mode in result["settings"]["modes"]:
        series.append((f"end to end, {mode}", {r["loader"]: r for r in result["train"] if r["mode"] == mode}))
    series = [(name, recs) for name, recs in series if recs]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    width = 0.8 / max(1, len(series))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, recs) in enumerate(series):
        xs, ys, lo, hi = [], [], [], []
        for j, loader in enumerate(loaders):
            r = recs.get(loader)
            if r and r["status"] == "ok":
                s = r["img_per_s"]
                xs.append(j + (i - (len(series) - 1) / 2) * width)
                ys.append(s["median"])
                lo.append(s["median"] - s["min"])
                hi.append(s["max"] - s["median"])
        ax.bar(xs, ys, width, yerr=[lo, hi], capsize=3, label=name, color=colors[i % len(colors)])
    for i, (mode, value) in enumerate(result["ceiling"].items()):
        ax.axhline(value, linestyle="--", color=colors[(i + 1) % len(colors)],
                   label=f"ceiling, {mode} ({value:,.0f} img/s)")
    ax.set_xticks(range(len(loaders)))
    ran = {r["loader"] for r in result["pipelines"] + result["train"] if r["status"] == "ok"}
    ax.set_xticklabels([k if k in ran else f"{k}\n(not run)" for k in loaders])
    ax.set_ylabel("images / second")
    s = result["settings"]
    where = result["environment"]["gpu"] or f"CPU, {result['environment']['cpus_usable']} cores"
    ax.set_title(f"{s['arch']} {s['precision']}, batch {s['batch_size']}, {s['resolution']} px ({where})", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
