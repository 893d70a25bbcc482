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

`holds(prefix)` answers from the token ids and slots alone (the user vector is projected on
the model thread, after admission): whether some entry was computed for that prompt text. The
engine prices such a request without its prefix tokens when it decides admission.
"""

from __future__ import annotations

import hashlib
from collections import Counter

import numpy as np
from cachetools import LRUCache

from sellarec.model.encoding import Encoded
from sellarec.model.sella import PrefixState


def state_bytes(state: PrefixState) -> int:
    """Bytes the keys/values of `state` hold."""
    return sum(k.nbytes + v.nbytes for k, v in state.layers)


class _Entries(LRUCache):
    """cachetools' LRU that tells `evicted` which key it drops to make room."""

    def __init__(self, maxsize: int, evicted) -> None:  # noqa: ANN001
        super().__init__(maxsize, getsizeof=state_bytes)
        self._evicted = evicted

    def popitem(self):  # noqa: ANN201
        key, value = super().popitem()
        self._evicted(key)
        return key, value


#: Bytes of each of the key's two digests (the prompt's ids and slots, then the user vector).
DIGEST = 20


class PrefixCache:
    """Batch-of-one prefix states by key, at most `max_bytes` of keys/values in all
    (cachetools' LRU, sized by `state_bytes`), with hit and miss counts for the metrics."""

    def __init__(self, max_bytes: int) -> None:
        #: Budget of keys/values, in bytes; 0 keeps nothing.
        self.max_bytes = max_bytes
        #: Lookups that found an entry, and those that did not.
        self.hits = 0
        self.misses = 0
        self._entries: LRUCache[bytes, PrefixState] = _Entries(max_bytes, self._dropped)
        #: Entries per prompt digest (the first half of their keys), for `holds`.
        self._prompts: Counter[bytes] = Counter()

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
    def prompt(prefix: Encoded) -> bytes:
        """Digest of the prompt text of a prefix: its ids and its slots."""
        digest = hashlib.blake2b(digest_size=DIGEST)
        digest.update(np.asarray(prefix.ids, dtype=np.int64).tobytes())
        digest.update(repr(prefix.slots).encode())
        return digest.digest()

    @classmethod
    def key(cls, prefix: Encoded, user_vector: np.ndarray) -> bytes:
        """What a prefix's keys/values depend on: its ids, its slots and the user vector spliced
        in (float32, on the CPU)."""
        vector = hashlib.blake2b(
            np.ascontiguousarray(user_vector, dtype=np.float32).tobytes(), digest_size=DIGEST
        )
        return cls.prompt(prefix) + vector.digest()

    def holds(self, prefix: Encoded) -> bool:
        """Whether an entry was computed for this prompt text (with some user vector): a request
        for it will most likely run only its candidates. Counts no lookup."""
        return self.enabled and self.prompt(prefix) in self._prompts

    def get(self, key: bytes) -> PrefixState | None:
        state = self._entries.get(key)
        if state is None:
            self.misses += 1
        else:
            self.hits += 1
        return state

    def put(self, key: bytes, state: PrefixState) -> None:
        if state_bytes(state) > self.max_bytes:  # it would evict everything, then fail
            return
        if key not in self._entries:
            self._prompts[key[:DIGEST]] += 1
        self._entries[key] = state

    def _dropped(self, key: bytes) -> None:
        self._prompts[key[:DIGEST]] -= 1
        if not self._prompts[key[:DIGEST]]:
            del self._prompts[key[:DIGEST]]

    def clear(self) -> None:
        self._entries.clear()
        self._prompts.clear()
