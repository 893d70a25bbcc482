"""Does stage 1 learn? One pass of stage 1 on the learning test's synthetic data, loss by quarter.

    python scripts/train/stage1_synthetic.py --rows 1024 --set lr=1e-3 --set warmup_steps=8 \\
        --set lora_top_layers=8 [--spec genre_weight=6 --spec collab_weight=0.5]

Runs `train_stage1` (the real SmolLM2 backbone, one torch thread) on `--rows` seeded rows of
`SyntheticSpec(seed=3)` (what tests/test_learning.py uses for stage 3) with the stage-1 prompt
at history 5, and prints the mean running loss of each quarter of the steps beside the
base-rate BCE. One pass, so each step's loss is on rows not yet trained on. `--set` takes
`Stage1Config` fields (YAML values: `--set 'target_modules=[q_proj, v_proj, o_proj]'`), `--spec`
`SyntheticSpec` fields. The table "Stage 1 at other settings" of docs/results.md came from it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from sellarec.model.backbone import SMOLLM2_ALIAS, resolve
from sellarec.model.prompts import TemplateSpec
from sellarec.training.config import load_config, parse_sets
from sellarec.training.data import Dataset, sample
from sellarec.training.stage1 import train_stage1
from sellarec.training.synthetic import SyntheticSpec, synthetic_frames


def quarters(losses: list[float]) -> list[float]:
    """Mean running loss of each quarter of the steps (fewer parts when there are fewer steps)."""
    return [round(float(np.mean(part)), 3) for part in np.array_split(losses, 4) if len(part)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1024, help="seeded train rows, one pass")
    parser.add_argument("--set", dest="sets", action="append", default=[], help="Stage1Config KEY=VALUE")
    parser.add_argument("--spec", action="append", default=[], help="SyntheticSpec KEY=VALUE")
    parser.add_argument("--backbone", default=SMOLLM2_ALIAS)
    parser.add_argument("--out", type=Path, help="write the numbers here as JSON")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = load_config(None, {f"stage1.{k}": v for k, v in parse_sets(args.sets).items()}).stage1
    spec = SyntheticSpec(**{"seed": 3, **parse_sets(args.spec)})
    train, valid, _ = synthetic_frames(spec)
    rows = sample(Dataset.from_frames(train, valid, name="stage1-synthetic").train, args.rows, seed=0)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        m = train_stage1(
            resolve(args.backbone), TemplateSpec(stage="stage1", history_length=5), rows, cfg, 0, Path(tmp)
        )
    result = {
        "rows": len(rows),
        "stage1": dataclasses.asdict(cfg),
        "spec": dataclasses.asdict(spec),
        "loss_quarters": quarters(m["losses"]),
        "base_rate_bce": round(float(m["base_rate_bce"]), 3),
        "seconds": round(time.perf_counter() - start, 1),
    }
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
