"""PNG plots of one `bench/run.py` result: speedup and goodput vs concurrency per policy, tau per item slot,
latency CDFs, and perf_analyzer's verifier throughput vs concurrency per tree size."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

BASELINE = "off"


def _label(policy: str, drafter: str) -> str:
    return "plain (off)" if policy == BASELINE else f"{policy} / {drafter}"


def speedup_vs_concurrency(rows: list[dict], path: Path) -> Path:
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    configs = list(dict.fromkeys((r["policy"], r["drafter"]) for r in rows))
    for pol, d in configs:
        sub = sorted((r for r in rows if (r["policy"], r["drafter"]) == (pol, d)), key=lambda r: r["concurrency"])
        conc = [r["concurrency"] for r in sub]
        style = "k--" if pol == BASELINE else ("-o" if pol == "adaptive" else ":.")
        ax1.plot(conc, [r["speedup_median_pairwise"] for r in sub], style, label=_label(pol, d))
        ax2.plot(conc, [r["goodput_ratio_median"] for r in sub], style, label=_label(pol, d))
    titles = ("latency speedup vs plain (pairwise median)", "goodput vs plain (median of repeats)")
    for ax, title in zip((ax1, ax2), titles, strict=True):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrency (requests in flight)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    ax2.axhline(0.95, color="r", lw=0.8, label="goal 0.95x")
    ax1.axhline(2.0, color="r", lw=0.8, label="goal 2x (conc 1)")
    ax2.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def tau_per_slot(slot_res: dict, path: Path, column: str = "tree 16") -> Path:
    drafters = list(slot_res["drafters"])
    slots = sorted({s for d in drafters for s in slot_res["drafters"][d][column]["slots"]},
                   key=lambda s: (s == "end", s))
    fig, ax = plt.subplots(figsize=(8, 4.5))
    width = 0.8 / max(len(drafters), 1)
    x = np.arange(len(slots))
    for i, d in enumerate(drafters):
        vals = [slot_res["drafters"][d][column]["slots"].get(s, np.nan) for s in slots]
        ax.bar(x + i * width, vals, width, label=f"{d} (all {slot_res['drafters'][d][column]['tau']:.2f})")
    ax.set_xticks(x + width * (len(drafters) - 1) / 2, slots)
    ax.set_xlabel("item slot of the round's first unforced token")
    ax.set_ylabel("tau (tokens per verification)")
    ax.set_title(f"tau per item slot, {column} (offline replay, {slot_res['users']} users)")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def latency_cdfs(stack_records: dict, hf_records: list[dict], concs: list[int], path: Path) -> Path:
    show = [c for c in (min(concs), max(concs)) if c in concs]
    show = list(dict.fromkeys(show))
    fig, axes = plt.subplots(1, len(show), figsize=(6.5 * len(show), 4.5), squeeze=False)
    for ax, conc in zip(axes[0], show, strict=True):
        for key, recs in stack_records.items():
            pol, d, c = key.split("|")
            if int(c) != conc or (pol not in (BASELINE, "adaptive", "heuristic") and pol != "fixed:4:16"):
                continue
            lat = np.sort([r["latency_ms"] for r in recs if "error" not in r])
            ax.plot(lat, np.arange(1, len(lat) + 1) / len(lat), "k--" if pol == BASELINE else "-", label=_label(pol, d))
        if conc == 1:
            for name in dict.fromkeys(r["config"] for r in hf_records):
                if name.startswith("hf"):
                    lat = np.sort([r["latency_ms"] for r in hf_records if r["config"] == name])
                    ax.plot(lat, np.arange(1, len(lat) + 1) / len(lat), "-.", label=f"{name} (in process)")
        ax.set_xscale("log")
        ax.set_xlabel("request latency, ms")
        ax.set_ylabel("fraction of requests")
        ax.set_title(f"latency CDF, concurrency {conc}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def perf_analyzer_plot(perf: dict, path: Path) -> Path:
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for n in sorted({r["tree_nodes"] for r in perf["rows"]}):
        sub = sorted((r for r in perf["rows"] if r["tree_nodes"] == n), key=lambda r: r["concurrency"])
        conc = [r["concurrency"] for r in sub]
        ax1.plot(conc, [r["infer_per_s"] for r in sub], "-o", label=f"tree {n} nodes")
        ax2.plot(conc, [r["p50_ms"] for r in sub], "-o", label=f"tree {n} p50")
    for ax, title, ylab in ((ax1, "verifications / s", "requests/s"), (ax2, "verify latency p50", "ms")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent sequences")
        ax.set_ylabel(ylab)
        ax.set_title(f"perf_analyzer on specrec_target: {title}")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
