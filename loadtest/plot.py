"""The latency-versus-throughput picture of a sweep: where the knee is."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; load tests run on headless machines

import matplotlib.pyplot as plt  # noqa: E402


def step_label(report: dict[str, Any]) -> str:
    """What a sweep step asked for: "2 req/s" (open loop) or "C=4" (closed loop)."""
    if report["mode"] == "open":
        return f"{report['target_rate']:g} req/s"
    return f"C={report['concurrency']}"


def plot_latency_throughput(reports: list[dict[str, Any]], path: Path, title: str | None = None) -> Path:
    """p50 and p99 latency against achieved candidates/s, one point per sweep step."""
    points = [r for r in reports if r["candidates_per_s"] is not None and r["latency_p50_ms"] is not None]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    x = [r["candidates_per_s"] for r in points]
    ax.plot(x, [r["latency_p50_ms"] for r in points], "o-", label="p50")
    ax.plot(x, [r["latency_p99_ms"] for r in points], "s--", label="p99")
    for r in points:
        ax.annotate(
            step_label(r),
            (r["candidates_per_s"], r["latency_p99_ms"]),
            textcoords="offset points",
            xytext=(4, 4),
            fontsize=8,
        )
    ax.set_xlabel("achieved throughput (candidates/s)")
    ax.set_ylabel("latency (ms)")
    ax.set_title(title or "sellarec: latency vs throughput")
    ax.grid(True, alpha=0.3)
    ax.legend()
    if not points:
        ax.text(0.5, 0.5, "no successful requests", ha="center", transform=ax.transAxes)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
