"""CoLLM-format loading, item table, histories, seeded samples and the YAML configuration."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sellarec.training.config import VARIANTS, RunConfig, load_config
from sellarec.training.data import Dataset, load_split, sample


def _split() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "uid": [1, 1, 2, 1],
            "iid": [3, 4, 3, 5],
            "label": [1, 0, 1, 1],
            "timestamp": [10, 11, 12, 13],
            "his": [np.array([0]), np.array([0, 3]), np.array([0]), np.array([0, 3])],
            "his_title": [
                np.array([""]),
                np.array(["", "C"]),
                np.array([], dtype=object),
                np.array(["", "C"]),
            ],
            "title": ["C", "D", "C", "E"],
            "not_cold": [1, 1, 1, 0],
        }
    )


def test_load_split_drops_the_pad_and_keeps_titles_aligned(tmp_path):
    _split().to_parquet(tmp_path / "s.parquet")
    frame = load_split(tmp_path / "s.parquet")
    assert frame["his"].tolist() == [[], [3], [], [3]]
    assert frame["his_title"].tolist() == [[], ["C"], [], ["C"]]
    assert frame["uid"].dtype == np.int64


def test_missing_columns_are_named():
    with pytest.raises(ValueError, match="title"):
        Dataset.from_frames(_split().drop(columns=["title"]), _split())


def test_item_table_histories_and_masks():
    valid = _split().assign(uid=[2, 2, 6, 2], timestamp=[20, 21, 22, 23])
    data = Dataset.from_frames(_split(), valid)
    assert data.n_users == 7 and data.n_items == 6
    assert data.items.titles[3] == "C" and data.items.titles[0] == ""
    assert data.histories(10)[1] == [3, 5]
    assert data.histories(1)[1] == [5]
    assert data.trained_users().tolist() == [False, True, True, False, False, False, False]
    assert data.trained_items()[[3, 4, 5]].all() and not data.trained_items()[0]


def test_sample_is_seeded_and_keeps_order():
    frame = pd.DataFrame({"x": range(100)})
    a, b = sample(frame, 10, seed=3), sample(frame, 10, seed=3)
    assert a["x"].tolist() == b["x"].tolist() == sorted(a["x"].tolist())
    assert sample(frame, 0, seed=3) is frame


def test_the_held_out_train_split_is_exactly_the_rows_stage3_does_not_draw():
    from sellarec.training.assembly import STAGE3_SEED_OFFSET, held_out
    from sellarec.training.synthetic import synthetic_dataset

    data = synthetic_dataset()
    cfg = load_config(None, {"stage3.budget": 40, "seed": 2})
    drawn = sample(data.train, 40, 2 + STAGE3_SEED_OFFSET)
    rest = held_out(cfg, data).train
    assert len(rest) == len(data.train) - 40
    key = ["uid", "iid", "timestamp"]
    both = pd.concat([rest[key], drawn[key]]).sort_values(key).reset_index(drop=True)
    assert both.equals(data.train[key].sort_values(key).reset_index(drop=True))  # disjoint, and all of it
    assert held_out(cfg, data).valid is data.valid


def test_yaml_overrides_defaults_and_rejects_unknown_keys(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("seed: 5\nstage1:\n  budget: 7\n")
    cfg = load_config(path, {"stage3.budget": 9})
    assert (cfg.seed, cfg.stage1.budget, cfg.stage3.budget) == (5, 7, 9)
    assert (cfg.stage1.lora_r, cfg.stage1.lora_alpha, cfg.stage2.collab_dim) == (8, 16, 256)
    path.write_text("stage1:\n  budgte: 7\n")
    with pytest.raises(ValueError, match="budgte"):
        load_config(path)


def test_shipped_config_loads():
    cfg = load_config(Path(__file__).parents[1] / "training" / "configs" / "ml1m.yaml")
    assert isinstance(cfg, RunConfig) and cfg.eval.limit >= 1000
    # Data paths are relative to the config file and come back resolved.
    assert Path(cfg.data.train).is_absolute() and cfg.data.train.endswith("ml-1m/train.parquet")


def test_relative_data_paths_resolve_against_the_config_file(tmp_path):
    (tmp_path / "conf").mkdir()
    path = tmp_path / "conf" / "run.yaml"
    path.write_text("data:\n  train: ../data/t.parquet\n  valid: v.parquet\n")
    cfg = load_config(path)
    assert cfg.data.train == str((tmp_path / "data" / "t.parquet").resolve())
    assert cfg.data.valid == str((tmp_path / "conf" / "v.parquet").resolve())


def test_a_missing_split_names_the_setting_to_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.train"):
        Dataset.load(tmp_path / "nope.parquet", tmp_path / "nope.parquet")


def test_variants_follow_the_paper_switches():
    assert not VARIANTS["collm"].align and not VARIANTS["collm"].warm_start
    assert [s.value for s in VARIANTS["collm"].slots] == ["user", "item"]
    assert VARIANTS["sellarec"].align and VARIANTS["sellarec"].warm_start
    assert not VARIANTS["sella-proj"].warm_start and VARIANTS["sella-proj"].align
    assert [s.value for s in VARIANTS["sella-ui"].slots] == ["warm"]
    assert not VARIANTS["tallrec"].stage3 and not VARIANTS["zeroshot"].lora and not VARIANTS["mf"].llm


def test_float_settings_written_without_a_dot_are_read_as_numbers():
    # YAML 1.1 reads "3e-3" as a string; `--set stage3.table_lr=3e-3` must still be 0.003.
    cfg = load_config(None, {"stage3.table_lr": "3e-3", "stage1.lr": "1e-3", "stage3.lr": 2})
    assert cfg.stage3.table_lr == 0.003 and cfg.stage1.lr == 0.001 and cfg.stage3.lr == 2
    with pytest.raises(ValueError, match="Stage3Config.table_lr must be a number"):
        load_config(None, {"stage3.table_lr": "fast"})
    assert load_config(None, {"data.name": "1e3"}).data.name == "1e3"  # strings stay strings
