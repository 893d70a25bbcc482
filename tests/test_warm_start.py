"""The anchored warm start (stage3.warm_start = "anchored"): stage 2's aligned Proj C->L,
re-based on a fresh projection's mean and spread, keeping the aligned directions."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sellarec.model.collab import CollabProjector, anchored_warm_start


def _aligned_and_fresh(out_norm: float = 0.0):
    torch.manual_seed(1)
    aligned = CollabProjector(8, 16, hidden=32)
    with torch.no_grad():  # like stage 2's: small, diverse outputs
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
