"""A first-order update of Proj C->L that puts the MF's user and item levels in the LLM's
logit, at the start of stage 3 (`stage3.level_init`) or at its end (`stage3.level_finish`);
a choice, the paper does not have it.

Why. On ML-1M the LLM rows order each user's own candidates better than MF but lose to it
between users (docs/results.md, "Where the gap to MF lies"): which users like more of what
they are shown, and which items more users like. MF's logit <u, v> holds that in its dot
product; the LLM must learn it through `<User_ID>` and `<Item_ID>` from a few thousand rows.

What. Write the MF logit around the stage-3 rows' mean user u0 and item v0:

    <u, v> = <u, v0> + <u0, v> + <u - u0, v - v0> - <u0, v0>

The first two terms, the user level L(u) = <u, v0> and the item level L(v) = <u0, v>, are
linear in one vector each, so a soft token can carry them. With g_ru and g_ri each sampled
row's gradient of the LLM's logit with respect to its user and item soft token, ridge
solutions d_u, d_i of <g_ru, d_u> = <g_ri, d_i> = 1 and <g_ru, d_i> = <g_ri, d_u> = 0 over
the rows move a row's logit, to first order, by about one unit through one slot and little
through the other. Proj C->L's last layer gets the rank-two update

    W += d_u w_u^T + d_i w_i^T,    b += d_u c_u + d_i c_i

where w.h + c is a ridge fit of L on the projection's hidden layer h (over the MF users,
and over the items; `exclusive`: also to read zero from the other table). The projection
keeps its architecture and everything it had; its output moves along d_u by the user's level
and along d_i by the item's. `level_start` then rescales the update (within `max_scale`)
toward a measured slope of 1 of the logits' change on other rows against L(u) + L(v) (the
first-order step is not exact through a 30-layer model); `level_finish` gives the same
update to the projection stage 3 trained, at the multiple whose BCE on stage-3 rows is lowest
(`stage3.level_finish`).

Measured on ML-1M and the demo, neither is kept (docs/results.md, "The MF's levels put in the
LLM's logit at the start of stage 3").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import Ridge

from sellarec.model.collab import CollabProjector

#: Rows whose per-row gradients fit the directions, and rows the slope is measured on.
FIT_ROWS, CHECK_ROWS = 128, 64
#: Rows whose BCE chooses `level_finish`'s multiple.
FINISH_CHECK_ROWS = 256
#: Ridge penalties, as a share of the mean square of the features or gradients.
RIDGE_SHARE, DIRECTION_SHARE = 1e-3, 1e-3
#: Measured slope accepted as 1 (the update is rescaled while it is further off).
SLOPE_TOLERANCE = 0.1


def mf_levels(
    users: torch.Tensor, items: torch.Tensor, uids: torch.Tensor, iids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The MF's user levels [n_users] and item levels [n_items] around rows (uids, iids):
    <u, v0> and <u0, v> with u0, v0 the rows' mean user and item vectors, each centred on
    its mean over the rows."""
    u0, v0 = users[uids].mean(0), items[iids].mean(0)
    user_level, item_level = users @ v0, items @ u0
    return user_level - user_level[uids].mean(), item_level - item_level[iids].mean()


def slot_directions(gradients: torch.Tensor, share: float = DIRECTION_SHARE) -> torch.Tensor:
    """[k, d_L] directions for the per-row slot gradients [n, k, d_L]: direction j is the ridge
    solution of <g_rj, d> = 1 and <g_rl, d> = 0 (l != j) over the rows r, so that it moves each
    row's logit by about one through slot j and little through the others."""
    n, k, dim = gradients.shape
    a = gradients.transpose(0, 1).reshape(n * k, dim).double()
    penalty = share * float((a**2).sum(1).mean()) * torch.eye(dim, dtype=a.dtype)
    targets = torch.kron(torch.eye(k, dtype=a.dtype), torch.ones(n, 1, dtype=a.dtype))  # [n k, k]
    return torch.linalg.solve(a.T @ a + penalty, a.T @ targets).T.float()


def hidden(proj: CollabProjector, x: torch.Tensor) -> torch.Tensor:
    """Proj C->L's hidden layer (its input to the last linear layer) for rows `x`."""
    return proj.net[1](proj.net[0](x))


def fit_level(features: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, float, float]:
    """Ridge fit target ~ features . w + c; returns (w, c, R^2)."""
    x, y = features.double().numpy(), target.double().numpy()
    model = Ridge(alpha=RIDGE_SHARE * float(np.mean(x**2)) * x.shape[0]).fit(x, y)
    return torch.from_numpy(model.coef_).float(), float(model.intercept_), float(model.score(x, y))


