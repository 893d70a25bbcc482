"""Metrics equal a direct sklearn computation; the CLI evaluates any split file."""

from __future__ import annotations

import json

import factories
import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from sellarec.training.cli import app
from sellarec.training.evaluate import metrics


def _frame(seed: int = 0, n: int = 200) -> tuple[pd.DataFrame, np.ndarray]:
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(
        {"uid": rng.integers(0, 12, n), "label": rng.integers(0, 2, n), "not_cold": rng.integers(0, 2, n)}
    )
    return frame, rng.normal(size=n) + frame["label"].to_numpy() * 0.5


def _uauc(frame: pd.DataFrame, scores: np.ndarray) -> float:
    aucs = []
    for u in np.unique(frame["uid"]):
        m = (frame["uid"] == u).to_numpy()
        if len(np.unique(frame["label"][m])) == 2:
            aucs.append(roc_auc_score(frame["label"][m], scores[m]))
    return float(np.mean(aucs))


def test_metrics_equal_sklearn_on_all_warm_and_cold_rows():
    frame, scores = _frame()
    got = metrics(frame, scores)
    assert got["n"] == len(frame)
    assert np.isclose(got["auc"], roc_auc_score(frame["label"], scores))
    assert np.isclose(got["uauc"], _uauc(frame, scores))
    for name, flag in (("warm", 1), ("cold", 0)):
        m = (frame["not_cold"] == flag).to_numpy()
        assert np.isclose(got[f"auc_{name}"], roc_auc_score(frame["label"][m], scores[m]))
        assert np.isclose(got[f"uauc_{name}"], _uauc(frame[m].reset_index(drop=True), scores[m]))


def test_one_class_subsets_are_null():
    frame, scores = _frame(n=40)
    frame["not_cold"] = 1
    frame.loc[frame.index[:5], "not_cold"] = 0
    frame.loc[frame["not_cold"] == 0, "label"] = 1
    got = metrics(frame, scores)
    assert got["auc_cold"] is None and got["uauc_cold"] is None
    assert got["auc_warm"] is not None


def test_cli_evaluates_a_split_with_unknown_ids(tmp_path, tiny_bundle_dir):
    t = factories.TITLES
    frame = pd.DataFrame(
        {
            "uid": [0, 1, 77, 78],
            "iid": [1, 2, 3, 99],
            "label": [1, 0, 1, 0],
            "timestamp": [1, 2, 3, 4],
            "his": [[0], [0, 1], [0, 5, 6], [0]],
            "his_title": [[""], ["", t[1]], ["", t[5], t[6]], [""]],
            "title": [t[1], t[2], t[3], "An Unknown Film (2003)"],
            "not_cold": [1, 1, 0, 0],
        }
    )
    frame.to_parquet(tmp_path / "split.parquet")
    out = tmp_path / "metrics.json"
    result = CliRunner().invoke(
        app,
        [
            "evaluate",
            "--artifacts",
            str(tiny_bundle_dir),
            "--data",
            str(tmp_path / "split.parquet"),
            "--out",
            str(out),
            "--limit",
            "3",
            "--seed",
            "1",
            "--no-progress",
        ],
    )
    assert result.exit_code == 0, result.output
    got = json.loads(out.read_text())
    assert got["n"] == 3
    assert {"auc", "uauc", "auc_warm", "auc_cold", "uauc_warm", "uauc_cold"} <= set(got)


def test_cli_run_records_its_overrides_in_the_result(tmp_path):
    import yaml

    from sellarec.training.synthetic import synthetic_dataset

    data = synthetic_dataset()
    data.train.to_parquet(tmp_path / "train.parquet")
    data.valid.to_parquet(tmp_path / "valid.parquet")
    config = tmp_path / "run.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "data": {"train": str(tmp_path / "train.parquet"), "valid": str(tmp_path / "valid.parquet")},
                "stage2": {"collab_dim": 8, "max_epochs": 2},
            }
        )
    )
    out = tmp_path / "run"
    args = ["run", "mf", "--config", str(config), "--out", str(out), "--no-progress"]
    args += ["--stage3-lr", "0.0005", "--stage3-budget", "64", "--eval-limit", "20", "--seed", "3"]
    args += ["--set", "stage2.proj_weight_decay=0", "--set", "stage1.lora_r=4"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    recorded = json.loads((out / "results" / "mf.json").read_text())
    assert recorded["config"]["stage3"]["lr"] == 0.0005
    assert recorded["config"]["stage3"]["budget"] == 64 and recorded["seed"] == 3
    assert recorded["valid"]["n"] == 20
    assert recorded["config"]["stage2"]["proj_weight_decay"] == 0
    assert recorded["config"]["stage1"]["lora_r"] == 4


def test_cli_run_rejects_a_malformed_or_unknown_setting(tmp_path):
    for bad in ("stage2.proj_weight_decay", "stage2.no_such_field=1"):
        args = ["run", "mf", "--config", "training/configs/ml1m.yaml", "--out", str(tmp_path), "--set", bad]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2, result.output
        assert "--set" in result.output
    assert not (tmp_path / "results").exists()


def test_cli_refuses_a_tampered_bundle_with_one_line_and_exit_1(tmp_path, tiny_bundle_dir):
    import shutil

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle_dir, bundle)
    data = bytearray((bundle / "tensors.safetensors").read_bytes())
    data[-1] ^= 1
    (bundle / "tensors.safetensors").write_bytes(bytes(data))
    t = factories.TITLES
    frame = pd.DataFrame(
        {
            "uid": [0],
            "iid": [1],
            "label": [1],
            "timestamp": [1],
            "his": [[0]],
            "his_title": [[t[0]]],
            "title": [t[1]],
            "not_cold": [1],
        }  # fmt: skip
    )
    frame.to_parquet(tmp_path / "split.parquet")
    out = tmp_path / "metrics.json"
    args = ["evaluate", "--artifacts", str(bundle), "--data", str(tmp_path / "split.parquet")]
    result = CliRunner().invoke(app, [*args, "--out", str(out), "--no-progress"])
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit)  # typer.Exit, not a traceback
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "refusing the bundle" in lines[0]
    assert "checksum of tensors.safetensors" in lines[0]
    assert "Traceback" not in result.output and not out.exists()
