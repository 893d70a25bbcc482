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


#: Fold-in defaults: ridge strength and the logit a liked item should get (see `fold_in`), the
#: best of a small grid on ML-1M validation users held apart from the reported ones
#: (scripts/eval/foldin.py, docs/results.md): strong shrinkage towards the prior.
FOLD_IN_REG = 100.0
FOLD_IN_TARGET = 0.5


def fold_in(
    history_item_vectors: torch.Tensor,
    prior: torch.Tensor,
    reg: float = FOLD_IN_REG,
    target: float = FOLD_IN_TARGET,
) -> torch.Tensor:
    """MF fold-in: a collaborative vector for a user the MF never saw, from the items they liked.

    With the item table frozen, the user row that MF training would fit to these positives
    is a ridge regression pulled towards the prior (the neutral vector, the mean trained user):

        u = argmin_u  sum_i (<u, v_i> - target)^2 + reg * ||u - prior||^2
          = (V^T V + reg I)^-1 (target V^T 1 + reg prior)

    `history_item_vectors` [n, d_C] (n >= 0), `prior` [d_C]; returns [d_C] float32. With no
    history it is the prior itself, and the more items, the less the prior weighs.
    """
    prior = torch.as_tensor(prior, dtype=torch.float64)
    v = torch.as_tensor(history_item_vectors, dtype=torch.float64).reshape(-1, prior.numel())
    if len(v) == 0:
        return prior.float()
    gram = v.T @ v + reg * torch.eye(prior.numel(), dtype=torch.float64)
    rhs = target * v.sum(0) + reg * prior
    return torch.linalg.solve(gram, rhs).float()
