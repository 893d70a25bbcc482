"""Turning prompt segments into token ids and slot positions.

Each text segment is tokenised on its own and the ids are concatenated; a slot takes one
position (its id is a placeholder whose embedding is overwritten). So the ids of a prompt
are by construction the ids of its user-level prefix followed by those of its suffix, and
a service can compute the prefix once and reuse it for every candidate.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import torch
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from sellarec.model.prompts import Prompt, Segment, Slot


@dataclass(frozen=True)
class Encoded:
    """Token ids of a piece of prompt and where its slots sit."""

    #: Token ids; slot positions hold the placeholder id.
    ids: tuple[int, ...]
    #: (slot, position) pairs, positions relative to the start of `ids`.
    slots: tuple[tuple[Slot, int], ...] = ()

    def __len__(self) -> int:
        return len(self.ids)

    def __add__(self, other: Encoded) -> Encoded:
        shift = len(self.ids)
        return Encoded(self.ids + other.ids, self.slots + tuple((s, p + shift) for s, p in other.slots))


#: Which end of a padded row the padding goes to.
Side = Literal["right", "left"]


def pad(
    encoded: Sequence[Encoded], pad_id: int, side: Side = "right"
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """One batch of `encoded` pieces: (ids [B, T], attention mask [B, T], shift per row).

    Right padding (whole prompts, suffixes) keeps every row at position 0, so reading the
    last real token is `mask.sum(1) - 1`; left padding (prefixes) lines up their ends, so
    a cache of them can be continued at one width. `shifts[b]` is how far row b's tokens
    (and slot positions) moved right: 0 on the right, the row's padding on the left.
    """
    if side not in ("right", "left"):
        raise ValueError(f"side must be 'right' or 'left', not {side!r}")
    width = max(len(e) for e in encoded)
    ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    shifts = [width - len(e) if side == "left" else 0 for e in encoded]
    for row, (e, shift) in enumerate(zip(encoded, shifts, strict=True)):
        ids[row, shift : shift + len(e)] = torch.tensor(e.ids)
        mask[row, shift : shift + len(e)] = 1
    return ids, mask, shifts


class PromptEncoder:
    """Tokenises prompts segment by segment, with a cache for repeated text (titles)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, cache_size: int = 65536) -> None:
        self.tokenizer = tokenizer
        self.placeholder_id = int(
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        )
        self.pad_id = self.placeholder_id
        # Leading special tokens the tokenizer adds by itself (BOS for Llama-style
        # tokenizers, nothing for Qwen2): the prompt starts with them, once.
        with_special = tokenizer("x").input_ids
        plain = tokenizer("x", add_special_tokens=False).input_ids
        self.lead: tuple[int, ...] = tuple(with_special[: with_special.index(plain[0])])
        self._text = lru_cache(maxsize=cache_size)(self._tokenize)

    def _tokenize(self, text: str) -> tuple[int, ...]:
        return tuple(self.tokenizer(text, add_special_tokens=False).input_ids)

    def segments(self, segments: Sequence[Segment], lead: bool = False) -> Encoded:
        ids: list[int] = list(self.lead) if lead else []
        slots: list[tuple[Slot, int]] = []
        for segment in segments:
            if isinstance(segment, Slot):
                slots.append((segment, len(ids)))
                ids.append(self.placeholder_id)
            elif segment:
                ids.extend(self._text(segment))
        return Encoded(tuple(ids), tuple(slots))

    def prompt(self, prompt: Prompt) -> Encoded:
        """The whole prompt, as the plain reference path feeds it."""
        return self.segments(prompt.segments, lead=True)

    def split(self, prompt: Prompt) -> tuple[Encoded, Encoded]:
        """(user-level prefix, per-candidate suffix); their concatenation is `prompt()`."""
        return self.segments(prompt.user_part, lead=True), self.segments(prompt.item_part)
