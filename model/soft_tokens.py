"""Soft tokens (paper Eq. 10): slot positions' input embeddings replaced in place."""

from __future__ import annotations

import torch

from sellarec.model.prompts import ALL_SLOTS, Slot


def slot_positions(
    slots: list[tuple[tuple[Slot, int], ...]],
    offset: list[int] | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """[B, 3] positions of (user, item, warm) per row, -1 where a row has no such slot."""
    positions = torch.full((len(slots), len(ALL_SLOTS)), -1, dtype=torch.long)
    for row, row_slots in enumerate(slots):
        shift = offset[row] if offset else 0
        for slot, pos in row_slots:
            positions[row, ALL_SLOTS.index(slot)] = pos + shift
    return positions.to(device)


def splice(embeds: torch.Tensor, positions: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """Return `embeds` [B, T, d_L] with vectors[b, k] written at positions[b, k] (if >= 0).

    `vectors` is [B, 3, d_L] in (user, item, warm) order; rows without a slot keep their
    token embedding. Out of place, so gradients flow to the vectors and not to the table.
    """
    rows, kinds = torch.nonzero(positions >= 0, as_tuple=True)
    if rows.numel() == 0:
        return embeds
    out = embeds.clone()
    out[rows, positions[rows, kinds]] = vectors[rows, kinds].to(out.dtype)
    return out
