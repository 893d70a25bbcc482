"""The Redis store: key layout and the read path the server uses.

    {p}:active                      the active version (one SET flips it)
    {p}:versions                    hash: version -> JSON summary (what `sellarec-store list` shows)
    {p}:v:{version}:meta            hash: meta JSON, neutral vectors, projection weights
    {p}:v:{version}:u:{user_id}     hash: collab (float32 LE bytes), history, history_titles (JSON)
    {p}:v:{version}:i:{item_id}     hash: title (UTF-8), collab, semantic (float32 LE bytes)
    {p}:v:{version}:d:{title_key}   string: distilled semantic vector of a cold item (with a TTL)

A version's meta hash exists only once the load has been verified; the server never
reads a version without it. Every lookup is one pipelined round trip.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import numpy as np
import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from service.errors import StoreUnavailable
from service.store import ItemRecord, Lookup, Store, UserRecord, title_key
from service.versions import VersionMeta

T = TypeVar("T")

log = logging.getLogger(__name__)

#: Hash fields of a user and of an item, in HMGET order.
USER_FIELDS = ("collab", "history", "history_titles")
ITEM_FIELDS = ("title", "collab", "semantic")
#: Transient failures worth one more try (a dropped connection is re-opened by the pool).
TRANSIENT = (RedisConnectionError, RedisTimeoutError, ConnectionError, OSError)


class Keys:
    """Key names under one prefix."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.active = f"{prefix}:active"
        self.versions = f"{prefix}:versions"

    def namespace(self, version: str) -> str:
        return f"{self.prefix}:v:{version}"

    def meta(self, version: str) -> str:
        return f"{self.namespace(version)}:meta"

    def user(self, version: str, user_id: str) -> str:
        return f"{self.namespace(version)}:u:{user_id}"

    def item(self, version: str, item_id: str) -> str:
        return f"{self.namespace(version)}:i:{item_id}"

    def distilled(self, version: str, title: str) -> str:
        return f"{self.namespace(version)}:d:{title_key(title)}"


def vector(raw: bytes) -> np.ndarray:
    """Raw little-endian float32 bytes -> a read-only [d] array (no copy)."""
    return np.frombuffer(raw, dtype="<f4")


def connect(url: str, timeout_s: float = 1.0) -> redis.Redis:
    """A client for `url` (redis://, rediss://, with credentials); redis-py's own retries are off
    so that tenacity decides, and a dead server fails within about `timeout_s`."""
    return redis.from_url(
        url,
        socket_connect_timeout=timeout_s,
        socket_timeout=timeout_s,
        retry=Retry(NoBackoff(), 0),
        decode_responses=False,
    )


def retrying(attempts: int = 2) -> AsyncRetrying:
    """Retry policy for idempotent reads: one quick retry on a transient failure."""
    return AsyncRetrying(
        retry=retry_if_exception_type(TRANSIENT),
        stop=stop_after_attempt(attempts),
        wait=wait_exponential(multiplier=0.05, max=0.5),
        reraise=True,
    )


class RedisStore(Store):
    """The server's read path (and the cold-item cache writes) over redis.asyncio."""

    kind = "redis"

    def __init__(
        self, client: redis.Redis, prefix: str = "sellarec", distilled_ttl_s: int = 7 * 86400
    ) -> None:
        self.client = client
        self.keys = Keys(prefix)
        self.distilled_ttl_s = distilled_ttl_s

    @classmethod
    def from_url(cls, url: str, prefix: str = "sellarec", timeout_s: float = 1.0, **kw: int) -> RedisStore:
        return cls(connect(url, timeout_s), prefix, **kw)

    async def _call(self, what: str, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run `fn(*args)` with the retry policy; a store that stays down is StoreUnavailable."""
        try:
            async for attempt in retrying():
                with attempt:
                    return await fn(*args)
        except (RedisError, *TRANSIENT) as err:
            # The address and the socket error go to the log; the client learns which
            # dependency failed, not where it lives.
            log.warning("Redis %s failed: %s: %s", what, type(err).__name__, err)
            raise StoreUnavailable(f"the store (Redis) is unavailable ({what} failed)") from err
        raise AssertionError("unreachable")  # pragma: no cover - AsyncRetrying re-raises

    async def ping(self) -> None:
        await self._call("ping", self.client.ping)

    async def active_version(self) -> str | None:
        raw = await self._call("active version", self.client.get, self.keys.active)
        return raw.decode() if raw else None

    async def version_meta(self, version: str) -> VersionMeta | None:
        raw = await self._call("version meta", self.client.hgetall, self.keys.meta(version))
        if not raw:
            return None
        return VersionMeta.from_fields({k.decode(): v for k, v in raw.items()})

    async def lookup(
        self, version: str, user_id: str, item_ids: Sequence[str], titles: Sequence[str]
    ) -> Lookup:
        return await self._call("lookup", self._lookup, version, user_id, list(item_ids), list(titles))

    async def _lookup(self, version: str, user_id: str, item_ids: list[str], titles: list[str]) -> Lookup:
        pipe = self.client.pipeline(transaction=False)
        pipe.exists(self.keys.meta(version))
        pipe.hmget(self.keys.user(version, user_id), USER_FIELDS)
        for item_id in item_ids:
            pipe.hmget(self.keys.item(version, item_id), ITEM_FIELDS)
        for title in titles:
            pipe.get(self.keys.distilled(version, title))
        complete, *replies = await pipe.execute()
        if not complete:
            # The version vanished under the server (a Redis restarted empty, being reloaded):
            # its items are not unknown, the store is incomplete.
            log.warning("store version %s has no meta key (Redis lost it?)", version)
            raise StoreUnavailable(
                f"the store (Redis) does not hold version {version} completely (reloading?)"
            )
        collab, history, history_titles = replies[0]
        user = None
        if collab is not None:
            user = UserRecord(
                vector(collab),
                tuple(json.loads(history or b"[]")),
                tuple(json.loads(history_titles or b"[]")),
            )
        items = {}
        for item_id, (title, item_collab, semantic) in zip(item_ids, replies[1 : 1 + len(item_ids)]):
            if item_collab is not None:
                items[item_id] = ItemRecord(title.decode(), vector(item_collab), vector(semantic))
        distilled = {
            t: vector(raw) for t, raw in zip(titles, replies[1 + len(item_ids) :]) if raw is not None
        }
        return Lookup(user, items, distilled)

    async def cache_distilled(self, version: str, vectors: dict[str, np.ndarray]) -> None:
        if vectors:
            await self._call("cache distilled", self._cache_distilled, version, vectors)

    async def _cache_distilled(self, version: str, vectors: dict[str, np.ndarray]) -> None:
        pipe = self.client.pipeline(transaction=False)
        for title, vec in vectors.items():
            pipe.set(
                self.keys.distilled(version, title), vec.astype("<f4").tobytes(), ex=self.distilled_ttl_s
            )
        await pipe.execute()

    async def close(self) -> None:
        await self.client.aclose()
