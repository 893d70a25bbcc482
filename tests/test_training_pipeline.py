"""End to end on a tiny random Qwen2: every variant trains, caches, evaluates and loads."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from sellarec.model.artifacts import load_bundle
from sellarec.model.loader import load_scorer
from sellarec.training.config import VARIANTS, load_config
from sellarec.training.data import Dataset
from sellarec.training.evaluate import collab_inputs, evaluate_bundle, score_llm
from sellarec.training.pipeline import Pipeline, run_variant
from sellarec.training.synthetic import synthetic_dataset


@pytest.fixture(scope="module")
def tiny_data() -> Dataset:
    return synthetic_dataset()


@pytest.fixture(scope="module")
def tiny_cfg(tiny_backbone_dir):
    return load_config(
        None,
        {
            "backbone": str(tiny_backbone_dir),
            "stage1.budget": 12,
            "stage1.batch_size": 4,
            "stage2.collab_dim": 8,
            "stage2.max_epochs": 3,
            "stage2.batch_size": 16,
            "stage3.budget": 8,
            "stage3.batch_size": 4,
            "eval.limit": 16,
            "eval.batch_size": 4,
        },
    )


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_cfg, tiny_data):
    out = tmp_path_factory.mktemp("run")
    for name in VARIANTS:
        run_variant(tiny_cfg, name, out, data=tiny_data, progress=False, command=f"test {name}")
    return out


@pytest.mark.parametrize("name", list(VARIANTS))
def test_every_variant_writes_results_with_all_metrics(run_dir, name):
    result = json.loads((run_dir / "results" / f"{name}.json").read_text())
    for key in ("n", "auc", "uauc", "auc_warm", "auc_cold", "uauc_warm", "uauc_cold"):
        assert key in result["valid"]
    assert result["valid"]["n"] == 16


def test_stages_are_shared_between_variants(run_dir):
    names = sorted(
        p.name.rsplit("-", 1)[0] for p in (run_dir / "stages").iterdir() if not p.name.startswith(".")
    )
    assert names.count("stage1") == 1
    assert names.count("distill") == 1
    assert names.count("stage2-align") == 1 and names.count("stage2-mf") == 1


def test_cached_stages_are_skipped_on_rerun(run_dir, tiny_cfg, tiny_data, monkeypatch):
    import sellarec.training.assembly as assembly
    import sellarec.training.pipeline as pipeline

    def fail(*args, **kwargs):
        raise AssertionError("a cached stage ran again")

    for fn in ("train_stage1", "distill_items", "train_stage2"):
        monkeypatch.setattr(pipeline, fn, fail)
    for fn in ("train_stage3", "evaluate_bundle", "write_bundle"):
        monkeypatch.setattr(assembly, fn, fail)
    run_variant(tiny_cfg, "sellarec", run_dir, data=tiny_data, progress=False)


def test_changed_budget_builds_a_new_stage(run_dir, tiny_cfg, tiny_data):
    cfg = load_config(None, {"backbone": tiny_cfg.backbone, "stage1.budget": 6, "stage1.batch_size": 4})
    Pipeline(cfg, run_dir, tiny_data, progress=False).stage1()
    assert len(list((run_dir / "stages").glob("stage1-*"))) == 2


@pytest.mark.parametrize("name", ["sellarec", "collm", "sella-ui", "tallrec", "zeroshot"])
def test_llm_bundles_load_in_the_service_loader(run_dir, name):
    result = json.loads((run_dir / "results" / f"{name}.json").read_text())
    loaded = load_scorer(result["bundle"])
    assert loaded.bundle.manifest.variant == name
    has_warm = name in {"sellarec", "sella-ui"}
    assert (loaded.scorer.proj_w is not None) == has_warm


def test_mf_bundle_has_no_llm_and_scores_by_dot_product(run_dir, tiny_data):
    result = json.loads((run_dir / "results" / "mf.json").read_text())
    bundle = load_bundle(result["bundle"])
    assert bundle.manifest.backbone is None and bundle.manifest.template is None
    frame = tiny_data.valid.head(5)
    _, scores = evaluate_bundle(result["bundle"], frame, progress=False)
    users, items = bundle.tensors["mf.users"], bundle.tensors["mf.items"]
    expected = [float(users[u] @ items[i]) for u, i in zip(frame["uid"], frame["iid"], strict=True)]
    np.testing.assert_allclose(scores, expected, rtol=1e-5)


@pytest.mark.parametrize("name", ["mf", "sellarec", "tallrec"])
def test_unknown_users_and_items_score_with_neutral_vectors(run_dir, tiny_data, name):
    result = json.loads((run_dir / "results" / f"{name}.json").read_text())
    frame = tiny_data.valid.head(6).copy()
    frame.loc[:2, "uid"] = [900, 901, 902]
    frame.loc[3:, "iid"] = [800, 801, 802]
    frame["not_cold"] = 0
    metrics, scores = evaluate_bundle(result["bundle"], frame, progress=False)
    assert np.isfinite(scores).all() and metrics["n"] == 6


def test_the_mf_residual_extension_scores_the_llm_logit_plus_the_dot_product(run_dir, tiny_data):
    result = json.loads((run_dir / "results" / "sellarec-mf.json").read_text())
    bundle = load_bundle(result["bundle"])
    assert bundle.manifest.mf_residual and bundle.manifest.variant == "sellarec-mf"
    # Its MF was fit without the stage-3 rows; the paper variants' MF with them.
    assert result["stages"]["stage2-align-holdout"]["dir"].startswith("stage2-align-holdout-")
    plain = json.loads((run_dir / "results" / "sellarec.json").read_text())
    assert "stage2-align-holdout" not in plain["stages"] and "stage2-align" in plain["stages"]
    assert not load_bundle(plain["bundle"]).manifest.mf_residual  # the paper variant is untouched
    frame = tiny_data.valid.head(6).copy()
    frame.loc[:1, "uid"] = [900, 901]  # users the MF never saw: the neutral user's dot product
    _, scores = evaluate_bundle(result["bundle"], frame, progress=False)
    inputs = collab_inputs(bundle)
    llm = score_llm(load_scorer(bundle).scorer, inputs, frame, progress=False)
    users, items = inputs.user(frame["uid"].tolist()), inputs.item(frame["iid"].tolist())
    np.testing.assert_allclose(scores, llm + (users * items).sum(-1).double().numpy(), rtol=1e-5, atol=1e-6)
    assert not np.allclose(scores, llm, atol=1e-3)


def test_held_out_mf_fits_stage2_without_the_stage3_rows_for_a_paper_variant(tiny_cfg, tiny_data, tmp_path):
    stage3 = dataclasses.replace(tiny_cfg.stage3, held_out_mf=True)
    result = run_variant(
        dataclasses.replace(tiny_cfg, stage3=stage3), "collm", tmp_path, data=tiny_data, progress=False
    )
    assert (
        set(result["stages"]) >= {"stage2-mf-holdout", "bundle-collm"} and "stage2-mf" not in result["stages"]
    )
    assert not load_bundle(result["bundle"]).manifest.mf_residual  # still the paper's scoring


def test_trained_tables_move_in_stage3(run_dir):
    result = json.loads((run_dir / "results" / "sellarec.json").read_text())
    bundle = load_bundle(result["bundle"])
    stage2 = next((run_dir / "stages").glob("stage2-align-*"))
    from safetensors.torch import load_file

    before = load_file(stage2 / "collab.safetensors")
    assert not torch.allclose(before["proj_c.net.0.weight"], bundle.tensors["proj_c.net.0.weight"])


def test_report_writes_the_table_bootstrap_and_figure(run_dir, tmp_path):
    from sellarec.training.report import LABELS, paired_bootstrap, write_report

    doc = write_report(run_dir, tmp_path / "results.md", tmp_path / "figures", resamples=20)
    text = doc.read_text()
    for label in LABELS.values():
        assert label in text
    assert "SeLLa-Rec - CoLLM" in text and "not yet run" not in text
    # The extension is a row of its own section, never one of the paper's table.
    section = text.split("## Validation table")[1].split("\n## ")[0]
    table = "\n".join(line for line in section.splitlines() if line.startswith("|"))
    extension = text.split("## Extension, not a paper variant")[1].split("\n## ")[0]
    assert LABELS["sellarec-mf"] not in table and f"| {LABELS['sellarec-mf']} |" in extension
    assert f"| {LABELS['sellarec']} |" in table
    assert (tmp_path / "figures" / "fig7_cosine_ml1m.png").stat().st_size > 0
    result = json.loads((run_dir / "results" / "sellarec.json").read_text())
    same = paired_bootstrap(result, result, resamples=10)
    assert same["auc"]["diff"] == 0 and same["auc"]["low"] == same["auc"]["high"] == 0


def test_soft_token_scale_is_the_norm_of_what_the_served_model_splices_in(run_dir):
    from sellarec.training.diagnostics import token_scale

    result = json.loads((run_dir / "results" / "sellarec.json").read_text())
    loaded = load_scorer(result["bundle"])
    t = loaded.bundle.tensors
    scale = token_scale(t)
    with torch.no_grad():
        users = loaded.scorer.proj_c(t["mf.users"]).norm(dim=-1).median()
        items = loaded.scorer.proj_c(t["mf.items"]).norm(dim=-1).median()
        warm = loaded.scorer.proj_w(t["semantic.items"]).norm(dim=-1).median()
    assert scale.user == pytest.approx(float(users), rel=1e-5)
    assert scale.item == pytest.approx(float(items), rel=1e-5)
    assert scale.warm == pytest.approx(float(warm), rel=1e-5)
    no_warm = json.loads((run_dir / "results" / "sella-warm.json").read_text())
    assert token_scale(load_bundle(no_warm["bundle"]).tensors).warm is None
    no_ui = json.loads((run_dir / "results" / "sella-ui.json").read_text())
    assert token_scale(load_bundle(no_ui["bundle"]).tensors).user is None


def test_vocabulary_scale_reads_the_input_embeddings(run_dir, tiny_backbone_dir):
    from transformers import AutoModelForCausalLM

    from sellarec.training.diagnostics import vocabulary_scale

    model = AutoModelForCausalLM.from_pretrained(tiny_backbone_dir)
    expected = model.get_input_embeddings().weight.detach().norm(dim=-1).median()
    assert vocabulary_scale(tiny_backbone_dir) == pytest.approx(float(expected), rel=1e-5)
    assert vocabulary_scale(run_dir) is None  # no backbone weights there


def test_report_has_a_soft_token_scale_row_per_stage3_variant(run_dir, tmp_path):
    from sellarec.training.report import LABELS, write_report

    text = write_report(run_dir, tmp_path / "results.md", tmp_path / "figures", resamples=5).read_text()
    section = text.split("## Soft-token scale", 1)[1]
    for name, variant in VARIANTS.items():
        assert (f"after stage 3, {LABELS[name]} |" in section) == variant.stage3
    assert "with alignment (the warm start of Proj C->L)" in section


def test_report_compares_a_sweep_run_with_the_base_row(run_dir, tiny_cfg, tiny_data, tmp_path):
    from sellarec.training.report import write_report

    sweep = tmp_path / "sweep"
    cfg = dataclasses.replace(tiny_cfg, stage3=dataclasses.replace(tiny_cfg.stage3, lr=3e-3))
    run_variant(cfg, "sellarec", sweep, data=tiny_data, progress=False, command="test sweep")
    text = write_report(run_dir, tmp_path / "r.md", tmp_path / "f", resamples=5, sweeps=[sweep]).read_text()
    section = text.split("## Tuning on validation", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| SeLLa-Rec |")]
    assert len(rows) == 1 and "`stage3.lr=0.003`" in rows[0]
    assert "test sweep" in section


def test_results_record_the_cpu_kernels_and_the_report_names_them(run_dir, tmp_path):
    from sellarec.training.report import machine_line

    result = json.loads((run_dir / "results" / "collm.json").read_text())
    assert result["machine"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert result["machine"]["torch"] == torch.__version__
    line = machine_line({"collm": result})
    assert f"{torch.backends.cpu.get_cpu_capability()} kernels" in line and "predate" not in line
    assert "predate" in machine_line({"collm": {k: v for k, v in result.items() if k != "machine"}})


def test_a_stage3_lora_rate_ships_the_adapter_stage3_trained(tiny_cfg, tiny_data, tmp_path):
    from safetensors.torch import load_file

    from sellarec.model.artifacts import ADAPTER_WEIGHTS

    stage3 = dataclasses.replace(tiny_cfg.stage3, lora_lr=1e-2)
    result = run_variant(
        dataclasses.replace(tiny_cfg, stage3=stage3), "collm", tmp_path, data=tiny_data, progress=False
    )
    bundle = load_bundle(result["bundle"])  # checksums verified
    shipped = load_file(bundle.path / ADAPTER_WEIGHTS)
    stage1 = load_file(next((tmp_path / "stages").glob("stage1-*")) / ADAPTER_WEIGHTS)
    assert shipped.keys() == stage1.keys()
    assert any(not torch.equal(shipped[k], stage1[k]) for k in shipped)
    assert np.isfinite(result["valid"]["auc"])
    # The served model is the stage-3 adapter's: it loads and scores like the evaluation did.
    assert load_scorer(bundle).scorer is not None
