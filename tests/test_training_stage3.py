"""Stage 3's no-grad prefix is an optimisation only: same loss, same gradients as the plain path."""

from __future__ import annotations

import factories
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from sellarec.model.backbone import load_backbone
from sellarec.model.collab import CollabProjector, SemanticProjector
from sellarec.model.prompts import ALL_SLOTS, Slot, TemplateSpec
from sellarec.model.sella import SellaRec
from sellarec.training.batches import row_prompts, split_before_first_slot
from sellarec.training.stage3 import SoftInputTables, split_loss


def _setup(tiny_backbone_dir, slots=ALL_SLOTS):
    torch.manual_seed(0)
    model, tok, info = load_backbone(str(tiny_backbone_dir))
    spec = TemplateSpec(slots=slots)
    scorer = SellaRec(
        model,
        tok,
        spec,
        proj_c=CollabProjector(8, info.hidden_size),
        proj_w=SemanticProjector(info.hidden_size),
    )
    tables = SoftInputTables(torch.randn(5, 8), torch.randn(10, 8), torch.randn(10, info.hidden_size))
    t = factories.TITLES
    frame = pd.DataFrame(
        {
            "uid": [1, 1, 2, 3],
            "iid": [2, 3, 4, 5],
            "label": [1, 0, 1, 0],
            "his_title": [[t[0], t[1]], [t[0], t[1]], [], [t[6], t[7], t[8]]],
            "title": [t[2], t[3], t[4], t[5]],
        }
    )
    return scorer, tables, frame


def _grads(params):
    return [p.grad.clone() for p in params]


def test_prefix_without_grad_gives_the_plain_loss_and_gradients(tiny_backbone_dir):
    scorer, tables, frame = _setup(tiny_backbone_dir)
    params = [*tables.parameters(), *scorer.proj_c.parameters(), *scorer.proj_w.parameters()]
    uids, iids = torch.tensor(frame["uid"].to_numpy()), torch.tensor(frame["iid"].to_numpy())
    labels = torch.tensor(frame["label"].to_numpy(), dtype=torch.float32)
    prompts = row_prompts(scorer.spec, frame)

    plain = F.binary_cross_entropy_with_logits(
        scorer.score([scorer.encoder.prompt(p) for p in prompts], tables.vectors(scorer, uids, iids)), labels
    )
    plain.backward()
    expected = _grads(params)
    for p in params:
        p.grad = None

    pieces = [split_before_first_slot(scorer.encoder, p) for p in prompts]
    split = split_loss(scorer, tables, [h for h, _ in pieces], [t for _, t in pieces], uids, iids, labels)
    split.backward()
    assert torch.allclose(plain, split, atol=1e-5)
    for g_plain, g_split in zip(expected, _grads(params), strict=True):
        assert torch.allclose(g_plain, g_split, atol=1e-5, rtol=1e-4)


def test_an_mf_residual_adds_the_dot_product_to_the_logits_and_trains_the_tables_with_it(tiny_backbone_dir):
    scorer, tables, frame = _setup(tiny_backbone_dir)
    uids, iids = torch.tensor(frame["uid"].to_numpy()), torch.tensor(frame["iid"].to_numpy())
    labels = torch.tensor(frame["label"].to_numpy(), dtype=torch.float32)
    prompts = row_prompts(scorer.spec, frame)
    pieces = [split_before_first_slot(scorer.encoder, p) for p in prompts]
    heads, tails = [h for h, _ in pieces], [t for _, t in pieces]

    llm = scorer.score([scorer.encoder.prompt(p) for p in prompts], tables.vectors(scorer, uids, iids))
    dots = torch.stack([tables.users[u] @ tables.items[i] for u, i in zip(uids, iids, strict=True)])
    expected = F.binary_cross_entropy_with_logits(llm + dots, labels)
    expected.backward()
    want = _grads(tables.parameters())
    for p in tables.parameters():
        p.grad = None

    got = split_loss(scorer, tables, heads, tails, uids, iids, labels, mf_residual=True)
    got.backward()
    assert torch.allclose(got, expected, atol=1e-5)
    plain = split_loss(scorer, tables, heads, tails, uids, iids, labels).detach()
    assert not torch.allclose(got.detach(), plain, atol=1e-3)  # the residual is there
    for g_want, g_got in zip(want, _grads(tables.parameters()), strict=True):
        assert torch.allclose(g_want, g_got, atol=1e-5, rtol=1e-4)


