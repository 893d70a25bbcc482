"""Keys/values of recent users' prefixes, kept across requests (least recently used first out).

A user-level prefix (instruction, liked titles, `<User_ID>`) is most of a one-candidate
prompt, and under real traffic the same user comes back: a page of single-item `/score`
calls, a `/rerank` after a `/score`. vLLM's automatic prefix caching keeps such prefixes by
token block; this is the torch backend's counterpart, keyed by everything the keys/values
depend on besides the frozen model: the prefix's token ids, where its slots sit, and the
projected user vector spliced into it. A new store version with other embeddings or
projections therefore gives other keys, and an entry can never serve a prompt it was not
computed for. The budget is in bytes of keys/values; an entry larger than the whole budget
is not kept.
"""

from __future__ import annotations

import hashlib

import numpy as np
from cachetools import LRUCache

from sellarec.model.encoding import Encoded
from sellarec.model.sella import PrefixState


def state_bytes(state: PrefixState) -> int:
    """Bytes the keys/values of `state` hold."""
    return sum(k.nbytes + v.nbytes for k, v in state.layers)


class PrefixCache:
    """Batch-of-one prefix states by key, at most `max_bytes` of keys/values in all
    (cachetools' LRU, sized by `state_bytes`), with hit and miss counts for the metrics."""

    def __init__(self, max_bytes: int) -> None:
        #: Budget of keys/values, in bytes; 0 keeps nothing.
        self.max_bytes = max_bytes
        #: Lookups that found an entry, and those that did not.
        self.hits = 0
        self.misses = 0
        self._entries: LRUCache[bytes, PrefixState] = LRUCache(max_bytes, getsizeof=state_bytes)

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    @property
    def bytes(self) -> int:
        """Bytes of keys/values held now."""
        return int(self._entries.currsize)

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def key(prefix: Encoded, user_vector: np.ndarray) -> bytes:
        """What a prefix's keys/values depend on: its ids, its slots and the user vector spliced
        in (float32, on the CPU)."""
        digest = hashlib.blake2b(digest_size=20)
        digest.update(np.asarray(prefix.ids, dtype=np.int64).tobytes())
        digest.update(repr(prefix.slots).encode())
        digest.update(np.ascontiguousarray(user_vector, dtype=np.float32).tobytes())
        return digest.digest()

    def get(self, key: bytes) -> PrefixState | None:
        state = self._entries.get(key)
        if state is None:
            self.misses += 1
        else:
            self.hits += 1
        return state

    def put(self, key: bytes, state: PrefixState) -> None:
        if state_bytes(state) <= self.max_bytes:  # a larger one would evict everything, then fail
            self._entries[key] = state

    def clear(self) -> None:
        self._entries.clear()
