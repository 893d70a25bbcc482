"""Store versions: what one loaded artifact puts in the store, and whether this server can serve it.

A version is everything the store holds for one artifact bundle: users, items, the
neutral (cold-start) vectors and the two projections, which were trained together with
the embeddings and so travel with them. It may be served by a model whose backbone,
dimensions, prompt template, answer tokens and LoRA are those it was trained with:
`ModelInfo` is that identity, and `ModelInfo.problems` explains a mismatch.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from sellarec.model.artifacts import Bundle, Manifest

#: Manifest checksum that identifies the LoRA weights (the adapter is merged into the model).
_ADAPTER_WEIGHTS = "adapter/adapter_model.safetensors"
#: Files whose content defines a version.
_CONTENT_FILES = ("tensors.safetensors", "catalog.json", _ADAPTER_WEIGHTS)


@dataclass(frozen=True)
class ModelInfo:
    """What a store version must share with the model that serves it."""

    #: Backbone fingerprint (config, tokenizer and weight files).
    backbone: str
    #: d_L, the LLM hidden size.
    llm_dim: int
    #: d_C, the collaborative dimension.
    collab_dim: int
    #: The prompt template record, as canonical JSON.
    template: str
    #: (yes, no) answer token ids.
    answer_ids: tuple[int, int]
    #: sha256 of the LoRA weights ("" without an adapter).
    adapter: str

    @classmethod
    def of(cls, manifest: Manifest) -> ModelInfo:
        if manifest.backbone is None or manifest.template is None:
            raise ValueError(f"variant {manifest.variant!r} carries no LLM and cannot be served")
        ids = manifest.answer_token_ids or {}
        return cls(
            backbone=manifest.backbone.fingerprint,
            llm_dim=int(manifest.llm_dim or manifest.backbone.hidden_size),
            collab_dim=int(manifest.collab_dim or 0),
            template=json.dumps(manifest.template.model_dump(), sort_keys=True),
            answer_ids=(int(ids.get("yes", -1)), int(ids.get("no", -1))),
            adapter=manifest.checksums.get(_ADAPTER_WEIGHTS, ""),
        )

    def problems(self, other: ModelInfo) -> list[str]:
        """Why a version made for `other` cannot be served by this model (empty: it can)."""
        out = []
        if other.backbone != self.backbone:
            out.append(f"backbone fingerprint {other.backbone[:12]} != model's {self.backbone[:12]}")
        for name in ("llm_dim", "collab_dim", "answer_ids"):
            if getattr(other, name) != getattr(self, name):
                out.append(f"{name} {getattr(other, name)} != model's {getattr(self, name)}")
        if other.template != self.template:
            out.append(f"prompt template {other.template} != model's {self.template}")
        if other.adapter != self.adapter:
            out.append(
                f"LoRA weights {other.adapter[:12] or 'none'} != model's {self.adapter[:12] or 'none'}"
            )
        return out


@dataclass
class VersionMeta:
    """The model metadata of one store version."""

    #: Version id: `{manifest name}-{12 hex digits of the content hash}`.
    version: str
    #: Manifest name of the bundle.
    name: str
    #: Paper variant of the bundle.
    variant: str
    #: When the bundle was created (ISO 8601).
    created_at: str
    #: Number of users the version holds.
    n_users: int
    #: Number of items the version holds.
    n_items: int
    #: What the serving model must match.
    model: ModelInfo
    #: Cold-start vectors: "neutral.user", "neutral.item" [d_C], "neutral.semantic" [d_L], float32.
    neutral: dict[str, np.ndarray]
    #: Projection weights, "proj_c.*" and "proj_w.*".
    projections: dict[str, torch.Tensor]
    #: sha256 over every user and item record as written (set by the loader, checked after a load).
    checksum: str = ""
    #: Free-form details (dataset, loaded_at).
    extra: dict[str, Any] = field(default_factory=dict)

    def to_fields(self) -> dict[str, bytes]:
        """Hash fields for the store: JSON for the scalars, raw float32 / safetensors for tensors."""
        head = {k: v for k, v in asdict(self).items() if k not in {"neutral", "projections"}}
        fields = {"meta": json.dumps(head).encode()}
        fields |= {name: vec.astype("<f4").tobytes() for name, vec in self.neutral.items()}
        fields["projections"] = save_tensors({k: v.contiguous() for k, v in self.projections.items()})
        return fields

    @classmethod
    def from_fields(cls, fields: dict[str, bytes]) -> VersionMeta:
        head = json.loads(fields["meta"])
        model = head.pop("model")
        model["answer_ids"] = tuple(model["answer_ids"])
        neutral = {k: np.frombuffer(v, dtype="<f4") for k, v in fields.items() if k.startswith("neutral.")}
        projections = load_tensors(fields["projections"]) if fields.get("projections") else {}
        return cls(**head, model=ModelInfo(**model), neutral=neutral, projections=projections)


def version_id(manifest: Manifest) -> str:
    """`{name}-{hash}`: the same bundle content always gets the same id."""
    digest = hashlib.sha256()
    for name in _CONTENT_FILES:
        digest.update(f"{name}={manifest.checksums.get(name, '')};".encode())
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", manifest.name).strip("_") or "model"
    return f"{name}-{digest.hexdigest()[:12]}"


def meta_from_bundle(bundle: Bundle) -> VersionMeta:
    """The metadata of the version a bundle makes (checksum left for the loader to fill)."""
    m, t = bundle.manifest, bundle.tensors
    neutral = {
        k: t[k].float().numpy() for k in ("neutral.user", "neutral.item", "neutral.semantic") if k in t
    }
    projections = {k: v.float() for k, v in t.items() if k.startswith(("proj_c.", "proj_w."))}
    return VersionMeta(
        version=version_id(m),
        name=m.name,
        variant=m.variant,
        created_at=m.created_at,
        n_users=m.n_users,
        n_items=m.n_items,
        model=ModelInfo.of(m),
        neutral=neutral,
        projections=projections,
        extra={"dataset": m.dataset},
    )
