"""Raw builders on small fixtures written in the exact source formats."""

from __future__ import annotations

import gzip
import json

import numpy as np

from sellarec.training.raw import build_amazon_book, build_ml1m, utc


def _write_ml1m(root):
    movies = [
        "1::Toy Story (1995)::Animation|Children's|Comedy",
        "2::Amélie (2001)::Comedy|Romance",
        "3::Heat (1995)::Action|Crime|Thriller",
        "4::Alien (1979)::Horror|Sci-Fi",
    ]
    (root / "movies.dat").write_bytes(("\n".join(movies) + "\n").encode("latin-1"))
    ratings = [
        (10, 1, 5, utc(2001, 5, 3)),  # month 13: before train, still in later histories
        (10, 2, 4, utc(2001, 6, 2)),  # train (month 14)
        (10, 3, 2, utc(2001, 6, 2)),  # train, same second: file order decides
        (20, 2, 3, utc(2002, 3, 30)),  # train (month 23), negative
        (10, 4, 5, utc(2002, 4, 1)),  # valid (month 24)
        (30, 1, 4, utc(2002, 8, 31)),  # valid (month 28), user cold
        (20, 3, 5, utc(2002, 9, 1)),  # test (month 29)
        (20, 4, 1, utc(2003, 1, 31)),  # test (month 33)
        (10, 3, 5, utc(2003, 2, 2)),  # month 34: dropped
    ]
    (root / "ratings.dat").write_text("".join(f"{u}::{i}::{r}::{t}\n" for u, i, r, t in ratings))


def test_ml1m_splits_by_month_labels_and_histories(tmp_path):
    _write_ml1m(tmp_path)
    built = build_ml1m(tmp_path)
    train, valid, test = (built.splits[k] for k in ("train", "valid", "test"))
    assert (len(train), len(valid), len(test)) == (3, 2, 2)
    assert train["label"].tolist() == [1, 0, 0]
    titles = dict(zip(built.items["id"], built.items["title"], strict=True))
    assert titles[train["iid"][0]] == "Amélie (2001)"
    # Row 2 (same second as row 1) sees the earlier pre-train positive and row 1's positive.
    assert [titles[i] for i in train["his"][1]] == ["", "Toy Story (1995)", "Amélie (2001)"]
    assert list(train["his_title"][1]) == ["", "Toy Story (1995)", "Amélie (2001)"]
    assert list(train["his"][0])[0] == 0 and list(train["his_title"][0]) == ["", "Toy Story (1995)"]
    # valid: user 10's history spans splits; user 30 never in train -> cold.
    assert [titles[i] for i in valid["his"][0][1:]] == ["Toy Story (1995)", "Amélie (2001)"]
    assert valid["not_cold"].tolist() == [0, 0]  # item 4 and user 30 are not in train
    assert test["not_cold"].tolist() == [1, 0]
    assert valid["timestamp"].is_monotonic_increasing
    assert built.items["id"][0] == 0 and built.items["title"][0] == ""


def _gz_lines(path, records):
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def _review(user, asin, rating, ts):
    return {
        "overall": float(rating),
        "verified": True,
        "reviewTime": "01 1, 2017",
        "reviewerID": user,
        "asin": asin,
        "reviewerName": "x",
        "reviewText": "ok",
        "summary": "ok",
        "unixReviewTime": ts,
    }


def test_amazon_book_filters_year_counts_and_splits_december(tmp_path):
    users, books = [f"U{k}" for k in range(22)], [f"B{k:09d}" for k in range(22)]
    reviews = []
    for a, u in enumerate(users):
        for b, asin in enumerate(books):
            month = 12 if b >= 20 else 1 + (a + b) % 11
            reviews.append(_review(u, asin, 5 if (a + b) % 2 else 3, utc(2017, month, 1 + b % 28, a % 24)))
    reviews += [_review("LOWUSER", books[0], 5, utc(2017, 3, 1))]  # 1 rating: dropped
    reviews += [_review(u, "NOTITLE00", 5, utc(2017, 4, 1)) for u in users]  # no title: dropped
    reviews += [_review(u, books[1], 5, utc(2016, 6, 1)) for u in users]  # other year: dropped
    _gz_lines(tmp_path / "Books_5.json.gz", reviews)
    meta = [{"asin": b, "title": f"Book {b}", "category": ["Books"], "price": "$1"} for b in books]
    meta.append({"asin": "NOTITLE00", "category": ["Books"]})
    _gz_lines(tmp_path / "meta_Books.json.gz", meta)
    built = build_amazon_book(tmp_path / "Books_5.json.gz", tmp_path / "meta_Books.json.gz")
    train, valid, test = (built.splits[k] for k in ("train", "valid", "test"))
    assert len(train) == 22 * 20 and len(valid) + len(test) == 22 * 2 and len(valid) == len(test)
    assert valid["timestamp"].max() <= test["timestamp"].min()
    everything = np.concatenate([train["label"], valid["label"], test["label"]])
    assert set(everything) == {0, 1}
    assert len(built.items) == 23  # 22 books + pad
    assert all(t.startswith("Book ") for t in train["title"])
    # history = earlier rating-5 books of the user, across splits
    last = test.iloc[-1]
    uid = last["uid"]
    earlier = [
        r
        for s in (train, valid, test)
        for r in s.itertuples()
        if r.uid == uid and r.timestamp < last["timestamp"]
    ]
    assert len(last["his"]) - 1 == sum(r.label for r in earlier)
