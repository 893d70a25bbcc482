"""Offline training of SeLLa-Rec and the variants the paper compares.

Programmatic use (a demo on a synthetic dataset, no files needed)::

    from sellarec.training.config import load_config
    from sellarec.training.pipeline import run_variant
    from sellarec.training.synthetic import synthetic_dataset

    cfg = load_config(None, {"backbone": "smollm2-135m-instruct", "stage1.budget": 32,
                             "stage3.budget": 32, "eval.limit": 0})
    result = run_variant(cfg, "sellarec", "out/", data=synthetic_dataset())
    result["bundle"]   # an artifact directory that model.loader.load_scorer accepts
    result["valid"]    # n, auc, uauc, auc_warm, auc_cold, uauc_warm, uauc_cold

Modules: `config` (YAML -> dataclasses, variants), `data` (CoLLM splits), `raw` (builders
from MovieLens-1M / Amazon-Book files), `stage1` (LoRA + distillation), `stage2` (MF +
InfoNCE), `stage3` (soft tokens), `pipeline` (cached stages), `evaluate`, `report`, `cli`.
"""