def test_an_mf_residual_gives_neutral_rows_the_neutral_users_dot_product(tiny_backbone_dir):
    users, items = torch.randn(5, 8), torch.randn(10, 8)
    trained = torch.tensor([False, True, True, False, True])
    tables = SoftInputTables(users, items, None, trained.numpy())
    uids, iids, neutral = torch.tensor([1, 2, 4]), torch.tensor([2, 3, 4]), torch.tensor([True, False, True])
    got = tables.mf_logits(uids, iids, neutral)
    mixed = torch.where(neutral[:, None], users[trained].mean(0), users[uids])
    assert torch.allclose(got, (mixed * items[iids]).sum(-1), atol=1e-6)


def test_split_prompt_concatenates_to_the_whole_prompt(tiny_backbone_dir):
    scorer, _, frame = _setup(tiny_backbone_dir, slots=(Slot.WARM,))
    for prompt in row_prompts(scorer.spec, frame):
        head, tail = split_before_first_slot(scorer.encoder, prompt)
        assert not head.slots and (head + tail) == scorer.encoder.prompt(prompt)


def test_shared_instruction_head_gives_the_plain_scores(tiny_backbone_dir):
    from sellarec.model.shared_head import SharedHead
    from sellarec.training.batches import prefix_groups

    scorer, tables, frame = _setup(tiny_backbone_dir)
    uids, iids = torch.tensor(frame["uid"].to_numpy()), torch.tensor(frame["iid"].to_numpy())
    prompts = row_prompts(scorer.spec, frame)
    vectors = tables.vectors(scorer, uids, iids).detach()
    with torch.no_grad():
        plain = scorer.score([scorer.encoder.prompt(p) for p in prompts], vectors)
        groups, suffixes = prefix_groups(scorer.encoder, prompts, frame["uid"].tolist())
        head = SharedHead(scorer, [g.prefix for g in groups])
        assert head.length > 10
        firsts = [g.rows[0] for g in groups]
        state = head.run([g.prefix for g in groups], vectors[firsts])
        rows = [r for g in groups for r in g.rows]
        owner = torch.tensor([k for k, g in enumerate(groups) for _ in g.rows])
        shared = scorer.score_suffixes(state, owner, [suffixes[r] for r in rows], vectors[rows])
    assert torch.allclose(plain[rows], shared, atol=1e-4)
    assert len(groups) == 3  # rows 0 and 1 share user 1's prefix


def test_shared_head_in_split_loss_gives_the_same_loss(tiny_backbone_dir):
    from sellarec.model.shared_head import SharedHead

    scorer, tables, frame = _setup(tiny_backbone_dir)
    uids, iids = torch.tensor(frame["uid"].to_numpy()), torch.tensor(frame["iid"].to_numpy())
    labels = torch.tensor(frame["label"].to_numpy(), dtype=torch.float32)
    pieces = [split_before_first_slot(scorer.encoder, p) for p in row_prompts(scorer.spec, frame)]
    heads, tails = [h for h, _ in pieces], [t for _, t in pieces]
    with torch.no_grad():
        a = split_loss(scorer, tables, heads, tails, uids, iids, labels)
        b = split_loss(scorer, tables, heads, tails, uids, iids, labels, SharedHead(scorer, heads))
    assert torch.allclose(a, b, atol=1e-5)


def test_neutral_rows_enter_with_the_mean_trained_user_and_the_others_with_their_own(tiny_backbone_dir):
    scorer, _, _ = _setup(tiny_backbone_dir)
    users = torch.randn(5, 8)
    trained = torch.tensor([False, True, True, False, True])  # users 0 and 3 have no training row
    tables = SoftInputTables(users, torch.randn(10, 8), torch.randn(10, scorer.llm_dim), trained.numpy())
    uids, iids = torch.tensor([1, 2, 4, 1]), torch.tensor([2, 3, 4, 5])
    neutral = torch.tensor([True, False, True, False])

    got = tables.vectors(scorer, uids, iids, neutral)
    mixed = torch.where(neutral[:, None], users[trained].mean(0), users[uids])
    expected = scorer.soft_vectors(mixed, tables.items[iids], tables.semantic[iids], len(uids))
    assert torch.allclose(got, expected, atol=1e-6)
    plain = tables.vectors(scorer, uids, iids)
    assert torch.allclose(got[~neutral], plain[~neutral], atol=1e-6)
    assert not torch.allclose(got[neutral, 0], plain[neutral, 0], atol=1e-3)  # the user token moved
    assert torch.allclose(got[neutral, 1:], plain[neutral, 1:], atol=1e-6)  # the item tokens did not


def test_the_neutral_user_is_a_constant_of_the_step(tiny_backbone_dir):
    # Only the rows' own users learn from them: a gradient through the mean would move every
    # trained user row (and Adam would step them all) on every step.
    scorer, _, _ = _setup(tiny_backbone_dir)
    tables = SoftInputTables(
        torch.randn(5, 8), torch.randn(10, 8), None, torch.ones(5, dtype=torch.bool).numpy()
    )
    uids, iids = torch.tensor([1, 2]), torch.tensor([2, 3])
    tables.vectors(scorer, uids, iids, torch.tensor([True, False])).sum().backward()
    touched = tables.users.grad.abs().sum(1) > 0
    assert touched.tolist() == [False, False, True, False, False]


