"""The Redis store: key layout and the read path the server uses.

    {p}:active                      the active version (one SET flips it)
    {p}:versions                    hash: version -> JSON summary (what `sellarec-store list` shows)
    {p}:v:{version}:meta            hash: meta JSON, neutral vectors, projection weights
    {p}:v:{version}:u:{user_id}     hash: collab (float32 LE bytes), history, history_titles (JSON)
    {p}:v:{version}:i:{item_id}     hash: title (UTF-8), collab, semantic (float32 LE bytes)
    {p}:v:{version}:d:{title_key}   string: distilled semantic vector of a cold item (with a TTL)
    {p}:v:{version}:f:{fold_key}    string: fold-in vector of a history, for users the MF never saw (TTL)
    {p}:e:{user_id}                 string: the user's POST /events overlay (JSON), over every version:
                                    {"liked": [[event_id, ts, item_id, title], ...],
                                     "labelled": [[event_id, ts, item_id, label], ...]}

A version's meta hash exists only once the load has been verified; the server never
reads a version without it. Every lookup is one pipelined round trip (in a Redis Cluster,
redis-py splits it by node and runs the parts concurrently).

Redis Cluster: no operation needs two keys at once (the event merge is a script on the
one overlay key; loads, drops and lookups are many single-key commands), so no key carries
a hash tag, and a version's users and items spread over every master. A prefix with braces
in it would pin every key to one slot: keep prefixes free of `{` and `}`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import numpy as np
import redis.asyncio as redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from sellarec.service.errors import StoreUnavailable
from sellarec.service.store.base import (
    ItemRecord,
    LabelledEvent,
    LikedItem,
    Lookup,
    Store,
    UserRecord,
    title_key,
)
from sellarec.service.store.versions import VersionMeta

T = TypeVar("T")

log = logging.getLogger(__name__)

#: Hash fields of a user and of an item, in HMGET order.
USER_FIELDS = ("collab", "history", "history_titles")
ITEM_FIELDS = ("title", "collab", "semantic")
#: Transient failures worth one more try (a dropped connection is re-opened by the pool).
TRANSIENT = (RedisConnectionError, RedisTimeoutError, ConnectionError, OSError)
#: Everything that means "the store failed" (a cluster that cannot be reached, or whose slots
#: are not covered, raises RedisClusterException, which is not a RedisError).
STORE_ERRORS = (RedisError, RedisClusterException, *TRANSIENT)
#: URL schemes that name a Redis Cluster (any node of it), and the plain scheme each stands for.
CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}
#: A client of one Redis server or of a Redis Cluster: the store uses what both share.
Client = redis.Redis | RedisCluster

#: `merge_events` (service/store/base.py) on both lists of the overlay, as one atomic script on the
#: overlay key (see the key layout above; an overlay written as a bare JSON array, as the
#: first events code did, is read as the positives). ARGV[1] = entries to keep per list,
#: ARGV[2] = how many positives follow, then the new positives and the new labelled events,
#: each in arrival order. Returns {positives added, labelled events added} (not repeated ids).
#: cjson writes an empty list as {}: readers take a missing or empty list as [].
MERGE_EVENTS = """
local function merge(kept, first, last)
  local added = 0
  for k = first, last do
    local event = cjson.decode(ARGV[k])
    local seen = false
    if event[1] ~= '' then
      for _, old in ipairs(kept) do
        if old[1] == event[1] then seen = true break end
      end
    end
    if not seen then
      local pos = #kept + 1
      while pos > 1 and kept[pos - 1][2] > event[2] do pos = pos - 1 end
      table.insert(kept, pos, event)
      added = added + 1
    end
  end
  while #kept > tonumber(ARGV[1]) do table.remove(kept, 1) end
  return added
end
local raw = redis.call('GET', KEYS[1])
local liked, labelled = {}, {}
if raw then
  local stored = cjson.decode(raw)
  if string.sub(raw, 1, 1) == '[' then
    liked = stored
  else
    if type(stored.liked) == 'table' then liked = stored.liked end
    if type(stored.labelled) == 'table' then labelled = stored.labelled end
  end
