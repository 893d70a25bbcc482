"""Diagnostics of the soft tokens, read from a run directory without running the LLM.

Alignment (cf. the paper's Fig. 7): cos(Proj C->L(e_i^C), e_i^L) per model.

Scale: how large the vectors spliced into the prompt are, against the backbone's own token
embeddings.

A soft token replaces a placeholder's input embedding in place (paper Eq. 10), so a vector
far off the scale of the vocabulary's embeddings is an input the frozen LLM has never
seen. These figures say whether that is the case, for each stage-3 bundle and for the
stage-2 projection a warm start begins from.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file

from sellarec.model.bundle import MF_ITEMS, MF_USERS, PROJ_C, PROJ_W, SEMANTIC_ITEMS, without_prefix
from sellarec.model.collab import CollabProjector, SemanticProjector, vocabulary_norm


@dataclass(frozen=True)
class TokenScale:
    """Median L2 norm of each soft token a model splices in (None: the slot is not used)."""

    #: Proj C->L(e_u^C) over every user of the table.
    user: float | None
    #: Proj C->L(e_i^C) over every item of the table.
    item: float | None
    #: Proj W->L(e_i^L) over every item of the table.
    warm: float | None


def _median_norm(x: torch.Tensor) -> float:
    return float(x.norm(dim=-1).median())


@torch.no_grad()
def token_scale(tensors: dict[str, torch.Tensor]) -> TokenScale:
    """Soft-token norms from a bundle's (or stage 2's) tensors: mf.*, proj_c.*, semantic.items, proj_w.*."""
    user = item = warm = None
    proj_c = without_prefix(tensors, PROJ_C)
    if proj_c and MF_ITEMS in tensors:
        proj = CollabProjector.from_state(proj_c)
        item = _median_norm(proj(tensors[MF_ITEMS]))
        if MF_USERS in tensors:
            user = _median_norm(proj(tensors[MF_USERS]))
    proj_w = without_prefix(tensors, PROJ_W)
    if proj_w and SEMANTIC_ITEMS in tensors:
        proj = SemanticProjector.from_state(proj_w)
        warm = _median_norm(proj(tensors[SEMANTIC_ITEMS]))
    return TokenScale(user, item, warm)


def random_projection(collab_dim: int, llm_dim: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A freshly initialised Proj C->L (CoLLM's starting point), seeded."""
    torch.manual_seed(seed)
    return CollabProjector(collab_dim, llm_dim).state_dict()


def vocabulary_scale(backbone_dir: str | Path) -> float | None:
    """Median L2 norm of the backbone's input token embeddings, read from its safetensors."""
    for shard in sorted(Path(backbone_dir).glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:  # reads one tensor, not the shard
            key = next((k for k in f.keys() if k.endswith("embed_tokens.weight")), None)  # noqa: SIM118
            if key is not None:
                return vocabulary_norm(f.get_tensor(key))
    return None


def latest_stage(runs: Path, pattern: str) -> Path | None:
    found = sorted((runs / "stages").glob(pattern), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def cosine_sets(runs: Path, results: dict[str, dict], trained: np.ndarray) -> dict[str, np.ndarray]:
    """cos(Proj C->L(e_i^C), e_i^L) over items with training rows (`trained` ids), per model."""
    distill = latest_stage(runs, "distill-*")
    if distill is None:
        return {}
    semantic = load_file(distill / "semantic.safetensors")[SEMANTIC_ITEMS]
    out: dict[str, np.ndarray] = {}

    def cos(
        items: torch.Tensor, proj_state: dict, trained: torch.Tensor, shuffle: bool = False
    ) -> np.ndarray:
        proj = CollabProjector.from_state(proj_state)
        target = semantic[trained]
        if shuffle:  # mismatched pairs: what a projection onto the common direction alone scores
            target = target[torch.randperm(len(target), generator=torch.Generator().manual_seed(0))]
        with torch.no_grad():
            return F.cosine_similarity(proj(items[trained]), target, dim=-1).numpy()

    def trained_mask(items: torch.Tensor) -> torch.Tensor:
        mask = torch.zeros(len(items), dtype=torch.bool)
        mask[torch.as_tensor(trained[trained < len(items)])] = True
        return mask

    for name, pattern in (("stage 2, with alignment", "stage2-align-*"),):
        path = latest_stage(runs, pattern)
        if path is not None:
            t = load_file(path / "collab.safetensors")
            state = without_prefix(t, PROJ_C)
            out[name] = cos(t[MF_ITEMS], state, trained_mask(t[MF_ITEMS]))
            out["stage 2, with alignment, mismatched item pairs"] = cos(
                t[MF_ITEMS], state, trained_mask(t[MF_ITEMS]), shuffle=True
            )
    mf = latest_stage(runs, "stage2-mf-*")
    if mf is not None:
        t = load_file(mf / "collab.safetensors")
        rand = random_projection(t[MF_ITEMS].shape[1], semantic.shape[1])
        out["stage 2, without alignment (random Proj C->L)"] = cos(
            t[MF_ITEMS], rand, trained_mask(t[MF_ITEMS])
        )
    for name, label in (
        ("sellarec", "after stage 3, SeLLa-Rec (aligned)"),
        ("collm", "after stage 3, CoLLM"),
    ):
        if name in results:
            t = load_file(Path(results[name]["bundle"]) / "tensors.safetensors")
            state = without_prefix(t, PROJ_C)
            out[label] = cos(t[MF_ITEMS], state, trained_mask(t[MF_ITEMS]))
    return out
