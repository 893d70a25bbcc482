"""The embedding store: its async interface, the records it returns, and the in-process store.

Every read names a version: a request snapshots the active version once and does all
its lookups under it, so a version switch never mixes two versions inside one request.
`RedisStore` (service/store/redis_store.py) is the production store; `InMemoryStore` is the
embedded default, built from the artifact bundle the server loads.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

import numpy as np
import torch

from sellarec.model import collab
from sellarec.model.artifacts import Bundle
from sellarec.service.store.versions import VersionMeta, meta_from_bundle


@dataclass(frozen=True)
class UserRecord:
    """A known user."""

    #: Collaborative (MF) vector [d_C], float32 (empty: the model has no collaborative side).
    collab: np.ndarray
    #: Recent liked item ids, oldest first.
    history: tuple[str, ...]
    #: Titles of `history` (stored with the user so the prompt needs no second lookup).
    history_titles: tuple[str, ...]


@dataclass(frozen=True)
class ItemRecord:
    """A known item."""

    #: Item title as the catalog has it.
    title: str
    #: Collaborative (MF) vector [d_C], float32 (empty: the model has no collaborative side).
    collab: np.ndarray
    #: Aligned semantic vector E_I^L [d_L], float32 (empty: the model has no <Warm_ID>).
    semantic: np.ndarray


@dataclass(frozen=True)
class LikedItem:
    """A positive event kept in a user's history overlay (POST /events)."""

    #: External item id.
    item_id: str
    #: Its title when the event was recorded (the prompt needs no item lookup).
    title: str
    #: When it happened (Unix seconds); the overlay is ordered by it, ties in arrival order.
    timestamp: float
    #: The caller's event id ("" when none was sent: such events are never deduplicated).
    event_id: str = ""


@dataclass(frozen=True)
class LabelledEvent:
    """An event of either label kept in a user's overlay (POST /events), for labelled fold-in."""

    #: External item id.
    item_id: str
    #: 1: liked; 0: not liked.
    label: int
    #: When it happened (Unix seconds); the overlay is ordered by it, ties in arrival order.
    timestamp: float
    #: The caller's event id ("" when none was sent: such events are never deduplicated).
    event_id: str = ""


class _Timed(Protocol):
    @property
    def timestamp(self) -> float: ...

    @property
    def event_id(self) -> str: ...


E = TypeVar("E", bound=_Timed)


@dataclass
class Lookup:
    """Everything one request needs from the store, read in one round trip."""

    #: The user's MF record, or None for a user the MF never saw.
    user: UserRecord | None
    #: Known items among those asked for, by id.
    items: dict[str, ItemRecord]
    #: Cached distilled semantic vectors of cold items, by title.
    distilled: dict[str, np.ndarray]
    #: Positives recorded by POST /events for this user, oldest first (any version).
    liked: tuple[LikedItem, ...] = ()
    #: The user's last labelled events of either label from POST /events, oldest first.
    labelled: tuple[LabelledEvent, ...] = ()
    #: The cached fold-in vector asked for with `fold_key` (None: not cached or not asked).
    folded: np.ndarray | None = None


def title_key(title: str) -> str:
    """Cache key of a cold item's distilled vector: it depends on the title only."""
    return hashlib.sha256(title.encode()).hexdigest()[:32]


def fold_key(history: Sequence[str], labelled: Sequence[tuple[str, int]] = ()) -> str:
    """Cache key of a fold-in vector (kept under the version): it covers every input of the fold-in,
    the history's item ids, the labelled (item id, label) pairs and the fold-in's settings, so it
    changes whenever a new event changes what the fold-in sees. Without labelled pairs it is the
    key of the positives-only fold-in of `history`."""
    settings = [collab.FOLD_IN_REG, collab.FOLD_IN_TARGET]
    if labelled:
        settings += [collab.FOLD_IN_LABELLED_REG, collab.FOLD_IN_STEPS]
    inputs = [list(history), [[i, int(y)] for i, y in labelled], settings]
    return hashlib.sha256(json.dumps(inputs).encode()).hexdigest()[:32]