def test_neutral_rows_are_a_seeded_share_and_none_at_rate_zero():
    import pytest

    from sellarec.training.stage3 import neutral_rows

    assert neutral_rows(100, 0.0, 0) is None
    mask = neutral_rows(20_000, 0.3, 0)
    assert mask.dtype == torch.bool and abs(float(mask.float().mean()) - 0.3) < 0.02
    assert torch.equal(mask, neutral_rows(20_000, 0.3, 0))
    assert not torch.equal(mask, neutral_rows(20_000, 0.3, 1))
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="neutral_user_rate"):
            neutral_rows(10, bad, 0)


def test_teacher_targets_mix_the_label_with_the_frozen_mf_probability():
    import pytest

    from sellarec.training.stage3 import teacher_targets

    users, items = torch.randn(5, 8), torch.randn(10, 8)
    tables = SoftInputTables(users, items, None, torch.ones(5, dtype=torch.bool).numpy())
    uids, iids = torch.tensor([0, 1, 4]), torch.tensor([2, 9, 3])
    labels = torch.tensor([1.0, 0.0, 1.0])
    mf = torch.sigmoid((users[uids] * items[iids]).sum(-1))
    assert teacher_targets(tables, uids, iids, labels, 0.0) is labels
    torch.testing.assert_close(teacher_targets(tables, uids, iids, labels, 1.0), mf)
    got = teacher_targets(tables, uids, iids, labels, 0.25)
    torch.testing.assert_close(got, 0.75 * labels + 0.25 * mf)
    assert not got.requires_grad  # the teacher is frozen: no gradient reaches the tables through it
    neutral = torch.tensor([False, True, False])
    neutral_mf = torch.sigmoid((users.mean(0) * items[9]).sum())
    torch.testing.assert_close(teacher_targets(tables, uids, iids, labels, 1.0, neutral)[1], neutral_mf)
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="teacher_weight"):
            teacher_targets(tables, uids, iids, labels, bad)
    with pytest.raises(ValueError, match="MF user and item tables"):
        teacher_targets(SoftInputTables(None, items, None), uids, iids, labels, 0.5)


def test_calibrated_offset_puts_the_mean_prediction_at_the_rate():
    import pytest

    from sellarec.training.stage3 import calibrated_offset

    logits = torch.tensor([-3.0, -2.5, 0.5, -4.0, 1.0])
    for rate in (0.1, 0.55, 0.9):
        b = calibrated_offset(logits, rate)
        assert abs(float(torch.sigmoid(logits + b).mean()) - rate) < 1e-6
    for bad in (0.0, 1.0):
        with pytest.raises(ValueError, match="base rate"):
            calibrated_offset(logits, bad)


def test_a_logit_offset_starts_stage3_at_the_base_rate_and_is_trained(tiny_backbone_dir):
    import copy

    from sellarec.training.config import Stage3Config
    from sellarec.training.stage3 import calibrated_offset, split_logits, train_stage3

    scorer, tables, frame = _setup(tiny_backbone_dir)
    frame = pd.concat([frame] * 3, ignore_index=True)  # 12 rows: every one in the calibration sample
    frame.loc[[1, 3], "label"] = 1  # base rate 8/12, not 0.5
    enc = scorer.encoder
    pieces = [split_before_first_slot(enc, p) for p in row_prompts(scorer.spec, frame)]
    uids, iids = torch.tensor(frame["uid"].to_numpy()), torch.tensor(frame["iid"].to_numpy())
    with torch.no_grad():
        before = split_logits(
            copy.deepcopy(scorer),
            copy.deepcopy(tables),
            [h for h, _ in pieces],
            [t for _, t in pieces],
            uids,
            iids,
        )
    assert frame["label"].mean() == 8 / 12
    want = calibrated_offset(before, 8 / 12)
    cfg = Stage3Config(lr=1e-2, batch_size=4, logit_offset=True)
    m = train_stage3(scorer, tables, frame, cfg, seed=0, progress=False)
    assert abs(m["logit_offset"]["start"] - want) < 1e-3
    assert m["logit_offset"]["end"] != m["logit_offset"]["start"]  # trained with the rest
    assert "offset" in m["group_grad_norms"]
    plain = train_stage3(*_setup(tiny_backbone_dir)[:2], frame, Stage3Config(lr=1e-2, batch_size=4), 0, False)
    assert "logit_offset" not in plain


