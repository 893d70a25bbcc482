"""Loading artifact bundles into Redis as versions, listing them, dropping them.

A load writes the version's users and items under its own namespace, reads everything
back to check counts and a checksum, writes the meta hash (the mark of a complete
version) and only then flips the active-version pointer with one SET. Running servers
pick the new version up on their next poll.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from itertools import islice
from typing import Any, TypeVar

import redis.asyncio as redis
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from sellarec.model.artifacts import Bundle
from sellarec.service.store.base import ItemRecord, UserRecord, bundle_records
from sellarec.service.store.redis_store import ITEM_FIELDS, TRANSIENT, USER_FIELDS, Keys, RedisStore

T = TypeVar("T")


class LoadRefused(RuntimeError):
    """The load would activate a version the servers' model cannot serve, or did not verify."""


@dataclass
class LoadReport:
    """What a load did."""

    #: The version id written.
    version: str
    #: Users written and verified.
    users: int
    #: Items written and verified.
    items: int
    #: sha256 over every record as written.
    checksum: str
    #: The version that was active before (None: none).
    previous: str | None
    #: True when the version was already complete in Redis and only re-verified.
    reused: bool
    #: Wall time of the load, seconds.
    seconds: float


def _chunks(records: Iterable[T], size: int) -> Iterator[list[T]]:
    it = iter(records)
    while chunk := list(islice(it, size)):
        yield chunk


async def _retry(fn: Callable[[], Awaitable[T]]) -> T:
    """Writes and reads of a load are idempotent: retry transient failures a few times."""
    async for attempt in AsyncRetrying(
        retry=retry_if_exception_type(TRANSIENT),
        stop=stop_after_attempt(4),
        wait=wait_exponential(multiplier=0.2, max=3),
        reraise=True,
    ):
        with attempt:
            return await fn()
    raise AssertionError("unreachable")  # pragma: no cover


def _user_fields(user: UserRecord) -> dict[str, bytes]:
    return {
        "collab": user.collab.astype("<f4").tobytes(),
        "history": json.dumps(list(user.history)).encode(),
        "history_titles": json.dumps(list(user.history_titles), ensure_ascii=False).encode(),
    }


def _item_fields(item: ItemRecord) -> dict[str, bytes]:
    return {
        "title": item.title.encode(),
        "collab": item.collab.astype("<f4").tobytes(),
        "semantic": item.semantic.astype("<f4").tobytes(),
    }


def _digest_update(digest: Any, kind: bytes, key: str, values: Iterable[bytes | None]) -> None:
    digest.update(kind + key.encode() + b"\0")
    for value in values:
        digest.update(len(value).to_bytes(8, "little") + value if value is not None else b"\xff" * 8)


