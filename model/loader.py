"""Artifact bundle -> ready SellaRec scorer (backbone, LoRA, projections), checked."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from sellarec.model.artifacts import Bundle, load_bundle
from sellarec.model.backbone import BackboneInfo, load_backbone
from sellarec.model.compat import ModelIdentity, check_compatible, require_llm
from sellarec.model.lora import load_lora, merge
from sellarec.model.scoring import answer_token_ids
from sellarec.model.sella import SellaRec


@dataclass
class LoadedModel:
    """A scorer together with the bundle it came from."""

    #: The scorer: backbone (LoRA merged or attached), the bundle's projections, Yes/No head.
    scorer: SellaRec
    #: The bundle, tensors and catalog included.
    bundle: Bundle
    #: The backbone actually loaded.
    backbone: BackboneInfo
    #: What a store version must share with this model to be served by it.
    identity: ModelIdentity


def load_scorer(
    artifacts: str | Path | Bundle,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    backbone: str | None = None,
    merge_adapter: bool = True,
) -> LoadedModel:
    """Load a bundle's backbone (or `backbone`, checked for identity), LoRA and projections.

    Any variant with an LLM loads; an MF bundle is refused (ArtifactError, one line).
    `merge_adapter` folds the LoRA into the weights: identical outputs, faster forward.
    """
    bundle = artifacts if isinstance(artifacts, Bundle) else load_bundle(artifacts)
    manifest = bundle.manifest
    require_llm(manifest, bundle.path)
    assert manifest.backbone is not None and manifest.template is not None  # require_llm
    model, tokenizer, info = load_backbone(backbone or manifest.backbone.spec, dtype=dtype, device=device)
    spec = manifest.template.to_spec()
    # Checked before anything is loaded into the backbone, so a mismatch reads as one.
    identity = check_compatible(manifest, info, answer_token_ids(tokenizer, spec.answer_cue))
    if bundle.adapter_dir is not None:
        model = load_lora(model, bundle.adapter_dir)
        if merge_adapter:
            model = merge(model)
    projections = bundle.projections(device)
    scorer = SellaRec(model, tokenizer, spec, proj_c=projections.proj_c, proj_w=projections.proj_w)
    return LoadedModel(scorer=scorer, bundle=bundle, backbone=info, identity=identity)
