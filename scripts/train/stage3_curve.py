"""Validation AUC along stage 3: does the last step's model score best, or an earlier one?

    python scripts/train/stage3_curve.py --config training/configs/ml1m.yaml --run runs/ml1m \
        --variant sellarec --every 32 --select 500 --out runs/curve

Reuses the stage-1, distillation and stage-2 caches of a finished `sellarec-train run` (the
same cache keys, so nothing before stage 3 is retrained), trains the variant's stage 3 as the
pipeline does, snapshots the trained tables and projections every `--every` optimiser steps,
writes a bundle of each snapshot and evaluates it on two disjoint validation samples: the
report's rows (`eval.limit`, `eval.seed`: the numbers docs/results.md compares) and a seeded
`--select` rows drawn from the rest of validation, on which a checkpoint could be chosen without
touching the report's rows. Prints one line per snapshot and writes them as JSON to OUT, with a plot
(OUT/curve.png). The last snapshot is the bundle the pipeline writes (after `stage3.level_finish`
where set; the earlier ones are before it); `stage3.lora_lr` is refused (the adapter is not
snapshotted).
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch

from sellarec.training import assembly
from sellarec.training.config import VARIANTS, load_config, parse_sets
from sellarec.training.data import sample, sample_positions
from sellarec.training.pipeline import Pipeline, templates
from sellarec.training.stage3 import train_stage3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="training/configs/ml1m.yaml")
    parser.add_argument("--run", type=Path, default=Path("runs/ml1m"))
    parser.add_argument("--variant", default="sellarec")
    parser.add_argument("--every", type=int, default=32, help="Snapshot every this many optimiser steps.")
    parser.add_argument("--at", default="", help="Snapshot at these steps instead (comma-separated).")
    parser.add_argument("--select", type=int, default=500, help="Validation rows outside the report's.")
    parser.add_argument("--out", type=Path, default=Path("runs/curve"))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    cfg = load_config(args.config, parse_sets(args.set))
    if cfg.stage3.lora_lr is not None:  # the snapshots hold the tables and projections, not the adapter
        parser.error("stage3.lora_lr trains the adapter too: its snapshots are not taken here")
    torch.set_num_threads(cfg.threads)
    variant = VARIANTS[args.variant]
    pipe = Pipeline(cfg, args.run, progress=False)
    adapter, _ = pipe.stage1()
    semantic, _ = pipe.distill()
    collab, _ = pipe.stage2(align=variant.align, holdout=variant.mf_residual or cfg.stage3.held_out_mf)
    _, spec = templates(cfg, variant)
    scorer, tables, rows = assembly.stage3_start(cfg, pipe.data, variant, spec, adapter, collab, semantic)

    modules = [m for m in (tables, scorer.proj_c, scorer.proj_w) if m is not None]
    snapshots: dict[int, list[dict[str, torch.Tensor]]] = {}
    at = {int(x) for x in args.at.split(",") if x}

    def snapshot(step: int) -> None:
        if (step in at) if at else (step % args.every == 0):
            snapshots[step] = [copy.deepcopy(m.state_dict()) for m in modules]

    metrics = train_stage3(scorer, tables, rows, cfg.stage3, cfg.seed, progress=True, on_step=snapshot)
    steps = len(metrics["losses"])
    snapshots[steps] = [copy.deepcopy(m.state_dict()) for m in modules]

    valid = pipe.data.valid
    report = sample(valid, cfg.eval.limit, cfg.eval.seed)
    rest = valid.drop(index=valid.index[sample_positions(len(valid), cfg.eval.limit, cfg.eval.seed)])
    select = sample(rest.reset_index(drop=True), args.select, cfg.eval.seed + 1)
    lines = []
    for step, states in sorted(snapshots.items()):
        for m, state in zip(modules, states, strict=True):
            m.load_state_dict(state)
        d = args.out / f"step-{step:04d}"
        assembly.write_variant(
            d,
            cfg,
            pipe.data,
            variant,
            assembly.trained_tensors(pipe.data, scorer, tables),
            spec=spec,
            adapter=adapter,
            collab_dim=cfg.stage2.collab_dim,
        )
        line = {"step": step, "of": steps}
        for name, frame in (("report", report), ("select", select)):
            (d / name).mkdir(parents=True, exist_ok=True)
            result = assembly.evaluation(d / name, d / "bundle", frame, cfg.eval.batch_size, progress=False)
            line |= {f"{name}_{k}": result[k] for k in ("auc", "uauc", "auc_warm", "auc_cold")}
        lines.append(line)
        print(json.dumps(line), flush=True)
    (args.out / "curve.json").write_text(
        json.dumps({"losses": metrics["losses"], "snapshots": lines}, indent=1)
    )
    plot(lines, f"{args.variant}, seed {cfg.seed}", args.out / "curve.png")


def plot(lines: list[dict], title: str, path: Path) -> None:
    """Validation AUC of each snapshot against its step, on both samples."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps = [line["step"] for line in lines]
    for name, label in (("report", "the report's rows"), ("select", "the selection rows")):
        ax.plot(steps, [line[f"{name}_auc"] for line in lines], marker="o", label=label)
    ax.set(xlabel="stage-3 optimiser step", ylabel="validation AUC", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
