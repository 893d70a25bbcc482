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
from collections import OrderedDict

import numpy as np
import torch

from sellarec.model.encoding import Encoded
from sellarec.model.sella import PrefixState


def state_bytes(state: PrefixState) -> int:
    """Bytes the keys/values of `state` hold."""
    return sum(k.nbytes + v.nbytes for k, v in state.layers)


class PrefixCache:
    """Batch-of-one prefix states by key, at most `max_bytes` of keys/values in all."""

    def __init__(self, max_bytes: int) -> None:
        #: Budget of keys/values, in bytes; 0 keeps nothing.
        self.max_bytes = max_bytes
        #: Bytes held now.
        self.bytes = 0
        #: Lookups that found an entry, and those that did not.
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[bytes, tuple[PrefixState, int]] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def key(prefix: Encoded, user_vector: torch.Tensor) -> bytes:
        """What a prefix's keys/values depend on: its ids, its slots and the user vector spliced in."""
        digest = hashlib.blake2b(digest_size=20)
        digest.update(np.asarray(prefix.ids, dtype=np.int64).tobytes())
        digest.update(repr(prefix.slots).encode())
        vector = user_vector.detach().to("cpu", torch.float32).contiguous()
        digest.update(vector.numpy().tobytes())
        return digest.digest()

    def get(self, key: bytes) -> PrefixState | None:
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self.hits += 1
        self._entries.move_to_end(key)
        return entry[0]

    def put(self, key: bytes, state: PrefixState) -> None:
        size = state_bytes(state)
        if size > self.max_bytes:
            return
        old = self._entries.pop(key, None)
        if old is not None:
            self.bytes -= old[1]
        while self._entries and self.bytes + size > self.max_bytes:
            _, (_, evicted) = self._entries.popitem(last=False)
            self.bytes -= evicted
        self._entries[key] = (state, size)
        self.bytes += size

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0
