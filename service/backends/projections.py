"""The soft-token projections of one store version (adapter over `model.collab`).

`SellaRec.soft_vectors` uses the projections loaded with the scorer; a server that
switches store versions without a restart needs the projections of each version, so it
builds them here from the version's weights and computes the vectors the same way.
"""

from __future__ import annotations

import torch

from sellarec.model.collab import CollabProjector, SemanticProjector
from sellarec.model.prompts import ALL_SLOTS


def _strip(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    cut = len(prefix) + 1
    return {k[cut:]: v for k, v in state.items() if k.startswith(prefix + ".")}


class Projections:
    """Proj C->L and Proj W->L of one version, on the model's device, frozen."""

    def __init__(self, state: dict[str, torch.Tensor], llm_dim: int, device: torch.device | str) -> None:
        self.llm_dim = llm_dim
        self.device = torch.device(device)
        self.proj_c: CollabProjector | None = None
        self.proj_w: SemanticProjector | None = None
        proj_c, proj_w = _strip(state, "proj_c"), _strip(state, "proj_w")
        if proj_c:
            self.proj_c = CollabProjector.from_state(proj_c)
            self.proj_c.to(self.device).eval().requires_grad_(False)
        if proj_w:
            self.proj_w = SemanticProjector.from_state(proj_w)
            self.proj_w.to(self.device).eval().requires_grad_(False)

    @torch.inference_mode()
    def soft_vectors(
        self,
        user_collab: torch.Tensor | None,
        item_collab: torch.Tensor | None,
        item_semantic: torch.Tensor | None,
        n: int,
    ) -> torch.Tensor:
        """[n, 3, d_L] projected (user, item, warm) vectors; zeros where an input or projection is absent."""
        out = torch.zeros(n, len(ALL_SLOTS), self.llm_dim, device=self.device)
        for k, (x, proj) in enumerate(
            [(user_collab, self.proj_c), (item_collab, self.proj_c), (item_semantic, self.proj_w)]
        ):
            if x is not None and proj is not None:
                out[:, k] = proj(x.to(self.device, torch.float32))
        return out
