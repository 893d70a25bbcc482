"""Request bodies for the load: who asks, about which items, with how much context.

A workload draws from the ids the service knows (from files, or "1".."N") and mixes in
traffic the service has never seen: cold users, cold items that carry a title (the service
embeds those on the fly), and requests that bring their own history. Everything comes from
one seeded RNG, so a run can be replayed request for request.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

Endpoint = Literal["score", "rerank"]

# Words for the titles of cold items; the service only needs a plausible title to embed.
_TITLE_WORDS = (
    "silent", "river", "midnight", "garden", "lost", "city", "broken", "crown", "summer",
    "storm", "last", "letter", "iron", "harbor", "golden", "hour", "paper", "moon", "wild",
    "coast", "hidden", "road", "winter", "light", "distant", "shore", "red", "door", "glass",
    "house", "quiet", "war", "second", "chance", "northern", "star", "open", "sky",
)  # fmt: skip


@dataclass
class WorkloadConfig:
    """What the generated traffic looks like."""

    user_ids: list[str]
    """Users the service knows."""
    item_ids: list[str]
    """Items the service knows."""
    candidates: int = 20
    """Candidates (items) per request."""
    cold_user_frac: float = 0.0
    """Fraction of requests from a user id the service has never seen."""
    cold_item_frac: float = 0.0
    """Fraction of candidates that are unknown items carrying a title."""
    history_frac: float = 0.0
    """Fraction of requests that carry a `history` list (only /score accepts one)."""
    history_len: int = 10
    """Items in a carried history."""
    endpoint: Endpoint = "score"
    """Which API the bodies are for: /score (`items`) or /rerank (`candidates`)."""
    top_n: int | None = None
    """`top_n` sent with /rerank requests; None leaves it out."""
    seed: int = 0
    """Seed of the RNG that draws every request."""
    cold_tag: str = ""
    """Put into cold ids ("cold-u-<tag>-<n>") so that repeated runs against one live service
    stay cold instead of hitting the embeddings it cached for the previous run."""

    def __post_init__(self) -> None:
        for name in ("cold_user_frac", "cold_item_frac", "history_frac"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {value}")
        if self.candidates < 1:
            raise ValueError(f"candidates must be at least 1, got {self.candidates}")
        if not self.user_ids and self.cold_user_frac < 1.0:
            raise ValueError("no known user ids: give some, or set cold_user_frac to 1")
        if not self.item_ids and self.cold_item_frac < 1.0:
            raise ValueError("no known item ids: give some, or set cold_item_frac to 1")
        if self.endpoint not in ("score", "rerank"):
            raise ValueError(f"endpoint must be 'score' or 'rerank', got {self.endpoint!r}")


@dataclass
class Workload:
    """An endless, reproducible stream of request bodies for one endpoint."""

    config: WorkloadConfig
    _rng: random.Random = field(init=False, repr=False)
    _cold_users: int = field(default=0, init=False)
    _cold_items: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.config.seed)

    def next_body(self) -> dict[str, Any]:
        """The JSON body of the next request."""
        cfg, rng = self.config, self._rng
        if rng.random() < cfg.cold_user_frac or not cfg.user_ids:
            self._cold_users += 1
            user_id = self._cold_id("u", self._cold_users)
        else:
            user_id = rng.choice(cfg.user_ids)
        items = self._draw_items()
        if cfg.endpoint == "rerank":
            body: dict[str, Any] = {"user_id": user_id, "candidates": items}
            if cfg.top_n is not None:
                body["top_n"] = cfg.top_n
            return body
        body = {"user_id": user_id, "items": items}
        if cfg.item_ids and rng.random() < cfg.history_frac:
            body["history"] = self._sample_known(cfg.history_len)
        return body

    def _draw_items(self) -> list[str | dict[str, str]]:
        cfg, rng = self.config, self._rng
        n_cold = sum(rng.random() < cfg.cold_item_frac for _ in range(cfg.candidates))
        if not cfg.item_ids:
            n_cold = cfg.candidates
        items: list[str | dict[str, str]] = list(self._sample_known(cfg.candidates - n_cold))
        for _ in range(n_cold):
            self._cold_items += 1
            item_id = self._cold_id("i", self._cold_items)
            items.append({"item_id": item_id, "title": self._title()})
        rng.shuffle(items)
        return items

    def _cold_id(self, kind: str, n: int) -> str:
        tag = self.config.cold_tag
        return f"cold-{kind}-{tag}-{n}" if tag else f"cold-{kind}-{n}"

    def _sample_known(self, k: int) -> list[str]:
        """k known items, distinct when the catalogue is large enough."""
        ids = self.config.item_ids
        if k <= len(ids):
            return self._rng.sample(ids, k)
        return self._rng.choices(ids, k=k)

    def _title(self) -> str:
        words = self._rng.sample(_TITLE_WORDS, self._rng.randint(2, 4))
        return f"{' '.join(words).title()} ({self._rng.randint(1950, 2024)})"


def default_ids(n: int) -> list[str]:
    """The ids "1".."n", as the training data numbers users and items."""
    return [str(i) for i in range(1, n + 1)]


def load_ids(path: Path, kind: Literal["user", "item"]) -> list[str]:
    """Read ids from a text file (one per line, `#` comments) or from JSON.

    JSON may be a list of ids, a list of records with `<kind>_id` or `id`, or an object
    holding such a list (or a mapping keyed by id) under `<kind>_ids`, `<kind>s` or `ids`;
    so one file can serve as both --users-file and --items-file.
    """
    text = Path(path).read_text()
    if Path(path).suffix.lower() == ".json":
        return _ids_from_json(json.loads(text), kind, path)
    ids = [line.strip() for line in text.splitlines()]
    ids = [i for i in ids if i and not i.startswith("#")]
    if not ids:
        raise ValueError(f"{path}: no {kind} ids found")
    return ids


def _ids_from_json(data: Any, kind: str, path: Path) -> list[str]:
    if isinstance(data, dict):
        for key in (f"{kind}_ids", f"{kind}s", "ids"):
            if isinstance(data.get(key), (list, dict)):
                data = list(data[key])  # a mapping contributes its keys
                break
        else:
            raise ValueError(f"{path}: expected a list under '{kind}_ids', '{kind}s' or 'ids'")
    if not isinstance(data, list) or not data:
        raise ValueError(f"{path}: expected a non-empty JSON list of {kind} ids")
    ids = []
    for entry in data:
        if isinstance(entry, dict):
            entry = entry.get(f"{kind}_id", entry.get("id"))
        if not isinstance(entry, (str, int)):
            raise ValueError(f"{path}: cannot read a {kind} id from {entry!r}")
        ids.append(str(entry))
    return ids
