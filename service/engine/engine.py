"""From a validated request to scores: snapshot, lookup, cold start, encoding, queue.

Decisions (also in docs/api.md):
- A request snapshots the served store version once; every lookup and the projections
  it uses come from that version, and the response names it in `model`.
- `history` in a request, when present (even empty), replaces the stored history, for
  known and cold users; absent, the stored history is used: the version's, then the
  positives recorded by POST /events (empty for a cold user without events). Only the
  last `history_length` entries (10 in the paper) reach the prompt.
- A user the MF never saw gets a collaborative vector folded in from the MF vectors of the
  items they interacted with, the first of these that applies:
  1. labelled fold-in: the user's labelled events recorded by POST /events (their last
     `events_keep`, either label) hold a negative on an item the version knows:
     model.collab.fold_in_labelled over the known ones (the row MF's BCE training would fit).
     Stored facts about the user, like an MF row: used whether or not the request sends a
     history.
  2. positives-only fold-in: the history the prompt uses (sent or stored, its last
     `history_length` entries) holds known items: model.collab.fold_in over them, so a
     stored and a sent history give the same scores.
  3. the version's neutral collaborative vector.
  The vector is cached in the store under the version, keyed by everything it was computed
  from (store.fold_key), so a new event that changes the inputs changes the key.
- Unknown item with a title: neutral collaborative vector and a semantic vector distilled
  from the title (cached in the store under the version). Unknown item without a title:
  422 `unknown_items` naming every such id (candidates and history alike).
- A known item is always scored with its stored title and vectors; a title sent with it
  is ignored.
- Duplicate candidates are scored at each occurrence (computed once).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from sellarec.model.collab import fold_in, fold_in_labelled
from sellarec.model.encoding import PromptEncoder
from sellarec.model.prompts import ALL_SLOTS, TemplateSpec, distillation_prompt, item_prompt, user_prompt
from sellarec.service.backends.torch_backend import Backend
from sellarec.service.engine.admission import Work
from sellarec.service.engine.batcher import Batcher
from sellarec.service.engine.jobs import Job, JobResult
from sellarec.service.engine.tracker import ServedVersion, VersionTracker
from sellarec.service.errors import (
    DeadlineExceeded,
    NotReady,
    PromptTooLong,
    StoreUnavailable,
    TooLarge,
    UnknownItems,
)
from sellarec.service.metrics import Metrics
from sellarec.service.store.base import Lookup, Store, fold_key

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ItemInput:
    """A requested item, as the engine sees it."""

    #: External item id.
    item_id: str
    #: Title sent with it (used only if the store does not know the item).
    title: str | None = None


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


@dataclass
class _Candidate:
    """A distinct candidate of one request."""

    #: Id of its first occurrence (for error messages).
    item_id: str
    #: The title the prompt uses (stored for known items, sent for cold ones).
    title: str
    #: Collaborative vector [d_C] (neutral for a cold item).
    collab: np.ndarray
    #: Semantic vector [d_L], or None until distilled.
    semantic: np.ndarray | None
    #: The store did not know the item.
    cold: bool


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
        self._background: set[asyncio.Task[None]] = set()

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
        if len(items) > self.max_candidates:
            raise TooLarge(
                f"{len(items)} candidates; at most {self.max_candidates} per request (max_candidates)"
            )
        if history is not None and len(history) > self.max_history:
            raise TooLarge(f"{len(history)} history entries; at most {self.max_history} (max_history)")
        served = self.served()
        recent = None
        if history is not None:
            keep = self.spec.history_length
            recent = list(history[-keep:]) if keep > 0 else []
        fold = fold_key([h.item_id for h in recent]) if recent else None
        lookup = await self._lookup(served, user_id, items, recent, fold)

        history_ids, history_titles = self._history(lookup, recent)
        cold_user = lookup.user is None
        if lookup.user is not None:
            user_collab = lookup.user.collab
        else:
            user_collab = await self._fold_in(served, lookup, history_ids, looked_up=recent is not None)
        keys, distinct = self._candidates(served, lookup, items)

        prefix = self.encoder.segments(user_prompt(self.spec, history_titles), lead=True)
        suffixes = [self.encoder.segments(item_prompt(self.spec, c.title)) for c in distinct.values()]
        for cand, suffix in zip(distinct.values(), suffixes):
            if len(prefix) + len(suffix) > self.backend.max_positions:
                raise PromptTooLong(
                    f"the prompt for item {cand.item_id!r} has {len(prefix) + len(suffix)} tokens; "
                    f"the model takes {self.backend.max_positions} (shorten titles or history)",
                    items=[cand.item_id],
                )
        cands = list(distinct.values())
        distill = {
            c.title: self.encoder.prompt(distillation_prompt(self.spec, c.title))
            for c in cands
            if c.semantic is None
        }
        job = Job(
            prefix=prefix,
            suffixes=suffixes,
            user_collab=user_collab,
            item_collab=np.stack([c.collab for c in cands]),
            item_semantic=[c.semantic for c in cands],
            titles=[c.title for c in cands],
            distill=distill,
            projections=served.projections,
        )
        if self.max_request_tokens is not None and job.cost > self.max_request_tokens:
            raise TooLarge(
                f"this request puts {job.cost} token positions through the model (prompt prefix, "
                f"{job.size} candidate suffixes, {len(distill)} cold titles to distil); at most "
                f"{self.max_request_tokens} per request (max_request_tokens): send fewer or shorter "
                f"items, or split the request"
            )
        work = Work(len(prefix) + sum(map(len, distill.values())), sum(map(len, suffixes)))
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
            result = await asyncio.wait_for(future, remaining)
        except TimeoutError:
            raise DeadlineExceeded(
                "the request's timeout passed before its scores were ready; it was dropped "
                "(retry later or with more time)",
                retry_after=self.batcher.retry_after(),
            ) from None
        if result.distilled:
            self._remember(served.version, result.distilled)

        index = {key: k for k, key in enumerate(distinct)}
        scores = []
        for item, key in zip(items, keys):
            cand = distinct[key]
            scores.append(
                Scored(item.item_id, float(result.probabilities[index[key]]), cold_user or cand.cold)
            )
        self.metrics.candidates.inc(len(scores))
        if cold_user:
            self.metrics.cold.labels(kind="user").inc(len(scores))
        self.metrics.cold.labels(kind="item").inc(sum(distinct[k].cold for k in keys))
        return Outcome(served.version, scores)

    async def _lookup(
        self,
        served: ServedVersion,
        user_id: str,
        items: Sequence[ItemInput],
        history: Sequence[ItemInput] | None,
        fold: str | None,
    ) -> Lookup:
        """One round trip: the user and their events, every item and history id, cached vectors
        of titled items, and the cached fold-in vector of a sent history (used if the user is cold)."""
        ids = list(dict.fromkeys([i.item_id for i in items] + [h.item_id for h in history or []]))
        titles = list(dict.fromkeys(i.title for i in items if i.title))
        start = time.perf_counter()
        try:
            return await self.store.lookup(served.version, user_id, ids, titles, fold)
        finally:
            self.metrics.store_seconds.labels(op="lookup").observe(time.perf_counter() - start)

    def _history(
        self, lookup: Lookup, history: Sequence[ItemInput] | None
    ) -> tuple[list[str], tuple[str, ...]]:
        """The ids and titles of the history the prompt uses: the sent one, else the stored one
        (the version's, then the recorded events), its last `history_length` entries."""
        if history is None:
            ids, titles = [], []
            if lookup.user is not None:
                ids, titles = list(lookup.user.history), list(lookup.user.history_titles)
            ids += [e.item_id for e in lookup.liked]
            titles += [e.title for e in lookup.liked]
            keep = self.spec.history_length
            return (ids[-keep:], tuple(titles[-keep:])) if keep > 0 else ([], ())
        titles, unknown = [], []
        for h in history:
            known = lookup.items.get(h.item_id)
            title = known.title if known is not None else h.title
            if title is None:
                unknown.append(h.item_id)
            else:
                titles.append(title)
        if unknown:
            raise UnknownItems(_unknown_message("history items", unknown), items=unknown)
        return [h.item_id for h in history], tuple(titles)

    async def _fold_in(
        self, served: ServedVersion, lookup: Lookup, history: list[str], looked_up: bool
    ) -> np.ndarray:
        """The collaborative vector of a user the MF never saw (see the module's decisions): folded
        in from their labelled events when those hold a negative, else from the known items of
        `history`, else the neutral vector; cached under the version by `fold_key`.
        `looked_up`: the first round trip already read `history`'s items and its cached vector."""
        labelled = [(e.item_id, e.label) for e in lookup.labelled]
        if not any(label == 0 for _, label in labelled):
            labelled = []  # no negative: nothing beyond the positives-only fold-in of the history
        if not history and not labelled:
            return served.neutral_user
        fold = fold_key(history, labelled)
        folded, items = lookup.folded, dict(lookup.items)
        if labelled or not looked_up:
            # The cached vector first; the items (up to `events_keep`) only when it is missing.
            folded = (await self._read(served, [], fold)).folded
            if folded is None:
                ids = dict.fromkeys([*history, *(i for i, _ in labelled)])
                items.update((await self._read(served, [i for i in ids if i not in items], None)).items)
        if folded is not None:
            self.metrics.fold_ins.labels(source="cache").inc()
            return folded
        prior = torch.from_numpy(np.array(served.neutral_user, dtype=np.float32))
        known = [(items[i].collab, label) for i, label in labelled if i in items]
        vectors = [items[i].collab for i in history if i in items]
        if any(label == 0 for _, label in known):
            vector = fold_in_labelled(
                torch.from_numpy(np.stack([v for v, _ in known])),
                torch.tensor([label for _, label in known]),
                prior,
            ).numpy()
        elif vectors:
            vector = fold_in(torch.from_numpy(np.stack(vectors)), prior).numpy()
        else:
            return served.neutral_user
        self.metrics.fold_ins.labels(source="computed").inc()
        self._in_background(
            lambda: self.store.cache_folded(served.version, fold, vector), "caching a fold-in vector"
        )
        return vector

    async def _read(self, served: ServedVersion, item_ids: list[str], fold: str | None) -> Lookup:
        """A fold-in round trip: items and/or a cached fold-in vector, no user."""
        if not item_ids and fold is None:
            return Lookup(None, {}, {})
        start = time.perf_counter()
        try:
            return await self.store.lookup(served.version, None, item_ids, [], fold)
        finally:
            self.metrics.store_seconds.labels(op="fold_in").observe(time.perf_counter() - start)

    def _candidates(
        self, served: ServedVersion, lookup: Lookup, items: Sequence[ItemInput]
    ) -> tuple[list[tuple[str, str]], dict[tuple[str, str], _Candidate]]:
        """Each item's key, and the distinct candidates by key (known: by id; cold: by title)."""
        keys: list[tuple[str, str]] = []
        distinct: dict[tuple[str, str], _Candidate] = {}
        unknown: list[str] = []
        for item in items:
            known = lookup.items.get(item.item_id)
            if known is not None:
                key = ("known", item.item_id)
                if key not in distinct:
                    distinct[key] = _Candidate(
                        item.item_id, known.title, known.collab, known.semantic, cold=False
                    )
            elif item.title is not None:
                key = ("cold", item.title)
                if key not in distinct:
                    cached = lookup.distilled.get(item.title)
                    distinct[key] = _Candidate(
                        item.item_id, item.title, served.neutral_item, cached, cold=True
                    )
            else:
                unknown.append(item.item_id)
                continue
            keys.append(key)
        if unknown:
            unknown = list(dict.fromkeys(unknown))
            raise UnknownItems(_unknown_message("items", unknown), items=unknown)
        return keys, distinct

    def _remember(self, version: str, vectors: dict[str, np.ndarray]) -> None:
        """Cache distilled vectors in the store without holding up the response."""
        self._in_background(
            lambda: self.store.cache_distilled(version, vectors), f"caching {len(vectors)} distilled vectors"
        )

    def _in_background(self, work: Callable[[], Awaitable[None]], what: str) -> None:
        """Run a cache write without holding up the response."""

        async def write() -> None:
            try:
                await work()
            except Exception as err:  # a failed cache write only costs a later recomputation
                log.warning("%s failed: %s", what, err)

        task = asyncio.get_running_loop().create_task(write())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

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
        if self._background:
            await asyncio.wait(set(self._background), timeout=timeout_s)


def _unknown_message(what: str, ids: list[str]) -> str:
    shown = ", ".join(repr(i) for i in ids[:20]) + (f" and {len(ids) - 20} more" if len(ids) > 20 else "")
    return (
        f'unknown {what} without a title: {shown}. Send them as {{"item_id", "title"}} to score '
        f"them cold, or load a store version that has them"
    )