class StoreAdmin:
    """Version management over one Redis prefix."""

    def __init__(self, client: redis.Redis, prefix: str = "sellarec", chunk: int = 500) -> None:
        self.client = client
        self.keys = Keys(prefix)
        self.chunk = chunk

    async def active(self) -> str | None:
        raw = await _retry(lambda: self.client.get(self.keys.active))
        return raw.decode() if raw else None

    async def load(self, bundle: Bundle, force: bool = False, activate: bool = True) -> LoadReport:
        """Write `bundle` as a version, verify it, then flip the pointer to it (if `activate`).

        Any LLM variant's bundle; an MF bundle is an ArtifactError (no LLM to serve), raised
        before Redis is touched. The model check is the servers' (`ModelIdentity.problems`).
        """
        start = time.perf_counter()
        meta, users, items = bundle_records(bundle)
        version, store = meta.version, RedisStore(self.client, self.keys.prefix)
        previous = await self.active()
        if previous and previous != version and not force:
            current = await store.version_meta(previous)
            if current is not None and (problems := current.model.problems(meta.model)):
                raise LoadRefused(
                    f"{version} cannot be served by the model of the active version {previous} "
                    f"({'; '.join(problems)}); servers would refuse it. Deploy servers with the new "
                    f"artifacts and load with --force to switch anyway."
                )
        existing = await store.version_meta(version)
        user_ids, item_ids = list(bundle.catalog.users), list(bundle.catalog.items)
        reused = existing is not None and existing.checksum != ""
        if reused:
            checksum = existing.checksum
            meta.extra["loaded_at"] = existing.extra.get("loaded_at")
        else:
            await self.drop(version, force=True)
            checksum = await self._write(version, users, items)
        n_users, n_items, read_back = await self._verify(version, user_ids, item_ids)
        if (n_users, n_items, read_back) != (len(user_ids), len(item_ids), checksum):
            raise LoadRefused(
                f"verification of {version} failed: read back {n_users}/{len(user_ids)} users, "
                f"{n_items}/{len(item_ids)} items, checksum {read_back[:12]} vs written {checksum[:12]}; "
                f"the pointer was not flipped"
            )
        if not reused:
            meta.checksum = checksum
            meta.extra["loaded_at"] = datetime.now(timezone.utc).isoformat()
            await _retry(lambda: self.client.hset(self.keys.meta(version), mapping=meta.to_fields()))
        summary = {
            "name": meta.name, "variant": meta.variant, "created_at": meta.created_at, "users": n_users,
            "items": n_items, "checksum": checksum, "loaded_at": meta.extra.get("loaded_at"),
        }  # fmt: skip
        await _retry(lambda: self.client.hset(self.keys.versions, version, json.dumps(summary)))
        if activate:
            await _retry(lambda: self.client.set(self.keys.active, version))
        return LoadReport(version, n_users, n_items, checksum, previous, reused, time.perf_counter() - start)

    async def _write(
        self, version: str, users: Iterator[tuple[str, UserRecord]], items: Iterator[tuple[str, ItemRecord]]
    ) -> str:
        digest = hashlib.sha256()
        for kind, records, key, fields, names in (
            (b"u", users, self.keys.user, _user_fields, USER_FIELDS),
            (b"i", items, self.keys.item, _item_fields, ITEM_FIELDS),
        ):
            for chunk in _chunks(records, self.chunk):
                writes = [(key(version, record_id), fields(record)) for record_id, record in chunk]
                for (record_id, _), (_, values) in zip(chunk, writes):
                    _digest_update(digest, kind, record_id, (values[n] for n in names))

                async def write(writes: list[tuple[str, dict[str, bytes]]] = writes) -> None:
                    pipe = self.client.pipeline(transaction=False)
                    for name, values in writes:
                        pipe.hset(name, mapping=values)
                    await pipe.execute()

                await _retry(write)
        return digest.hexdigest()

    async def _verify(self, version: str, user_ids: list[str], item_ids: list[str]) -> tuple[int, int, str]:
        """Read every record back: (users found, items found, checksum of what was read)."""
        digest, found = hashlib.sha256(), []
        for kind, ids, key, names in (
            (b"u", user_ids, self.keys.user, USER_FIELDS),
            (b"i", item_ids, self.keys.item, ITEM_FIELDS),
        ):
            count = 0
            for chunk in _chunks(ids, self.chunk):

                async def read(chunk: list[str] = chunk, key=key, names=names) -> list[list[bytes | None]]:  # noqa: ANN001
                    pipe = self.client.pipeline(transaction=False)
                    for record_id in chunk:
                        pipe.hmget(key(version, record_id), names)
                    return await pipe.execute()

                for record_id, values in zip(chunk, await _retry(read)):
                    count += values[1] is not None
                    _digest_update(digest, kind, record_id, values)
            found.append(count)
        return found[0], found[1], digest.hexdigest()

    async def versions(self) -> list[dict[str, Any]]:
        """Every complete version, oldest load first, with `active` set on the served one."""
        raw = await _retry(lambda: self.client.hgetall(self.keys.versions))
        active = await self.active()
        out = [
            {"version": k.decode(), **json.loads(v), "active": k.decode() == active} for k, v in raw.items()
        ]
        return sorted(out, key=lambda v: v.get("loaded_at") or "")

    async def drop(self, version: str, force: bool = False) -> int:
        """Delete a version's keys (refused for the active one unless `force`); returns keys deleted."""
        if not force and version == await self.active():
            raise LoadRefused(f"{version} is the active version; load or activate another one first")
        pattern = re.sub(r"([*?\[\]\\])", r"\\\1", self.keys.namespace(version)) + ":*"
        deleted = 0
        batch: list[bytes] = []
        async for key in self.client.scan_iter(match=pattern, count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                deleted += await self.client.unlink(*batch)
                batch = []
        if batch:
            deleted += await self.client.unlink(*batch)
        await self.client.hdel(self.keys.versions, version)
        return deleted

    async def activate(self, version: str) -> None:
        """Point the servers at an existing complete version (a rollback)."""
        if await RedisStore(self.client, self.keys.prefix).version_meta(version) is None:
            raise LoadRefused(f"no complete version {version!r}")
        await _retry(lambda: self.client.set(self.keys.active, version))
