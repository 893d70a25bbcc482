"""Whether a bundle can be served, and by which model: the one compatibility check.

An MF bundle has no LLM and is refused by every server and store load (`require_llm`), in
one line that names what to serve instead. An LLM bundle is served only by the model it was
trained with: `ModelIdentity` is what the two must share, `ModelIdentity.problems` says what
differs. The scorer's loader checks a bundle against the backbone it loaded
(`check_compatible`); a store load and a server's version tracker check a store version
against the served model with the same `problems`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from safetensors import safe_open

from sellarec.model.artifacts import (
    ADAPTER_WEIGHTS,
    TENSORS,
    ArtifactError,
    Manifest,
    check_tensors,
    verify_bundle,
)
from sellarec.model.backbone import BackboneInfo

#: The variants whose bundles hold an LLM, named when an MF bundle is refused
#: (training/config.py defines them; a test keeps the two lists equal).
LLM_VARIANTS = (
    "zeroshot",
    "tallrec",
    "collm",
    "sellarec",
    "sella-proj",
    "sella-warm",
    "sella-ui",
    "sellarec-mf",
)


def require_llm(manifest: Manifest, where: str | Path = "") -> None:
    """Refuse, in one line, a bundle with no LLM to serve (an MF bundle)."""
    if manifest.has_llm:
        return
    what = (
        "an MF bundle (matrix-factorisation tables only)"
        if manifest.variant == "mf"
        else f"a {manifest.variant!r} bundle without a backbone or prompt template"
    )
    raise ArtifactError(
        f"{str(where) + ': ' if where else ''}{what} has no LLM to serve; serve the bundle of an LLM "
        f"variant instead ({', '.join(LLM_VARIANTS)}), or score this one offline with "
        f"`sellarec-train evaluate`"
    )


def check_servable(path: str | Path) -> Manifest:
    """What a server or a store load checks before loading anything: every file against the
    manifest, the tensors against the prompt (read from the safetensors header alone), an LLM."""
    path = Path(path)
    manifest = verify_bundle(path)
    try:
        with safe_open(path / TENSORS, framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    except Exception as err:  # safetensors raises its own SafetensorError on a damaged header
        raise ArtifactError(f"{path}: cannot read {TENSORS} ({type(err).__name__}: {err})") from err
    check_tensors(path, manifest, shapes)
    require_llm(manifest, path)
    return manifest


@dataclass(frozen=True)
class ModelIdentity:
    """What an LLM bundle, and every store version made from one, shares with the model that
    serves it: the same backbone, dimensions, prompt, answer tokens and LoRA, or the scores
    mean nothing. Stored with each store version (as JSON)."""

    #: Backbone fingerprint (config, tokenizer and weight files).
    backbone: str
    #: d_L, the LLM hidden size.
    llm_dim: int
    #: d_C, the collaborative dimension (0: none).
    collab_dim: int
    #: The prompt template record, as canonical JSON.
    template: str
    #: (yes, no) answer token ids.
    answer_ids: tuple[int, int]
    #: sha256 of the LoRA weights ("" without an adapter).
    adapter: str
    #: The `sellarec-mf` extension: the MF dot product is part of every score.
    mf_residual: bool = False
    #: The backbone's name, for messages only (never compared).
    backbone_spec: str = ""

    @classmethod
    def of(cls, manifest: Manifest) -> ModelIdentity:
        """The identity a bundle was trained with (an MF bundle has none: refused)."""
        require_llm(manifest)
        assert manifest.backbone is not None and manifest.template is not None  # for the type checker
        ids = manifest.answer_token_ids or {}
        return cls(
            backbone=manifest.backbone.fingerprint,
            llm_dim=int(manifest.llm_dim or manifest.backbone.hidden_size),
            collab_dim=int(manifest.collab_dim or 0),
            template=json.dumps(manifest.template.model_dump(), sort_keys=True),
            answer_ids=(int(ids.get("yes", -1)), int(ids.get("no", -1))),
            adapter=manifest.checksums.get(ADAPTER_WEIGHTS, ""),
            mf_residual=manifest.mf_residual,
            backbone_spec=manifest.backbone.spec,
        )

    def measured(self, backbone: BackboneInfo, answer_ids: tuple[int, int]) -> ModelIdentity:
        """This identity with the facts of a backbone actually loaded (its fingerprint, d_L and
        the tokenizer's answer ids), to be compared with the one it was meant to be."""
        return replace(
            self,
            backbone=backbone.fingerprint,
            backbone_spec=backbone.spec,
            llm_dim=backbone.hidden_size,
            answer_ids=tuple(answer_ids),
        )

    def problems(self, artifact: ModelIdentity) -> list[str]:
        """Why an artifact (bundle, store version) made for `artifact` cannot be served by this
        model (empty: it can)."""
        out = []
        if artifact.backbone != self.backbone:
            out.append(
                f"backbone: artifact trained on {artifact.backbone_spec or '?'!r} (fingerprint "
                f"{artifact.backbone[:12]}), model is {self.backbone_spec or '?'!r} (fingerprint "
                f"{self.backbone[:12]})"
            )
        for label, name in (("d_L", "llm_dim"), ("d_C", "collab_dim"), ("Yes/No token ids", "answer_ids")):
            if getattr(artifact, name) != getattr(self, name):
                out.append(f"{label}: artifact {getattr(artifact, name)}, model {getattr(self, name)}")
        if artifact.template != self.template:
            out.append(f"prompt template: artifact {artifact.template}, model {self.template}")
        if artifact.adapter != self.adapter:
            theirs, ours = artifact.adapter[:12] or "none", self.adapter[:12] or "none"
            out.append(f"LoRA weights: artifact {theirs}, model {ours}")
        if artifact.mf_residual != self.mf_residual:
            out.append(f"MF residual: artifact {artifact.mf_residual}, model {self.mf_residual}")
        return out

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelIdentity:
        """Read back `to_dict` (fields this build does not know are ignored)."""
        known = {k: v for k, v in raw.items() if k in cls.__dataclass_fields__}
        return cls(**known | {"answer_ids": tuple(known["answer_ids"])})


def check_compatible(
    manifest: Manifest, backbone: BackboneInfo, answer_ids: tuple[int, int]
) -> ModelIdentity:
    """The identity of the loaded model, once it matches the bundle's (else ArtifactError saying
    what differs: backbone, d_L, Yes/No token ids)."""
    trained = ModelIdentity.of(manifest)
    model = trained.measured(backbone, answer_ids)
    if problems := model.problems(trained):
        raise ArtifactError("artifact does not match the model: " + "; ".join(problems))
    return model
