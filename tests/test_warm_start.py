"""The anchored warm start (stage3.warm_start = "anchored"): stage 2's aligned Proj C->L,
re-based on a fresh projection's mean and spread, keeping the aligned directions; and the
balanced one ("balanced"), re-based on a fresh projection's mean and step sizes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sellarec.model.collab import CollabProjector, anchored_warm_start, balanced_warm_start


def _aligned_and_fresh(out_norm: float = 0.0):
    torch.manual_seed(1)
    aligned = CollabProjector(8, 16, hidden=32)
    with torch.no_grad():  # like stage 2's: small, diverse outputs
        aligned.net[0].weight.mul_(0.3)  # stage 2's weight decay: a small first layer
        aligned.net[2].weight.mul_(0.05)
        aligned.net[2].bias.mul_(0.05)
    torch.manual_seed(2)
    fresh = CollabProjector(8, 16, hidden=32, out_norm=out_norm)
    return aligned, fresh, torch.randn(200, 8) * 0.1


def _spread(y: torch.Tensor) -> torch.Tensor:
    return (y - y.mean(0)).norm(dim=-1).median()


def test_anchored_start_takes_the_fresh_mean_and_spread():
    aligned, fresh, x = _aligned_and_fresh()
    anchored = CollabProjector.from_state(anchored_warm_start(fresh, aligned.state_dict(), x))
    with torch.no_grad():
        new, ref = anchored(x), fresh(x)
    assert torch.allclose(new.mean(0), ref.mean(0), atol=1e-5)
    assert torch.isclose(_spread(new), _spread(ref), rtol=1e-4)
    # The plain aligned projection has neither: its outputs are far smaller.
    with torch.no_grad():
        assert _spread(aligned(x)) < 0.5 * _spread(ref)


def test_anchored_start_keeps_the_aligned_directions():
    aligned, fresh, x = _aligned_and_fresh()
    anchored = CollabProjector.from_state(anchored_warm_start(fresh, aligned.state_dict(), x))
    with torch.no_grad():
        a, n, f = aligned(x), anchored(x), fresh(x)
    same = F.cosine_similarity(a - a.mean(0), n - n.mean(0))
    assert torch.allclose(same, torch.ones_like(same), atol=1e-4)
    # ... which a fresh projection's deviations are not.
    other = F.cosine_similarity(a - a.mean(0), f - f.mean(0))
    assert other.abs().mean() < 0.9


def test_only_the_last_layer_changes_and_the_input_is_untouched():
    aligned, fresh, x = _aligned_and_fresh(out_norm=3.0)
    before = {k: v.clone() for k, v in aligned.state_dict().items()}
    x0 = x.clone()
    state = anchored_warm_start(fresh, aligned.state_dict(), x)
    assert torch.equal(x, x0)
    for k, v in before.items():
        assert torch.equal(aligned.state_dict()[k], v)  # the aligned weights are not modified
        if not k.startswith("net.2."):
            assert torch.equal(state[k], v)
    assert not torch.equal(state["net.2.weight"], before["net.2.weight"])


def test_build_scorer_rejects_an_unknown_warm_start(tiny_backbone_dir):
    from sellarec.model.prompts import Slot, TemplateSpec
    from sellarec.training.stage3 import build_scorer

    spec = TemplateSpec(stage="stage3", slots=(Slot.USER, Slot.ITEM), history_length=2)
    with pytest.raises(ValueError, match="warm_start"):
        build_scorer(str(tiny_backbone_dir), None, spec, 8, None, 0, warm_start="hot")
    with pytest.raises(ValueError, match="MF rows"):
        aligned = CollabProjector(8, 64, hidden=16)
        build_scorer(str(tiny_backbone_dir), None, spec, 8, aligned.state_dict(), 0, warm_start="anchored")


def _step_turn(proj: CollabProjector, x: torch.Tensor, layer: int | None, seed: int = 5) -> float:
    """Median angle (radians) the pinned tokens turn for one Adam-sized step (+-1e-3 on every
    element) of the input rows (layer None) or of one linear layer's weights."""
    g = torch.Generator().manual_seed(seed)
    moved = CollabProjector.from_state(proj.state_dict())
    with torch.no_grad():
        before = moved(x)
        if layer is None:
            x = x + 1e-3 * torch.sign(torch.randn(x.shape, generator=g))
        else:
            w = moved.net[layer].weight
            w.add_(1e-3 * torch.sign(torch.randn(w.shape, generator=g)))
        cos = F.cosine_similarity(before, moved(x)).clamp(-1, 1)
    return float(torch.acos(cos).median())


