"""Fold-in for users the MF never saw, measured on a validation split with MF dot-product scores.

Hides the MF rows of a seeded sample of validation users (users with training rows, so
that their real rows exist to compare with) and scores all their validation rows with
<u, v_item>, where u is, per row:

- real row:         the user's trained MF row (what hiding takes away; the upper reference)
- neutral:          the bundle's neutral user vector (what the service used before fold-in)
- mean of history:  the mean MF vector of the row's last N liked items (no solve)
- fold-in, last N:  model.collab.fold_in over the row's last N liked items (what the service does)
- fold-in, all:     model.collab.fold_in over every earlier liked item of the row

The history of a row is its `his` column (liked items before it, oldest first). Prints
a Markdown table of AUC and UAUC (training.evaluate's definitions) over those rows.

fold_in's ridge strength and target logit are chosen on a disjoint set of tuning users
(`--tune-users`, also hidden, never reported) by the mean of AUC and UAUC, from a small
grid; the table reports the other sample only.

    python scripts/eval/foldin.py --bundle RUN/stages/bundle-mf-KEY/bundle \
        --valid DATA/valid.parquet --users 100 --tune-users 100 --seed 0
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from model.artifacts import load_bundle
from model.collab import fold_in
from training.evaluate import _auc, uauc

#: The grid searched on the tuning users (model.collab's defaults came from it).
REGS = (0.1, 1.0, 10.0, 100.0)
TARGETS = (0.5, 1.0, 2.0, 4.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, required=True, help="Bundle with mf.* tensors (stage 2+).")
    parser.add_argument("--valid", type=Path, required=True, help="Validation split (CoLLM parquet).")
    parser.add_argument("--users", type=int, default=100, help="Users whose MF rows are hidden.")
    parser.add_argument("--tune-users", type=int, default=100, help="Other hidden users, to pick reg/target.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the user samples.")
    parser.add_argument("--history", type=int, default=10, help="N: the prompt's history length.")
    args = parser.parse_args()

    bundle = load_bundle(args.bundle)
    t, cat = bundle.tensors, bundle.catalog
    users, items = t["mf.users"].double(), t["mf.items"].double()
    neutral = t["neutral.user"].double()
    user_rows, item_rows = cat.user_rows(), cat.item_rows()

    valid = pd.read_parquet(args.valid)
    valid = valid[valid["iid"].astype(str).isin(item_rows)]
    candidates = sorted({int(u) for u in valid.loc[valid["not_cold"] == 1, "uid"] if str(u) in user_rows})
    order = np.random.default_rng(args.seed).permutation(candidates).tolist()
    tuning, hidden = set(order[: args.tune_users]), set(order[args.tune_users : args.tune_users + args.users])

    def history(his: np.ndarray) -> list[int]:
        return [item_rows[str(i)] for i in list(his)[1:] if str(i) in item_rows]  # [0] is the pad

    def score(frame: pd.DataFrame, vector: Callable[[int, list[int]], torch.Tensor]) -> tuple[float, float]:
        labels, uids = frame["label"].to_numpy(), frame["uid"].to_numpy()
        targets = [item_rows[str(i)] for i in frame["iid"]]
        histories = [history(h) for h in frame["his"]]
        scores = np.array([float(vector(u, h) @ items[i]) for u, h, i in zip(uids, histories, targets)])
        return _auc(labels, scores), uauc(uids, labels, scores)

    n = args.history
    tune_rows = valid[valid["uid"].isin(tuning)]
    grid = {
        (reg, target): score(
            tune_rows, lambda u, h, r=reg, t=target: fold_in(items[h[-n:]], neutral, r, t).double()
        )
        for reg in REGS
        for target in TARGETS
    }
    reg, target = max(grid, key=lambda k: sum(grid[k]))
    baseline = score(tune_rows, lambda u, h: neutral)
    print(f"tuning: {len(tuning)} other hidden users, {len(tune_rows)} rows; fold-in, last {n}, AUC / UAUC")
    print(f"(neutral vector on them: {baseline[0]:.4f} / {baseline[1]:.4f}):\n")
    print("| reg \\ target | " + " | ".join(str(t) for t in TARGETS) + " |")
    print("|---" * (len(TARGETS) + 1) + "|")
    for r in REGS:
        print(f"| {r} | " + " | ".join(f"{grid[r, t][0]:.4f} / {grid[r, t][1]:.4f}" for t in TARGETS) + " |")
    print(f"\nchosen: reg={reg}, target={target}\n")

    def folded(h: list[int]) -> torch.Tensor:
        return fold_in(items[h], neutral, reg=reg, target=target).double()

    def mean(h: list[int]) -> torch.Tensor:
        return items[h].mean(0) if h else neutral

    conditions: dict[str, Callable[[int, list[int]], torch.Tensor]] = {
        "real MF row (not hidden)": lambda u, h: users[user_rows[str(u)]],
        "neutral vector (before)": lambda u, h: neutral,
        f"mean of last {n} liked items' vectors": lambda u, h: mean(h[-n:]),
        f"fold-in, last {n} liked items (service)": lambda u, h: folded(h[-n:]),
        "fold-in, all earlier liked items": lambda u, h: folded(h),
    }
    rows = valid[valid["uid"].isin(hidden)]
    lengths = [len(history(h)) for h in rows["his"]]
    print(
        f"reported: {len(hidden)} hidden users (seed {args.seed}), {len(rows)} validation rows "
        f"({int(rows['label'].sum())} positive), median history {int(np.median(lengths))} items\n"
    )
    print("| user vector | AUC | UAUC |\n|---|---|---|")
    for name, vector in conditions.items():
        auc, user_auc = score(rows, vector)
        print(f"| {name} | {auc:.4f} | {user_auc:.4f} |")


if __name__ == "__main__":
    main()
