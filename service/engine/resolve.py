"""Request resolution: from a validated request and a store version to the model's `Job`.

One request resolves in this order: the history the prompt uses, one pipelined store
lookup, the user's collaborative vector (stored, folded in, or neutral), the distinct
candidates (known or cold), and the tokenised prefix and suffixes. Nothing here touches
the model; `jobs.run_jobs` does, on the model thread.

Decisions (also in docs/api.md):
- Every lookup and the projections a request uses come from the one store version the
  engine snapshotted for it.
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

from sellarec.model.collab import Projections, fold_in, fold_in_labelled
from sellarec.model.encoding import PromptEncoder
from sellarec.model.prompts import TemplateSpec, distillation_prompt, item_prompt, user_prompt
from sellarec.service.engine.jobs import Job
from sellarec.service.engine.tracker import ServedVersion
from sellarec.service.errors import PromptTooLong, UnknownItems
from sellarec.service.metrics import Metrics
from sellarec.service.store.base import Lookup, Store, fold_key

log = logging.getLogger(__name__)

#: A distinct candidate's identity: ("known", item id) or ("cold", title).
CandidateKey = tuple[str, str]


@dataclass(frozen=True)
class ItemInput:
    """A requested item, as the engine sees it."""

    #: External item id.
    item_id: str
    #: Title sent with it (used only if the store does not know the item).
    title: str | None = None


@dataclass
class Candidate:
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


@dataclass(frozen=True)
class Resolved:
    """A request resolved against one version: the model's job and how its results map back."""

    #: Store version id the request snapshotted.
    version: str
    #: The model work: one prefix, one suffix per distinct candidate.
    job: Job
    #: Per requested item, in input order: its candidate's row in the job (duplicates share one).
    rows: list[int]
    #: Per requested item, in input order: the store did not know the item.
    cold_items: list[bool]
    #: The user has no MF row in the version.
    cold_user: bool


class CacheWrites:
    """Store cache writes that run beside the response: a failed one only costs a later recomputation."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self, work: Callable[[], Awaitable[None]], what: str) -> None:
        """Run `work` in the background; a failure is logged, never raised."""

        async def write() -> None:
            try:
                await work()
            except Exception as err:  # a failed cache write only costs a later recomputation
                log.warning("%s failed: %s", what, err)

        task = asyncio.get_running_loop().create_task(write())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def flush(self, timeout_s: float) -> None:
        """Wait (a bounded time) for the writes in flight."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout_s)


