"""Two variants compared on the same validation rows: the difference of AUC and UAUC, and
its paired bootstrap over users."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from safetensors.torch import load_file
from sklearn.metrics import roc_auc_score


@dataclass(frozen=True)
class _Paired:
    """Two variants' scores on the same validation rows, grouped by user."""

    label: np.ndarray
    score_a: np.ndarray
    score_b: np.ndarray
    #: Row indices of each user.
    rows_of: list[np.ndarray]
    #: Per-user AUC of a minus b (NaN for users with one class only).
    per_user: np.ndarray

    @classmethod
    def of(cls, a: dict, b: dict) -> _Paired:
        """From two results' score files (checked to hold the same rows)."""
        sa, sb = load_file(a["valid"]["scores"]), load_file(b["valid"]["scores"])
        if not (torch.equal(sa["uid"], sb["uid"]) and torch.equal(sa["iid"], sb["iid"])):
            raise ValueError("the variants were evaluated on different rows; pairing needs the same rows")
        return cls.of_scores(
            sa["uid"].numpy(), sa["label"].numpy(), sa["scores"].numpy(), sb["scores"].numpy()
        )

    @classmethod
    def of_scores(
        cls, uid: np.ndarray, label: np.ndarray, score_a: np.ndarray, score_b: np.ndarray
    ) -> _Paired:
        """From two score arrays over the same rows."""
        _, inverse = np.unique(uid, return_inverse=True)
        rows_of = [np.flatnonzero(inverse == k) for k in range(int(inverse.max(initial=-1)) + 1)]
        per_user = np.full(len(rows_of), np.nan)
        for k, rows in enumerate(rows_of):
            if len(np.unique(label[rows])) == 2:
                per_user[k] = roc_auc_score(label[rows], score_a[rows]) - roc_auc_score(
                    label[rows], score_b[rows]
                )
        return cls(label, score_a, score_b, rows_of, per_user)

    def auc_diff(self, rows: np.ndarray | None = None) -> float:
        rows = np.arange(len(self.label)) if rows is None else rows
        y = self.label[rows]
        return float(roc_auc_score(y, self.score_a[rows]) - roc_auc_score(y, self.score_b[rows]))

    def point(self) -> dict[str, float]:
        """AUC and UAUC of a minus b on all the rows (UAUC over users with both classes)."""
        return {"auc": self.auc_diff(), "uauc": float(np.nanmean(self.per_user))}


def paired_difference(a: dict, b: dict) -> dict[str, float]:
    """AUC and UAUC of a minus b on the same validation rows (checked)."""
    return _Paired.of(a, b).point()


def paired_bootstrap(a: dict, b: dict, resamples: int, seed: int = 0) -> dict:
    """Differences a - b of AUC and UAUC with 95% percentile intervals, resampling users
    (all rows of a drawn user go in together), on the shared validation sample of two results.

    UAUC of a resample is the mean per-user AUC over the drawn users (with multiplicity)
    that hold both classes, so per-user AUCs are computed once.
    """
    return _bootstrap(_Paired.of(a, b), resamples, seed)


def paired_bootstrap_scores(
    uid: np.ndarray, label: np.ndarray, a: np.ndarray, b: np.ndarray, resamples: int, seed: int = 0
) -> dict:
    """`paired_bootstrap` of two score arrays over the same rows (users `uid`, labels `label`)."""
    return _bootstrap(_Paired.of_scores(uid, label, a, b), resamples, seed)


def _bootstrap(paired: _Paired, resamples: int, seed: int) -> dict:
    users = len(paired.rows_of)
    rng = np.random.default_rng(seed)
    diffs: dict[str, list[float]] = {"auc": [], "uauc": []}
    for _ in range(resamples):
        drawn = rng.integers(0, users, users)
        diffs["auc"].append(paired.auc_diff(np.concatenate([paired.rows_of[k] for k in drawn])))
        both = paired.per_user[drawn][~np.isnan(paired.per_user[drawn])]
        diffs["uauc"].append(float(both.mean()) if len(both) else float("nan"))
    point = paired.point()
    out: dict = {}
    for k, v in diffs.items():
        arr = np.asarray(v)
        out[k] = {
            "diff": point[k],
            "low": float(np.percentile(arr, 2.5)),
            "high": float(np.percentile(arr, 97.5)),
            "p_le_0": float(np.mean(arr <= 0)),
        }
    return out | {"users": users, "rows": len(paired.label), "resamples": resamples}


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (NaN for one value)."""
    arr = np.asarray(values, dtype=float)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else float("nan")
