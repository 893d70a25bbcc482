"""Rows per second of the LLM training stages and of evaluation, before and after the budget
choices of training/configs/ml1m.yaml, measured in one run on one machine.

    python scripts/perf/train_throughput.py --train DATA/train.parquet --valid DATA/valid.parquet

Each line is one setting on the same seeded rows: stage 1 with LoRA on every layer (the
paper's placement) against the top 8 layers, each prompt length (history 10, the paper's,
against 5), and one torch thread against two (a single worker on an idle machine). Prints
a table and writes it as JSON with --out. A script that prints numbers, not a test.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from sellarec.model.prompts import Slot, TemplateSpec
from sellarec.training.batches import CollabInputs
from sellarec.training.config import Stage1Config, Stage3Config
from sellarec.training.data import Dataset, sample
from sellarec.training.evaluate import score_llm
from sellarec.training.stage1 import train_stage1
from sellarec.training.stage3 import SoftInputTables, build_scorer, train_stage3

BACKBONE = "smollm2-135m-instruct"


def stage1_rate(data: Dataset, rows: int, history: int, top_layers: int | None, threads: int) -> float:
    torch.set_num_threads(threads)
    frame = sample(data.train, rows, 0)
    cfg = Stage1Config(lr=1e-3, batch_size=8, lora_top_layers=top_layers)
    with tempfile.TemporaryDirectory() as out:
        spec = TemplateSpec(stage="stage1", history_length=history)
        m = train_stage1(BACKBONE, spec, frame, cfg, 0, Path(out), False)
    return rows / m["seconds"]


def _collm(data: Dataset, history: int):
    spec = TemplateSpec(stage="stage3", history_length=history, slots=(Slot.USER, Slot.ITEM))
    scorer = build_scorer(BACKBONE, None, spec, 64, None, 0)
    g = torch.Generator().manual_seed(0)
    users, items = torch.randn(data.n_users, 64, generator=g), torch.randn(data.n_items, 64, generator=g)
    return scorer, users, items


def stage3_rate(data: Dataset, rows: int, history: int, threads: int) -> float:
    torch.set_num_threads(threads)
    scorer, users, items = _collm(data, history)
    tables = SoftInputTables(users, items, None)
    cfg = Stage3Config(lr=1e-3, batch_size=8)
    m = train_stage3(scorer, tables, sample(data.train, rows, 3), cfg, 0, False)
    return rows / m["seconds"]


def eval_rate(data: Dataset, rows: int, history: int, threads: int) -> float:
    torch.set_num_threads(threads)
    scorer, users, items = _collm(data, history)
    inputs = CollabInputs(
        users,
        items,
        None,
        {str(u): u for u in range(len(users))},
        {str(i): i for i in range(len(items))},
        {"user": users.mean(0), "item": items.mean(0)},
    )
    frame = sample(data.valid, rows, 0)
    start = time.perf_counter()
    score_llm(scorer, inputs, frame, 16, False)
    return rows / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", required=True)
    parser.add_argument("--valid", required=True)
    parser.add_argument("--rows", type=int, default=48, help="rows per measurement")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    data = Dataset.load(args.train, args.valid)
    n = args.rows
    plan = [
        ("stage 1", "LoRA every layer, history 10, 1 thread", lambda: stage1_rate(data, n, 10, None, 1)),
        ("stage 1", "LoRA top 8 layers, history 10, 1 thread", lambda: stage1_rate(data, n, 10, 8, 1)),
        ("stage 1", "LoRA top 8 layers, history 5, 1 thread", lambda: stage1_rate(data, n, 5, 8, 1)),
        ("stage 3", "history 10, 1 thread", lambda: stage3_rate(data, n, 10, 1)),
        ("stage 3", "history 5, 1 thread", lambda: stage3_rate(data, n, 5, 1)),
        ("stage 3", "history 5, 2 threads", lambda: stage3_rate(data, n, 5, 2)),
        ("evaluation", "history 10, 1 thread", lambda: eval_rate(data, 2 * n, 10, 1)),
        ("evaluation", "history 5, 1 thread", lambda: eval_rate(data, 2 * n, 5, 1)),
        ("evaluation", "history 5, 2 threads", lambda: eval_rate(data, 2 * n, 5, 2)),
    ]
    results = []
    for stage, setting, measure in plan:
        rate = measure()
        results.append({"stage": stage, "setting": setting, "rows_per_s": rate})
        print(f"{stage:<11} {setting:<42} {rate:6.2f} rows/s", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