class Resolver:
    """Resolves requests into jobs: store lookups, cold start and prompt encoding."""

    def __init__(
        self,
        spec: TemplateSpec,
        encoder: PromptEncoder,
        store: Store,
        metrics: Metrics,
        max_positions: int,
        writes: CacheWrites,
    ) -> None:
        self.spec = spec
        self.encoder = encoder
        self.store = store
        self.metrics = metrics
        #: Token positions the backend takes per prompt (prefix + one suffix).
        self.max_positions = max_positions
        self.writes = writes

    async def resolve(
        self,
        served: ServedVersion,
        user_id: str,
        items: Sequence[ItemInput],
        history: Sequence[ItemInput] | None,
    ) -> Resolved:
        """The job of one request against `served` (raises UnknownItems, PromptTooLong, store errors)."""
        recent = last_entries(history, self.spec.history_length)
        lookup = await self._lookup(served, user_id, items, recent)
        history_ids, history_titles = prompt_history(lookup, recent, self.spec.history_length)
        if lookup.user is not None:
            user_collab = lookup.user.collab
        else:
            user_collab = await self._fold_in(served, lookup, history_ids, looked_up=recent is not None)
        keys, distinct = candidates(served, lookup, items)
        job = self._encode(history_titles, user_collab, list(distinct.values()), served.projections)
        row = {key: k for k, key in enumerate(distinct)}
        return Resolved(
            version=served.version,
            job=job,
            rows=[row[key] for key in keys],
            cold_items=[distinct[key].cold for key in keys],
            cold_user=lookup.user is None,
        )

    async def _lookup(
        self,
        served: ServedVersion,
        user_id: str,
        items: Sequence[ItemInput],
        history: Sequence[ItemInput] | None,
    ) -> Lookup:
        """One round trip: the user and their events, every item and history id, cached vectors
        of titled items, and the cached fold-in vector of a sent history (used if the user is cold)."""
        fold = fold_key([h.item_id for h in history]) if history else None
        ids = list(dict.fromkeys([i.item_id for i in items] + [h.item_id for h in history or []]))
        titles = list(dict.fromkeys(i.title for i in items if i.title))
        start = time.perf_counter()
        try:
            return await self.store.lookup(served.version, user_id, ids, titles, fold)
        finally:
            self.metrics.store_seconds.labels(op="lookup").observe(time.perf_counter() - start)

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
        self.writes.start(
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

    def _encode(
        self,
        history_titles: tuple[str, ...],
        user_collab: np.ndarray,
        cands: list[Candidate],
        projections: Projections,
    ) -> Job:
        """Tokenise the prefix, one suffix per candidate and the distillation prompt of each
        title without a semantic vector; refuse a prompt longer than the model takes."""
        prefix = self.encoder.segments(user_prompt(self.spec, history_titles), lead=True)
        suffixes = [self.encoder.segments(item_prompt(self.spec, c.title)) for c in cands]
        for cand, suffix in zip(cands, suffixes):
            if len(prefix) + len(suffix) > self.max_positions:
                raise PromptTooLong(
                    f"the prompt for item {cand.item_id!r} has {len(prefix) + len(suffix)} tokens; "
                    f"the model takes {self.max_positions} (shorten titles or history)",
                    items=[cand.item_id],
                )
        distill = {
            c.title: self.encoder.prompt(distillation_prompt(self.spec, c.title))
            for c in cands
            if c.semantic is None and projections.uses_semantic  # only <Warm_ID> prompts distil
        }
        return Job(
            prefix=prefix,
            suffixes=suffixes,
            user_collab=user_collab,
            item_collab=np.stack([c.collab for c in cands]),
            item_semantic=[c.semantic for c in cands],
            titles=[c.title for c in cands],
            distill=distill,
            projections=projections,
        )


def last_entries(history: Sequence[ItemInput] | None, keep: int) -> list[ItemInput] | None:
    """The part of a sent history the prompt keeps (its last `keep`); None when none was sent."""
    if history is None:
        return None
    return list(history[-keep:]) if keep > 0 else []


def prompt_history(
    lookup: Lookup, history: Sequence[ItemInput] | None, keep: int
) -> tuple[list[str], tuple[str, ...]]:
    """The ids and titles of the history the prompt uses: the sent one, else the stored one
    (the version's, then the recorded events), its last `keep` entries."""
    if history is None:
        ids, titles = [], []
        if lookup.user is not None:
            ids, titles = list(lookup.user.history), list(lookup.user.history_titles)
        ids += [e.item_id for e in lookup.liked]
        titles += [e.title for e in lookup.liked]
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
        raise UnknownItems(unknown_message("history items", unknown), items=unknown)
    return [h.item_id for h in history], tuple(titles)


def candidates(
    served: ServedVersion, lookup: Lookup, items: Sequence[ItemInput]
) -> tuple[list[CandidateKey], dict[CandidateKey, Candidate]]:
    """Each item's key, and the distinct candidates by key (known: by id; cold: by title)."""
    keys: list[CandidateKey] = []
    distinct: dict[CandidateKey, Candidate] = {}
    unknown: list[str] = []
    for item in items:
        known = lookup.items.get(item.item_id)
        if known is not None:
            key = ("known", item.item_id)
            if key not in distinct:
                distinct[key] = Candidate(item.item_id, known.title, known.collab, known.semantic, cold=False)
        elif item.title is not None:
            key = ("cold", item.title)
            if key not in distinct:
                cached = lookup.distilled.get(item.title)
                distinct[key] = Candidate(item.item_id, item.title, served.neutral_item, cached, cold=True)
        else:
            unknown.append(item.item_id)
            continue
        keys.append(key)
    if unknown:
        unknown = list(dict.fromkeys(unknown))
        raise UnknownItems(unknown_message("items", unknown), items=unknown)
    return keys, distinct


def unknown_message(what: str, ids: list[str]) -> str:
    """The 422 message naming unknown ids (the first 20) and the two ways to score them."""
    shown = ", ".join(repr(i) for i in ids[:20]) + (f" and {len(ids) - 20} more" if len(ids) > 20 else "")
    return (
        f'unknown {what} without a title: {shown}. Send them as {{"item_id", "title"}} to score '
        f"them cold, or load a store version that has them"
    )
