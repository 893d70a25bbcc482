"""One padded batch from encoded prompt pieces: right for whole prompts and suffixes, left for
prefixes whose keys/values are continued."""

from __future__ import annotations

import pytest
import torch

from sellarec.model.encoding import Encoded, pad
from sellarec.model.prompts import Slot

PAD = 0
SHORT = Encoded((5, 6), ((Slot.USER, 1),))
LONG = Encoded((7, 8, 9, 10))


def test_right_padding_keeps_every_row_at_position_zero():
    ids, mask, shifts = pad([SHORT, LONG], PAD)
    assert ids.tolist() == [[5, 6, PAD, PAD], [7, 8, 9, 10]]
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert shifts == [0, 0]
    assert (mask.sum(1) - 1).tolist() == [1, 3]  # the last real token of each row


def test_left_padding_lines_up_the_ends_and_says_how_far_each_row_moved():
    ids, mask, shifts = pad([SHORT, LONG], PAD, side="left")
    assert ids.tolist() == [[PAD, PAD, 5, 6], [7, 8, 9, 10]]
    assert mask.tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]]
    assert shifts == [2, 0]


def test_padding_gives_long_tensors_of_the_batch_width():
    for side in ("right", "left"):
        ids, mask, _ = pad([LONG, SHORT, Encoded((1,))], PAD, side=side)
        assert ids.shape == mask.shape == (3, 4)
        assert ids.dtype == mask.dtype == torch.long


def test_an_unknown_side_is_refused():
    with pytest.raises(ValueError, match="side"):
        pad([SHORT], PAD, side="middle")  # type: ignore[arg-type]
