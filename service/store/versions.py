"""Store versions: what one loaded artifact puts in the store.

A version is everything the store holds for one artifact bundle: users, items, the
neutral (cold-start) vectors and the two projections, which were trained together with
the embeddings and so travel with them. It may be served only by a model whose backbone,
dimensions, prompt template, answer tokens and LoRA are those it was trained with: its
`model` is that identity (`model.compat.ModelIdentity`, the check the scorer's loader uses).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from sellarec.model.artifacts import ADAPTER_WEIGHTS, CATALOG, TENSORS, Bundle, Manifest
from sellarec.model.bundle import NEUTRAL, NEUTRAL_ITEM, NEUTRAL_SEMANTIC, NEUTRAL_USER, projection_tensors
from sellarec.model.compat import ModelIdentity

#: Files whose content defines a version.
_CONTENT_FILES = (TENSORS, CATALOG, ADAPTER_WEIGHTS)


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
    model: ModelIdentity
    #: Cold-start vectors by name (model.bundle.NEUTRAL), float32: user and item [d_C], semantic
    #: [d_L]; empty where the variant has no such side (its users' and items' vectors are empty too).
    neutral: dict[str, np.ndarray]
    #: Projection weights as the bundle stores them (model.bundle: "proj_c.*", "proj_w.*").
    projections: dict[str, torch.Tensor]
    #: sha256 over every user and item record as written (set by the loader, checked after a load).
    checksum: str = ""
    #: Free-form details (dataset, loaded_at).
    extra: dict[str, Any] = field(default_factory=dict)

    def to_fields(self) -> dict[str, bytes]:
        """Hash fields for the store: JSON for the scalars, raw float32 / safetensors for tensors."""
        scalars = [f.name for f in fields(self) if f.name not in {"model", "neutral", "projections"}]
        head = {name: getattr(self, name) for name in scalars} | {"model": self.model.to_dict()}
        out = {"meta": json.dumps(head).encode()}
        out |= {name: vec.astype("<f4").tobytes() for name, vec in self.neutral.items()}
        out["projections"] = save_tensors({k: v.contiguous() for k, v in self.projections.items()})
        return out

    @classmethod
    def from_fields(cls, raw: dict[str, bytes]) -> VersionMeta:
        """Read back `to_fields`."""
        head = json.loads(raw["meta"])
        model = ModelIdentity.from_dict(head.pop("model"))
        neutral = {k: np.frombuffer(raw[k], dtype="<f4") for k in NEUTRAL if k in raw}
        projections = load_tensors(raw["projections"]) if raw.get("projections") else {}
        return cls(**head, model=model, neutral=neutral, projections=projections)


def version_id(manifest: Manifest) -> str:
    """`{name}-{hash}`: the same bundle content always gets the same id."""
    digest = hashlib.sha256()
    for name in _CONTENT_FILES:
        digest.update(f"{name}={manifest.checksums.get(name, '')};".encode())
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", manifest.name).strip("_") or "model"
    return f"{name}-{digest.hexdigest()[:12]}"


def meta_from_bundle(bundle: Bundle) -> VersionMeta:
    """The metadata of the version a bundle makes (checksum left for the loader to fill).

    An MF bundle makes none (ArtifactError: no LLM to serve).
    """
    m, tables = bundle.manifest, bundle.tables()
    model = ModelIdentity.of(m)
    neutral = {
        name: _vector(vector)
        for name, vector in (
            (NEUTRAL_USER, tables.neutral_user),
            (NEUTRAL_ITEM, tables.neutral_item),
            (NEUTRAL_SEMANTIC, tables.neutral_semantic),
        )
    }
    return VersionMeta(
        version=version_id(m),
        name=m.name,
        variant=m.variant,
        created_at=m.created_at,
        n_users=m.n_users,
        n_items=m.n_items,
        model=model,
        neutral=neutral,
        projections={k: v.float() for k, v in projection_tensors(bundle.tensors).items()},
        extra={"dataset": m.dataset},
    )


def _vector(tensor: torch.Tensor | None) -> np.ndarray:
    """A float32 vector; empty for a side the variant does not have."""
    return np.zeros(0, np.float32) if tensor is None else tensor.float().numpy()
