"""POST /events: interactions as they happen, folded into each user's stored history.

Decisions (also in docs/api.md):
- Positives go to a per-user overlay in the store, not into the active version: a like
  is a fact about the user, not about a trained model, so it must survive a version flip
  (a retrain loaded while events keep coming). The stored history a request sees is the
  served version's history followed by the overlay, and the prompt takes its last
  `history_length` entries.
- The overlay keeps the user's last `keep` positives ordered by event time (ties: arrival
  order), and an event id already kept is not added twice, so a retried batch is harmless.
  Events without an id are never deduplicated.
- Every event, of either label, also goes to the same overlay's labelled list: the user's
  last `keep` (item, label) events, in the same order and with the same deduplication. The
  history lists liked items only (negatives never reach the prompt); the labelled list is
  what a user the MF never saw is folded in from (model.collab.fold_in_labelled, see
  service/engine/resolve.py). Both lists are written by one atomic store call per user.
- Positives' items must be known to the served version or carry a title (else 422
  `unknown_items`, nothing written); the title is kept with the event so that reading the
  history needs no item lookup. Negatives need neither: a negative on an item the served
  version does not know is kept, and fold-in skips it until a version knows the item.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass

from sellarec.service.engine.engine import Engine
from sellarec.service.errors import StoreUnavailable, TooLarge, UnknownItems
from sellarec.service.store.base import LabelledEvent, LikedItem


@dataclass(frozen=True)
class EventInput:
    """One interaction, as the recorder sees it."""

    #: External user id.
    user_id: str
    #: External item id.
    item_id: str
    #: 1: liked (extends the history); 0: not liked. Both are kept for fold-in.
    label: int
    #: When it happened, Unix seconds (None: when it was received).
    timestamp: float | None = None
    #: The caller's id of the event, for deduplication (None: never deduplicated).
    event_id: str | None = None
    #: Title, for an item the store does not know.
    title: str | None = None


@dataclass(frozen=True)
class EventOutcome:
    """What a batch of events did."""

    #: Positives added to users' histories.
    recorded: int
    #: Positives whose event id was already recorded.
    duplicates: int
    #: Negatives received (kept in the labelled list, not in the history).
    negatives: int


class EventRecorder:
    """Writes events into the store's per-user overlays (positives checked against the served
    version): positives to the history, every event to the labelled list."""

    def __init__(self, engine: Engine, keep: int = 100, max_events: int = 1000) -> None:
        self.engine = engine
        self.keep = keep
        self.max_events = max_events

    async def record(self, events: Sequence[EventInput]) -> EventOutcome:
        if len(events) > self.max_events:
            raise TooLarge(f"{len(events)} events; at most {self.max_events} per request (max_events)")
        received = time.time()
        positives = [e for e in events if e.label == 1]
        negatives = len(events) - len(positives)
        titles = await self._titles(positives)
        liked: dict[str, list[LikedItem]] = {}
        labelled: dict[str, list[LabelledEvent]] = {}
        for e in events:
            when, event_id = received if e.timestamp is None else float(e.timestamp), e.event_id or ""
            labelled.setdefault(e.user_id, []).append(LabelledEvent(e.item_id, e.label, when, event_id))
            if e.label == 1:
                title = titles[e.item_id] if e.item_id in titles else str(e.title)
                liked.setdefault(e.user_id, []).append(LikedItem(e.item_id, title, when, event_id))
        store, metrics = self.engine.store, self.engine.metrics
        start = time.perf_counter()
        try:
            writes = (
                store.add_events(user, liked.get(user, []), batch, self.keep)
                for user, batch in labelled.items()
            )
            added = await asyncio.gather(*writes)
        finally:
            metrics.store_seconds.labels(op="events").observe(time.perf_counter() - start)
        recorded = sum(liked_added for liked_added, _ in added)
        metrics.events.labels(outcome="recorded").inc(recorded)
        metrics.events.labels(outcome="duplicate").inc(len(positives) - recorded)
        metrics.events.labels(outcome="negative").inc(negatives)
        return EventOutcome(recorded, len(positives) - recorded, negatives)

    async def _titles(self, positives: Sequence[EventInput]) -> dict[str, str]:
        """Stored titles of the known items among `positives`; 422 for unknown ones without a title."""
        if not positives:
            return {}
        served = self.engine.tracker.current
        if served is None:
            raise StoreUnavailable(f"no store version to serve: {self.engine.tracker.problem}")
        ids = list(dict.fromkeys(e.item_id for e in positives))
        lookup = await self.engine.store.lookup(served.version, None, ids, [])
        unknown = [e.item_id for e in positives if e.item_id not in lookup.items and not e.title]
        unknown = list(dict.fromkeys(unknown))
        if unknown:
            shown = ", ".join(repr(i) for i in unknown[:20])
            raise UnknownItems(
                f"events for unknown items without a title: {shown}. Send a title with them, "
                f"or load a store version that has them; nothing was recorded",
                items=unknown,
            )
        return {i: record.title for i, record in lookup.items.items()}
