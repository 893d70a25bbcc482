"""Two-level prefix sharing: the token prefix common to every prompt (the instruction) runs
once; each user-level prefix only runs its remainder on top of it.

Training and offline evaluation run thousands of prompts that all open with the same
instruction; `SharedHead` keeps its keys/values and continues them with
`SellaRec.extend_prefixes`, which gives the numbers of running each prefix whole (tested).
The serving backend keeps one for the template it serves (`SharedHead.for_template`), so a
request only runs the tokens after the instruction (56 of SmolLM2's 177 prefix tokens).
A prompt that does not open with the head takes the plain path, so the head only ever
saves work: it never changes a score beyond float summation order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sellarec.model.encoding import Encoded
from sellarec.model.prompts import user_prompt
from sellarec.model.sella import PrefixState, SellaRec

#: Histories whose user-level prefixes are compared to find the template's instruction: empty,
#: and titles opening with a letter, a digit, a quote and punctuation, so that no history can
#: merge tokens across the instruction's end without the probe seeing it.
PROBE_HISTORIES: tuple[tuple[str, ...], ...] = (
    (),
    ("Toy Story (1995)",),
    ("101 Dalmatians (1996)",),
    ("'Til There Was You (1997)",),
    ('"Weird Al" Yankovic Live! (1999)', "Heat (1995)"),
    ("...And Justice for All (1979)",),
)


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


class SharedHead:
    """The instruction's keys/values, computed once (no grad) and reused by every batch."""

    def __init__(self, scorer: SellaRec, prefixes: Sequence[Encoded]) -> None:
        self.scorer = scorer
        self.length = common_head_length(prefixes)
        self.ids: tuple[int, ...] = prefixes[0].ids[: self.length] if self.length else ()
        self.state: PrefixState | None = None
        self.refresh()

    def refresh(self) -> None:
        """Recompute the keys/values with the scorer's current weights (a LoRA being trained)."""
        if self.length > 0:
            with torch.no_grad():
                self.state = self.scorer.run_prefixes([Encoded(self.ids)])

    @classmethod
    def for_template(cls, scorer: SellaRec) -> SharedHead:
        """The head of the scorer's own template: the tokens every user-level prefix opens with."""
        spec, encoder = scorer.spec, scorer.encoder
        return cls(scorer, [encoder.segments(user_prompt(spec, list(h)), lead=True) for h in PROBE_HISTORIES])

    def usable(self, prompts: Sequence[Encoded]) -> bool:
        """Whether every prompt opens with the head and keeps its slots and a token past it."""
        return self.state is not None and all(
            p.ids[: self.length] == self.ids
            and len(p) > self.length
            and all(pos >= self.length for _, pos in p.slots)
            for p in prompts
        )

    def score(
        self,
        prompts: Sequence[Encoded],
        vectors: torch.Tensor | None = None,
        kept: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> torch.Tensor:
        """Same numbers as `scorer.score(prompts, vectors)`: each prompt's remainder runs once,
        after the head's keys/values (one forward, as the plain path). `kept`, a list, receives
        each layer's keys/values of the remainders (for `grown`); it stays empty when the
        prompts take the plain path."""
        if not self.usable(prompts):
            return self.scorer.score(prompts, vectors)
        rows = torch.zeros(len(prompts), dtype=torch.long)
        pieces = [tail(p, self.length) for p in prompts]
        return self.scorer.score_suffixes(self.state, rows, pieces, vectors, kept)

    def grown(self, kept: Sequence[tuple[torch.Tensor, torch.Tensor]], row: int, length: int) -> PrefixState:
        """A prefix of one: the head, then the first `length` tokens of row `row` of `kept`,
        the per-layer keys/values of pieces run after the head (`SellaRec.suffix_hidden`'s `kept`)."""
        assert self.state is not None, "a head of no tokens grows nothing"
        piece = slice(row, row + 1)
        layers = [
            (torch.cat([hk, k[piece, :, :length]], 2), torch.cat([hv, v[piece, :, :length]], 2))
            for (hk, hv), (k, v) in zip(self.state.layers, kept, strict=True)
        ]
        mask = torch.ones(1, self.length + length, dtype=self.state.mask.dtype, device=self.state.mask.device)
        return PrefixState(layers=layers, mask=mask, lengths=mask.sum(1))

    def run(self, prefixes: Sequence[Encoded], vectors: torch.Tensor | None = None) -> PrefixState:
        """Same numbers as `scorer.run_prefixes(prefixes, vectors)`, the shared head reused.

        `vectors` [n, 3, d_L] fill the slots of the prefixes (which all lie past the head).
        """
        if not self.usable(prefixes):
            return self.scorer.run_prefixes(prefixes, vectors)
        rows = torch.zeros(len(prefixes), dtype=torch.long)
        pieces = [tail(p, self.length) for p in prefixes]
        return self.scorer.extend_prefixes(self.state, rows, pieces, vectors)