def test_anchored_start_takes_larger_steps_than_a_fresh_projection_and_balanced_does_not():
    aligned, fresh, x = _aligned_and_fresh(out_norm=3.0)
    with torch.no_grad():  # as stage 2 leaves it: little gain along the directions the rows vary in
        aligned.net[0].weight[:, :4].mul_(0.1)
        x[:, 4:].mul_(0.1)
    pinned = {"out_norm": torch.tensor(3.0)}
    anchored = CollabProjector.from_state(anchored_warm_start(fresh, aligned.state_dict(), x) | pinned)
    balanced = CollabProjector.from_state(balanced_warm_start(fresh, aligned.state_dict(), x) | pinned)
    for layer in (None, 0):
        ref = _step_turn(fresh, x, layer)
        assert _step_turn(anchored, x, layer) > 1.5 * ref  # what the balanced start corrects
        assert _step_turn(balanced, x, layer) == pytest.approx(ref, rel=0.35)


def test_balanced_start_keeps_the_fresh_mean_and_the_aligned_directions():
    aligned, fresh, x = _aligned_and_fresh()
    balanced = CollabProjector.from_state(balanced_warm_start(fresh, aligned.state_dict(), x))
    with torch.no_grad():
        a, b, f = aligned(x), balanced(x), fresh(x)
    assert torch.allclose(b.mean(0), f.mean(0), atol=1e-5)
    same = F.cosine_similarity(a - a.mean(0), b - b.mean(0))
    assert same.median() > 0.99
    assert torch.isclose(fresh.net[0].weight.norm(), balanced.net[0].weight.norm(), rtol=1e-5)


def test_build_scorer_loads_the_balanced_start(tiny_backbone_dir):
    from sellarec.model.prompts import Slot, TemplateSpec
    from sellarec.training.stage3 import build_scorer

    spec = TemplateSpec(stage="stage3", slots=(Slot.USER, Slot.ITEM), history_length=2)
    aligned = CollabProjector(8, 64, hidden=1024)
    rows = torch.randn(20, 8) * 0.1
    plain = build_scorer(str(tiny_backbone_dir), None, spec, 8, aligned.state_dict(), 0)
    scorer = build_scorer(
        str(tiny_backbone_dir),
        None,
        spec,
        8,
        aligned.state_dict(),
        0,
        warm_start="balanced",
        collab_inputs=rows,
    )
    torch.manual_seed(0)
    fresh = CollabProjector(8, 64)
    expected = balanced_warm_start(fresh, aligned.state_dict(), rows)
    for name, t in expected.items():
        if name == "out_norm":  # pinned to the backbone's scale by build_scorer
            continue
        assert torch.allclose(scorer.proj_c.state_dict()[name], t, atol=1e-6), name
    assert not torch.allclose(scorer.proj_c.net[2].weight, plain.proj_c.net[2].weight)


def test_soft_token_gain_multiplies_the_pinned_norm(tiny_backbone_dir):
    from sellarec.model.collab import vocabulary_norm
    from sellarec.model.prompts import Slot, TemplateSpec
    from sellarec.training.stage3 import build_scorer

    spec = TemplateSpec(stage="stage3", slots=(Slot.USER, Slot.ITEM, Slot.WARM), history_length=2)
    rows = torch.randn(20, 8)
    base = build_scorer(str(tiny_backbone_dir), None, spec, 8, None, 0)
    vocab = vocabulary_norm(base.backbone.get_input_embeddings().weight)
    scorer = build_scorer(str(tiny_backbone_dir), None, spec, 8, None, 0, soft_token_gain=2.5)
    with torch.no_grad():
        for s in (base, scorer):
            assert s.proj_c(rows).norm(dim=-1).std() < 1e-4 * vocab  # every token at one norm
        assert base.proj_c(rows).norm(dim=-1).mean() == pytest.approx(vocab, rel=1e-5)
        assert scorer.proj_c(rows).norm(dim=-1).mean() == pytest.approx(2.5 * vocab, rel=1e-5)
        semantic = torch.randn(5, base.proj_w.net.in_features)
        assert scorer.proj_w(semantic).norm(dim=-1).mean() == pytest.approx(2.5 * vocab, rel=1e-5)
    free = build_scorer(str(tiny_backbone_dir), None, spec, 8, None, 0, "free", soft_token_gain=2.5)
    assert float(free.proj_c.out_norm) == 0.0  # the gain applies to the pinned scale only
    with pytest.raises(ValueError, match="soft_token_gain"):
        build_scorer(str(tiny_backbone_dir), None, spec, 8, None, 0, soft_token_gain=0.0)
