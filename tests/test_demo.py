"""The newcomer path: the synthetic dataset behind `sellarec-demo`, the demo end to end on a tiny
backbone, and a README that keeps up with the service settings."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import typer
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from sellarec.model.loader import load_scorer
from sellarec.training.data import COLUMNS, Dataset
from sellarec.training.demo import DemoBudget, demo, demo_config, run_demo, try_these
from sellarec.training.synthetic import GENRES, SyntheticSpec, synthetic_frames, write_splits

SMALL = SyntheticSpec(n_users=20, n_items=36, n_train=240, n_valid=80, seed=3)
TITLE = re.compile(r"^(?P<words>.+) \((?P<genre>[A-Za-z-]+), (?P<year>\d{4})\)$")


@pytest.fixture(scope="module")
def frames() -> tuple[pd.DataFrame, pd.DataFrame]:
    train, valid, _ = synthetic_frames(SMALL)
    return train, valid


def test_the_same_seed_gives_the_same_rows_and_another_seed_other_rows(frames):
    again, _, _ = synthetic_frames(SMALL)
    pd.testing.assert_frame_equal(frames[0], again)
    other, _, _ = synthetic_frames(replace(SMALL, seed=4))
    assert not frames[0][["uid", "iid", "label"]].equals(other[["uid", "iid", "label"]])


def test_splits_have_the_collm_columns_and_sizes(frames):
    train, valid = frames
    assert (len(train), len(valid)) == (SMALL.n_train, SMALL.n_valid)
    for frame in frames:
        assert tuple(frame.columns) == COLUMNS
        for col in ("uid", "iid", "label", "timestamp", "not_cold"):
            assert frame[col].dtype == np.int64, col
        assert set(frame["label"]) == {0, 1}
        assert frame["uid"].between(1, SMALL.n_users).all() and frame["iid"].between(1, SMALL.n_items).all()
        assert all(isinstance(t, str) and t for t in frame["title"])


def test_parquet_files_hold_list_columns_the_loader_reads(frames, tmp_path):
    train_path, valid_path = write_splits(*frames, tmp_path)
    schema = pq.read_schema(train_path)
    assert str(schema.field("his").type) == "list<element: int64>"
    assert str(schema.field("his_title").type) == "list<element: string>"
    data = Dataset.load(train_path, valid_path)
    assert len(data.train) == SMALL.n_train and data.n_items == SMALL.n_items + 1
    assert [len(h) for h in data.train["his"]] == [len(h) - 1 for h in frames[0]["his"]]


def test_histories_are_the_users_earlier_likes_oldest_first_after_the_pad(frames):
    rows = pd.concat(frames, ignore_index=True)
    liked: dict[int, list[int]] = {}
    titles = dict(zip(rows["iid"], rows["title"]))
    for uid, iid, label, his, his_title in zip(
        rows["uid"], rows["iid"], rows["label"], rows["his"], rows["his_title"]
    ):
        assert his[0] == 0 and his_title[0] == ""
        assert list(his[1:]) == liked.get(uid, [])
        assert list(his_title[1:]) == [titles[i] for i in his[1:]]
        if label == 1:
            liked.setdefault(uid, []).append(iid)


def test_titles_carry_their_genre_words_and_are_unique():
    _, _, world = synthetic_frames(SMALL)
    assert len(set(world.titles[1:])) == SMALL.n_items
    for title, genre in zip(world.titles[1:], world.genres[1:]):
        match = TITLE.match(title)
        assert match and match["genre"] == genre
        openers, endings = GENRES[genre]
        words = match["words"]
        assert any(words.startswith(o + " ") for o in openers) and any(words.endswith(e) for e in endings)


def test_the_split_is_chronological_and_marks_cold_rows(frames):
    train, valid = frames
    assert train["timestamp"].is_monotonic_increasing and valid["timestamp"].is_monotonic_increasing
    assert train["timestamp"].max() <= valid["timestamp"].min()
    assert (train["not_cold"] == 1).all()
    warm = valid["uid"].isin(set(train["uid"])) & valid["iid"].isin(set(train["iid"]))
    assert (valid["not_cold"] == warm.astype(int)).all()
    assert 0 < (valid["not_cold"] == 0).sum() < len(valid)


def test_labels_follow_both_the_title_genre_and_the_hidden_factors():
    spec = SyntheticSpec()
    train, _, world = synthetic_frames(spec)
    assert roc_auc_score(train["label"], world.logits[train["uid"], train["iid"]]) > 0.85

    def genre(title: str) -> str:
        return TITLE.match(title)["genre"]

    share = [
        np.mean([genre(h) == genre(t) for h in his[1:]]) if len(his) > 1 else 0.0
        for his, t in zip(train["his_title"], train["title"])
    ]
    assert roc_auc_score(train["label"], share) > 0.6  # what a model can read from titles
    no_genre = SyntheticSpec(genre_weight=0.0)
    plain, _, hidden = synthetic_frames(no_genre)
    assert (
        roc_auc_score(plain["label"], hidden.logits[plain["uid"], plain["iid"]]) > 0.8
    )  # collaborative only


def test_hints_name_a_trained_user_and_items_it_never_met():
    train, _, world = synthetic_frames(SMALL)
    hints = try_these(world, train)
    user = int(hints["user_id"])
    assert user in set(train["uid"])
    met = set(train.loc[train["uid"] == user, "iid"])
    for item in hints["liked"] + hints["disliked"]:
        assert int(item) not in met and 1 <= int(item) <= SMALL.n_items
    assert all(world.genres[int(i)] == hints["favourite_genre"] for i in hints["liked"])
    assert hints["cold_item"]["title"] not in world.titles


@pytest.mark.slow
def test_a_tiny_demo_builds_a_servable_bundle_and_a_rerun_skips_training(tiny_backbone_dir, tmp_path):
    out, work = tmp_path / "bundle", tmp_path / "work"
    result = run_demo(
        out,
        work,
        backbone=str(tiny_backbone_dir),
        budget=DemoBudget(stage1=8, stage3=8, eval_limit=24),
        spec=SMALL,
        progress=False,
    )
    assert result["valid"]["n"] == 24 and 0.0 <= result["valid"]["auc"] <= 1.0
    loaded = load_scorer(out)
    manifest = loaded.bundle.manifest
    assert (manifest.variant, manifest.dataset) == ("sellarec", "synthetic-movies")
    assert loaded.scorer.proj_c is not None and loaded.scorer.proj_w is not None
    assert result["demo"]["hints"]["user_id"] in loaded.bundle.catalog.users
    assert json.loads((work / "demo.json").read_text())["valid"]["auc"] == result["valid"]["auc"]

    app = typer.Typer()
    app.command()(demo)
    rerun = CliRunner().invoke(app, ["--out", str(out), "--work", str(work)])
    assert rerun.exit_code == 0, rerun.output
    assert "training skipped" in rerun.output and "curl" in rerun.output


def test_set_overrides_win_over_the_demos_own_choices(tmp_path):
    cfg = demo_config(tmp_path, "tiny", DemoBudget(), 0, 1, {"stage3.lr": 5e-4, "stage3.warm_start": None})
    assert cfg.stage3.lr == 5e-4 and cfg.stage3.warm_start is None
    assert cfg.stage3.budget == DemoBudget().stage3 and cfg.stage2.collab_dim == 32  # the rest kept
    assert demo_config(tmp_path, "tiny", DemoBudget(), 0, 1).stage3.warm_start == "anchored"


@pytest.mark.parametrize(
    ("item", "says"),
    [
        ("stage3.nope=1", "unknown Stage3Config keys"),
        ("stage3.lr", "is not KEY=VALUE"),
        ("=3", "is not KEY=VALUE"),
    ],
)
def test_a_bad_set_is_refused_before_anything_is_built(item, says, tmp_path):
    app = typer.Typer()
    app.command()(demo)
    out, work = tmp_path / "bundle", tmp_path / "work"
    result = CliRunner().invoke(app, ["--out", str(out), "--work", str(work), "--set", item])
    assert result.exit_code == 2, result.output
    assert says in result.output
    assert not out.exists() and not work.exists()


def test_the_readme_lists_every_service_setting_with_its_default():
    from sellarec.service.settings import Settings

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    for name, field in Settings.model_fields.items():
        default = field.default
        shown = (
            "(none)"
            if default is None
            else f"`{str(default).lower() if isinstance(default, bool) else default}`"
        )
        assert f"| `SELLAREC_{name.upper()}` | {shown} |" in readme, name
