"""Soft tokens at the backbone's scale: the projections pin their output norm, and the norm
travels with their weights (older weights without it load with the free scale)."""

from __future__ import annotations

import pytest
import torch

from sellarec.model.collab import CollabProjector, SemanticProjector, vocabulary_norm


def test_a_pinned_projection_outputs_exactly_its_norm():
    torch.manual_seed(0)
    proj = CollabProjector(8, 16, hidden=32, out_norm=3.0)
    norms = proj(torch.randn(5, 8) * 50).norm(dim=-1)
    assert torch.allclose(norms, torch.full((5,), 3.0), atol=1e-5)


def test_the_free_scale_is_the_plain_network():
    torch.manual_seed(0)
    proj = SemanticProjector(16)
    x = torch.randn(4, 16)
    assert torch.equal(proj(x), proj.net(x))


def test_the_norm_round_trips_through_the_state_dict():
    torch.manual_seed(0)
    pinned = CollabProjector(8, 16, hidden=32, out_norm=2.5)
    loaded = CollabProjector.from_state(pinned.state_dict())
    x = torch.randn(3, 8)
    assert torch.allclose(loaded(x), pinned(x))
    assert torch.allclose(loaded(x).norm(dim=-1), torch.full((3,), 2.5))


def test_weights_written_before_the_norm_load_with_the_free_scale():
    torch.manual_seed(0)
    state = CollabProjector(8, 16, hidden=32, out_norm=2.5).state_dict()
    old = {k: v for k, v in state.items() if k != "out_norm"}
    loaded = CollabProjector.from_state(old)
    x = torch.randn(3, 8)
    assert torch.equal(loaded(x), loaded.net(x))


def test_the_vocabulary_norm_is_the_median_row_norm():
    table = torch.tensor([[3.0, 4.0], [0.0, 1.0], [6.0, 8.0]])
    assert vocabulary_norm(table) == 5.0


def test_a_tampered_output_norm_is_refused_at_load():
    state = SemanticProjector(8, out_norm=2.0).state_dict()
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="out_norm"):
            SemanticProjector.from_state(state | {"out_norm": torch.tensor(bad)})
