"""PNG plots of benchmark runs: latency CDFs per configuration, goodput and ITL percentiles against
the request rate, and ITL over the time of one run."""

from __future__ import annotations

import pathlib
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np


def latency_cdfs(runs: dict[str, list[dict[str, Any]]], path: pathlib.Path) -> None:
    """One panel per metric (TTFT, ITL, E2E); one curve per run label."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, (key, title) in zip(axes, (("ttft", "TTFT"), ("itl", "ITL (every gap)"), ("e2e", "E2E")), strict=True):
        for label, requests in runs.items():
            values = sorted(v * 1e3 for r in requests if r["ok"] for v in
                            (r["itl"] if key == "itl" else [r[key]]) if v is not None)
            if values:
                ax.plot(values, np.arange(1, len(values) + 1) / len(values), label=label)
        ax.set_xscale("log")
        ax.set_xlabel(f"{title} (ms)")
        ax.set_ylabel("fraction of requests" if key != "itl" else "fraction of gaps")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def versus_rate(summaries: dict[str, list[tuple[float, dict[str, Any]]]], path: pathlib.Path) -> None:
    """Goodput, ITL p50/p99 and TTFT p90 against the request rate, one line per configuration."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for label, points in summaries.items():
        rates = [rate for rate, _ in points]
        axes[0].plot(rates, [s["goodput_rps"] for _, s in points], marker="o", label=label)
        axes[1].plot(rates, [s["itl_ms"]["p50"] for _, s in points], marker="o", label=f"{label} p50")
        axes[1].plot(rates, [s["itl_ms"]["p99"] for _, s in points], marker="x", linestyle="--", label=f"{label} p99")
        axes[2].plot(rates, [s["ttft_ms"]["p90"] for _, s in points], marker="o", label=label)
    for ax, ylabel in zip(axes, ("goodput (req/s meeting both SLOs)", "ITL (ms)", "TTFT p90 (ms)"), strict=True):
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def itl_over_time(runs: dict[str, list[dict[str, Any]]], path: pathlib.Path) -> None:
    fig, ax = plt.subplots(figsize=(10, 4))
    for label, requests in runs.items():
        times = [t for r in requests if r["ok"] for t in r["chunk_times"][1:]]
        gaps = [g * 1e3 for r in requests if r["ok"] for g in r["itl"]]
        ax.scatter(times, gaps, s=3, alpha=0.5, label=label)
    ax.set_xlabel("time since the run started (s)")
    ax.set_ylabel("ITL (ms)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, markerscale=4)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
