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
from peft import PeftModel

from sellarec.model import fast_path
from sellarec.model.encoding import Encoded
from sellarec.model.sella import PrefixState, SellaRec, row_state
from sellarec.model.shared_head import SharedHead
from sellarec.service.backends.prefix_cache import PrefixCache


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
        offsets: torch.Tensor | None = None,
    ) -> np.ndarray:
        """P(Yes) [N] of suffix n continuing prefix rows[n].

        `prefix_vectors` [P, 3, d_L] need only the user column, `suffix_vectors` [N, 3, d_L]
        only the item and warm columns. `offsets` [N] (CPU), where given, are added to the
        logits before the sigmoid (the MF residual of a `sellarec-mf` model).
        """

    @abstractmethod
    def distill(self, prompts: Sequence[Encoded]) -> torch.Tensor:
        """[n, d_L] float32 (CPU): last hidden state of each distillation prompt (E_I^L)."""

    def keeps_prefix(self, prefix: Encoded) -> bool:
        """Whether a request with this user-level prefix will most likely run only its candidates
        (its keys/values kept from an earlier request): admission prices it without the prefix.
        Read from the event loop while the model thread scores: it must not block."""
        return False

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
    """PyTorch + transformers on CPU or CUDA, shared-prefix scoring (model.sella).

    On CPU in float32 the decoder's linear layers are packed for oneDNN at construction
    (`model.fast_path`, in place: the scorer is serving-only from then on), unless
    `cpu_fast_path` is off or the LoRA is not merged; with it on, on CPU, the process's malloc
    keeps freed memory for the next forward (`fast_path.keep_freed_memory`; process-wide:
    `keep_freed_memory=False` leaves glibc's defaults only if nothing set it before). The
    template's instruction (the tokens every user-level prefix opens with) runs once, at construction,
    and every request continues its keys/values (`model.shared_head`); `shared_head=False`
    runs it with every request.
    With `prefix_cache_bytes` > 0 (and the head), each user-level prefix's keys/values are kept
    across requests (`PrefixCache`): a returning user's prompt runs only its candidates.
    """

    name = "torch"

    def __init__(
        self,
        scorer: SellaRec,
        max_batch_tokens: int = 8192,
        cpu_fast_path: bool = True,
        shared_head: bool = True,
        prefix_cache_bytes: int = 0,
        keep_freed_memory: bool = True,
    ) -> None:
        self.scorer = scorer
        self.max_batch_tokens = max_batch_tokens
        self.llm_dim = scorer.llm_dim
        self.device = scorer.device
        config = scorer.backbone.config.get_text_config()
        self.max_positions = int(getattr(config, "max_position_embeddings", None) or 1 << 30)
        #: What the CPU fast path did (inactive on CUDA, in bf16, or with an unmerged LoRA).
        self.fast_path = fast_path.FastPath()
        merged = not isinstance(scorer.backbone, PeftModel)
        if cpu_fast_path and merged and fast_path.supported(self.device, scorer.dtype):
            self.fast_path = fast_path.enable(scorer.decoder, scorer.llm_dim)
        #: Whether freed memory is kept for the next forward (on CPU, fast path and keep_freed_memory on).
        on_cpu = cpu_fast_path and keep_freed_memory and self.device.type == "cpu"
        self.keeps_freed_memory = on_cpu and fast_path.keep_freed_memory()
        # The template's instruction, run once here (after the fast path, with the weights that
        # will serve): every request continues its keys/values instead of running it again.
        # Off, it is a head of no tokens: every prompt then takes the plain path.
        self.head = SharedHead.for_template(scorer) if shared_head else SharedHead(scorer, ())
        # Kept prefixes continue the head's keys/values, so without a head nothing is kept.
        self.prefix_cache = PrefixCache(prefix_cache_bytes if self.head.state is not None else 0)

    def keeps_prefix(self, prefix: Encoded) -> bool:
        return self.prefix_cache.holds(prefix)

    @torch.inference_mode()
    def score(
        self,
        prefixes: Sequence[Encoded],
        prefix_vectors: torch.Tensor,
        rows: Sequence[int],
        suffixes: Sequence[Encoded],
        suffix_vectors: torch.Tensor,
        offsets: torch.Tensor | None = None,
    ) -> np.ndarray:
        out = torch.empty(len(suffixes), dtype=torch.float64)  # logits; P(Yes) at the end
        by_prefix: dict[int, list[int]] = {}
        for n, row in enumerate(rows):
            by_prefix.setdefault(row, []).append(n)
        cache = self.prefix_cache
        keys: dict[int, bytes] = {}
        if cache.enabled:  # one copy of the user vectors to the CPU, not one per prefix
            users = prefix_vectors[:, 0].float().cpu().numpy()
            keys = {p: cache.key(prefixes[p], users[p]) for p in by_prefix}
        # A returning user's prefix: its kept keys/values, only the candidates run.
        for p, key in keys.items():
            state = cache.get(key)
            if state is not None:
                ns = by_prefix.pop(p)
                self._score_after(state, dict.fromkeys(ns, 0), suffixes, suffix_vectors, out)
        # A prefix with one candidate has nothing to share: its whole prompt runs in one
        # forward instead of a prefix forward and a suffix forward (measured 7% faster at
        # one candidate on CPU; one pass over the layers fewer on any device).
        alone = [ns[0] for ns in by_prefix.values() if len(ns) == 1]
        if alone:
            self._score_whole(prefixes, prefix_vectors, rows, suffixes, suffix_vectors, alone, out, keys)
        shared = {p: ns for p, ns in by_prefix.items() if len(ns) > 1}
        # Prefixes of similar length share a forward (little left padding); each group's
        # keys/values are then extended by its candidates, shortest suffixes first, in
        # chunks whose expanded cache (candidates x (prefix + suffix)) fits the budget.
        order = sorted(shared, key=lambda p: len(prefixes[p]))
        groups = _greedy_chunks(order, lambda k, last: k * len(prefixes[last]), self.max_batch_tokens)
        for group in groups:
            state = self.head.run([prefixes[p] for p in group], prefix_vectors[group])
            for j, p in enumerate(group):
                if p in keys:
                    cache.put(keys[p], row_state(state, j))
            candidates = {n: j for j, p in enumerate(group) for n in shared[p]}
            self._score_after(state, candidates, suffixes, suffix_vectors, out)
        if offsets is not None:
            out += offsets.to(out.dtype)
        return torch.sigmoid(out).to(torch.float32).numpy()

    def _score_after(
        self,
        state: PrefixState,
        candidates: dict[int, int],
        suffixes: Sequence[Encoded],
        suffix_vectors: torch.Tensor,
        out: torch.Tensor,
    ) -> None:
        """Score candidate n (a key of `candidates`) as the continuation of prefix
        `candidates[n]` of `state`, shortest suffixes first, in chunks whose expanded cache
        (candidates x (prefix + suffix)) fits the budget."""
        width = state.mask.shape[1]
        order = sorted(candidates, key=lambda n: len(suffixes[n]))
        budget = self.max_batch_tokens
        for chunk in _greedy_chunks(order, lambda k, last: k * (width + len(suffixes[last])), budget):
            logits = self.scorer.score_suffixes(
                state,
                torch.tensor([candidates[n] for n in chunk]),
                [suffixes[n] for n in chunk],
                suffix_vectors[chunk],
            )
            out[chunk] = logits.double().cpu()

    def _score_whole(
        self,
        prefixes: Sequence[Encoded],
        prefix_vectors: torch.Tensor,
        rows: Sequence[int],
        suffixes: Sequence[Encoded],
        suffix_vectors: torch.Tensor,
        candidates: list[int],
        out: torch.Tensor,
        keys: dict[int, bytes],
    ) -> None:
        """Score `candidates` through the plain path: prefix + suffix as one prompt each. With
        `keys` (prefix -> cache key), the same forward also keeps each prefix's keys/values."""
        prompts = {n: prefixes[rows[n]] + suffixes[n] for n in candidates}
        order = sorted(candidates, key=lambda n: len(prompts[n]))
        head = self.head
        for chunk in _greedy_chunks(order, lambda k, last: k * len(prompts[last]), self.max_batch_tokens):
            vectors = suffix_vectors[chunk].clone()  # item and warm columns from the suffix ...
            vectors[:, 0] = prefix_vectors[[rows[n] for n in chunk], 0]  # ... the user's from the prefix
            kept: list[tuple[torch.Tensor, torch.Tensor]] = []
            logits = head.score([prompts[n] for n in chunk], vectors, kept if keys else None)
            if kept:  # each prefix's keys/values, from the same forward
                for j, n in enumerate(chunk):
                    own = len(prefixes[rows[n]]) - head.length  # its tokens past the head
                    self.prefix_cache.put(keys[rows[n]], head.grown(kept, j, own))
            out[chunk] = logits.double().cpu()

    @torch.inference_mode()
    def distill(self, prompts: Sequence[Encoded]) -> torch.Tensor:
        out = torch.empty(len(prompts), self.llm_dim, dtype=torch.float32)
        order = sorted(range(len(prompts)), key=lambda n: len(prompts[n]))
        for chunk in _greedy_chunks(order, lambda k, last: k * len(prompts[last]), self.max_batch_tokens):
            out[chunk] = self.scorer.last_hidden([prompts[n] for n in chunk]).float().cpu()
        return out
