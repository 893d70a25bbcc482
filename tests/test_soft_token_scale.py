"""Soft tokens at the backbone's scale: the projections pin their output norm, and the norm
travels with their weights (older weights without it load with the free scale)."""

from __future__ import annotations

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


def test_the_semantic_input_scale_multiplies_the_input_and_round_trips():
    torch.manual_seed(0)
    scaled = SemanticProjector(16, in_scale=0.25)
    x = torch.randn(4, 16) * 40
    assert torch.allclose(scaled(x), scaled.net(x * 0.25))
    loaded = SemanticProjector.from_state(scaled.state_dict())
    assert torch.allclose(loaded(x), scaled(x))


def test_semantic_weights_written_before_the_input_scale_read_the_raw_input():
    torch.manual_seed(0)
    state = SemanticProjector(16, out_norm=2.0, in_scale=0.25).state_dict()
    old = {k: v for k, v in state.items() if k != "in_scale"}
    loaded = SemanticProjector.from_state(old)
    x = torch.randn(3, 16)
    assert torch.allclose(loaded(x), torch.nn.functional.normalize(loaded.net(x), dim=-1) * 2.0, atol=1e-5)


def test_a_tampered_scale_is_refused_at_load():
    import pytest

    state = SemanticProjector(8, out_norm=2.0, in_scale=0.5).state_dict()
    nan, inf = float("nan"), float("inf")
    bad_values = [("in_scale", nan), ("in_scale", 0.0), ("out_norm", -1.0), ("out_norm", inf)]
    for key, bad in bad_values:
        with pytest.raises(ValueError, match=key):
            SemanticProjector.from_state(state | {key: torch.tensor(bad)})
