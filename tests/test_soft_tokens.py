"""Soft tokens replace exactly the placeholder positions, in padded batches, for any slot subset."""

from __future__ import annotations

import itertools

import pytest
import torch

from sellarec.model.encoding import PromptEncoder
from sellarec.model.prompts import ALL_SLOTS, TemplateSpec, scoring_prompt
from sellarec.model.soft_tokens import slot_positions, splice

SUBSETS = [s for k in range(4) for s in itertools.combinations(ALL_SLOTS, k)]


@pytest.mark.parametrize("slots", SUBSETS)
def test_vectors_land_on_placeholders_and_nowhere_else(tokenizer, slots):
    encoder = PromptEncoder(tokenizer)
    spec = TemplateSpec(slots=slots)
    histories = [["Heat (1995)"] * 7, [], ["Alien (1979)"]]
    encoded = [encoder.prompt(scoring_prompt(spec, h, "Toy Story (1995)")) for h in histories]
    width, dim = max(len(e) for e in encoded), 8
    embeds = torch.randn(len(encoded), width, dim)
    vectors = torch.randn(len(encoded), 3, dim)
    out = splice(embeds, slot_positions([e.slots for e in encoded]), vectors)

    for row, e in enumerate(encoded):
        expected = embeds[row].clone()  # independent: write each slot by hand
        for slot, pos in e.slots:
            assert e.ids[pos] == encoder.placeholder_id
            expected[pos] = vectors[row, ALL_SLOTS.index(slot)]
        torch.testing.assert_close(out[row], expected, rtol=0, atol=0)
        changed = (out[row] != embeds[row]).any(-1).nonzero().flatten().tolist()
        assert changed == sorted(pos for _, pos in e.slots)


def test_splice_does_not_modify_its_input_and_passes_gradients():
    embeds = torch.zeros(2, 5, 4)
    vectors = torch.randn(2, 3, 4, requires_grad=True)
    positions = torch.tensor([[1, 3, -1], [-1, -1, 4]])
    out = splice(embeds, positions, vectors)
    assert embeds.abs().sum() == 0
    out.sum().backward()
    used = torch.tensor([[1, 1, 0], [0, 0, 1]], dtype=torch.float32)
    torch.testing.assert_close(vectors.grad, used[..., None].expand(2, 3, 4))


def test_positions_shift_with_left_padding():
    slots = [((ALL_SLOTS[0], 2),), ()]
    assert slot_positions(slots, offset=[5, 0]).tolist() == [[7, -1, -1], [-1, -1, -1]]
