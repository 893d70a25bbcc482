"""Where a variant gains or loses against MF: between users or within them.

A global AUC compares rows of different users, so it rewards a model twice: for ordering a
user's own rows (what UAUC measures) and for ordering the users by how much they like what
they are shown. `user_levels` splits a model's scores into those two parts on the same rows:
each row's score replaced by its user's mean score over the sample (the between-user part),
and by its deviation from that mean (the within-user part). The AUC of each part says which
one the model reads better; neither is fitted, so nothing here is tuned on validation.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from safetensors.numpy import load_file
from sklearn.metrics import roc_auc_score

from sellarec.training.report.context import LABELS, Report, plus_minus
from sellarec.training.report.stats import mean_std

#: The rows of the section, in the paper's order (those measured).
LEVEL_VARIANTS: tuple[str, ...] = ("mf", "collm", "sellarec", "sella-proj", "sella-warm")


def user_levels(uid: np.ndarray, label: np.ndarray, score: np.ndarray) -> dict[str, float]:
    """AUCs of the whole score, of its per-user mean (between users) and of each row's
    deviation from that mean (within users), all over the same rows."""
    frame = pd.DataFrame({"uid": uid, "score": np.asarray(score, dtype=np.float64)})
    raw = frame.groupby("uid")["score"].transform("mean").to_numpy()
    # Both parts rounded, so that a part that is constant (every row of a user scoring the same;
    # every user's mean the same) is exactly so, not the last bits of a float summation, which
    # would order its rows at random.
    mean, deviation = np.round(raw, 9), np.round(frame["score"].to_numpy() - raw, 9)
    return {
        "auc": float(roc_auc_score(label, frame["score"])),
        "between": float(roc_auc_score(label, mean)),
        "within": float(roc_auc_score(label, deviation)),
    }


def label_ceiling(uid: np.ndarray, label: np.ndarray) -> float:
    """AUC of each row's user's own label mean: the most a between-user part can reach."""
    frame = pd.DataFrame({"uid": uid, "label": label})
    return float(roc_auc_score(label, frame.groupby("uid")["label"].transform("mean")))


def by_row_kind(uid: np.ndarray, label: np.ndarray, score: np.ndarray, warm: np.ndarray) -> dict[str, float]:
    """`user_levels` on the warm rows (user and item with training rows) and on the cold ones
    apart, keys `warm_between`, `warm_within`, `cold_between`, `cold_within`; NaN where a
    kind has rows of one label only (or none)."""
    out = {}
    for kind, rows in (("warm", warm), ("cold", ~warm)):
        parts = (
            user_levels(uid[rows], label[rows], score[rows])
            if len(np.unique(label[rows])) == 2
            else {"between": float("nan"), "within": float("nan")}
        )
        out |= {f"{kind}_between": parts["between"], f"{kind}_within": parts["within"]}
    return out


def _levels(result: dict) -> tuple[dict[str, float], np.ndarray, np.ndarray]:
    t = load_file(result["valid"]["scores"])
    levels = user_levels(t["uid"], t["label"], t["scores"])
    if "not_cold" in t:
        levels |= by_row_kind(t["uid"], t["label"], t["scores"], t["not_cold"] == 1)
    return levels, t["uid"], t["label"]


#: The columns of the warm/cold table: (key of `by_row_kind`, header).
KIND_COLUMNS = (
    ("warm_between", "warm rows: between users"),
    ("warm_within", "warm rows: within users"),
    ("cold_between", "cold rows: between users"),
    ("cold_within", "cold rows: within users"),
)


def _cell(mean: float, std: float) -> str:
    return "-" if np.isnan(mean) else plus_minus(mean, std)


def levels_section(r: Report) -> list[str]:
    names = [n for n in LEVEL_VARIANTS if n in r.results]
    if "mf" not in names or len(names) < 2:
        return []
    per_name: dict[str, list[dict[str, float]]] = {}
    uid = label = None
    for _, results in r.seed_runs:
        for name in names:
            if name in results:
                levels, uid, label = _levels(results[name])
                per_name.setdefault(name, []).append(levels)
    lines = [
        "## Where the gap to MF lies: between users or within them",
        "",
        "Each model's validation scores split in two on the same rows (`training/report/levels.py`): "
        "every row scored by its user's mean score over the sample (*between users*: does the model "
        "know which users like more of what they are shown?) and by its deviation from that mean "
        "(*within users*: does it order a user's own rows?). Mean ± std over the seeds each "
        "variant was run at (base run and `--seeds` runs).",
        "",
        "| variant | seeds | AUC | between users | within users |",
        "|---|---|---|---|---|",
    ]
    spread = {n: {k: mean_std([v[k] for v in runs]) for k in runs[0]} for n, runs in per_name.items()}
    for name in names:
        cells = [plus_minus(*spread[name][k]) for k in ("auc", "between", "within")]
        lines.append(f"| {LABELS[name]} | {len(per_name[name])} | " + " | ".join(cells) + " |")
    mean = {n: {k: m for k, (m, _) in by_key.items()} for n, by_key in spread.items()}
    lines += [
        "",
        f"On these rows each user's own label mean, used as the score, gives "
        f"{label_ceiling(uid, label):.4f} AUC: the most a between-user part can reach here.",
    ]
    for name in (n for n in ("collm", "sellarec") if n in names):
        gap = {k: mean[name][k] - mean["mf"][k] for k in ("between", "within")}
        lines.append(
            f"- {LABELS[name]} minus {LABELS['mf']}: between users {gap['between']:+.4f}, within users "
            f"{gap['within']:+.4f}."
        )
    if all(k in spread[n] for n in names for k, _ in KIND_COLUMNS):
        lines += _kind_table(names, per_name, spread, mean)
    return lines


def _kind_table(
    names: list[str],
    per_name: dict[str, list[dict[str, float]]],
    spread: dict[str, dict[str, tuple[float, float]]],
    mean: dict[str, dict[str, float]],
) -> list[str]:
    """The same split on the warm rows and on the cold rows apart (the AUC warm / cold columns'
    rows): on ML-1M's validation split the cold rows are almost all users the MF never saw, who
    reach every model as the neutral user, so their within-user part is how each model orders
    items for a user it knows nothing of."""
    lines = [
        "",
        "The same split on the warm rows (user and item with training rows) and on the cold ones apart:",
        "",
        "| variant | seeds | " + " | ".join(h for _, h in KIND_COLUMNS) + " |",
        "|---|---|" + "---|" * len(KIND_COLUMNS),
    ]
    for name in names:
        cells = [_cell(*spread[name][k]) for k, _ in KIND_COLUMNS]
        lines.append(f"| {LABELS[name]} | {len(per_name[name])} | " + " | ".join(cells) + " |")
    lines.append("")
    for name in (n for n in ("collm", "sellarec") if n in names):
        gaps = [
            f"{h} {mean[name][k] - mean['mf'][k]:+.4f}"
            for k, h in KIND_COLUMNS
            if not np.isnan(mean[name][k] - mean["mf"][k])
        ]
        lines.append(f"- {LABELS[name]} minus {LABELS['mf']}: " + ", ".join(gaps) + ".")
    return lines
