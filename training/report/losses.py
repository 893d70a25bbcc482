"""The training-loss curves of stage 1 and every stage-3 bundle, against the base-rate BCE
(what a model that learned nothing about the rows reaches)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sellarec.training.config import VARIANTS
from sellarec.training.report.context import LABELS, Report

#: Steps in the moving average of the loss plot.
LOSS_WINDOW = 16


@dataclass(frozen=True)
class LossCurve:
    """The per-step training loss of one cached stage."""

    #: "stage 1" or "stage 3".
    stage: str
    #: What trained: "stage 1" or the variant's label.
    label: str
    #: The stage's cache directory name.
    name: str
    #: Training rows.
    rows: int
    #: BCE of every optimiser step.
    losses: np.ndarray
    #: BCE of the constant label-mean prediction on the same rows.
    base_rate: float

    @property
    def title(self) -> str:
        return self.stage if self.stage == self.label else f"{self.stage}, {self.label}"


def _trained_stages(results: dict[str, dict]) -> list[tuple[str, str]]:
    """(stage, cache directory) of stage 1 and of every stage-3 bundle the results use, once each."""
    found: dict[str, str] = {}
    for res in results.values():
        for stage, entry in res.get("stages", {}).items():
            variant = stage.removeprefix("bundle-")
            if stage == "stage1" or (variant != stage and variant in VARIANTS and VARIANTS[variant].stage3):
                found.setdefault(entry["dir"], stage)
    return [(stage, directory) for directory, stage in found.items()]


def _loss_curve(runs: Path, stage: str, directory: str) -> LossCurve | None:
    """The curve a stage's done.json records (None before per-step losses were recorded)."""
    done = runs / "stages" / directory / "done.json"
    m = (json.loads(done.read_text()).get("metrics") or {}) if done.exists() else {}
    if not m.get("losses") or m.get("base_rate_bce") is None:
        return None
    variant = stage.removeprefix("bundle-")
    first = stage == "stage1"
    return LossCurve(
        stage="stage 1" if first else "stage 3",
        label="stage 1" if first else LABELS.get(variant, variant),
        name=directory,
        rows=int(m.get("rows", 0)),
        losses=np.asarray(m["losses"], dtype=float),
        base_rate=float(m["base_rate_bce"]),
    )


def loss_curves(r: Report) -> tuple[list[LossCurve], list[str]]:
    """Curves of stage 1 and every stage-3 bundle of the base run; and the stage directories
    that recorded no per-step losses (built before they were recorded)."""
    curves, missing = [], []
    for stage, directory in _trained_stages(r.results):
        curve = _loss_curve(r.runs, stage, directory)
        if curve is None:
            missing.append(directory)
        else:
            curves.append(curve)
    return curves, missing


def _moving_average(x: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over up to `window` steps (shorter at the start)."""
    c = np.concatenate([[0.0], np.cumsum(x)])
    i = np.arange(1, len(x) + 1)
    lo = np.maximum(i - window, 0)
    return (c[i] - c[lo]) / (i - lo)


def plot_losses(curves: list[LossCurve], path: Path) -> Path | None:
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, stage in zip(axes, ("stage 1", "stage 3"), strict=True):
        for k, c in enumerate(x for x in curves if x.stage == stage):
            colour = f"C{k}"
            steps = np.arange(1, len(c.losses) + 1)
            ax.plot(steps, c.losses, color=colour, alpha=0.25, linewidth=0.8)
            ax.plot(
                steps,
                _moving_average(c.losses, LOSS_WINDOW),
                color=colour,
                linewidth=1.6,
                label=f"{c.label} ({c.rows} rows)",
            )
            ax.axhline(c.base_rate, color=colour, linestyle="--", linewidth=1.0)
        ax.set_title(stage if stage == "stage 1" else f"{stage} (all variants)")
        ax.set_xlabel("optimiser step")
        if ax.has_data():
            ax.legend(fontsize=7)
    axes[0].set_ylabel("training BCE")
    fig.suptitle(f"BCE per step (faint), moving average of {LOSS_WINDOW} steps; dashed: base-rate BCE")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def loss_section(r: Report) -> list[str]:
    lines = ["## Training loss", ""]
    curves, missing = loss_curves(r)
    fig = plot_losses(curves, r.figures / "training_loss_ml1m.png")
    if fig is not None:
        lines += [
            f"![training loss]({r.figure_link(fig)})",
            "",
            "BCE of each optimiser step (faint) and its moving average over "
            f"{LOSS_WINDOW} steps, against the base-rate BCE (dashed, same colour): the loss of "
            "predicting the label mean for every row, which a model that learned from the rows must "
            "fall below. Quarters are of the optimiser steps.",
            "",
            "| stage | rows | steps | first-quarter mean | last-quarter mean | base-rate BCE | "
            "last quarter - base |",
            "|---|---|---|---|---|---|---|",
        ]
        for c in curves:
            q = max(1, len(c.losses) // 4)
            first, last = float(c.losses[:q].mean()), float(c.losses[-q:].mean())
            lines.append(
                f"| {c.title} (`{c.name}`) | {c.rows} | {len(c.losses)} | {first:.4f} | {last:.4f} | "
                f"{c.base_rate:.4f} | {last - c.base_rate:+.4f} |"
            )
    else:
        lines.append("No per-step losses recorded in this run's stage 1 or stage-3 caches.")
    if missing:
        lines += [
            "",
            "Built before per-step losses were recorded: " + ", ".join(f"`{m}`" for m in missing) + ".",
        ]
    return lines