@dataclass
class LevelRows:
    """What the update is measured on: the MF tables the soft tokens read, the stage-3 rows,
    the prompt's slots and two disjoint samples of the rows with the LLM's answers on them."""

    #: The MF user and item tables [n_users, d_C], [n_items, d_C].
    users: torch.Tensor
    items: torch.Tensor
    #: The stage-3 rows' user and item ids [n].
    uids: torch.Tensor
    iids: torch.Tensor
    #: Which soft-token columns (0 user, 1 item) the prompt carries.
    slots: list[int]
    #: Rows whose per-row gradients fit the directions.
    fit_rows: list[int]
    #: Rows the result is measured on (slope or BCE).
    check_rows: list[int]
    #: [n] the LLM's logits of the given rows, with the projection as it is at the call.
    logits: Callable[[list[int]], torch.Tensor]
    #: [n, 3, d_L] each given row's gradient of its logit with respect to its soft tokens.
    gradients: Callable[[list[int]], torch.Tensor]

    def levels(self) -> tuple[torch.Tensor, torch.Tensor]:
        return mf_levels(self.users, self.items, self.uids, self.iids)


class LevelUpdate:
    """The rank-two update of Proj C->L's last layer (module docstring), applied at any multiple
    of itself on top of the weights the projection had when it was measured."""

    @torch.no_grad()
    def __init__(self, proj: CollabProjector, rows: LevelRows, exclusive: bool = True) -> None:
        self.levels = rows.levels()
        directions = slot_directions(rows.gradients(rows.fit_rows)[:, rows.slots])
        self.last = proj.net[-1]
        self.weight, self.bias = self.last.weight.detach().clone(), self.last.bias.detach().clone()
        self.update_w, self.update_b = torch.zeros_like(self.weight), torch.zeros_like(self.bias)
        fits = {}
        features = [hidden(proj, t) for t in (rows.users, rows.items)]
        for k, slot in enumerate(rows.slots):
            if exclusive:  # one slot's level from its own table and zero from the other's (shared projection)
                targets = [torch.zeros(len(rows.users)), torch.zeros(len(rows.items))]
                targets[slot] = self.levels[slot]
                w, c, r2 = fit_level(torch.cat(features), torch.cat(targets))
            else:
                w, c, r2 = fit_level(features[slot], self.levels[slot])
            self.update_w += torch.outer(directions[k], w)
            self.update_b += directions[k] * c
            fits[("user", "item")[slot]] = r2
        self.info = {
            "ridge_r2": fits,
            "direction_norms": [float(d.norm()) for d in directions],
            "level_std": {("user", "item")[s]: float(self.levels[s].std()) for s in rows.slots},
        }

    @torch.no_grad()
    def apply(self, scale: float) -> None:
        """The projection's last layer at its measured weights plus `scale` times the update."""
        self.last.weight.copy_(self.weight + scale * self.update_w)
        self.last.bias.copy_(self.bias + scale * self.update_b)


@torch.no_grad()
def level_start(
    proj: CollabProjector, rows: LevelRows, rounds: int = 3, max_scale: float = 1.0, exclusive: bool = True
) -> dict:
    """Give Proj C->L the update of the module docstring, in place, rescaled toward a slope of 1
    of the change of the check rows' logits against their levels.

    `max_scale`: the largest multiple of the first-order update the rescaling may reach (a
    trust region: the first-order model is local); `exclusive`: each level is fit to read zero
    from the other table (the projection is shared by both slots), else the directions alone
    keep the slots apart. Returns what it measured (for done.json).
    """
    update = LevelUpdate(proj, rows, exclusive)
    check = torch.as_tensor(rows.check_rows)
    ids = (rows.uids[check], rows.iids[check])
    wanted = sum(update.levels[slot][ids[slot]] for slot in rows.slots)
    before = rows.logits(rows.check_rows)
    scale, history = 1.0, []
    for _ in range(rounds):
        update.apply(scale)
        change = rows.logits(rows.check_rows) - before
        slope = float(torch.cov(torch.stack([change, wanted]))[0, 1] / wanted.var())
        corr = float(torch.corrcoef(torch.stack([change, wanted]))[0, 1])
        history.append({"scale": scale, "slope": slope, "correlation": corr})
        if abs(slope - 1.0) <= SLOPE_TOLERANCE or slope <= 0.1 or scale >= max_scale:
            break
        scale = min(scale / slope, max_scale)
    kept = history[-1]["slope"] > 0.1
    if not kept:  # the logit does not follow the levels: leave the projection as it was
        update.apply(0.0)
    return update.info | {"rounds": history, "kept": kept}


#: Multiples of the update `level_finish` tries (0: none, so it never raises the loss it is chosen on).
FINISH_SCALES = (0.0, 0.5, 1.0, 2.0, 4.0)


@torch.no_grad()
def level_finish(
    proj: CollabProjector,
    rows: LevelRows,
    labels: torch.Tensor,
    exclusive: bool = True,
    scales: tuple[float, ...] = FINISH_SCALES,
) -> dict:
    """The same update, given to the projection stage 3 trained (`stage3.level_finish`):
    measured at the trained point, and kept at the multiple in `scales` whose BCE on the
    `labels` [n] of the check rows (stage-3 rows) is lowest. Returns what it measured."""
    update = LevelUpdate(proj, rows, exclusive)
    target = labels[torch.as_tensor(rows.check_rows)].float()
    losses = {}
    for scale in scales:
        update.apply(scale)
        losses[scale] = float(F.binary_cross_entropy_with_logits(rows.logits(rows.check_rows), target))
    best = min(losses, key=losses.get)
    update.apply(best)
    return update.info | {"losses": {str(k): v for k, v in losses.items()}, "scale": best}
