"""The embedding store: its async interface, the records it returns, and the in-process store.

Every read names a version: a request snapshots the active version once and does all
its lookups under it, so a version switch never mixes two versions inside one request.
`RedisStore` (service/redis_store.py) is the production store; `InMemoryStore` is the
embedded default, built from the artifact bundle the server loads.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from model.artifacts import Bundle
from service.versions import VersionMeta, meta_from_bundle


@dataclass(frozen=True)
class UserRecord:
    """A known user."""

    #: Collaborative (MF) vector [d_C], float32.
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
    #: Collaborative (MF) vector [d_C], float32.
    collab: np.ndarray
    #: Aligned semantic vector E_I^L [d_L], float32.
    semantic: np.ndarray


@dataclass
class Lookup:
    """Everything one request needs from the store, read in one round trip."""

    #: The user, or None for a cold user.
    user: UserRecord | None
    #: Known items among those asked for, by id.
    items: dict[str, ItemRecord]
    #: Cached distilled semantic vectors of cold items, by title.
    distilled: dict[str, np.ndarray]


def title_key(title: str) -> str:
    """Cache key of a cold item's distilled vector: it depends on the title only."""
    return hashlib.sha256(title.encode()).hexdigest()[:32]


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
        self, version: str, user_id: str, item_ids: Sequence[str], titles: Sequence[str]
    ) -> Lookup:
        """The user, the known items among `item_ids` and the cached vectors of `titles`."""

    @abstractmethod
    async def cache_distilled(self, version: str, vectors: dict[str, np.ndarray]) -> None:
        """Remember distilled semantic vectors of cold items (by title) under `version`."""

    async def close(self) -> None:  # noqa: B027 - optional hook, nothing to release by default
        """Release connections."""


def bundle_records(
    bundle: Bundle,
) -> tuple[VersionMeta, Iterator[tuple[str, UserRecord]], Iterator[tuple[str, ItemRecord]]]:
    """A bundle as store records: its version metadata, its users and its items."""
    meta = meta_from_bundle(bundle)
    cat, t = bundle.catalog, bundle.tensors
    titles = dict(zip(cat.items, cat.titles))

    def users() -> Iterator[tuple[str, UserRecord]]:
        vectors = t["mf.users"].float().numpy()
        for row, uid in enumerate(cat.users):
            history = tuple(i for i in cat.histories.get(uid, []) if i in titles)
            yield uid, UserRecord(vectors[row], history, tuple(titles[i] for i in history))

    def items() -> Iterator[tuple[str, ItemRecord]]:
        collab, semantic = t["mf.items"].float().numpy(), t["semantic.items"].float().numpy()
        for row, iid in enumerate(cat.items):
            yield iid, ItemRecord(titles[iid], collab[row], semantic[row])

    return meta, users(), items()


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


class InMemoryStore(Store):
    """The embedded store: versions held in process, the distilled cache bounded (LRU)."""

    kind = "memory"

    def __init__(self, max_distilled: int = 100_000) -> None:
        self._versions: dict[str, _Version] = {}
        self._active: str | None = None
        self._max_distilled = max_distilled

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
        self._versions[meta.version] = _Version(meta, dict(users), dict(items), OrderedDict())
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
        self, version: str, user_id: str, item_ids: Sequence[str], titles: Sequence[str]
    ) -> Lookup:
        held = self._versions[version]
        items = {i: held.items[i] for i in item_ids if i in held.items}
        distilled = {t: held.distilled[t] for t in titles if t in held.distilled}
        for t in distilled:
            held.distilled.move_to_end(t)
        return Lookup(held.users.get(user_id), items, distilled)

    async def cache_distilled(self, version: str, vectors: dict[str, np.ndarray]) -> None:
        held = self._versions.get(version)
        if held is None:
            return
        held.distilled.update(vectors)
        while len(held.distilled) > self._max_distilled:
            held.distilled.popitem(last=False)
