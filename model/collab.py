"""Collaborative side: MF embeddings, the two projections, the soft tokens they make, the alignment
loss and the fold-in of users the MF never saw."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from sellarec.model.prompts import ALL_SLOTS

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


def at_norm(x: torch.Tensor, norm: float) -> torch.Tensor:
    """`x` rescaled row-wise to L2 norm `norm`; unchanged where `norm` is 0 (scale left free)."""
    if norm <= 0:
        return x
    return x * (norm / x.norm(dim=-1, keepdim=True).clamp_min(1e-6))


class _Projector(nn.Module):
    """A soft-token projection whose output may be pinned to a fixed L2 norm.

    Design decision (the paper leaves the scale free): a soft token replaces a placeholder's
    input embedding, so it enters the frozen LLM where only vocabulary embeddings ever did.
    With `out_norm` > 0 every projected vector has exactly that norm, the median norm of the
    backbone's own token embeddings (`vocabulary_norm`), from the warm start on and through
    stage 3; only its direction is learned. `out_norm` = 0 is the paper-literal free scale
    (which one a run uses is a training setting: `Stage3Config.soft_token_scale`). The norm is
    a buffer, so it travels in the bundle's state dict; a Python copy is kept beside it so that
    scoring never reads a device tensor back.
    """

    out_norm: torch.Tensor

    def __init__(self, out_norm: float = 0.0) -> None:
        super().__init__()
        self.register_buffer("out_norm", torch.tensor(float(out_norm)))
        self._norm = float(out_norm)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001, ANN002
        # Bundles and stage-2 projections written before the norm existed: free scale.
        norm = state_dict.setdefault(prefix + "out_norm", torch.tensor(0.0))
        if norm.numel() != 1 or not bool(torch.isfinite(norm).all()) or float(norm) < 0:
            raise ValueError(f"{prefix}out_norm must be one finite number >= 0, not {norm.tolist()}")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._norm = float(norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return at_norm(self.net(x), self._norm)


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


def soft_vectors(
    proj_c: CollabProjector | None,
    proj_w: SemanticProjector | None,
    llm_dim: int,
    user_collab: torch.Tensor | None,
    item_collab: torch.Tensor | None,
    item_semantic: torch.Tensor | None,
    n: int,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """[n, 3, d_L] soft tokens in slot order (user, item, warm): Proj C->L of the user's and the
    item's MF vectors (Eq. 6) and Proj W->L of the item's semantics; zeros where an input or its
    projection is absent (a slot the prompt does not carry is never read).

    Out of place (stacked, not written into the zeros), so stage 3 trains through it.
    """
    zeros = torch.zeros(n, len(ALL_SLOTS), llm_dim, device=device)
    parts = [(user_collab, proj_c), (item_collab, proj_c), (item_semantic, proj_w)]
    columns = {
        k: proj(x.to(device, torch.float32))
        for k, (x, proj) in enumerate(parts)
        if x is not None and proj is not None
    }
    if not columns:
        return zeros
    return torch.stack([columns.get(k, zeros[:, k]) for k in range(len(ALL_SLOTS))], dim=1)


@dataclass
class Projections:
    """Proj C->L and Proj W->L of one trained model; a projection its prompt has no slot for is None.

    The scorer holds the pair it was loaded (or trained) with; a server that switches store
    versions holds one pair per version, each built from that version's weights
    (`model.bundle.load_projections`).
    """

    #: d_L, the width of the soft tokens.
    llm_dim: int
    #: Proj C->L (for <User_ID> and <Item_ID>), or None.
    proj_c: CollabProjector | None = None
    #: Proj W->L (for <Warm_ID>), or None.
    proj_w: SemanticProjector | None = None
    #: Where the projections run and the soft tokens are made.
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    #: The `sellarec-mf` extension: each score's logit gets the MF dot product added
    #: (`mf_logits`); False for every paper variant.
    mf_residual: bool = False

    @property
    def uses_collab(self) -> bool:
        """The MF vectors reach the prompt (through Proj C->L)."""
        return self.proj_c is not None

    @property
    def uses_semantic(self) -> bool:
        """The items' semantic vectors reach the prompt (through Proj W->L)."""
        return self.proj_w is not None

    def mf_logits(self, user_collab: torch.Tensor, item_collab: torch.Tensor) -> torch.Tensor | None:
        """[n] the logit offsets of n candidates: `<u, v_i>` of the user's MF vector [1 or n, d_C]
        and theirs [n, d_C] under an MF residual (float64), None without one."""
        if not self.mf_residual:
            return None
        return (user_collab.double() * item_collab.double()).sum(-1)

    def frozen(self, device: torch.device | str) -> Projections:
        """These projections on `device`, in eval mode, without gradients (for serving)."""
        for proj in (self.proj_c, self.proj_w):
            if proj is not None:
                proj.to(device).eval().requires_grad_(False)
        self.device = torch.device(device)
        return self

    def soft_vectors(
        self,
        user_collab: torch.Tensor | None,
        item_collab: torch.Tensor | None,
        item_semantic: torch.Tensor | None,
        n: int,
    ) -> torch.Tensor:
        """[n, 3, d_L] soft tokens (see `soft_vectors`)."""
        return soft_vectors(
            self.proj_c, self.proj_w, self.llm_dim, user_collab, item_collab, item_semantic, n, self.device
        )