end
local n_liked = tonumber(ARGV[2])
local added_liked = merge(liked, 3, 2 + n_liked)
local added_labelled = merge(labelled, 3 + n_liked, #ARGV)
if added_liked + added_labelled > 0 then
  redis.call('SET', KEYS[1], cjson.encode({liked = liked, labelled = labelled}))
end
return {added_liked, added_labelled}
"""


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

    def folded(self, version: str, fold: str) -> str:
        return f"{self.namespace(version)}:f:{fold}"

    def events(self, user_id: str) -> str:
        return f"{self.prefix}:e:{user_id}"


def vector(raw: bytes) -> np.ndarray:
    """Raw little-endian float32 bytes -> a read-only [d] array (no copy)."""
    return np.frombuffer(raw, dtype="<f4")


def overlay(raw: bytes | None) -> tuple[tuple[LikedItem, ...], tuple[LabelledEvent, ...]]:
    """A stored POST /events overlay -> (positives, labelled events), oldest first."""
    stored = json.loads(raw) if raw else {}
    if isinstance(stored, list):  # the first layout: positives only
        stored = {"liked": stored}
    liked = tuple(
        LikedItem(item_id, title, float(ts), event_id)
        for event_id, ts, item_id, title in stored.get("liked") or []
    )
    labelled = tuple(
        LabelledEvent(item_id, int(label), float(ts), event_id)
        for event_id, ts, item_id, label in stored.get("labelled") or []
    )
    return liked, labelled


def connect(url: str, timeout_s: float = 1.0, cluster: bool = False) -> Client:
    """A client for `url` (redis://, rediss://, with credentials); redis-py's own retries are off
    so that tenacity decides, and a dead server fails within about `timeout_s`.

    A Redis Cluster is named by a redis+cluster:// (rediss+cluster://) URL of any of its nodes,
    or by `cluster=True`: the client then learns the slot map and sends each key to its master.
    """
    scheme, sep, rest = url.partition("://")
    if scheme.lower() in CLUSTER_SCHEMES:
        url, cluster = f"{CLUSTER_SCHEMES[scheme.lower()]}{sep}{rest}", True
    options: dict[str, Any] = {
        "socket_connect_timeout": timeout_s,
        "socket_timeout": timeout_s,
        "retry": Retry(NoBackoff(), 0),
        "decode_responses": False,
    }
    if cluster:
        return RedisCluster.from_url(url, **options)
    return redis.from_url(url, **options)


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

    def __init__(self, client: Client, prefix: str = "sellarec", distilled_ttl_s: int = 7 * 86400) -> None:
        self.client = client
        self.keys = Keys(prefix)
        self.distilled_ttl_s = distilled_ttl_s
        self.kind = "redis-cluster" if isinstance(client, RedisCluster) else "redis"

    @classmethod
    def from_url(
        cls, url: str, prefix: str = "sellarec", timeout_s: float = 1.0, cluster: bool = False, **kw: int
    ) -> RedisStore:
        return cls(connect(url, timeout_s, cluster), prefix, **kw)

    async def _call(self, what: str, fn: Callable[..., Awaitable[T]], *args: Any, attempts: int = 2) -> T:
        """Run `fn(*args)` with the retry policy; a store that stays down is StoreUnavailable."""
        try:
            async for attempt in retrying(attempts):
                with attempt:
                    return await fn(*args)
        except STORE_ERRORS as err:
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
        self,
        version: str,
        user_id: str | None,
        item_ids: Sequence[str],
        titles: Sequence[str],
        fold: str | None = None,
    ) -> Lookup:
        return await self._call("lookup", self._lookup, version, user_id, list(item_ids), list(titles), fold)

    async def _lookup(
        self, version: str, user_id: str | None, item_ids: list[str], titles: list[str], fold: str | None
    ) -> Lookup:
        pipe = self.client.pipeline(transaction=False)
        pipe.exists(self.keys.meta(version))
        if fold is not None:
            pipe.get(self.keys.folded(version, fold))
        if user_id is not None:
            pipe.hmget(self.keys.user(version, user_id), USER_FIELDS)
            pipe.get(self.keys.events(user_id))
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
        folded = None
        if fold is not None:
            raw, replies = replies[0], replies[1:]
            folded = vector(raw) if raw is not None else None
        if user_id is None:
            return Lookup(None, *self._items_and_distilled(item_ids, titles, replies), folded=folded)
        (collab, history, history_titles), raw_overlay, replies = replies[0], replies[1], replies[2:]
        liked, labelled = overlay(raw_overlay)
        user = None
        if collab is not None:
            user = UserRecord(
                vector(collab),
                tuple(json.loads(history or b"[]")),
                tuple(json.loads(history_titles or b"[]")),
            )
        items, distilled = self._items_and_distilled(item_ids, titles, replies)
        return Lookup(user, items, distilled, liked, labelled, folded)

    @staticmethod
    def _items_and_distilled(
        item_ids: list[str], titles: list[str], replies: list[Any]
    ) -> tuple[dict[str, ItemRecord], dict[str, np.ndarray]]:
        items = {}
        for item_id, (title, item_collab, semantic) in zip(item_ids, replies[: len(item_ids)]):
            if item_collab is not None:
                items[item_id] = ItemRecord(title.decode(), vector(item_collab), vector(semantic))
        distilled = {t: vector(raw) for t, raw in zip(titles, replies[len(item_ids) :]) if raw is not None}
        return items, distilled

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

    async def cache_folded(self, version: str, fold: str, vector: np.ndarray) -> None:
        await self._call(
            "cache fold-in",
            self.client.set,
            self.keys.folded(version, fold),
            np.asarray(vector, dtype="<f4").tobytes(),
            self.distilled_ttl_s,
        )

    async def add_events(
        self, user_id: str, liked: Sequence[LikedItem], labelled: Sequence[LabelledEvent], keep: int
    ) -> tuple[int, int]:
        """One atomic script call; not retried (an event without an id would be added twice)."""
        args = [json.dumps([e.event_id, e.timestamp, e.item_id, e.title]) for e in liked]
        args += [json.dumps([e.event_id, e.timestamp, e.item_id, e.label]) for e in labelled]
        added_liked, added_labelled = await self._call(
            "record events",
            self.client.eval,
            MERGE_EVENTS,
            1,
            self.keys.events(user_id),
            keep,
            len(liked),
            *args,
            attempts=1,
        )
        return int(added_liked), int(added_labelled)

    async def close(self) -> None:
        await self.client.aclose()
