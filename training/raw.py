"""Builders of CoLLM-format splits from the raw sources (MovieLens-1M, Amazon-Book 2018).

Both builders share one recipe: interactions sorted by time (stable, so ties keep file
order), history = the user's positives strictly earlier in that order (across splits,
oldest first), ids re-indexed from 1 (0 is the pad) over the users and items the kept
interactions and their histories mention, not_cold = user and item both in train.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

#: MovieLens months are counted from April 2000 (month 0), in UTC.
ML1M_EPOCH = (2000, 4)
#: (first, last) month of train / valid / test (inclusive).
ML1M_MONTHS = {"train": (14, 23), "valid": (24, 28), "test": (29, 33)}


@dataclass
class BuiltSplits:
    """Output of a raw builder."""

    #: split name -> CoLLM-format frame.
    splits: dict[str, pd.DataFrame]
    #: id, title (id 0 is the pad).
    items: pd.DataFrame

    def write(self, out: str | Path) -> Path:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        for name, frame in self.splits.items():
            frame.to_parquet(out / f"{name}.parquet", index=False)
        self.items.to_parquet(out / "items.parquet", index=False)
        return out


def _month_index(ts: pd.Series) -> pd.Series:
    t = pd.to_datetime(ts, unit="s", utc=True)
    return (t.dt.year - ML1M_EPOCH[0]) * 12 + (t.dt.month - ML1M_EPOCH[1])


def assemble(events: pd.DataFrame, split: pd.Series, titles: dict) -> BuiltSplits:
    """events: user, item, label, timestamp (all raw rows, any order); split: name or None.

    Histories use every earlier positive, also those outside the kept splits.
    """
    events = events.assign(split=split.to_numpy()).sort_values("timestamp", kind="stable")
    history: dict = {}
    his_col: list[list] = []
    for user, item, label in zip(events["user"], events["item"], events["label"], strict=True):
        past = history.setdefault(user, [])
        his_col.append(list(past))
        if label == 1:
            past.append(item)
    events = events.assign(his_raw=his_col)
    kept = events[events["split"].notna()]
    item_raw = sorted(set(kept["item"]) | {i for h in kept["his_raw"] for i in h})
    user_raw = sorted(set(kept["user"]))
    item_id = {raw: k + 1 for k, raw in enumerate(item_raw)}
    user_id = {raw: k + 1 for k, raw in enumerate(user_raw)}
    train = kept[kept["split"] == "train"]
    seen_u, seen_i = set(train["user"]), set(train["item"])
    frames = {}
    for name in dict.fromkeys(kept["split"]):
        part = kept[kept["split"] == name]
        frames[name] = pd.DataFrame(
            {
                "uid": part["user"].map(user_id).astype(np.int64).to_numpy(),
                "iid": part["item"].map(item_id).astype(np.int64).to_numpy(),
                "label": part["label"].astype(np.int64).to_numpy(),
                "timestamp": part["timestamp"].astype(np.int64).to_numpy(),
                "his": [[0] + [item_id[i] for i in h] for h in part["his_raw"]],
                "his_title": [[""] + [titles.get(i, "") for i in h] for h in part["his_raw"]],
                "title": [titles.get(i, "") for i in part["item"]],
                "not_cold": [
                    int(u in seen_u and i in seen_i) for u, i in zip(part["user"], part["item"], strict=True)
                ],
            }
        )
    items = pd.DataFrame(
        {"id": [0, *item_id.values()], "title": ["", *(titles.get(i, "") for i in item_raw)]}
    )
    return BuiltSplits(splits=frames, items=items)


def build_ml1m(raw_dir: str | Path) -> BuiltSplits:
    """MovieLens-1M from ratings.dat / movies.dat (latin-1, '::'-separated); label = rating > 3."""
    raw_dir = Path(raw_dir)
    ratings = pd.read_csv(
        raw_dir / "ratings.dat",
        sep="::",
        engine="python",
        encoding="latin-1",
        names=["user", "item", "rating", "timestamp"],
    )
    movies = pd.read_csv(
        raw_dir / "movies.dat",
        sep="::",
        engine="python",
        encoding="latin-1",
        names=["item", "title", "genres"],
    )
    titles = dict(zip(movies["item"], movies["title"].astype(str), strict=True))
    month = _month_index(ratings["timestamp"])
    split = pd.Series([None] * len(ratings), dtype=object)
    for name, (lo, hi) in ML1M_MONTHS.items():
        split[((month >= lo) & (month <= hi)).to_numpy()] = name
    events = pd.DataFrame(
        {
            "user": ratings["user"],
            "item": ratings["item"],
            "label": (ratings["rating"] > 3).astype(int),
            "timestamp": ratings["timestamp"],
        }
    )
    return assemble(events, split, titles)


def _json_lines(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def build_amazon_book(
    reviews: str | Path, metadata: str | Path, year: int = 2017, min_count: int = 20
) -> BuiltSplits:
    """Amazon-Book 2018 (Books 5-core + metadata): one year, users and items with more than
    `min_count` ratings that year (one pass), label = rating 5, Jan-Nov train, December
    split in halves by time order (first half valid, second half test). Items without a
    title in the metadata are dropped before counting."""
    rows = pd.DataFrame(
        _json_lines(Path(reviews)), columns=["reviewerID", "asin", "overall", "unixReviewTime"]
    )
    meta = pd.DataFrame(_json_lines(Path(metadata)), columns=["asin", "title"]).dropna()
    meta = meta[meta["title"].astype(str).str.strip() != ""].drop_duplicates("asin")
    titles = dict(zip(meta["asin"], meta["title"].astype(str), strict=True))
    ts = pd.to_datetime(rows["unixReviewTime"], unit="s", utc=True)
    rows = rows[(ts.dt.year == year).to_numpy() & rows["asin"].isin(titles).to_numpy()]
    users = rows["reviewerID"].value_counts()
    items = rows["asin"].value_counts()
    rows = rows[rows["reviewerID"].map(users).gt(min_count) & rows["asin"].map(items).gt(min_count)]
    events = (
        pd.DataFrame(
            {
                "user": rows["reviewerID"].to_numpy(),
                "item": rows["asin"].to_numpy(),
                "label": (rows["overall"].astype(float) == 5.0).astype(int).to_numpy(),
                "timestamp": rows["unixReviewTime"].astype(np.int64).to_numpy(),
            }
        )
        .sort_values("timestamp", kind="stable")
        .reset_index(drop=True)
    )
    month = pd.to_datetime(events["timestamp"], unit="s", utc=True).dt.month.to_numpy()
    split = np.where(month <= 11, "train", None).astype(object)
    december = np.flatnonzero(month == 12)
    half = len(december) // 2
    split[december[:half]] = "valid"
    split[december[half:]] = "test"
    return assemble(events, pd.Series(split, dtype=object), titles)


def utc(year: int, month: int, day: int = 1, hour: int = 0) -> int:
    """Unix seconds of a UTC date (fixtures and docs)."""
    return int(datetime(year, month, day, hour, tzinfo=timezone.utc).timestamp())
