"""`stage3.level_init`: Proj C->L starts stage 3 with the MF's user and item levels in the LLM's logit."""

from __future__ import annotations

import copy

import factories
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from test_training_stage3 import _setup

from sellarec.model.collab import CollabProjector
from sellarec.training.batches import row_prompts, split_before_first_slot
from sellarec.training.config import Stage3Config
from sellarec.training.level_start import (
    SLOPE_TOLERANCE,
    LevelRows,
    level_start,
    mf_levels,
    slot_directions,
)
from sellarec.training.stage3 import split_logits, train_stage3


def test_the_levels_of_an_additive_mf_are_its_user_and_item_terms():
    # <u, v> = a_u + b_v exactly when u = [a_u, 1] and v = [1, b_v].
    a, b = torch.randn(6), torch.randn(9)
    users, items = torch.stack([a, torch.ones(6)], 1), torch.stack([torch.ones(9), b], 1)
    uids, iids = torch.tensor([0, 1, 1, 3, 5, 2]), torch.tensor([8, 0, 4, 4, 2, 7])
    user_level, item_level = mf_levels(users, items, uids, iids)
    assert torch.allclose(user_level, a - a[uids].mean(), atol=1e-6)
    assert torch.allclose(item_level, b - b[iids].mean(), atol=1e-6)
    logits = (users[uids] * items[iids]).sum(-1)
    assert torch.allclose(user_level[uids] + item_level[iids], logits - logits.mean(), atol=1e-5)


def test_slot_directions_move_each_rows_logit_through_its_own_slot_and_not_the_other():
    torch.manual_seed(0)
    common = torch.randn(2, 32)  # each slot's gradient: a shared part plus a row's own
    gradients = common[None] + 0.1 * torch.randn(40, 2, 32)
    directions = slot_directions(gradients, share=1e-6)
    response = torch.einsum("rkd,jd->rkj", gradients, directions)  # [row, slot, direction]
    assert torch.allclose(response[:, 0, 0], torch.ones(40), atol=0.05)
    assert torch.allclose(response[:, 1, 1], torch.ones(40), atol=0.05)
    assert response[:, 0, 1].abs().max() < 0.05 and response[:, 1, 0].abs().max() < 0.05


def _rows(n: int = 48, users: int = 12, items: int = 10) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    t = factories.TITLES
    return pd.DataFrame(
        {
            "uid": rng.integers(0, users, n),
            "iid": rng.integers(0, items, n),
            "label": rng.integers(0, 2, n),
            "his_title": [[t[0], t[1]]] * n,
            "title": [t[k % 8] for k in range(n)],
        }
    )


def _small_mf_setup(tiny_backbone_dir):
    """The stage-3 setup with small MF tables, so that the tiny backbone answers them linearly."""
    scorer, tables, _ = _setup(tiny_backbone_dir)
    torch.manual_seed(1)
    tables.users.data = 0.01 * torch.randn(12, 8)
    tables.items.data = 0.01 * torch.randn(10, 8)
    return scorer, tables


def _logits(scorer, tables, frame) -> torch.Tensor:
    pieces = [split_before_first_slot(scorer.encoder, p) for p in row_prompts(scorer.spec, frame)]
    uids, iids = (
        torch.as_tensor(frame["uid"].to_numpy(copy=True)),
        torch.as_tensor(frame["iid"].to_numpy(copy=True)),
    )
    with torch.no_grad():
        return split_logits(scorer, tables, [h for h, _ in pieces], [t for _, t in pieces], uids, iids)


def test_a_level_start_puts_the_mf_levels_in_the_llm_logit_and_nothing_else_moves(tiny_backbone_dir):
    frame = _rows()
    scorer, tables = _small_mf_setup(tiny_backbone_dir)
    before = _logits(scorer, tables, frame)
    start = copy.deepcopy(scorer.proj_c.state_dict())
    frozen = Stage3Config(lr=0.0, table_lr=0.0, batch_size=8, level_init=True, level_max_scale=4.0)
    m = train_stage3(scorer, tables, frame, frozen, seed=0, progress=False)
    assert m["level_start"]["kept"]
    assert abs(m["level_start"]["rounds"][-1]["slope"] - 1) <= SLOPE_TOLERANCE
    change = _logits(scorer, tables, frame) - before
    uids, iids = (
        torch.as_tensor(frame["uid"].to_numpy(copy=True)),
        torch.as_tensor(frame["iid"].to_numpy(copy=True)),
    )
    user_level, item_level = mf_levels(tables.users.detach(), tables.items.detach(), uids, iids)
    wanted = user_level[uids] + item_level[iids]
    assert float(torch.corrcoef(torch.stack([change, wanted]))[0, 1]) > 0.6  # every row, not the sample
    slope = float(torch.cov(torch.stack([change, wanted]))[0, 1] / wanted.var())
    assert 0.6 < slope < 1.4
    moved = {k for k, v in scorer.proj_c.state_dict().items() if not torch.equal(v, start[k])}
    assert moved == {"net.2.weight", "net.2.bias"}  # the last layer only: a rank-two update

    plain, plain_tables = _small_mf_setup(tiny_backbone_dir)
    m = train_stage3(plain, plain_tables, frame, Stage3Config(lr=0.0, table_lr=0.0, batch_size=8), 0, False)
    assert "level_start" not in m
    assert torch.allclose(_logits(plain, plain_tables, frame), before)


