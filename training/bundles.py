"""Artifact bundles of every variant (model.artifacts layout, tensor names of model.bundle).

- MF: backbone and template None; mf.* and neutral.user/item only. Evaluated offline;
  servers refuse it (no LLM).
- Zero-shot / TALLRec: the stage-1 template, no tensors (TALLRec carries the adapter).
- Stage-3 variants: the stage-3 template with its slots, the stage-1 adapter, and only the
  tensors its slots use (mf.* and proj_c.* for <User_ID>/<Item_ID>, semantic.items and
  proj_w.* for <Warm_ID>), with neutral vectors for ids the tables do not know.

`save_bundle` refuses tensors that do not back the prompt, so every bundle written here loads
back and, with an LLM, serves.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch
from peft import PeftModel

from sellarec.model.artifacts import Catalog, Manifest, TemplateRecord, backbone_record, save_bundle
from sellarec.model.backbone import BackboneInfo
from sellarec.model.bundle import (
    MF_ITEMS,
    MF_USERS,
    NEUTRAL_ITEM,
    NEUTRAL_SEMANTIC,
    NEUTRAL_USER,
    SEMANTIC_ITEMS,
)
from sellarec.model.prompts import TemplateSpec
from sellarec.model.scoring import answer_token_ids
from sellarec.training.data import Dataset


class AdapterCopy:
    """Stands in for a PeftModel in save_bundle: copies a saved adapter directory."""

    def __init__(self, source: Path) -> None:
        self.source = Path(source)

    def save_pretrained(self, path: str | Path, safe_serialization: bool = True) -> None:
        shutil.copytree(self.source, path)


def catalog(data: Dataset, history_length: int) -> Catalog:
    """Ids are the dataset's integer ids as strings, row = id (0 is the pad)."""
    return Catalog(
        users=[str(u) for u in range(data.n_users)],
        items=[str(i) for i in range(data.n_items)],
        titles=list(data.items.titles),
        histories={str(u): [str(i) for i in h] for u, h in data.histories(history_length).items()},
    )


def masked_mean(table: torch.Tensor, mask: np.ndarray) -> torch.Tensor:
    """Mean row of `table` over `mask` (all rows where the mask is empty): a neutral vector."""
    m = torch.as_tensor(mask)
    return table[m].mean(0) if bool(m.any()) else table.mean(0)


def collab_tensors(data: Dataset, users: torch.Tensor, items: torch.Tensor) -> dict[str, torch.Tensor]:
    """mf.* with neutral = mean over the ids that have training rows."""
    return {
        MF_USERS: users,
        MF_ITEMS: items,
        NEUTRAL_USER: masked_mean(users, data.trained_users()),
        NEUTRAL_ITEM: masked_mean(items, data.trained_items()),
    }


def semantic_tensors(data: Dataset, semantic: torch.Tensor) -> dict[str, torch.Tensor]:
    titled = np.array([bool(t) for t in data.items.titles])
    return {SEMANTIC_ITEMS: semantic, NEUTRAL_SEMANTIC: masked_mean(semantic, titled)}


def write_bundle(
    path: Path,
    variant: str,
    data: Dataset,
    tensors: dict[str, torch.Tensor],
    history_length: int,
    info: BackboneInfo | None = None,
    spec: TemplateSpec | None = None,
    tokenizer=None,
    adapter: Path | PeftModel | None = None,
    collab_dim: int | None = None,
    extra: dict | None = None,
    mf_residual: bool = False,
) -> Path:
    """Save one variant's bundle (LLM fields only when `info` and `spec` are given); `adapter` is
    a saved adapter directory (copied) or a PeftModel (saved as it is, e.g. trained on in stage 3)."""
    answer = None
    if spec is not None and tokenizer is not None:
        yes, no = answer_token_ids(tokenizer, spec.answer_cue)
        answer = {"yes": yes, "no": no}
    manifest = Manifest(
        name=f"{data.name}-{variant}",
        variant=variant,
        dataset=data.name,
        backbone=backbone_record(info) if info else None,
        collab_dim=collab_dim,
        llm_dim=info.hidden_size if info else None,
        template=TemplateRecord.from_spec(spec) if spec else None,
        answer_token_ids=answer,
        placeholders=[s.placeholder for s in spec.slots] if spec else [],
        n_users=data.n_users,
        n_items=data.n_items,
        mf_residual=mf_residual,
        extra=extra or {},
    )
    return save_bundle(
        path,
        manifest,
        {k: v.detach().float() for k, v in tensors.items()},
        catalog(data, history_length),
        adapter=AdapterCopy(adapter) if isinstance(adapter, (str, Path)) else adapter,
    )
