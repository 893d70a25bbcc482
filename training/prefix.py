"""Two-level prefix sharing: the token prefix common to every prompt (the instruction) runs
once; each user-level prefix only runs its remainder on top of it.

`extend_prefixes` continues a PrefixState by more tokens and returns the longer state, so
`SellaRec.score_suffixes` can finish from it. Right padding of the added pieces leaves
holes in the middle of the mask; positions come from the real token counts, so the numbers
are those of the plain path (tested). Candidate for model/sella.py.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import DynamicCache

from sellarec.model.encoding import Encoded
from sellarec.model.sella import PrefixState, SellaRec
from sellarec.model.soft_tokens import slot_positions


def common_head_length(prefixes: Sequence[Encoded]) -> int:
    """Length of the token prefix shared by all `prefixes`, stopping before any slot and
    leaving at least one token to each prefix."""
    if not prefixes:
        return 0
    limit = min(min([len(p) - 1, *(pos for _, pos in p.slots)]) for p in prefixes)
    first = prefixes[0].ids
    n = 0
    while n < limit and all(p.ids[n] == first[n] for p in prefixes):
        n += 1
    return n


def tail(encoded: Encoded, start: int) -> Encoded:
    """`encoded` without its first `start` tokens (slot positions shifted)."""
    return Encoded(encoded.ids[start:], tuple((s, p - start) for s, p in encoded.slots))


def extend_prefixes(
    scorer: SellaRec,
    state: PrefixState,
    rows: torch.Tensor,
    pieces: Sequence[Encoded],
    vectors: torch.Tensor | None = None,
) -> PrefixState:
    """Continue prefix `rows[n]` of `state` by `pieces[n]`; the new state has one row per piece."""
    device = scorer.device
    rows = rows.to(device)
    width = max(len(p) for p in pieces)
    ids = torch.full((len(pieces), width), scorer.encoder.pad_id, dtype=torch.long)
    mask = torch.zeros((len(pieces), width), dtype=torch.long)
    for row, p in enumerate(pieces):
        ids[row, : len(p)] = torch.tensor(p.ids)
        mask[row, : len(p)] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = slot_positions([p.slots for p in pieces], device=device)
    embeds = scorer._embed(ids, positions, vectors)
    config = scorer._causal_lm().config
    cache = DynamicCache(
        ddp_cache_data=[(k.index_select(0, rows), v.index_select(0, rows)) for k, v in state.layers],
        config=config,
    )
    base = state.lengths.index_select(0, rows)
    full_mask = torch.cat([state.mask.index_select(0, rows), mask], dim=1)
    scorer.decoder(
        inputs_embeds=embeds,
        attention_mask=full_mask,
        position_ids=base[:, None] + torch.arange(width, device=device),
        past_key_values=cache,
        use_cache=True,
    )
    layers = [(layer.keys, layer.values) for layer in cache.layers]
    return PrefixState(layers=layers, mask=full_mask, lengths=base + mask.sum(1))


class SharedHead:
    """The instruction's keys/values, computed once (no grad) and reused by every batch."""

    def __init__(self, scorer: SellaRec, prefixes: Sequence[Encoded]) -> None:
        self.scorer = scorer
        self.length = common_head_length(prefixes)
        self.ids: tuple[int, ...] = prefixes[0].ids[: self.length] if self.length else ()
        self.state: PrefixState | None = None
        if self.length > 0:
            with torch.no_grad():
                self.state = scorer.run_prefixes([Encoded(self.ids)])

    def run(self, prefixes: Sequence[Encoded], vectors: torch.Tensor | None = None) -> PrefixState:
        """Same numbers as `scorer.run_prefixes(prefixes, vectors)`, the shared head reused.

        `vectors` [n, 3, d_L] fill the slots of the prefixes (which all lie past the head).
        """
        usable = self.state is not None and all(
            p.ids[: self.length] == self.ids
            and len(p) > self.length
            and all(pos >= self.length for _, pos in p.slots)
            for p in prefixes
        )
        if not usable:
            return self.scorer.run_prefixes(prefixes, vectors)
        rows = torch.zeros(len(prefixes), dtype=torch.long)
        return extend_prefixes(
            self.scorer, self.state, rows, [tail(p, self.length) for p in prefixes], vectors
        )
