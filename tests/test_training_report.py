"""`sellarec-train report` on fake run directories: no LLM, no backbone, no real data."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from sklearn.metrics import roc_auc_score

from sellarec.model.backbone import SMOLLM2_ALIAS
from sellarec.training.config import load_config
from sellarec.training.report import (
    LABELS,
    PAPER_TABLE3_ML1M,
    PathStyle,
    survives,
    write_report,
)
from sellarec.training.report.soft_tokens import _local_backbone

USERS, PER_USER, COLD_USERS = 12, 10, 4
#: How strongly each variant's scores follow the label (0: noise only).
SIGNAL = {"mf": 0.3, "collm": 0.5, "sellarec": 3.0}
LOSSES = [0.9, 0.8, 0.75, 0.7, 0.69, 0.66, 0.64, 0.6]


def validation_rows() -> dict[str, np.ndarray]:
    """The same rows in every run (as `eval.seed` makes them): each user holds both labels."""
    rng = np.random.default_rng(0)
    label = np.concatenate([rng.permutation([0, 1] * (PER_USER // 2)) for _ in range(USERS)])
    return {
        "uid": np.repeat(np.arange(USERS), PER_USER),
        "iid": np.arange(USERS * PER_USER),
        "label": label,
        # The first COLD_USERS users have no training rows: their rows are the cold ones.
        "not_cold": (np.repeat(np.arange(USERS), PER_USER) >= COLD_USERS).astype(np.int64),
    }


def fake_scores(signal: float, seed: int) -> np.ndarray:
    rows = validation_rows()
    return np.random.default_rng(seed + 100).normal(size=len(rows["label"])) + signal * rows["label"]


def uauc(label: np.ndarray, scores: np.ndarray, uid: np.ndarray) -> float:
    return float(np.mean([roc_auc_score(label[uid == u], scores[uid == u]) for u in np.unique(uid)]))


def make_run(root: Path, name: str, seed: int, signal: dict[str, float], with_losses: bool = True) -> Path:
    """A run directory as `sellarec-train run` leaves it: results, scores, done.json files."""
    run = root / name
    cfg = load_config(
        None,
        {
            "seed": seed,
            "backbone": str(root / "no-backbone-here"),
            "data.train": str(root / "data" / "train.parquet"),
            "data.valid": str(root / "data" / "valid.parquet"),
            "stage1.budget": 64,
            "stage1.lora_top_layers": 8,
            "stage3.budget": 32,
            "eval.limit": USERS * PER_USER,
        },
    )
    rows = validation_rows()
    write_done(run, "stage1-s1", "stage1", LOSSES, with_losses)
    for variant, strength in signal.items():
        scores = fake_scores(strength, seed)
        score_file = run / "stages" / f"eval-{variant}-e" / "scores.safetensors"
        score_file.parent.mkdir(parents=True, exist_ok=True)
        save_file(
            {"scores": torch.tensor(scores)} | {k: torch.tensor(v) for k, v in rows.items()},
            str(score_file),
        )
        auc = float(roc_auc_score(rows["label"], scores))
        u = uauc(rows["label"], scores, rows["uid"])
        stages = {"stage1": {"dir": "stage1-s1", "build_seconds": 60.0}}
        if variant != "mf":
            write_done(run, f"bundle-{variant}-b", f"bundle-{variant}", LOSSES[::-1], with_losses)
            stages[f"bundle-{variant}"] = {"dir": f"bundle-{variant}-b", "build_seconds": 120.0}
        result = {
            "variant": variant,
            "bundle": str(run / "stages" / f"bundle-{variant}-b" / "bundle"),
            "command": f"sellarec-train run {variant} --config {root}/exp.yaml --out {run} --seed {seed}",
            "config": dataclasses.asdict(cfg),
            "budgets": {"stage1": 64, "stage3": 32, "eval_limit": USERS * PER_USER},
            "seed": seed,
            "valid": {"n": USERS * PER_USER, "auc": auc, "uauc": u, "scores": str(score_file)}
            | {k: auc for k in ("auc_warm", "auc_cold")}
            | {k: u for k in ("uauc_warm", "uauc_cold")},
            "stages": stages,
            "wall_seconds": 180.0,
        }
        (run / "results").mkdir(parents=True, exist_ok=True)
        (run / "results" / f"{variant}.json").write_text(json.dumps(result))
    return run


def write_done(run: Path, directory: str, stage: str, losses: list[float], with_losses: bool) -> None:
    metrics = {"rows": 64, "seconds": 10.0}
    if with_losses:
        metrics |= {"losses": losses, "base_rate_bce": 0.6931}
    (run / "stages" / directory).mkdir(parents=True, exist_ok=True)
    (run / "stages" / directory / "done.json").write_text(
        json.dumps({"stage": stage, "key": "k", "metrics": metrics, "build_seconds": 10.0})
    )


def report(
    tmp_path: Path,
    seed_signals: list[dict[str, float]],
    with_losses: bool = True,
    base_signal: dict | None = None,
) -> str:
    base = make_run(tmp_path, "base", 0, base_signal or SIGNAL, with_losses)
    seeds = [make_run(tmp_path, f"seed{k + 1}", k + 1, s) for k, s in enumerate(seed_signals)]
    doc = write_report(
        base, tmp_path / "docs" / "results.md", tmp_path / "docs" / "figures", resamples=50, seeds=seeds
    )
    return doc.read_text()


def row(doc: str, start: str) -> str:
    return next(line for line in doc.splitlines() if line.startswith(start))


@pytest.fixture(scope="module")
def tmp_run(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("report")


@pytest.fixture(scope="module")
def doc(tmp_run) -> str:
    return report(tmp_run, [SIGNAL, SIGNAL])


def test_seeds_section_lists_each_seed_then_mean_and_sample_std(doc):
    rows = validation_rows()
    aucs = [roc_auc_score(rows["label"], fake_scores(SIGNAL["sellarec"], s)) for s in range(3)]
    uaucs = [uauc(rows["label"], fake_scores(SIGNAL["sellarec"], s), rows["uid"]) for s in range(3)]
    line = row(doc, "| SeLLa-Rec | seed 0:")
    for s in range(3):
        assert f"seed {s}: {aucs[s]:.4f} / {uaucs[s]:.4f}" in line
    assert f"{np.mean(aucs):.4f} ± {np.std(aucs, ddof=1):.4f}" in line
    assert f"{np.mean(uaucs):.4f} ± {np.std(uaucs, ddof=1):.4f}" in line
    assert line.endswith("| 3 |")


def test_seed_pairs_state_the_rule_and_the_per_seed_paired_spread(doc):
    rows = validation_rows()
    diffs = [
        roc_auc_score(rows["label"], fake_scores(SIGNAL["sellarec"], s))
        - roc_auc_score(rows["label"], fake_scores(SIGNAL["collm"], s))
        for s in range(3)
    ]
    line = row(doc, f"| {LABELS['sellarec']} - {LABELS['collm']} | AUC |")
    assert f"{np.mean(diffs):+.4f} ± {np.std(diffs, ddof=1):.4f}" in line
    assert "exceeds twice the sample standard deviation" in doc
    assert "excludes 0" in doc


def test_a_large_gap_in_every_seed_survives_both(doc):
    assert row(doc, f"| {LABELS['sellarec']} - {LABELS['collm']} | AUC |").endswith("| yes |")


def test_a_seed_where_the_gap_vanishes_fails_the_seed_rule(tmp_path):
    vanished = SIGNAL | {"sellarec": SIGNAL["collm"]}
    doc = report(tmp_path, [SIGNAL, vanished])
    assert row(doc, f"| {LABELS['sellarec']} - {LABELS['collm']} | AUC |").endswith("| no |")


@pytest.mark.parametrize(
    ("mean", "std", "low", "high", "expected"),
    [
        (0.10, 0.02, 0.05, 0.15, True),
        (0.10, 0.06, 0.05, 0.15, False),  # within two seed deviations
        (0.10, 0.02, -0.01, 0.15, False),  # the bootstrap interval holds 0
        (-0.10, 0.02, -0.15, -0.05, True),
        (0.10, float("nan"), 0.05, 0.15, False),  # one seed: no spread to compare with
    ],
)
def test_survives_needs_both_the_seed_spread_and_the_bootstrap(mean, std, low, high, expected):
    assert survives(mean, std, low, high) is expected


def test_the_loss_plot_is_written_beside_the_document_with_a_quarter_table(tmp_run, doc):
    assert (tmp_run / "docs" / "figures" / "training_loss_ml1m.png").stat().st_size > 0
    assert "![training loss](figures/training_loss_ml1m.png)" in doc
    line = row(doc, "| stage 1 (`stage1-s1`)")
    first, last = np.mean(LOSSES[:2]), np.mean(LOSSES[-2:])
    assert f"| 64 | 8 | {first:.4f} | {last:.4f} | 0.6931 | {last - 0.6931:+.4f} |" in line
    assert row(doc, f"| stage 3, {LABELS['sellarec']} (`bundle-sellarec-b`)")


def test_stages_built_before_losses_were_recorded_are_named_not_plotted(tmp_path):
    doc = report(tmp_path, [], with_losses=False)
    assert "Built before per-step losses were recorded: `stage1-s1`" in doc
    assert not (tmp_path / "docs" / "figures" / "training_loss_ml1m.png").exists()


def test_the_document_names_no_absolute_path(tmp_run, doc):
    assert str(tmp_run) not in doc
    assert "/tmp" not in doc
    assert "--out RUNS/base --seed 0" in doc
    assert "`DATA/train.parquet`" in doc
    assert "--seeds RUNS/seed1 --seeds RUNS/seed2" in doc


def test_the_papers_table3_sits_beside_our_validation_figures(doc):
    for method, _, auc, uauc_ in PAPER_TABLE3_ML1M:
        assert f"| {method} | {auc:.4f} | {uauc_:.4f} |" in doc
    assert row(doc, "| LightGCN |").endswith("| - | - |")
    rows = validation_rows()
    ours = roc_auc_score(rows["label"], fake_scores(SIGNAL["sellarec"], 0))
    assert f"| SeLLa-Rec | 0.7606 | 0.7464 | {ours:.4f} |" in doc
    assert "compare orderings, not levels" in doc.lower()


def test_the_setup_states_budget_choices_beside_the_papers_values(doc):
    assert (
        "| `stage1.lora_top_layers` | top 8 layers (q_proj, v_proj) | every layer (q_proj, v_proj) |" in doc
    )
    assert "| `prompt.history_length` | 10 | 10 |" in doc
    assert "| `stage1.lr` | 0.0001 | 1e-4 |" in doc
    assert "`stage3.soft_token_scale`" in doc


def test_without_the_backbone_on_disk_the_scale_is_unknown_not_downloaded(tmp_path, monkeypatch):
    monkeypatch.setenv("SELLAREC_CACHE_DIR", str(tmp_path))
    assert _local_backbone(SMOLLM2_ALIAS) is None
    assert _local_backbone("Qwen/Qwen2-7B") is None
    (tmp_path / SMOLLM2_ALIAS).mkdir()
    (tmp_path / SMOLLM2_ALIAS / "config.json").write_text("{}")
    assert _local_backbone(SMOLLM2_ALIAS) == str(tmp_path / SMOLLM2_ALIAS)


def test_paths_are_relative_to_the_working_directory_else_under_a_placeholder():
    style = PathStyle.of(Path("/x/runs/exp"), Path("/d/ml-1m"), cwd=Path("/w"))
    assert style.path("/x/runs/exp/stages/a") == "RUNS/exp/stages/a"
    assert style.path("/x/runs/exp-seed1") == "RUNS/exp-seed1"
    assert style.path("/d/ml-1m/train.parquet") == "DATA/train.parquet"
    assert style.path("/w/runs/ml1m") == "runs/ml1m"
    assert style.path("/elsewhere/exp.yaml") == ".../exp.yaml"
    assert style.path("training/configs/ml1m.yaml") == "training/configs/ml1m.yaml"


def test_absolute_paths_inside_a_command_line_are_rewritten():
    style = PathStyle.of(Path("/x/runs/exp"), Path("/d/ml-1m"), cwd=Path("/w"))
    command = (
        "sellarec-train run mf --config /s/exp.yaml --out /x/runs/exp --set data.train=/d/ml-1m/t.parquet"
    )
    assert style.text(command) == (
        "sellarec-train run mf --config .../exp.yaml --out RUNS/exp --set data.train=DATA/t.parquet"
    )
    assert style.text("AUC / UAUC, Proj C->L, a/b") == "AUC / UAUC, Proj C->L, a/b"


def test_the_budget_table_names_each_warm_start_and_the_clipping_bound():
    from sellarec.training.report.overview import budget_table

    def row(stage3: dict, key: str) -> str:
        cfg = {"stage1": {"target_modules": ["q_proj", "v_proj"]}, "stage3": {"budget": 2048} | stage3}
        return next(line for line in budget_table(cfg) if line.startswith(f"| `{key}` |"))

    assert "as is (the paper)" in row({"warm_start": None}, "stage3.warm_start")
    assert "balanced_warm_start" in row({"warm_start": "balanced"}, "stage3.warm_start")
    assert "anchored_warm_start" in row({"warm_start": "anchored"}, "stage3.warm_start")
    assert "| unclipped |" in row({}, "stage3.max_grad_norm")
    assert "norm 1.0" in row({"max_grad_norm": 1.0}, "stage3.max_grad_norm")
    assert "| the labels alone |" in row({}, "stage3.teacher_weight")
    mixed = row({"teacher_weight": 0.25}, "stage3.teacher_weight")
    assert "0.75 x label + 0.25 x the MF's probability" in mixed
    assert "| none |" in row({}, "stage3.logit_offset")
    assert "started at the base rate" in row({"logit_offset": True}, "stage3.logit_offset")


def bar_row(doc: str, metric: str) -> list[str]:
    section = doc.split("## Does the paper's ordering hold here?")[1]
    line = next(x for x in section.splitlines() if x.startswith(f"| {metric} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_the_bar_reads_each_variant_on_its_mean_over_seeds(doc):
    seeds = row(doc, f"| {LABELS['sellarec']} | seed 0:").split("|")[3].strip()  # "mean ± std"
    cells = bar_row(doc, "AUC")
    assert cells[1] == f"{seeds.split(' ± ')[0]} (3)"
    assert cells[-2] == "holds"  # SeLLa-Rec > CoLLM (TALLRec and zero-shot not measured here)
    assert cells[-1].startswith("holds (+")
    assert "Moonshot" in doc and "reached (+" in doc


def test_the_bar_fails_when_sellarec_falls_below_mf_and_collm_on_the_mean(tmp_path):
    weak = SIGNAL | {"sellarec": 0.0}
    doc = report(tmp_path, [weak, weak], base_signal=weak)
    for metric in ("AUC", "UAUC"):
        cells = bar_row(doc, metric)
        assert cells[-2] == f"fails: {LABELS['sellarec']} <= {LABELS['collm']}"
        assert cells[-1].startswith("fails (-")


def test_user_levels_split_a_score_into_its_between_and_within_user_parts():
    from sellarec.training.report.levels import label_ceiling, user_levels

    rng = np.random.default_rng(0)
    uid = np.repeat(np.arange(40), 20)
    taste = rng.normal(size=40)[uid]  # how much each user likes what they are shown
    pick = rng.normal(size=len(uid))  # which of their rows they like
    label = (taste + pick + rng.normal(scale=0.5, size=len(uid)) > 0).astype(int)
    users_only = user_levels(uid, label, taste)
    assert users_only["within"] == 0.5  # a per-user constant orders no user's own rows
    assert users_only["between"] == users_only["auc"] > 0.6
    rows_only = user_levels(uid, label, pick - pd_mean(uid, pick))
    assert rows_only["between"] == 0.5 and rows_only["within"] == rows_only["auc"] > 0.6
    both = user_levels(uid, label, taste + pick)
    assert both["auc"] > max(users_only["auc"], rows_only["auc"])
    assert label_ceiling(uid, label) > users_only["between"] - 0.05


def pd_mean(uid: np.ndarray, x: np.ndarray) -> np.ndarray:
    sums, counts = np.bincount(uid, weights=x), np.bincount(uid)
    return (sums / counts)[uid]


def test_the_gap_to_mf_is_split_between_and_within_users_over_the_seeds(doc):
    section = doc.split("## Where the gap to MF lies")[1].split("\n## ")[0]
    assert row(section, f"| {LABELS['mf']} | 3 |")
    sella = row(section, f"| {LABELS['sellarec']} | 3 |")
    # The fake scores follow the label within every user (each user holds both labels), so the
    # strong variant's within-user part is far above MF's.
    within = [
        float(c.split("±")[0])
        for c in (sella.split("|")[5], row(section, f"| {LABELS['mf']} |").split("|")[5])
    ]
    assert within[0] > within[1] + 0.2
    assert f"- {LABELS['sellarec']} minus {LABELS['mf']}: between users" in section


def test_the_split_is_also_given_on_the_warm_and_the_cold_rows_apart(doc):
    from sellarec.training.report.levels import by_row_kind, user_levels

    section = doc.split("## Where the gap to MF lies")[1].split("\n## ")[0]
    assert "| variant | seeds | warm rows: between users | warm rows: within users |" in section
    rows = validation_rows()
    warm = rows["not_cold"] == 1
    scores = fake_scores(SIGNAL["sellarec"], 0)
    parts = by_row_kind(rows["uid"], rows["label"], scores, warm)
    # Each kind's numbers are user_levels on that kind's rows alone, not on all of them.
    cold = user_levels(rows["uid"][~warm], rows["label"][~warm], scores[~warm])
    assert parts["cold_within"] == cold["within"] and parts["cold_between"] == cold["between"]
    assert parts["warm_within"] != user_levels(rows["uid"], rows["label"], scores)["within"]
    # The strong variant orders each user's own rows far better than MF on both kinds.
    kinds = section.split("The same split on the warm rows")[1]
    sella = [c.strip() for c in row(kinds, f"| {LABELS['sellarec']} | 3 |").split("|")[3:7]]
    mf = [c.strip() for c in row(kinds, f"| {LABELS['mf']} | 3 |").split("|")[3:7]]
    for i in (1, 3):  # the within-user columns
        assert float(sella[i].split("±")[0]) > float(mf[i].split("±")[0]) + 0.2
    assert f"- {LABELS['sellarec']} minus {LABELS['mf']}: warm rows: between users" in section
    # A kind with rows of one label only has no AUC: shown as NaN, not as a number.
    one_label = by_row_kind(rows["uid"], np.ones_like(rows["label"]), scores, warm)
    assert all(np.isnan(v) for v in one_label.values())


def test_not_yet_run_lists_the_missing_paper_variants_and_no_extension(doc):
    section = doc.split("## Not yet run")[1].split("\n## ")[0]
    assert "sellarec-train run tallrec " in section
    assert "sellarec-mf" not in section  # an extension is run by choice, never awaited


def test_the_bootstrap_of_two_score_arrays_is_the_bootstrap_of_their_result_files(tmp_path):
    from sellarec.training.report.stats import paired_bootstrap, paired_bootstrap_scores

    rng = np.random.default_rng(0)
    uid, iid = rng.integers(0, 12, 200), np.arange(200)
    label = rng.integers(0, 2, 200)
    a, b = label + rng.normal(size=200), rng.normal(size=200)
    results = []
    for name, scores in (("a", a), ("b", b)):
        path = tmp_path / f"{name}.safetensors"
        columns = {"uid": uid, "iid": iid, "label": label, "scores": scores.astype(np.float32)}
        save_file({k: torch.as_tensor(v) for k, v in columns.items()}, path)
        results.append({"valid": {"scores": str(path)}})
    from_files = paired_bootstrap(*results, 50)
    from_arrays = paired_bootstrap_scores(uid, label, a.astype(np.float32), b.astype(np.float32), 50)
    assert from_arrays == from_files
    assert from_arrays["auc"]["diff"] > 0.1  # a reads the labels, b is noise
