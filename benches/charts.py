"""PNG charts of the memory benchmark (matplotlib, Agg backend, no display needed)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import List, Sequence

import bench_common as bc

COLORS = {"native": "#1f77b4", "reference": "#ff7f0e", "io": "#7f7f7f"}
LABELS = {"native": "native engine (C++)", "reference": "numpy reference", "io": "pure I/O (read + write)"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _label(case) -> str:
    return f"{case.size}\n{case.bits}-bit {case.fmt}"


def _impls(cases) -> List[str]:
    seen = {r["implementation"] for c in cases for r in c.records}
    return [i for i in ("native", "reference", "io") if i in seen]


def _num(y: float) -> str:
    """Bar label: whole numbers from 100 up (no exponent), three significant digits below."""
    return f"{y:,.0f}" if y >= 100 else f"{y:.3g}"


def _grouped_bars(ax, cases, impls, key: str, unit: str, log: bool) -> None:
    n = len(impls)
    width = 0.8 / n
    for k, impl in enumerate(impls):
        xs, ys = [], []
        for i, c in enumerate(cases):
            rec = next((r for r in c.records if r["implementation"] == impl), None)
            if rec is not None:
                xs.append(i + (k - (n - 1) / 2) * width)
                ys.append(max(rec[key], 0.01))
        bars = ax.bar(xs, ys, width, label=LABELS[impl], color=COLORS[impl])
        for b, y in zip(bars, ys):
            ax.annotate(_num(y), (b.get_x() + b.get_width() / 2, y), ha="center", va="bottom",
                        fontsize=7, xytext=(0, 2), textcoords="offset points")
    ax.set_xticks(range(len(cases)), [_label(c) for c in cases], fontsize=8)
    ax.set_ylabel(unit)
    if log:
        ax.set_yscale("log")
    ax.grid(axis="y", alpha=0.3)


def _legend_below(fig, ax, y: float = 0.0) -> None:
    handles, labels = ax.get_legend_handles_labels()
    uniq = dict(zip(labels, handles))  # one entry per label (target lines repeat)
    fig.legend(uniq.values(), uniq.keys(), loc="lower center", ncol=len(uniq), fontsize=8,
               bbox_to_anchor=(0.5, y), frameon=False)


def _spread(cases, key) -> bool:
    vals = [r[key] for c in cases for r in c.records if r[key] > 0]
    return bool(vals) and max(vals) / min(vals) > 30


def memory_comparison(cases, out: Path) -> Path:
    plt = _plt()
    impls = _impls(cases)
    fig, axes = plt.subplots(1, 2, figsize=(max(9, 2.6 * len(cases) + 4), 4.8))
    _grouped_bars(axes[0], cases, impls, "peak_memory_mb", "peak RSS (MB)", _spread(cases, "peak_memory_mb"))
    axes[0].set_title("Peak RSS of the job process (os.wait4)")
    _grouped_bars(axes[1], cases, impls, "quantization_memory_mb", "peak − baseline RSS (MB)",
                  _spread(cases, "quantization_memory_mb"))
    axes[1].set_title("Quantization memory (peak − RSS after imports)")
    _legend_below(fig, axes[0])
    fig.suptitle("Memory: native engine vs numpy reference")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    path = out / "memory_comparison.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def memory_ratio(cases, out: Path) -> Path:
    plt = _plt()
    rows = [(c, c.targets["memory_ratio"]["value"]) for c in cases
            if "memory_ratio" in c.targets and c.targets["memory_ratio"]["value"] is not None]
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(rows) + 3), 4.5))
    xs = range(len(rows))
    vals = [v for _, v in rows]
    colors = ["#98df8a" if v <= bc.RATIO_TARGET else "#f7a6a6" for v in vals]
    bars = ax.bar(xs, vals, 0.5, color=colors, edgecolor="#333333", zorder=2)
    ax.set_xlim(-0.75, len(rows) - 0.25)
    for b, v in zip(bars, vals):
        ax.annotate(f"{v:.3f}", (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=8,
                    xytext=(0, 2), textcoords="offset points")
    ax.axhline(bc.RATIO_TARGET, color="#8b0000", ls="--", lw=1.5, zorder=3,
               label=f"target ≤ {bc.RATIO_TARGET}")
    ax.axhline(0.5, color="#444444", ls=":", lw=1.5, zorder=3,
               label="first version's aim (0.5)")
    ax.set_xticks(list(xs), [_label(c) for c, _ in rows], fontsize=8)
    ax.set_ylabel("native / reference quantization memory")
    ax.set_ylim(0, max([0.6] + [v * 1.15 for v in vals]))
    ax.set_title("Memory ratio per size (lower is better; green = meets target, red = misses)", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path = out / "memory_ratio.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def speed_comparison(cases, out: Path) -> Path:
    plt = _plt()
    impls = _impls(cases)
    fig, axes = plt.subplots(1, 2, figsize=(max(9, 2.6 * len(cases) + 4), 4.8))
    _grouped_bars(axes[0], cases, impls, "quantization_time_s", "end-to-end time (s)",
                  _spread(cases, "quantization_time_s"))
    for i, c in enumerate(cases):
        if c.size in bc.TIME_TARGETS_S:
            axes[0].plot([i - 0.42, i + 0.42], [bc.TIME_TARGETS_S[c.size]] * 2, color="#d62728", ls="--",
                         lw=1.2, label="native time target")
    axes[0].set_title("Time (median; lower is better)")
    _legend_below(fig, axes[0], y=0.04)
    _grouped_bars(axes[1], cases, impls, "throughput_mparams_s", "throughput (M params/s)",
                  _spread(cases, "throughput_mparams_s"))
    axes[1].set_title("Throughput (higher is better)")
    speedups = [c.targets.get("speedup", {}).get("value") for c in cases]
    if any(s is not None for s in speedups):
        text = ", ".join(f"{c.size} {c.bits}-bit: {s:.1f}x" for c, s in zip(cases, speedups) if s is not None)
        fig.text(0.5, 0.01, f"speedup native vs reference: {text} (target ≥ {bc.SPEEDUP_TARGET:g}x)",
                 ha="center", fontsize=8)
    fig.suptitle("Speed: native engine vs numpy reference vs pure I/O")
    fig.tight_layout(rect=(0, 0.11, 1, 1))
    path = out / "speed_comparison.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def memory_timeline(cases, out: Path) -> Path:
    plt = _plt()
    n = len(cases)
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(max(7.5, 5.2 * cols), 3.8 * rows + 0.6), squeeze=False)
    for ax, c in zip(axes.flat, cases):
        for impl, tl in c.timelines.items():
            # A zombie (exited, not yet reaped) reports RSS 0: not a real sample.
            tl = [(t, m) for t, m in tl if m > 0]
            if tl:
                ax.plot([t for t, _ in tl], [m for _, m in tl], color=COLORS[impl], label=LABELS[impl], lw=1.3)
        ax.set_title(f"{c.size}, {c.bits}-bit, {c.fmt}", fontsize=10)
        ax.set_xlabel("time since process start (s)")
        ax.set_ylabel("RSS (MB)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    fig.suptitle("RSS over time of each job process\n(psutil samples every 20 ms, from process start: imports included)",
                 fontsize=10)
    fig.tight_layout()
    path = out / "memory_timeline.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_all(cases: Sequence, out: Path) -> List[Path]:
    paths = [memory_comparison(cases, out), speed_comparison(cases, out), memory_timeline(cases, out)]
    if any("memory_ratio" in c.targets for c in cases):
        paths.insert(1, memory_ratio(cases, out))
    return paths
