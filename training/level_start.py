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


@torch.no_grad()
def level_update(
    proj: CollabProjector,
    users: torch.Tensor,
    items: torch.Tensor,
    uids: torch.Tensor,
    iids: torch.Tensor,
    slots: list[int],
    gradients: torch.Tensor,
    exclusive: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """The rank-two update (weight, bias) of Proj C->L's last layer, the levels [n_users],
    [n_items] stacked as (user, item) and what it measured, for per-row slot gradients
    [n, 3, d_L] (see `level_start`)."""
    levels = mf_levels(users, items, uids, iids)
    directions = slot_directions(gradients[:, slots])
    last = proj.net[-1]
    update_w, update_b = torch.zeros_like(last.weight), torch.zeros_like(last.bias)
    fits = {}
    features = [hidden(proj, t) for t in (users, items)]
    for k, slot in enumerate(slots):
        if (
            exclusive
        ):  # one slot's level from its own table, nothing from the other's: the projection is shared
            zeros = [torch.zeros(len(users)), torch.zeros(len(items))]
            zeros[slot] = levels[slot]
            w, c, r2 = fit_level(torch.cat(features), torch.cat(zeros))
        else:
            w, c, r2 = fit_level(features[slot], levels[slot])
        update_w += torch.outer(directions[k], w)
        update_b += directions[k] * c
        fits[("user", "item")[slot]] = r2
    info = {
        "ridge_r2": fits,
        "direction_norms": [float(d.norm()) for d in directions],
        "level_std": {("user", "item")[s]: float(levels[s].std()) for s in slots},
    }
    return update_w, update_b, levels, info


def row_levels(levels: tuple[torch.Tensor, torch.Tensor], slots: list[int], uids, iids) -> torch.Tensor:
    """[n] the summed levels of rows (uids, iids) over the prompt's slots."""
    return sum(levels[slot][(uids, iids)[slot]] for slot in slots)


@torch.no_grad()
def level_start(
    proj: CollabProjector,
    users: torch.Tensor,
    items: torch.Tensor,
    uids: torch.Tensor,
    iids: torch.Tensor,
    slots: list[int],
    fit_rows: list[int],
    check_rows: list[int],
    logits: Callable[[list[int]], torch.Tensor],
    gradients: Callable[[list[int]], torch.Tensor],
    rounds: int = 3,
    max_scale: float = 1.0,
    exclusive: bool = True,
) -> dict:
    """Give Proj C->L the rank-two update of the module docstring, in place.

    `users`, `items`: the MF tables the soft tokens read; `uids`, `iids`: the stage-3 rows;
    `slots`: which of the soft-token columns (0 user, 1 item) the prompt carries;
    `gradients(rows)` [n, 3, d_L]: each row's gradient of its logit with respect to its soft
    tokens, measured on `fit_rows`; `logits(rows)` [n], measured on `check_rows`, with the
    projection as it is at the call. `max_scale`: the largest multiple of the first-order
    update the rescaling may reach (a trust region: the first-order model is local);
    `exclusive`: each level is fit to read zero from the other table (the projection is
    shared by both slots), else the directions alone keep the slots apart. Returns what it
    measured (for done.json).
    """
    update_w, update_b, levels, info = level_update(
        proj, users, items, uids, iids, slots, gradients(fit_rows), exclusive
    )
    last = proj.net[-1]
    weight, bias = last.weight.detach().clone(), last.bias.detach().clone()
    rows = torch.as_tensor(check_rows)
    wanted = row_levels(levels, slots, uids[rows], iids[rows])
    before = logits(check_rows)
    scale, history = 1.0, []
    for _ in range(rounds):
        last.weight.copy_(weight + scale * update_w)
        last.bias.copy_(bias + scale * update_b)
        change = logits(check_rows) - before
        slope = float(torch.cov(torch.stack([change, wanted]))[0, 1] / wanted.var())
        corr = float(torch.corrcoef(torch.stack([change, wanted]))[0, 1])
        history.append({"scale": scale, "slope": slope, "correlation": corr})
        if abs(slope - 1.0) <= SLOPE_TOLERANCE or slope <= 0.1 or scale >= max_scale:
            break
        scale = min(scale / slope, max_scale)
    kept = history[-1]["slope"] > 0.1
    if not kept:  # the logit does not follow the levels: leave the projection as it was
        last.weight.copy_(weight)
        last.bias.copy_(bias)
    return info | {"rounds": history, "kept": kept}


#: Multiples of the update `level_finish` tries (0: none, so it never raises the loss it is chosen on).
FINISH_SCALES = (0.0, 0.5, 1.0, 2.0, 4.0)


@torch.no_grad()
def level_finish(
    proj: CollabProjector,
    users: torch.Tensor,
    items: torch.Tensor,
    uids: torch.Tensor,
    iids: torch.Tensor,
    labels: torch.Tensor,
    slots: list[int],
    fit_rows: list[int],
    check_rows: list[int],
    logits: Callable[[list[int]], torch.Tensor],
    gradients: Callable[[list[int]], torch.Tensor],
    exclusive: bool = True,
    scales: tuple[float, ...] = FINISH_SCALES,
) -> dict:
    """The same rank-two update, given to the projection stage 3 trained (`stage3.level_finish`):
    measured at the trained point, and kept at the multiple in `scales` whose BCE on the labels
    of `check_rows` (stage-3 rows) is lowest. Returns what it measured (for done.json)."""
    update_w, update_b, _, info = level_update(
        proj, users, items, uids, iids, slots, gradients(fit_rows), exclusive
    )
    last = proj.net[-1]
    weight, bias = last.weight.detach().clone(), last.bias.detach().clone()
    target = labels[torch.as_tensor(check_rows)].float()
    losses = {}
    for scale in scales:
        last.weight.copy_(weight + scale * update_w)
        last.bias.copy_(bias + scale * update_b)
        losses[scale] = float(F.binary_cross_entropy_with_logits(logits(check_rows), target))
    best = min(losses, key=losses.get)
    last.weight.copy_(weight + best * update_w)
    last.bias.copy_(bias + best * update_b)
    return info | {"losses": {str(k): v for k, v in losses.items()}, "scale": best}
