"""The size sweep as a figure: candidates/s and p50 latency against rerank size, per path."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

#: (JSON key of the rate, JSON key of the p50, label, matplotlib style) per path.
PATHS = (
    ("engine_per_s", "engine_p50_ms", "engine (torch backend)", dict(color="C0", marker="o")),
    ("vllm_per_s", "vllm_p50_ms", "vLLM", dict(color="C1", marker="s")),
    ("naive_per_s", "naive_p50_ms", "straightforward (HF, full prompts)", dict(color="C2", marker="^")),
    ("roofline_per_s", "roofline_ms", "roofline", dict(color="0.4", linestyle="--", marker="")),
)


def plot_sweep(cases: Sequence[dict[str, Any]], title: str, path: Path) -> Path:
    """Two panels (log-log): candidates/s and p50 per request; a path without numbers is left out.

    The roofline's latency is the time one request would take at the roofline rate.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on servers
    import matplotlib.pyplot as plt

    fig, (rate_ax, p50_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    sizes = [c["candidates"] for c in cases]
    for rate_key, p50_key, label, style in PATHS:
        points = [(c["candidates"], c.get(rate_key), _p50(c, rate_key, p50_key)) for c in cases]
        points = [p for p in points if p[1]]
        if not points:
            continue
        xs = [p[0] for p in points]
        rate_ax.plot(xs, [p[1] for p in points], label=label, **style)
        p50_ax.plot(xs, [p[2] for p in points], label=label, **style)
    for ax, ylabel in ((rate_ax, "candidates / s (higher is better)"), (p50_ax, "p50 per request, ms")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(sizes, [str(s) for s in sizes])
        ax.minorticks_off()
        ax.set_xlabel("candidates per request")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="major", alpha=0.3)
    rate_ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _p50(case: dict[str, Any], rate_key: str, p50_key: str) -> float | None:
    if p50_key == "roofline_ms":
        return 1000 * case["candidates"] / case[rate_key]
    return case.get(p50_key)
