"""Artifact bundle -> ready SellaRec scorer (backbone, LoRA, projections), checked."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from sellarec.model.artifacts import ArtifactError, Bundle, check_compatible, load_bundle
from sellarec.model.backbone import BackboneInfo, load_backbone
from sellarec.model.collab import CollabProjector, SemanticProjector
from sellarec.model.lora import load_lora, merge
from sellarec.model.scoring import answer_token_ids
from sellarec.model.sella import SellaRec


@dataclass
class LoadedModel:
    """A scorer together with the bundle it came from."""

    scorer: SellaRec
    bundle: Bundle
    backbone: BackboneInfo


def load_scorer(
    artifacts: str | Path | Bundle,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    backbone: str | None = None,
    merge_adapter: bool = True,
) -> LoadedModel:
    """Load a bundle's backbone (or `backbone`, checked for identity), LoRA and projections.

    `merge_adapter` folds the LoRA into the weights: identical outputs, faster forward.
    """
    bundle = artifacts if isinstance(artifacts, Bundle) else load_bundle(artifacts)
    manifest = bundle.manifest
    if manifest.backbone is None or manifest.template is None:
        raise ArtifactError(f"variant {manifest.variant!r} carries no LLM and cannot be loaded as a scorer")
    model, tokenizer, info = load_backbone(backbone or manifest.backbone.spec, dtype=dtype, device=device)
    spec = manifest.template.to_spec()
    # Checked before anything is loaded into the backbone, so a mismatch reads as one.
    check_compatible(manifest, info, answer_token_ids(tokenizer, spec.answer_cue))
    if bundle.adapter_dir is not None:
        model = load_lora(model, bundle.adapter_dir)
        if merge_adapter:
            model = merge(model)
    proj_c = proj_w = None
    if manifest.collab_dim and bundle.state_dict("proj_c"):
        proj_c = CollabProjector.from_state(bundle.state_dict("proj_c"))
    if bundle.state_dict("proj_w"):
        proj_w = SemanticProjector.from_state(bundle.state_dict("proj_w"))
    scorer = SellaRec(model, tokenizer, spec, proj_c=proj_c, proj_w=proj_w)
    for proj in (scorer.proj_c, scorer.proj_w):
        if proj is not None:
            proj.to(device).eval().requires_grad_(False)
    return LoadedModel(scorer=scorer, bundle=bundle, backbone=info)
