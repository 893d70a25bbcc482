"""Splits in the CoLLM format, the item table and user histories.

A split is a frame with the columns uid, iid, label, timestamp, his (earlier liked item
ids, oldest first, with a leading 0 pad), his_title (their titles, leading '' pad), title
and not_cold (user and item both seen in train). Id 0 is the pad, never a real item.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

COLUMNS = ("uid", "iid", "label", "timestamp", "his", "his_title", "title", "not_cold")


def normalise(frame: pd.DataFrame) -> pd.DataFrame:
    """Check the columns and coerce types: ints, lists of ids/titles without the pad."""
    missing = [c for c in COLUMNS if c not in frame.columns and c != "not_cold"]
    if missing:
        raise ValueError(f"split lacks the CoLLM columns {missing}; has {list(frame.columns)}")
    out = frame.reset_index(drop=True).copy()
    for col in ("uid", "iid", "label", "timestamp"):
        out[col] = out[col].astype(np.int64)
    if "not_cold" not in out.columns:
        out["not_cold"] = 1
    out["not_cold"] = out["not_cold"].fillna(1).astype(np.int64)
    out["title"] = out["title"].astype(object).where(out["title"].notna(), "").astype(str)
    ids, titles = [], []
    for his, his_title in zip(out["his"], out["his_title"], strict=True):
        pairs = [
            (int(i), str(t)) for i, t in zip(_seq(his), _aligned(his, his_title), strict=True) if int(i) != 0
        ]
        ids.append([i for i, _ in pairs])
        titles.append([t for _, t in pairs])
    out["his"] = ids
    out["his_title"] = titles
    return out


def _seq(x: Iterable | None) -> list:
    return [] if x is None else list(x)


def _aligned(his: Iterable | None, his_title: Iterable | None) -> list[str]:
    """his_title aligned to his (some writers drop the '' of the pad when the list is empty)."""
    ids, titles = _seq(his), [str(t) for t in _seq(his_title)]
    if len(titles) < len(ids):
        titles = [""] * (len(ids) - len(titles)) + titles
    return titles[-len(ids) :] if ids else []


def load_split(path: str | Path) -> pd.DataFrame:
    """Read a CoLLM-format parquet split (pad removed from his/his_title)."""
    return normalise(pd.read_parquet(path))


def sample_positions(n: int, limit: int, seed: int) -> np.ndarray:
    """Sorted positions of the seeded sample of `limit` of `n` rows (all of them if limit <= 0)."""
    if limit <= 0 or limit >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=limit, replace=False))


def sample(frame: pd.DataFrame, limit: int, seed: int) -> pd.DataFrame:
    """A seeded sample of `limit` rows in their original order (all rows if limit <= 0)."""
    if limit <= 0 or limit >= len(frame):
        return frame
    return frame.iloc[sample_positions(len(frame), limit, seed)].reset_index(drop=True)


def without_sample(frame: pd.DataFrame, limit: int, seed: int) -> pd.DataFrame:
    """`frame` less the rows `sample(frame, limit, seed)` draws (none left if it draws all)."""
    keep = np.ones(len(frame), dtype=bool)
    keep[sample_positions(len(frame), limit, seed)] = False
    return frame.iloc[np.flatnonzero(keep)].reset_index(drop=True)


@dataclass
class ItemTable:
    """Item ids 0..n-1 (0 the pad) and their titles."""

    #: Title of each id ('' where unknown, e.g. the pad).
    titles: list[str]

    def __len__(self) -> int:
        return len(self.titles)

    @classmethod
    def from_splits(cls, *frames: pd.DataFrame, n_items: int | None = None) -> ItemTable:
        """Titles from the target and history columns of every split."""
        known: dict[int, str] = {}
        for f in frames:
            known.update(zip(f["iid"].tolist(), f["title"].tolist(), strict=True))
            for his, titles in zip(f["his"], f["his_title"], strict=True):
                known.update(zip(his, titles, strict=True))
        size = max([n_items or 0, *[i + 1 for i in known]])
        titles = [""] * size
        for i, t in known.items():
            titles[i] = t
        return cls(titles=titles)


@dataclass
class Dataset:
    """The train and validation splits with their id spaces."""

    #: Training split (normalised).
    train: pd.DataFrame
    #: Validation split (normalised).
    valid: pd.DataFrame
    #: Item titles by id.
    items: ItemTable
    #: Number of user ids (max id + 1, the pad included).
    n_users: int
    #: Dataset name recorded in manifests.
    name: str = "dataset"

    @classmethod
    def from_frames(cls, train: pd.DataFrame, valid: pd.DataFrame, name: str = "dataset") -> Dataset:
        train, valid = normalise(train), normalise(valid)
        items = ItemTable.from_splits(train, valid)
        n_users = int(max(train["uid"].max(), valid["uid"].max())) + 1
        return cls(train=train, valid=valid, items=items, n_users=n_users, name=name)

    @classmethod
    def load(cls, train: str | Path, valid: str | Path, name: str = "dataset") -> Dataset:
        for split, path in (("train", train), ("valid", valid)):
            if not str(path) or not Path(path).is_file():
                raise FileNotFoundError(
                    f"data.{split}: no split file at {str(path) or '(not set)'!r}; set data.{split} in the "
                    f"config (relative to it) or pass --set data.{split}=PATH"
                )
        return cls.from_frames(pd.read_parquet(train), pd.read_parquet(valid), name=name)

    @property
    def n_items(self) -> int:
        return len(self.items)

    def histories(self, length: int) -> dict[int, list[int]]:
        """Each user's last `length` liked items as of their latest row (train, then valid)."""
        out: dict[int, list[int]] = {}
        for f in (self.train, self.valid):
            latest = f.sort_values("timestamp", kind="stable")
            for uid, his, iid, label in zip(
                latest["uid"], latest["his"], latest["iid"], latest["label"], strict=True
            ):
                out[int(uid)] = ([*his, iid] if label == 1 else list(his))[-length:]
        return out

    def trained_users(self) -> np.ndarray:
        """Mask [n_users] of users with at least one training row."""
        mask = np.zeros(self.n_users, dtype=bool)
        mask[self.train["uid"].to_numpy()] = True
        return mask

    def trained_items(self) -> np.ndarray:
        """Mask [n_items] of items with at least one training row."""
        mask = np.zeros(self.n_items, dtype=bool)
        mask[self.train["iid"].to_numpy()] = True
        return mask
