"""Backends run the model on encoded prompts and soft-token vectors; they know nothing of HTTP.

The interface is what a vLLM backend (prompt_embeds + prefix caching + two logprob rows)
can implement as well: prefixes and suffixes already tokenised, the projected
(user, item, warm) vectors already computed, probabilities out.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

import numpy as np
import torch

from sellarec.model.encoding import Encoded
from sellarec.model.sella import SellaRec


class Backend(ABC):
    """Runs scoring and distillation forwards; called from the model thread only."""

    #: Backend name ("torch" or "vllm").
    name: str
    #: d_L, the width of the soft-token vectors.
    llm_dim: int
    #: Device the vectors should live on.
    device: torch.device
    #: Longest prompt (tokens) the model accepts.
    max_positions: int

    @abstractmethod
    def score(
        self,
        prefixes: Sequence[Encoded],
        prefix_vectors: torch.Tensor,
        rows: Sequence[int],
        suffixes: Sequence[Encoded],
        suffix_vectors: torch.Tensor,
    ) -> np.ndarray:
        """P(Yes) [N] of suffix n continuing prefix rows[n].

        `prefix_vectors` [P, 3, d_L] need only the user column, `suffix_vectors` [N, 3, d_L]
        only the item and warm columns.
        """

    @abstractmethod
    def distill(self, prompts: Sequence[Encoded]) -> torch.Tensor:
        """[n, d_L] float32 (CPU): last hidden state of each distillation prompt (E_I^L)."""

    def close(self) -> None:  # noqa: B027 - optional hook; the torch backend holds nothing to release
        """Release engines or processes the backend started (called once, at shutdown)."""


def _greedy_chunks(order: list[int], cost: Callable[[int, int], int], budget: int) -> list[list[int]]:
    """Split `order` (ascending by length) into runs whose padded cost stays within `budget`.

    `cost(count, last)` is the padded size of a run of `count` elements ending with `last`
    (the longest, as `order` ascends); a run always takes at least one element.
    """
    runs: list[list[int]] = []
    run: list[int] = []
    for index in order:
        if run and cost(len(run) + 1, index) > budget:
            runs.append(run)
            run = []
        run.append(index)
    if run:
        runs.append(run)
    return runs


class TorchBackend(Backend):
    """PyTorch + transformers on CPU or CUDA, shared-prefix scoring (model.sella)."""

    name = "torch"

    def __init__(self, scorer: SellaRec, max_batch_tokens: int = 8192) -> None:
        self.scorer = scorer
        self.max_batch_tokens = max_batch_tokens
        self.llm_dim = scorer.llm_dim
        self.device = scorer.device
        config = scorer.backbone.config.get_text_config()
        self.max_positions = int(getattr(config, "max_position_embeddings", None) or 1 << 30)

    @torch.inference_mode()
    def score(
        self,
        prefixes: Sequence[Encoded],
        prefix_vectors: torch.Tensor,
        rows: Sequence[int],
        suffixes: Sequence[Encoded],
        suffix_vectors: torch.Tensor,
    ) -> np.ndarray:
        out = torch.empty(len(suffixes), dtype=torch.float32)
        by_prefix: dict[int, list[int]] = {}
        for n, row in enumerate(rows):
            by_prefix.setdefault(row, []).append(n)
        # Prefixes of similar length share a forward (little left padding); each group's
        # keys/values are then extended by its candidates, shortest suffixes first, in
        # chunks whose expanded cache (candidates x (prefix + suffix)) fits the budget.
        order = sorted(by_prefix, key=lambda p: len(prefixes[p]))
        groups = _greedy_chunks(order, lambda k, last: k * len(prefixes[last]), self.max_batch_tokens)
        for group in groups:
            state = self.scorer.run_prefixes([prefixes[p] for p in group], prefix_vectors[group])
            width = state.mask.shape[1]
            local = {p: j for j, p in enumerate(group)}
            candidates = sorted((n for p in group for n in by_prefix[p]), key=lambda n: len(suffixes[n]))
            chunks = _greedy_chunks(
                candidates,
                lambda k, last, width=width: k * (width + len(suffixes[last])),
                self.max_batch_tokens,
            )
            for chunk in chunks:
                logits = self.scorer.score_suffixes(
                    state,
                    torch.tensor([local[rows[n]] for n in chunk]),
                    [suffixes[n] for n in chunk],
                    suffix_vectors[chunk],
                )
                out[chunk] = torch.sigmoid(logits.float()).cpu()
        return out.numpy()

    @torch.inference_mode()
    def distill(self, prompts: Sequence[Encoded]) -> torch.Tensor:
        out = torch.empty(len(prompts), self.llm_dim, dtype=torch.float32)
        order = sorted(range(len(prompts)), key=lambda n: len(prompts[n]))
        for chunk in _greedy_chunks(order, lambda k, last: k * len(prompts[last]), self.max_batch_tokens):
            out[chunk] = self.scorer.last_hidden([prompts[n] for n in chunk]).float().cpu()
        return out