@torch.no_grad()
def anchored_warm_start(
    fresh: CollabProjector, aligned: dict[str, torch.Tensor], inputs: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Stage 2's aligned Proj C->L, re-based so that stage 3 starts where a fresh one does.

    Design decision (stage3.warm_start = "anchored"; the paper loads the aligned projection as
    it is). The aligned projection maps the MF vectors to diverse directions (mean pairwise
    cosine about 0.05 on ML-1M), so at the first step of stage 3 the frozen LLM reads full-norm
    tokens that differ from row to row in ways it has not learned, and its loss starts above
    the base rate. A freshly initialised projection's output is dominated by its bias (pairwise
    cosine about 0.88): the tokens start close to one shared anchor and the loss starts near
    the base rate (CoLLM). The re-based projection keeps the aligned directions of the
    deviations and takes the fresh one's geometry:

        new(x) = mean_x fresh(x) + k * (aligned(x) - mean_x aligned(x)),
        k = median ||fresh(x) - mean fresh|| / median ||aligned(x) - mean aligned||,

    over `inputs` (the MF rows it will project). Only the last linear layer changes, so the
    result is an ordinary Proj C->L state dict.
    """
    proj = CollabProjector.from_state(aligned)
    new, old = fresh.net(inputs), proj.net(inputs)
    spread = lambda y: (y - y.mean(0)).norm(dim=-1).median().clamp_min(1e-12)  # noqa: E731
    return _rebased(aligned, proj, new, old, spread(new) / spread(old))


def _rebased(
    aligned: dict[str, torch.Tensor],
    proj: CollabProjector,
    fresh_out: torch.Tensor,
    proj_out: torch.Tensor,
    k: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """`aligned` with `proj`'s first-layer weights and its deviations scaled by `k` around
    the fresh projection's mean output: new(x) = mean fresh(x) + k (proj(x) - mean proj(x))."""
    state = {name: t.clone() for name, t in aligned.items()}
    state["net.0.weight"] = proj.net[0].weight.clone()
    last = proj.net[2]
    state["net.2.weight"] = k * last.weight
    state["net.2.bias"] = fresh_out.mean(0) - k * (proj_out.mean(0) - last.bias)
    return state