def merge_events(kept: Sequence[E], new: Sequence[E], keep: int) -> tuple[list[E], int]:
    """`kept` plus the `new` events not seen before (by event id), ordered by timestamp (ties:
    arrival order), the oldest dropped beyond `keep`; and how many were new. Used for both lists
    of the overlay (positives, labelled events); the Redis store runs the same merge in a Lua
    script (redis_store.MERGE_EVENTS)."""
    out, added = list(kept), 0
    for event in new:
        if event.event_id and any(old.event_id == event.event_id for old in out):
            continue
        pos = len(out)
        while pos > 0 and out[pos - 1].timestamp > event.timestamp:
            pos -= 1
        out.insert(pos, event)
        added += 1
    return out[-keep:] if keep > 0 else [], added


class Store(ABC):
    """Async access to users, items and version metadata, always under a named version."""

    #: "memory" or "redis", for logs and /readyz.
    kind: str = "store"

    @abstractmethod
    async def ping(self) -> None:
        """Raise StoreUnavailable if the store cannot be reached."""

    @abstractmethod
    async def active_version(self) -> str | None:
        """The version the active-version pointer names (None: nothing loaded yet)."""

    @abstractmethod
    async def version_meta(self, version: str) -> VersionMeta | None:
        """The metadata of a version (None: no such complete version)."""

    @abstractmethod
    async def lookup(
        self,
        version: str,
        user_id: str | None,
        item_ids: Sequence[str],
        titles: Sequence[str],
        fold: str | None = None,
    ) -> Lookup:
        """The user and their recorded positives (none if `user_id` is None), the known items
        among `item_ids`, the cached vectors of `titles` and the cached fold-in vector `fold`."""

    @abstractmethod
    async def cache_distilled(self, version: str, vectors: dict[str, np.ndarray]) -> None:
        """Remember distilled semantic vectors of cold items (by title) under `version`."""

    @abstractmethod
    async def cache_folded(self, version: str, fold: str, vector: np.ndarray) -> None:
        """Remember a fold-in vector under `version` by its `fold_key`."""

    @abstractmethod
    async def add_events(
        self, user_id: str, liked: Sequence[LikedItem], labelled: Sequence[LabelledEvent], keep: int
    ) -> tuple[int, int]:
        """Merge positives and labelled events into the user's overlay, atomically (see
        `merge_events`; each list keeps its last `keep`); returns how many of each were new."""

    async def close(self) -> None:  # noqa: B027 - optional hook, nothing to release by default
        """Release connections."""


def bundle_records(
    bundle: Bundle,
) -> tuple[VersionMeta, Iterator[tuple[str, UserRecord]], Iterator[tuple[str, ItemRecord]]]:
    """A bundle as store records: its version metadata, its users and its items.

    Any LLM variant: a side its prompt does not use (no MF tables for TALLRec, no semantic
    table for CoLLM) is stored as empty vectors, never read. An MF bundle is refused
    (ArtifactError: no LLM to serve).
    """
    meta = meta_from_bundle(bundle)
    cat, tables = bundle.catalog, bundle.tables()
    titles = dict(zip(cat.items, cat.titles))

    def users() -> Iterator[tuple[str, UserRecord]]:
        vectors = _rows(tables.users, len(cat.users))
        for row, uid in enumerate(cat.users):
            history = tuple(i for i in cat.histories.get(uid, []) if i in titles)
            yield uid, UserRecord(vectors[row], history, tuple(titles[i] for i in history))

    def items() -> Iterator[tuple[str, ItemRecord]]:
        collab, semantic = _rows(tables.items, len(cat.items)), _rows(tables.semantic, len(cat.items))
        for row, iid in enumerate(cat.items):
            yield iid, ItemRecord(titles[iid], collab[row], semantic[row])

    return meta, users(), items()


