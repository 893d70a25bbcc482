"""What the variant stages build into their cache directories, one function per family.

- MF alone: the stage-2 MF tables as a bundle, no LLM.
- Text-only LLM (zero-shot, TALLRec): the stage-1 template, TALLRec's stage-1 adapter, no
  tensors.
- Stage-3 variants (CoLLM, SeLLa-Rec and its ablations): stage 3 trained from the stage-1
  adapter and the stage-2 tables, then a bundle of the tensors its slots use.
- Evaluation: a bundle's metrics on the validation sample, with the scores kept for the
  paired comparisons of the report.

`Pipeline` resolves the upstream stages (and the cache keys); these functions get what it
resolved and a staging directory, and return the metrics the stage records.
"""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from peft import PeftModel
from safetensors.torch import save_file
from transformers import AutoConfig

from sellarec.model.backbone import BackboneInfo, load_tokenizer, resolve
from sellarec.model.backbone import fingerprint as backbone_fingerprint
from sellarec.model.bundle import MF_ITEMS, MF_USERS, PROJ_C, PROJ_W, with_prefix, without_prefix
from sellarec.model.prompts import TemplateSpec
from sellarec.model.sella import SellaRec
from sellarec.training.bundles import collab_tensors, semantic_tensors, write_bundle
from sellarec.training.config import RunConfig, Variant
from sellarec.training.data import Dataset, sample, without_sample
from sellarec.training.evaluate import evaluate_bundle
from sellarec.training.stage3 import SoftInputTables, build_scorer, train_stage3

#: Stage 3 draws its training rows with the run's seed plus this (stage 1 draws with the seed).
STAGE3_SEED_OFFSET = 3


def held_out(cfg: RunConfig, data: Dataset) -> Dataset:
    """`data` without the rows stage 3 trains on, for the stage 2 of `sellarec-mf` (and of
    `stage3.held_out_mf`): stage 3 then meets the MF's logits out of sample, as on new rows. On
    the rows it was fit to, an MF's logits already explain the labels (ML-1M: BCE 0.336 on the
    stage-3 rows, 0.645 on validation), and a residual on them learned nothing."""
    return replace(data, train=without_sample(data.train, cfg.stage3.budget, cfg.seed + STAGE3_SEED_OFFSET))


def backbone_info(spec: str) -> BackboneInfo:
    """BackboneInfo from the config alone (no weights loaded)."""
    path = resolve(spec)
    config = AutoConfig.from_pretrained(path)
    return BackboneInfo(
        spec=spec,
        fingerprint=backbone_fingerprint(path),
        hidden_size=int(config.get_text_config().hidden_size),
        model_type=str(config.model_type),
    )


def write_variant(
    d: Path,
    cfg: RunConfig,
    data: Dataset,
    variant: Variant,
    tensors: dict[str, torch.Tensor],
    spec: TemplateSpec | None = None,
    adapter: Path | PeftModel | None = None,
    collab_dim: int | None = None,
) -> dict:
    """`variant`'s bundle under d/bundle; the LLM fields only when it has a template."""
    write_bundle(
        d / "bundle",
        variant.name,
        data,
        tensors,
        cfg.prompt.history_length,
        info=backbone_info(cfg.backbone) if spec else None,
        spec=spec,
        tokenizer=load_tokenizer(cfg.backbone) if spec else None,
        adapter=adapter,
        collab_dim=collab_dim,
        extra={"config": asdict(cfg)},
        mf_residual=variant.mf_residual,
    )
    return {}


def mf_bundle(d: Path, cfg: RunConfig, data: Dataset, variant: Variant, collab: dict) -> dict:
    """MF alone: stage 2's tables (without alignment) and their neutral vectors."""
    tensors = collab_tensors(data, collab[MF_USERS], collab[MF_ITEMS])
    return write_variant(d, cfg, data, variant, tensors, collab_dim=cfg.stage2.collab_dim)


def text_bundle(
    d: Path, cfg: RunConfig, data: Dataset, variant: Variant, spec: TemplateSpec, adapter: Path | None
) -> dict:
    """Zero-shot (no adapter) or TALLRec (the stage-1 adapter) on the stage-1 prompt."""
    return write_variant(d, cfg, data, variant, {}, spec=spec, adapter=adapter)