def test_a_level_start_the_logit_does_not_follow_leaves_the_projection_as_it_was():
    torch.manual_seed(0)
    proj = CollabProjector(8, 16, hidden=32)
    start = copy.deepcopy(proj.state_dict())
    users, items = torch.randn(12, 8), torch.randn(10, 8)
    uids, iids = torch.randint(0, 12, (30,)), torch.randint(0, 10, (30,))
    rows = LevelRows(
        users,
        items,
        uids,
        iids,
        [0, 1],
        list(range(20)),
        list(range(20, 30)),
        logits=lambda rows: torch.zeros(len(rows)),  # an LLM the soft tokens do not reach
        gradients=lambda rows: torch.randn(len(rows), 3, 16),
    )
    m = level_start(proj, rows)
    assert not m["kept"]
    for k, v in proj.state_dict().items():
        assert torch.equal(v, start[k])


def _linear_llm(proj, users, items, uids, iids, a, b):
    """An 'LLM' whose logit is linear in the two soft tokens: <a, user token> + <b, item token>."""

    def logits(rows):
        r = torch.as_tensor(rows)
        return proj(users[uids[r]]) @ a + proj(items[iids[r]]) @ b

    def gradients(rows):
        g = torch.zeros(len(rows), 3, len(a))
        g[:, 0], g[:, 1] = a, b
        return g

    return logits, gradients


def test_through_a_linear_llm_the_first_order_start_adds_exactly_the_fitted_levels():
    torch.manual_seed(0)
    proj = CollabProjector(4, 16, hidden=64)
    users, items = torch.randn(30, 4), torch.randn(40, 4)
    uids, iids = torch.randint(0, 30, (300,)), torch.randint(0, 40, (300,))
    logits, gradients = _linear_llm(proj, users, items, uids, iids, torch.randn(16), torch.randn(16))
    rows = list(range(300))
    proj.requires_grad_(False)
    before = logits(rows)
    sample = LevelRows(users, items, uids, iids, [0, 1], rows[:100], rows[100:], logits, gradients)
    m = level_start(proj, sample, exclusive=False)
    assert m["rounds"][0]["scale"] == 1.0 and abs(m["rounds"][0]["slope"] - 1) < 0.05
    user_level, item_level = mf_levels(users, items, uids, iids)
    wanted = user_level[uids] + item_level[iids]
    assert float(torch.corrcoef(torch.stack([logits(rows) - before, wanted]))[0, 1]) > 0.98


def test_a_level_finish_keeps_the_multiple_whose_bce_on_the_rows_is_lowest():
    from sellarec.training.level_start import level_finish

    torch.manual_seed(0)
    proj = CollabProjector(4, 16, hidden=64)
    users, items = torch.randn(30, 4), torch.randn(40, 4)
    n = 4000
    uids, iids = torch.randint(0, 30, (n,)), torch.randint(0, 40, (n,))
    logits, gradients = _linear_llm(proj, users, items, uids, iids, torch.randn(16), torch.randn(16))
    rows = list(range(n))
    user_level, item_level = mf_levels(users, items, uids, iids)
    with torch.no_grad():  # labels drawn as if the logit carried twice the levels
        truth = logits(rows) + 2 * (user_level[uids] + item_level[iids])
    labels = torch.bernoulli(torch.sigmoid(truth), generator=torch.Generator().manual_seed(1))
    sample = LevelRows(users, items, uids, iids, [0, 1], rows[:200], rows[200:], logits, gradients)
    m = level_finish(proj, sample, labels, exclusive=False)
    assert m["scale"] == 2.0
    assert m["losses"]["2.0"] == min(m["losses"].values()) < m["losses"]["0.0"]
    with torch.no_grad():
        shipped = F.binary_cross_entropy_with_logits(logits(rows[200:]), labels[200:])
    assert abs(float(shipped) - m["losses"]["2.0"]) < 1e-5  # the projection keeps the chosen multiple


def test_a_level_finish_in_stage3_is_recorded_and_never_raises_the_loss_it_was_chosen_on(tiny_backbone_dir):
    scorer, tables = _small_mf_setup(tiny_backbone_dir)
    m = train_stage3(
        scorer, tables, _rows(), Stage3Config(lr=1e-3, batch_size=8, level_finish=True), 0, False
    )
    losses = m["level_finish"]["losses"]
    assert set(losses) == {"0.0", "0.5", "1.0", "2.0", "4.0"}
    assert losses[str(m["level_finish"]["scale"])] == min(losses.values()) <= losses["0.0"]
