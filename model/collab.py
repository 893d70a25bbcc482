"""Collaborative side: MF embeddings, the two projections and the alignment loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: Collaborative dimension d_C (paper default).
DEFAULT_COLLAB_DIM = 256
#: Hidden width of Proj C->L (paper Table 1).
PROJ_HIDDEN = 1024


class MatrixFactorization(nn.Module):
    """Dot-product MF: logit(u, i) = <e_u^C, e_i^C>, trained with BCE-with-logits."""

    def __init__(
        self, n_users: int, n_items: int, dim: int = DEFAULT_COLLAB_DIM, init_std: float = 0.1
    ) -> None:
        super().__init__()
        self.users = nn.Embedding(n_users, dim)
        self.items = nn.Embedding(n_items, dim)
        nn.init.normal_(self.users.weight, std=init_std)
        nn.init.normal_(self.items.weight, std=init_std)

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        return (self.users(users) * self.items(items)).sum(-1)

    def loss(self, users: torch.Tensor, items: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(self(users, items), labels.float())


class CollabProjector(nn.Module):
    """Proj C->L: Linear(d_C, 1024), GELU, Linear(1024, d_L) (paper Eq. 6)."""

    def __init__(self, collab_dim: int, llm_dim: int, hidden: int = PROJ_HIDDEN) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(collab_dim, hidden), nn.GELU(), nn.Linear(hidden, llm_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SemanticProjector(nn.Module):
    """Proj W->L: Linear(d_L, d_L) on the distilled item semantics, randomly initialised."""

    def __init__(self, llm_dim: int) -> None:
        super().__init__()
        self.net = nn.Linear(llm_dim, llm_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def info_nce(projected: torch.Tensor, semantic: torch.Tensor, temperature: float) -> torch.Tensor:
    """Eq. 7-9: align Proj C->L(e_i^C) with e_i^L; other items of the batch are negatives.

    sim(a, b) = cos(a, b) / tau; loss = -mean_i log softmax_j sim(z_i, s_j) at j = i.
    """
    z = F.normalize(projected, dim=-1)
    s = F.normalize(semantic, dim=-1)
    logits = z @ s.T / temperature
    target = torch.arange(len(z), device=z.device)
    return F.cross_entropy(logits, target)