def _rows(table: torch.Tensor | None, n: int) -> np.ndarray:
    """A table as float32 rows; [n, 0] for a table the variant does not have."""
    return np.zeros((n, 0), np.float32) if table is None else table.float().numpy()


@dataclass
class _Version:
    """One version held in process."""

    #: Its metadata.
    meta: VersionMeta
    #: Users by id.
    users: dict[str, UserRecord]
    #: Items by id.
    items: dict[str, ItemRecord]
    #: Distilled cold-item vectors by title, least recently used first.
    distilled: OrderedDict[str, np.ndarray]
    #: Fold-in vectors by fold key, least recently used first.
    folded: OrderedDict[str, np.ndarray]


class InMemoryStore(Store):
    """The embedded store: versions held in process, the distilled cache bounded (LRU)."""

    kind = "memory"

    def __init__(self, max_distilled: int = 100_000) -> None:
        self._versions: dict[str, _Version] = {}
        self._active: str | None = None
        self._max_distilled = max_distilled
        #: POST /events positives and labelled events by user: an overlay over every version.
        self._liked: dict[str, list[LikedItem]] = {}
        self._labelled: dict[str, list[LabelledEvent]] = {}

    @classmethod
    def from_bundle(cls, bundle: Bundle) -> InMemoryStore:
        store = cls()
        store.add(*bundle_records(bundle))
        return store

    def add(
        self,
        meta: VersionMeta,
        users: Iterator[tuple[str, UserRecord]],
        items: Iterator[tuple[str, ItemRecord]],
        activate: bool = True,
    ) -> str:
        self._versions[meta.version] = _Version(meta, dict(users), dict(items), OrderedDict(), OrderedDict())
        if activate:
            self._active = meta.version
        return meta.version

    async def ping(self) -> None:
        return None

    async def active_version(self) -> str | None:
        return self._active

    async def version_meta(self, version: str) -> VersionMeta | None:
        held = self._versions.get(version)
        return held.meta if held else None

    async def lookup(
        self,
        version: str,
        user_id: str | None,
        item_ids: Sequence[str],
        titles: Sequence[str],
        fold: str | None = None,
    ) -> Lookup:
        held = self._versions[version]
        items = {i: held.items[i] for i in item_ids if i in held.items}
        distilled = {t: held.distilled[t] for t in titles if t in held.distilled}
        for t in distilled:
            held.distilled.move_to_end(t)
        folded = held.folded.get(fold) if fold is not None else None
        if folded is not None:
            held.folded.move_to_end(fold)
        if user_id is None:
            return Lookup(None, items, distilled, folded=folded)
        liked = tuple(self._liked.get(user_id, ()))
        labelled = tuple(self._labelled.get(user_id, ()))
        return Lookup(held.users.get(user_id), items, distilled, liked, labelled, folded)

    async def cache_distilled(self, version: str, vectors: dict[str, np.ndarray]) -> None:
        held = self._versions.get(version)
        if held is None:
            return
        held.distilled.update(vectors)
        while len(held.distilled) > self._max_distilled:
            held.distilled.popitem(last=False)

    async def cache_folded(self, version: str, fold: str, vector: np.ndarray) -> None:
        held = self._versions.get(version)
        if held is None:
            return
        held.folded[fold] = vector
        while len(held.folded) > self._max_distilled:
            held.folded.popitem(last=False)

    async def add_events(
        self, user_id: str, liked: Sequence[LikedItem], labelled: Sequence[LabelledEvent], keep: int
    ) -> tuple[int, int]:
        self._liked[user_id], added_liked = merge_events(self._liked.get(user_id, ()), liked, keep)
        self._labelled[user_id], added = merge_events(self._labelled.get(user_id, ()), labelled, keep)
        return added_liked, added
