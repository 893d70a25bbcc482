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


def at_norm(x: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """`x` rescaled row-wise to L2 norm `norm`; unchanged where `norm` is 0 (scale left free)."""
    if float(norm) <= 0:
        return x
    return x * (norm / x.norm(dim=-1, keepdim=True).clamp_min(1e-6))


class _Projector(nn.Module):
    """A soft-token projection whose output may be pinned to a fixed L2 norm.

    Design decision (the paper leaves the scale free): a soft token replaces a placeholder's
    input embedding, so it enters the frozen LLM where only vocabulary embeddings ever did.
    With `out_norm` > 0 every projected vector has exactly that norm, the median norm of the
    backbone's own token embeddings (`vocabulary_norm`), from the warm start on and through
    stage 3; only its direction is learned. `out_norm` = 0 is the paper-literal free scale
    (kept as an ablation). The norm is a buffer, so it travels in the bundle's state dict.
    """

    out_norm: torch.Tensor

    def __init__(self, out_norm: float = 0.0) -> None:
        super().__init__()
        self.register_buffer("out_norm", torch.tensor(float(out_norm)))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001, ANN002
        # Bundles and stage-2 projections written before the norm existed: free scale.
        state_dict.setdefault(prefix + "out_norm", torch.tensor(0.0))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return at_norm(self.net(x), self.out_norm)


class CollabProjector(_Projector):
    """Proj C->L: Linear(d_C, 1024), GELU, Linear(1024, d_L) (paper Eq. 6)."""

    def __init__(
        self, collab_dim: int, llm_dim: int, hidden: int = PROJ_HIDDEN, out_norm: float = 0.0
    ) -> None:
        super().__init__(out_norm)
        self.net = nn.Sequential(nn.Linear(collab_dim, hidden), nn.GELU(), nn.Linear(hidden, llm_dim))

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor]) -> CollabProjector:
        """The projector a state dict describes (dimensions and norm read from it)."""
        hidden, collab_dim = state["net.0.weight"].shape
        llm_dim = state["net.2.weight"].shape[0]
        proj = cls(int(collab_dim), int(llm_dim), hidden=int(hidden))
        proj.load_state_dict(dict(state))
        return proj


class SemanticProjector(_Projector):
    """Proj W->L: Linear(d_L, d_L) on the distilled item semantics, randomly initialised."""

    def __init__(self, llm_dim: int, out_norm: float = 0.0) -> None:
        super().__init__(out_norm)
        self.net = nn.Linear(llm_dim, llm_dim)

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor]) -> SemanticProjector:
        proj = cls(int(state["net.weight"].shape[0]))
        proj.load_state_dict(dict(state))
        return proj


def vocabulary_norm(embeddings: torch.Tensor) -> float:
    """Median L2 norm of a backbone's input token embeddings: the scale soft tokens are put at."""
    return float(embeddings.detach().float().norm(dim=-1).median())


def info_nce(projected: torch.Tensor, semantic: torch.Tensor, temperature: float) -> torch.Tensor:
    """Eq. 7-9: align Proj C->L(e_i^C) with e_i^L; other items of the batch are negatives.

    sim(a, b) = cos(a, b) / tau; loss = -mean_i log softmax_j sim(z_i, s_j) at j = i.
    """
    z = F.normalize(projected, dim=-1)
    s = F.normalize(semantic, dim=-1)
    logits = z @ s.T / temperature
    target = torch.arange(len(z), device=z.device)
    return F.cross_entropy(logits, target)