def _sensitivity(net: nn.Module, inputs: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Median over `inputs` of ||J(x) v||: how far the output moves for a unit step of the
    input in a random direction v (one seeded direction per row), by forward-mode autodiff."""
    g = torch.Generator().manual_seed(seed)
    v = F.normalize(torch.randn(inputs.shape, generator=g, dtype=inputs.dtype), dim=-1)
    _, moved = torch.func.jvp(net, (inputs,), (v,))
    return moved.norm(dim=-1).median().clamp_min(1e-12)


@torch.no_grad()
def balanced_warm_start(
    fresh: CollabProjector, aligned: dict[str, torch.Tensor], inputs: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The anchored warm start with a fresh projection's step sizes (stage3.warm_start = "balanced").

    Design decision, measured on ML-1M (docs/results.md). `anchored_warm_start` matches a fresh
    projection's output spread, but not how far one optimiser step moves the output: stage 2's
    weight decay leaves the first layer about 3x smaller than a fresh one and the rescaled last
    layer about 2.7x larger, so an Adam step of the first layer, or of the MF rows it reads,
    turns the tokens 2.6x as far as the same step through a fresh projection (CoLLM's). Adam's
    step does not shrink with the gradient, so that is a 2.6x larger effective learning rate on
    the tables. Here:

    1. the first layer's weights are scaled to the fresh first layer's norm and the last layer
       divided by the same factor; the first layer's bias stays, so each hidden unit keeps its
       GELU slope and, to first order in the rows' deviations (small: stage 2's pre-activations
       vary little), the deviations keep the aligned directions;
    2. the deviations are scaled so that the projection's sensitivity to its input (median
       ||J v|| over the rows, v a random unit direction) equals the fresh projection's;
    3. the mean output is the fresh projection's, as in the anchored start.

    Only weights change; the result is an ordinary Proj C->L state dict. Measured at seed 0 it
    did not keep the run from failing (a gradient spike late in stage 3, docs/results.md), so
    the ML-1M config keeps "anchored"; this stays an option.
    """
    proj = CollabProjector.from_state(aligned)
    c = fresh.net[0].weight.norm() / proj.net[0].weight.norm().clamp_min(1e-12)
    proj.net[0].weight.mul_(c)  # the bias stays: each unit keeps its GELU slope
    proj.net[2].weight.div_(c)
    k = _sensitivity(fresh.net, inputs) / _sensitivity(proj.net, inputs)
    return _rebased(aligned, proj, fresh.net(inputs), proj.net(inputs), k)


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


#: Positives-only fold-in defaults (the fallback when no negative is known): ridge strength and
#: the logit a liked item should get (see `fold_in`), the best of a small grid on ML-1M
#: validation users held apart from the reported ones (scripts/eval/foldin.py,
#: docs/results.md): strong shrinkage towards the prior, since liked items alone barely tell
#: a user from the mean user.
FOLD_IN_REG = 100.0
FOLD_IN_TARGET = 1.0


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
    history it is the prior itself, and the more items, the less the prior weighs. A model
    without MF vectors (d_C = 0: no collaborative slot in its prompt) has nothing to fold in.
    """
    prior = torch.as_tensor(prior, dtype=torch.float64)
    if prior.numel() == 0:
        return prior.float()
    v = torch.as_tensor(history_item_vectors, dtype=torch.float64).reshape(-1, prior.numel())
    if len(v) == 0:
        return prior.float()
    gram = v.T @ v + reg * torch.eye(prior.numel(), dtype=torch.float64)
    rhs = target * v.sum(0) + reg * prior
    return torch.linalg.solve(gram, rhs).float()


#: Labelled fold-in defaults: the L2 strength towards the prior and the Newton step budget (see
#: `fold_in_labelled`); the strength is the best of a small grid on ML-1M validation users held
#: apart from the reported ones (scripts/eval/foldin.py, docs/results.md).
FOLD_IN_LABELLED_REG = 3.0
FOLD_IN_STEPS = 20


def fold_in_labelled(
    item_vectors: torch.Tensor,
    labels: torch.Tensor,
    prior: torch.Tensor,
    reg: float = FOLD_IN_LABELLED_REG,
    steps: int = FOLD_IN_STEPS,
    tol: float = 1e-8,
) -> torch.Tensor:
    """MF fold-in from labelled interactions: the user row MF training would fit to them.

    MatrixFactorization scores logit(u, i) = <u, v_i> and is trained with BCE, so with the
    item table frozen the row of a new user with labels y_i in {0, 1} on items v_i is the
    L2-regularised logistic regression (no intercept: MF has none) pulled to the prior:

        u = argmin_u  sum_i [softplus(<u, v_i>) - y_i <u, v_i>] + reg / 2 * ||u - prior||^2

    solved from u = prior by damped Newton (IRLS) steps, each with a backtracking line search
    on that objective (strictly convex for reg > 0, so it converges to the one optimum):

        g = V^T (sigmoid(V u) - y) + reg (u - prior),   H = V^T diag(p (1 - p)) V + reg I

    `item_vectors` [n, d_C], `labels` [n] (0/1; repeated items count as often as they come),
    `prior` [d_C]; returns [d_C] float32, computed in float64 on the CPU, deterministic. With
    no interactions it is the prior itself. Stops after `steps` Newton steps or once the
    largest gradient entry is below `tol` (1 + the largest |x_i|) scaled. Without MF vectors
    (d_C = 0) it is the empty prior.
    """
    if reg <= 0:
        raise ValueError(f"reg must be positive, got {reg}")
    prior = torch.as_tensor(prior, dtype=torch.float64).cpu().reshape(-1)
    if prior.numel() == 0:
        return prior.float()
    v = torch.as_tensor(item_vectors, dtype=torch.float64).cpu().reshape(-1, prior.numel())
    y = torch.as_tensor(labels, dtype=torch.float64).cpu().reshape(-1)
    if len(v) != len(y):
        raise ValueError(f"{len(v)} item vectors but {len(y)} labels")
    if len(v) == 0:
        return prior.float()
    eye = torch.eye(prior.numel(), dtype=torch.float64)

    def objective(u: torch.Tensor) -> torch.Tensor:
        x = v @ u
        return (F.softplus(x) - y * x).sum() + 0.5 * reg * (u - prior).square().sum()

    u, value = prior.clone(), objective(prior)
    for _ in range(steps):
        p = torch.sigmoid(v @ u)
        grad = v.T @ (p - y) + reg * (u - prior)
        if grad.abs().max() <= tol * (1.0 + (v @ u).abs().max()):
            break
        hessian = (v.T * (p * (1 - p))) @ v + reg * eye
        step = torch.cholesky_solve(grad[:, None], torch.linalg.cholesky(hessian))[:, 0]
        decrease = float(grad @ step)  # > 0: H is positive definite
        t = 1.0
        for _ in range(30):  # Armijo backtracking; a full step is taken near the optimum
            candidate = u - t * step
            new = objective(candidate)
            if new <= value - 1e-4 * t * decrease:
                break
            t *= 0.5
        else:
            break  # no decrease left to find in float64: at the optimum
        u, value = candidate, new
    return u.float()