def _saved_adapter(tiny_backbone_dir, path):
    """A stage-1-like adapter whose B matrices are not zero, so that it changes the scores."""
    from sellarec.model.lora import LoraSettings, attach_lora

    torch.manual_seed(0)
    model, _, _ = load_backbone(str(tiny_backbone_dir))
    lora = attach_lora(model, LoraSettings())
    for name, param in lora.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)
    lora.save_pretrained(str(path), safe_serialization=True)
    return path


def _lora_scorer(tiny_backbone_dir, adapter, train_lora):
    from sellarec.training.stage3 import build_scorer

    scorer = build_scorer(str(tiny_backbone_dir), adapter, TemplateSpec(), 8, None, 0, train_lora=train_lora)
    torch.manual_seed(1)
    tables = SoftInputTables(torch.randn(5, 8), torch.randn(10, 8), torch.randn(10, scorer.llm_dim))
    return scorer, tables


def test_a_lora_rate_trains_the_stage1_adapter_in_stage3_and_nothing_else_of_the_llm(
    tiny_backbone_dir, tmp_path
):
    from sellarec.model.lora import load_lora
    from sellarec.model.shared_head import SharedHead
    from sellarec.training.config import Stage3Config
    from sellarec.training.stage3 import split_logits, train_stage3

    adapter = _saved_adapter(tiny_backbone_dir, tmp_path / "adapter")
    frame = _setup(tiny_backbone_dir)[2]
    scorer, tables = _lora_scorer(tiny_backbone_dir, adapter, train_lora=True)
    loaded = dict(load_lora(load_backbone(str(tiny_backbone_dir))[0], adapter).named_parameters())
    m = train_stage3(scorer, tables, frame, Stage3Config(lr=1e-2, batch_size=2, lora_lr=1e-2), 0, False)
    norms = m["group_grad_norms"]
    assert len(norms["lora"]) == len(norms["proj_c"]) and min(norms["lora"]) > 0
    lora_moved = 0
    for name, param in scorer.backbone.named_parameters():
        assert not param.requires_grad  # frozen again once stage 3 ends
        if "lora_" in name:
            lora_moved += not torch.equal(param, loaded[name])
        else:
            assert torch.equal(param, loaded[name]), name  # the backbone itself never moves
    assert lora_moved > 0
    # The unmerged, trained adapter runs the split path with the numbers of the plain one.
    uids, iids = torch.tensor(frame["uid"].to_numpy()), torch.tensor(frame["iid"].to_numpy())
    prompts = row_prompts(scorer.spec, frame)
    pieces = [split_before_first_slot(scorer.encoder, p) for p in prompts]
    with torch.no_grad():
        plain = scorer.score([scorer.encoder.prompt(p) for p in prompts], tables.vectors(scorer, uids, iids))
        head = SharedHead(scorer, [h for h, _ in pieces])
        split = split_logits(scorer, tables, [h for h, _ in pieces], [t for _, t in pieces], uids, iids, head)
    assert torch.allclose(plain, split, atol=1e-4)
    # Without the rate the adapter is merged and frozen, and a rate needs an unmerged one.
    merged, tables = _lora_scorer(tiny_backbone_dir, adapter, train_lora=False)
    frozen = train_stage3(merged, tables, frame, Stage3Config(lr=1e-2, batch_size=2), 0, False)
    assert "lora" not in frozen["group_grad_norms"]
    with pytest.raises(ValueError, match="lora_lr"):
        train_stage3(merged, tables, frame, Stage3Config(lr=1e-2, batch_size=2, lora_lr=1e-2), 0, False)


def test_a_shared_head_refreshed_after_the_adapter_moved_holds_the_new_keys_and_values(
    tiny_backbone_dir, tmp_path
):
    from sellarec.model.shared_head import SharedHead

    adapter = _saved_adapter(tiny_backbone_dir, tmp_path / "adapter")
    scorer, _ = _lora_scorer(tiny_backbone_dir, adapter, train_lora=True)
    pieces = [
        split_before_first_slot(scorer.encoder, p)
        for p in row_prompts(scorer.spec, _setup(tiny_backbone_dir)[2])
    ]
    head = SharedHead(scorer, [h for h, _ in pieces])
    before = [v.clone() for v in _state_tensors(head.state)]
    with torch.no_grad():
        for name, param in scorer.backbone.named_parameters():
            if "lora_B" in name:
                param.add_(1.0)
    stale = _state_tensors(head.state)
    assert all(torch.equal(a, b) for a, b in zip(before, stale, strict=True))
    head.refresh()
    fresh = _state_tensors(SharedHead(scorer, [h for h, _ in pieces]).state)
    assert all(torch.equal(a, b) for a, b in zip(_state_tensors(head.state), fresh, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(before, fresh, strict=True))


def _state_tensors(state):
    return [t for k, v in state.layers for t in (k, v)]
