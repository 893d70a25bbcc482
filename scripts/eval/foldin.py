"""Fold-in for users the MF never saw, measured on a validation split with MF dot-product scores.

Hides the MF rows of a seeded sample of warm validation users (users with training rows, so
that their real rows exist to compare with), folds each of them in from their TRAINING rows
as POST /events would have received them (every row, label 0 or 1, in time order), and
scores all their validation rows with <u, v_item>, where u is, per user:

- real row:            the user's trained MF row (what hiding takes away; the upper reference)
- neutral:             the bundle's neutral user vector (what the service used before fold-in)
- positives only:      model.collab.fold_in over the last N liked items (the service's fallback)
- labelled:            model.collab.fold_in_labelled over the last K labelled events (K = the
                       service's events_keep); the positives-only fold-in for a user whose
                       window holds no negative (this is what the service does)
- labelled, all rows:  fold_in_labelled over every training row of the user (no window)

Prints Markdown tables of AUC and UAUC (training.evaluate's definitions) over those rows,
and a paired bootstrap over the reported users of each condition's difference to neutral.

The fold-ins' strengths are chosen on a disjoint set of tuning users (`--tune-users`, also
hidden, never reported), by the mean of AUC and UAUC, from small grids; the tables report
the other users only. Validation rows only: no test split is read.

    python scripts/eval/foldin.py --bundle RUN/stages/bundle-mf-KEY/bundle \\
        --train DATA/train.parquet --valid DATA/valid.parquet --tune-users 100 --seed 0
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from sellarec.model.artifacts import load_bundle
from sellarec.model.bundle import MF_ITEMS, MF_USERS, NEUTRAL_USER
from sellarec.model.collab import fold_in, fold_in_labelled
from sellarec.training.evaluate import _auc, uauc

#: The grids searched on the tuning users (model.collab's defaults came from them).
RIDGE_REGS = (1.0, 10.0, 100.0, 1000.0)
RIDGE_TARGETS = (0.5, 1.0, 2.0)
LOGISTIC_REGS = (0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0)

#: One user's training rows: item rows of the MF table and labels, oldest first.
Events = tuple[list[int], list[int]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, required=True, help="Bundle with mf.* tensors (stage 2+).")
    parser.add_argument("--train", type=Path, required=True, help="Training split (CoLLM parquet).")
    parser.add_argument("--valid", type=Path, required=True, help="Validation split (CoLLM parquet).")
    parser.add_argument("--users", type=int, default=0, help="Users reported (0: all but the tuning ones).")
    parser.add_argument("--tune-users", type=int, default=100, help="Other hidden users, to pick strengths.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the user samples and the bootstrap.")
    parser.add_argument("--history", type=int, default=10, help="N: the prompt's history length.")
    parser.add_argument("--keep", type=int, default=100, help="K: events kept per user (events_keep).")
    parser.add_argument("--bootstrap", type=int, default=2000, help="Bootstrap resamples of the users.")
    args = parser.parse_args()

    bundle = load_bundle(args.bundle)
    t, cat = bundle.tensors, bundle.catalog
    users, items = t[MF_USERS].double(), t[MF_ITEMS].double()
    neutral = t[NEUTRAL_USER].double()
    user_rows, item_rows = cat.user_rows(), cat.item_rows()

    valid = pd.read_parquet(args.valid)
    valid = valid[valid["iid"].astype(str).isin(item_rows)]
    train = pd.read_parquet(args.train)
    train = train[train["iid"].astype(str).isin(item_rows)]
    train = train.sort_values("timestamp", kind="stable")  # the order /events keeps (ties: arrival)
    events: dict[int, Events] = {
        int(uid): ([item_rows[str(i)] for i in g["iid"]], [int(y) for y in g["label"]])
        for uid, g in train.groupby("uid", sort=False)
    }
    warm = {int(u) for u in valid.loc[valid["not_cold"] == 1, "uid"]}
    candidates = sorted(u for u in warm if str(u) in user_rows and u in events)
    order = np.random.default_rng(args.seed).permutation(candidates).tolist()
    tuning = order[: args.tune_users]
    rest = order[args.tune_users :]
    hidden = rest[: args.users] if args.users > 0 else rest

    n, k = args.history, args.keep

    def liked(uid: int) -> list[int]:
        """The last N positives: the prompt history /events builds, and the fallback's input."""
        rows, labels = events[uid]
        return [i for i, y in zip(rows, labels) if y == 1][-n:]

    def positives_only(uid: int, reg: float, target: float) -> torch.Tensor:
        return fold_in(items[liked(uid)], neutral, reg, target).double()

    def labelled(uid: int, reg: float, window: int | None, fallback: Callable[[int], torch.Tensor]):
        rows, labels = events[uid]
        if window is not None:
            rows, labels = rows[-window:], labels[-window:]
        if 0 not in labels:
            return fallback(uid)
        return fold_in_labelled(items[rows], torch.tensor(labels), neutral, reg).double()

    def rows_of(group: list[int]) -> pd.DataFrame:
        return valid[valid["uid"].isin(set(group))]

    def scores(frame: pd.DataFrame, vector: Callable[[int], torch.Tensor]) -> np.ndarray:
        vectors = {u: vector(u) for u in dict.fromkeys(int(u) for u in frame["uid"])}
        targets = [item_rows[str(i)] for i in frame["iid"]]
        return np.array([float(vectors[int(u)] @ items[i]) for u, i in zip(frame["uid"], targets)])

    def metrics(frame: pd.DataFrame, s: np.ndarray) -> tuple[float, float]:
        return _auc(frame["label"].to_numpy(), s), uauc(frame["uid"].to_numpy(), frame["label"].to_numpy(), s)

    tune = rows_of(tuning)
    base = metrics(tune, scores(tune, lambda u: neutral))
    ridge = {
        (r, tg): metrics(tune, scores(tune, lambda u, r=r, tg=tg: positives_only(u, r, tg)))
        for r in RIDGE_REGS
        for tg in RIDGE_TARGETS
    }
    ridge_reg, ridge_target = max(ridge, key=lambda key: sum(ridge[key]))

    def fallback(u: int) -> torch.Tensor:
        return positives_only(u, ridge_reg, ridge_target)

    logistic = {
        r: metrics(tune, scores(tune, lambda u, r=r: labelled(u, r, k, fallback))) for r in LOGISTIC_REGS
    }
    logistic_reg = max(logistic, key=lambda key: sum(logistic[key]))

    print(f"tuning: {len(tuning)} hidden users (seed {args.seed}), {len(tune)} validation rows; AUC / UAUC")
    print(f"(neutral vector on them: {base[0]:.4f} / {base[1]:.4f})\n")
    print(f"positives-only fold-in, last {n} liked training rows:\n")
    print("| reg \\ target | " + " | ".join(str(tg) for tg in RIDGE_TARGETS) + " |")
    print("|---" * (len(RIDGE_TARGETS) + 1) + "|")
    for r in RIDGE_REGS:
        cells = " | ".join(f"{ridge[r, tg][0]:.4f} / {ridge[r, tg][1]:.4f}" for tg in RIDGE_TARGETS)
        print(f"| {r} | {cells} |")
    print(f"\nchosen: reg={ridge_reg}, target={ridge_target}\n")
    print(f"labelled fold-in, last {k} training rows (positives-only fallback as chosen above):\n")
    print("| reg | " + " | ".join(str(r) for r in LOGISTIC_REGS) + " |")
    print("|---" * (len(LOGISTIC_REGS) + 1) + "|")
    print("| AUC / UAUC | " + " | ".join(f"{a:.4f} / {b:.4f}" for a, b in logistic.values()) + " |")
    print(f"\nchosen: reg={logistic_reg}\n")

    conditions: dict[str, Callable[[int], torch.Tensor]] = {
        "real MF row (not hidden)": lambda u: users[user_rows[str(u)]],
        "neutral vector (before fold-in)": lambda u: neutral,
        f"positives-only fold-in, last {n} liked": fallback,
        f"labelled fold-in, last {k} events (service)": lambda u: labelled(u, logistic_reg, k, fallback),
        "labelled fold-in, all training rows": lambda u: labelled(u, logistic_reg, None, fallback),
    }
    report = rows_of(hidden)
    counts = [len(events[u][0]) for u in hidden]
    no_negative = sum(0 not in events[u][1][-k:] for u in hidden)
    print(
        f"reported: {len(hidden)} other hidden users, {len(report)} validation rows "
        f"({int(report['label'].sum())} positive); training rows per user: median {int(np.median(counts))}, "
        f"{sum(c > k for c in counts)} users with more than {k}; {no_negative} users without a negative "
        f"in their last {k} (positives-only fallback)\n"
    )
    labels, uids = report["label"].to_numpy(), report["uid"].to_numpy()
    scored = {name: scores(report, vector) for name, vector in conditions.items()}
    neutral_scores = scored["neutral vector (before fold-in)"]

    # Paired bootstrap over users: resample the reported users, recompute both metrics' gaps.
    rng = np.random.default_rng(args.seed)
    by_user = {u: np.flatnonzero(uids == u) for u in hidden}
    draws = [
        np.concatenate([by_user[u] for u in rng.choice(hidden, len(hidden))]) for _ in range(args.bootstrap)
    ]

    def per_user_auc(s: np.ndarray) -> dict[int, float]:
        out = {}
        for u, idx in by_user.items():
            value = _auc(labels[idx], s[idx])
            if value is not None:
                out[u] = value
        return out

    neutral_per_user = per_user_auc(neutral_scores)
    print("| user vector | AUC | UAUC | AUC - neutral [95% CI] | UAUC - neutral [95% CI] |")
    print("|---|---|---|---|---|")
    for name, s in scored.items():
        auc, user_auc = metrics(report, s)
        cells = f"| {name} | {auc:.4f} | {user_auc:.4f} |"
        if s is neutral_scores:
            print(cells + " - | - |")
            continue
        per_user = per_user_auc(s)
        gaps = np.array([per_user[u] - neutral_per_user[u] for u in hidden if u in per_user])
        auc_gaps = [_auc(labels[idx], s[idx]) - _auc(labels[idx], neutral_scores[idx]) for idx in draws]
        uauc_gaps = [gaps[rng.integers(0, len(gaps), len(gaps))].mean() for _ in range(args.bootstrap)]
        lo, hi = np.percentile(auc_gaps, [2.5, 97.5])
        ulo, uhi = np.percentile(uauc_gaps, [2.5, 97.5])
        print(
            f"{cells} {auc - metrics(report, neutral_scores)[0]:+.4f} [{lo:+.4f}, {hi:+.4f}] "
            f"| {gaps.mean():+.4f} [{ulo:+.4f}, {uhi:+.4f}] |"
        )

    # Diagnostic: how much of a gain a per-user base rate alone would give (not a user vector):
    # the neutral score plus the logit of the user's smoothed positive rate over the same window.
    def base_rate(u: int) -> float:
        window = events[u][1][-k:]
        rate = (sum(window) + 1) / (len(window) + 2)
        return float(np.log(rate / (1 - rate)))

    offset = neutral_scores + np.array([base_rate(int(u)) for u in uids])
    auc, user_auc = metrics(report, offset)
    print(f"\ndiagnostic, neutral score + logit of the user's positive rate in the last {k} events")
    print(f"(a per-user bias, no user vector): AUC {auc:.4f}, UAUC {user_auc:.4f}")


if __name__ == "__main__":
    main()