def stage3_start(
    cfg: RunConfig,
    data: Dataset,
    variant: Variant,
    spec: TemplateSpec,
    adapter: Path,
    collab: dict[str, torch.Tensor],
    semantic: torch.Tensor | None,
) -> tuple[SellaRec, SoftInputTables, pd.DataFrame]:
    """What stage 3 starts from: the scorer (warm-started where the variant is), the tables it
    trains and its seeded train sample."""
    proj_state = warm_start(collab) if variant.warm_start else None
    scorer = build_scorer(
        cfg.backbone,
        adapter,
        spec,
        cfg.stage2.collab_dim,
        proj_state,
        cfg.seed,
        cfg.stage3.soft_token_scale,
        cfg.stage3.warm_start,
        torch.cat([collab[MF_USERS], collab[MF_ITEMS]]) if MF_USERS in collab else None,
        cfg.stage3.soft_token_gain,
        train_lora=cfg.stage3.lora_lr is not None,
    )
    tables = soft_input_tables(scorer, collab, semantic, data.trained_users())
    rows = sample(data.train, cfg.stage3.budget, cfg.seed + STAGE3_SEED_OFFSET)
    return scorer, tables, rows


def stage3_bundle(
    d: Path,
    cfg: RunConfig,
    data: Dataset,
    variant: Variant,
    spec: TemplateSpec,
    adapter: Path,
    collab: dict[str, torch.Tensor],
    semantic: torch.Tensor | None,
    progress: bool = True,
) -> dict:
    """Stage 3 on its seeded train sample, then the bundle; returns stage 3's metrics."""
    scorer, tables, rows = stage3_start(cfg, data, variant, spec, adapter, collab, semantic)
    residual = variant.mf_residual
    metrics = train_stage3(scorer, tables, rows, cfg.stage3, cfg.seed, progress, mf_residual=residual)
    tensors = trained_tensors(data, scorer, tables)
    # With `stage3.lora_lr` the bundle carries the adapter as stage 3 left it, saved from the model.
    shipped = scorer.backbone if cfg.stage3.lora_lr is not None else adapter
    collab_dim = cfg.stage2.collab_dim
    write_variant(d, cfg, data, variant, tensors, spec=spec, adapter=shipped, collab_dim=collab_dim)
    return metrics


def warm_start(collab: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Stage 2's Proj C->L weights (trained with the alignment loss, or not)."""
    return without_prefix(collab, PROJ_C)


def soft_input_tables(
    scorer: SellaRec,
    collab: dict[str, torch.Tensor],
    semantic: torch.Tensor | None,
    trained_users: np.ndarray | None = None,
) -> SoftInputTables:
    """The tables stage 3 trains: only those a projection of the scorer reads."""
    uses_collab = scorer.proj_c is not None
    return SoftInputTables(
        collab[MF_USERS] if uses_collab else None,
        collab[MF_ITEMS] if uses_collab else None,
        semantic if scorer.proj_w is not None else None,
        trained_users if uses_collab else None,
    )


def trained_tensors(data: Dataset, scorer: SellaRec, tables: SoftInputTables) -> dict[str, torch.Tensor]:
    """The tensors a stage-3 bundle carries: its slots' tables, projections, neutral vectors."""
    tensors: dict[str, torch.Tensor] = {}
    if scorer.proj_c is not None:
        tensors |= collab_tensors(data, tables.users.detach(), tables.items.detach())
        tensors |= with_prefix(PROJ_C, scorer.proj_c.state_dict())
    if scorer.proj_w is not None:
        tensors |= semantic_tensors(data, tables.semantic.detach())
        tensors |= with_prefix(PROJ_W, scorer.proj_w.state_dict())
    return tensors


def evaluation(d: Path, bundle: Path, frame: pd.DataFrame, batch_size: int, progress: bool = True) -> dict:
    """`bundle`'s metrics on `frame`; its scores saved beside them, row ids and labels included."""
    result, scores = evaluate_bundle(bundle, frame, batch_size, progress)
    save_file(
        {
            "scores": torch.as_tensor(scores),
            "uid": torch.tensor(frame["uid"].to_numpy()),
            "iid": torch.tensor(frame["iid"].to_numpy()),
            "label": torch.tensor(frame["label"].to_numpy()),
            "not_cold": torch.tensor(frame["not_cold"].to_numpy()),
        },
        d / "scores.safetensors",
    )
    return result
