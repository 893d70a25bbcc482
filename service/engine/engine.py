"""From a validated request to scores: validate -> resolve -> queue -> result.

Decisions (also in docs/api.md):
- A request snapshots the served store version once; every lookup and the projections
  it uses come from that version, and the response names it in `model`.
- Limits are checked before any store round trip (`max_candidates`, `max_history`), and
  the token budget (`max_request_tokens`) once the request is encoded, before it queues.
- How a request resolves (history, cold start, fold-in, unknown items, duplicates) is in
  service/engine/resolve.py; how queued jobs form batches is in service/engine/batcher.py.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from sellarec.model.encoding import PromptEncoder
from sellarec.model.prompts import ALL_SLOTS, TemplateSpec, distillation_prompt, item_prompt, user_prompt
from sellarec.service.backends.torch_backend import Backend
from sellarec.service.engine.admission import Work
from sellarec.service.engine.batcher import Batcher
from sellarec.service.engine.jobs import Job, JobResult
from sellarec.service.engine.resolve import CacheWrites, ItemInput, Resolved, Resolver
from sellarec.service.engine.tracker import ServedVersion, VersionTracker
from sellarec.service.errors import DeadlineExceeded, NotReady, StoreUnavailable, TooLarge
from sellarec.service.metrics import Metrics
from sellarec.service.store.base import Store

__all__ = ["Engine", "ItemInput", "Outcome", "Scored"]


@dataclass(frozen=True)
class Scored:
    """The score of one requested item."""

    #: External item id.
    item_id: str
    #: P(Yes).
    score: float
    #: The user or the item was cold.
    cold: bool


@dataclass(frozen=True)
class Outcome:
    """Scores of a request, in input order, and the version that produced them."""

    #: Store version id.
    model: str
    #: One per requested item.
    scores: list[Scored]


class Engine:
    """Turns requests into jobs for the batcher and their results into scores."""

    def __init__(
        self,
        spec: TemplateSpec,
        encoder: PromptEncoder,
        backend: Backend,
        store: Store,
        tracker: VersionTracker,
        batcher: Batcher[Job, JobResult],
        metrics: Metrics,
        max_candidates: int = 256,
        max_history: int = 100,
        max_request_tokens: int | None = None,
    ) -> None:
        self.spec = spec
        self.encoder = encoder
        self.backend = backend
        self.store = store
        self.tracker = tracker
        self.batcher = batcher
        self.metrics = metrics
        self.max_candidates = max_candidates
        self.max_history = max_history
        self.max_request_tokens = max_request_tokens
        self.writes = CacheWrites()
        self.resolver = Resolver(spec, encoder, store, metrics, backend.max_positions, self.writes)

    def served(self) -> ServedVersion:
        """The version a new request uses (raises when there is none)."""
        served = self.tracker.current
        if served is None:
            raise StoreUnavailable(f"no store version to serve: {self.tracker.problem}")
        return served

    async def score(
        self,
        user_id: str,
        items: Sequence[ItemInput],
        history: Sequence[ItemInput] | None = None,
        deadline: float | None = None,
    ) -> Outcome:
        """P(Yes) for each of `items`, in order.

        `deadline` (a `time.monotonic()` point) is when the caller stops waiting: a request
        that would wait past it is refused at admission (QueueFull), and one still queued then
        leaves the queue unrun (DeadlineExceeded: 429 with a Retry-After).
        """
        started = time.monotonic()
        self._validate(items, history)
        resolved = await self.resolver.resolve(self.served(), user_id, items, history)
        result = await self._queue(resolved.job, deadline, started)
        if result.distilled:
            self._remember(resolved.version, result.distilled)
        return self._outcome(items, resolved, result)

    def _validate(self, items: Sequence[ItemInput], history: Sequence[ItemInput] | None) -> None:
        """Refuse a request over the per-request limits before it costs a store round trip."""
        if len(items) > self.max_candidates:
            raise TooLarge(
                f"{len(items)} candidates; at most {self.max_candidates} per request (max_candidates)"
            )
        if history is not None and len(history) > self.max_history:
            raise TooLarge(f"{len(history)} history entries; at most {self.max_history} (max_history)")

    async def _queue(self, job: Job, deadline: float | None, started: float) -> JobResult:
        """Queue `job` for the model thread and wait for its result, within the token budget and
        the caller's deadline."""
        if self.max_request_tokens is not None and job.cost > self.max_request_tokens:
            raise TooLarge(
                f"this request puts {job.cost} token positions through the model (prompt prefix, "
                f"{job.size} candidate suffixes, {len(job.distill)} cold titles to distil); at most "
                f"{self.max_request_tokens} per request (max_request_tokens): send fewer or shorter "
                f"items, or split the request"
            )
        # A prefix the backend kept from this user's earlier request runs no token: priced as none.
        prefix = 0 if self.backend.keeps_prefix(job.prefix) else len(job.prefix)
        work = Work(prefix + sum(map(len, job.distill.values())), sum(map(len, job.suffixes)))
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            raise DeadlineExceeded(
                "the request's timeout passed before it reached the model; retry later or with more time",
                retry_after=self.batcher.retry_after(),
            )
        future = self.batcher.submit(
            job, job.cost, job.size, work=work, deadline_s=remaining, spent_s=time.monotonic() - started
        )
        try:
            # Cancelling this wait (timeout, or the route's client went away) cancels the
            # future, which takes the job out of the queue if it has not started.
            return await asyncio.wait_for(future, remaining)
        except TimeoutError:
            raise DeadlineExceeded(
                "the request's timeout passed before its scores were ready; it was dropped "
                "(retry later or with more time)",
                retry_after=self.batcher.retry_after(),
            ) from None

    def _outcome(self, items: Sequence[ItemInput], resolved: Resolved, result: JobResult) -> Outcome:
        """The scores in input order (duplicates read their candidate's one score), counted."""
        scores = [
            Scored(item.item_id, float(result.probabilities[row]), resolved.cold_user or cold_item)
            for item, row, cold_item in zip(items, resolved.rows, resolved.cold_items)
        ]
        self.metrics.candidates.inc(len(scores))
        if resolved.cold_user:
            self.metrics.cold.labels(kind="user").inc(len(scores))
        self.metrics.cold.labels(kind="item").inc(sum(resolved.cold_items))
        return Outcome(resolved.version, scores)

    def _remember(self, version: str, vectors: dict[str, np.ndarray]) -> None:
        """Cache distilled vectors in the store without holding up the response."""
        self.writes.start(
            lambda: self.store.cache_distilled(version, vectors), f"caching {len(vectors)} distilled vectors"
        )

    async def warm_up(self) -> None:
        """One scoring and one distillation forward before traffic (kernels, allocator, caches)."""
        prefix = self.encoder.segments(user_prompt(self.spec, ()), lead=True)
        suffix = self.encoder.segments(item_prompt(self.spec, "warm-up"))
        prompt = self.encoder.prompt(distillation_prompt(self.spec, "warm-up"))
        zeros = torch.zeros(1, len(ALL_SLOTS), self.backend.llm_dim, device=self.backend.device)

        def run() -> float:
            start = time.perf_counter()
            self.backend.score([prefix], zeros, [0], [suffix], zeros)
            self.backend.distill([prompt])
            return time.perf_counter() - start

        # A first price for the cost model (pessimistic: first calls are the slowest).
        seconds = await self.batcher.call(run)
        self.batcher.observe(Work(len(prefix) + len(prompt), len(suffix)), seconds)

    async def ready(self) -> str:
        """The served version if the store answers and a version is served; raises otherwise."""
        await self.store.ping()
        if self.tracker.current is None:
            await self.tracker.refresh()
        served = self.tracker.current
        if served is None:
            raise NotReady(f"no store version to serve: {self.tracker.problem}")
        return served.version

    async def flush(self, timeout_s: float = 5.0) -> None:
        """Wait (a bounded time) for background cache writes, at shutdown and in tests."""
        await self.writes.flush(timeout_s)
