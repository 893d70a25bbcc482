"""Where a stage-3 run's gradient spikes come from: loss and per-part gradient norms per step.

    python scripts/train/grad_norms.py RUN/stages/bundle-sellarec-KEY/done.json [...] \
        --labels "seed 0" [...] --out docs/figures/stage3_grad_norms.png

Reads the `losses`, `grad_norms` and `group_grad_norms` (tables, proj_c, proj_w; recorded
before any clipping) that stage 3 writes into its done.json, prints for each run the median
and largest norm and each part's share of the squared norm over its ten largest steps and at
the median step, and draws one column per run: the loss (20-step mean) against the base-rate
BCE above, the norms on a log scale below.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def shares(record: dict, top: int = 10) -> dict[str, tuple[float, float]]:
    """Each part's share of the squared gradient norm: (over the `top` largest steps, median step)."""
    total = np.asarray(record["grad_norms"])
    parts = {k: np.asarray(v) ** 2 for k, v in (record.get("group_grad_norms") or {}).items()}
    if not parts:
        return {}
    summed = sum(parts.values())
    largest = np.argsort(-total)[:top]
    return {
        k: (float(v[largest].sum() / summed[largest].sum()), float(np.median(v / np.maximum(summed, 1e-30))))
        for k, v in parts.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("done", nargs="+", type=Path, help="stage-3 bundles' done.json files")
    parser.add_argument("--labels", nargs="*", help="one title per run (default: the file's folder)")
    parser.add_argument("--out", type=Path, help="write the figure here (PNG)")
    parser.add_argument("--top", type=int, default=10, help="how many of the largest steps to attribute")
    args = parser.parse_args()
    labels = args.labels or [p.parent.name for p in args.done]
    if len(labels) != len(args.done):
        parser.error("give one label per done.json")
    records = []
    for path, label in zip(args.done, labels, strict=True):
        record = json.loads(path.read_text()).get("metrics") or {}
        if "grad_norms" not in record:
            raise SystemExit(f"{path}: no gradient norms recorded (written before they were?)")
        norms = np.asarray(record["grad_norms"])
        parts = ", ".join(f"{k} {a:.2f} / {m:.2f}" for k, (a, m) in shares(record, args.top).items())
        print(f"{label}: {len(norms)} steps, norm median {np.median(norms):.2f}, max {norms.max():.1f}")
        parts = parts or "no parts recorded"
        print(f"  share of the squared norm, {args.top} largest steps / median step: {parts}")
        records.append((label, record))
    if args.out:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(
            2, len(records), figsize=(4.2 * len(records), 6), squeeze=False, sharex="col"
        )
        for col, (label, record) in enumerate(records):
            losses = np.asarray(record["losses"])
            smooth = np.convolve(losses, np.ones(20) / 20, mode="valid")
            top, bottom = axes[0][col], axes[1][col]
            top.plot(np.arange(19, len(losses)), smooth, label="loss, 20-step mean")
            top.axhline(record["base_rate_bce"], color="grey", ls="--", label="base-rate BCE")
            top.set_title(label)
            bottom.semilogy(record["grad_norms"], color="black", lw=1, label="all")
            for name, norms in (record.get("group_grad_norms") or {}).items():
                bottom.semilogy(norms, lw=0.8, alpha=0.8, label=name)
            bottom.set_xlabel("optimiser step")
            if col == 0:
                top.set_ylabel("BCE")
                bottom.set_ylabel("gradient L2 norm (before clipping)")
                top.legend(fontsize=7)
                bottom.legend(fontsize=7)
        fig.tight_layout()
        args.out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.out, dpi=110)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
