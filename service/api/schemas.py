"""Wire types of the HTTP API, and nothing else: the single source of the OpenAPI schema.

Every field's docstring becomes its description in `/docs`. Limits that are settings
(`max_candidates`, `max_history`) are checked by the engine and answer 413, not 422.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

#: Longest item or user id accepted.
MAX_ID_CHARS = 256
#: Longest title accepted (a prompt must still fit the model's context).
MAX_TITLE_CHARS = 1024


Id = Annotated[str, Field(min_length=1, max_length=MAX_ID_CHARS)]
Title = Annotated[str, Field(min_length=1, max_length=MAX_TITLE_CHARS)]


def _integer(value: object) -> object:
    """Strict for a literal too: a Literal[0, 1] alone would take true and 1.0 (equal in Python)."""
    if type(value) is not int:
        raise ValueError("must be the integer 0 or 1")
    return value


Label = Annotated[Literal[0, 1], BeforeValidator(_integer)]


class _Wire(BaseModel):
    # Strict: "2" or true is not a top_n, 7 is not an id; nothing is coerced.
    model_config = ConfigDict(extra="forbid", strict=True, use_attribute_docstrings=True)


class ItemWithTitle(_Wire):
    """An item given with its title, so that it can be scored even if the store does not know it."""

    item_id: Id
    """External item id."""
    title: Title | None = None
    """Item title; used only when the store does not know the item (a cold item)."""


#: An item: its id alone (it must be in the store), or an object with id and title.
ItemRef = Annotated[Id | ItemWithTitle, Field(union_mode="left_to_right")]


class ScoreRequest(_Wire):
    """Score items for one user; the answer keeps the input order."""

    user_id: Id
    """External user id; an id the store does not know is scored as a cold user."""
    items: list[ItemRef] = Field(min_length=1)
    """Items to score, each an id or {"item_id", "title"}. Duplicates are scored at each occurrence."""
    history: list[ItemRef] | None = None
    """Recently liked items, oldest first. If given (even empty) it replaces the stored history,
    for known and cold users alike; absent or null: the stored history (empty for a cold user)."""


class RerankRequest(_Wire):
    """Rank candidates for one user, best first (Cohere/vLLM rerank conventions)."""

    user_id: Id
    """External user id; an id the store does not know is scored as a cold user."""
    candidates: list[ItemRef] = Field(min_length=1)
    """Candidates to rank, each an id or {"item_id", "title"}. Duplicates are ranked at each occurrence."""
    top_n: int | None = Field(None, ge=1)
    """Return only the best `top_n` results; absent: all of them."""
    history: list[ItemRef] | None = None
    """Recently liked items, oldest first; replaces the stored history when given (as in /score)."""


class ItemScore(_Wire):
    """The score of one requested item."""

    item_id: str
    """The item id as requested."""
    score: float
    """P(Yes): the probability that the user likes the item, in [0, 1]."""
    cold: bool
    """True when the user or the item was unknown to the store (scored with cold-start vectors)."""


class ScoreResponse(_Wire):
    """Scores in the order of the request's `items`."""

    model: str
    """The store version (model name and content id) that produced every score of this response."""
    scores: list[ItemScore]
    """One entry per requested item, in input order."""


class RerankResult(_Wire):
    """One ranked candidate."""

    index: int
    """Position of the candidate in the request's `candidates`."""
    item_id: str
    """The item id as requested."""
    relevance_score: float
    """P(Yes) for this user and candidate, in [0, 1]."""
    cold: bool
    """True when the user or the item was unknown to the store."""


class RerankResponse(_Wire):
    """Candidates sorted by relevance, best first (ties keep input order)."""

    model: str
    """The store version (model name and content id) that produced every score of this response."""
    results: list[RerankResult]
    """The best `top_n` candidates (all if `top_n` is absent), best first."""


class Event(_Wire):
    """One interaction: a user liked (1) or did not like (0) an item."""

    user_id: Id
    """External user id (known to the store or not)."""
    item_id: Id
    """External item id; for a positive it must be known to the store unless `title` is given."""
    label: Label
    """1: liked, appended to the user's stored history; 0: not liked. Either label is also kept in
    the user's labelled events, from which a user the MF never saw is folded in."""
    timestamp: float | None = None
    """When it happened, Unix seconds; the history is ordered by it. Absent: when it was received."""
    event_id: Id | None = None
    """The caller's id of the event: an event id already recorded for the user is not added again."""
    title: Title | None = None
    """Item title, for an item the store does not know; ignored for a known item."""


class EventBatch(_Wire):
    """Several interactions, recorded in order."""

    events: list[Event] = Field(min_length=1)
    """The events, oldest first when they carry no timestamp."""


class EventsResponse(_Wire):
    """What the events did."""

    recorded: int
    """Positives added to users' stored histories."""
    duplicates: int
    """Positives whose `event_id` was already recorded (not added again)."""
    negatives: int
    """Negatives received (kept in the user's labelled events, never in the history)."""


class ErrorBody(_Wire):
    """What went wrong."""

    message: str
    """Human-readable explanation."""
    type: str
    """Stable machine-readable kind: invalid_request, unknown_items, too_large, queue_full, ..."""
    code: int
    """The HTTP status code."""
    items: list[str] | None = None
    """The item ids the error is about (for unknown_items)."""


class ErrorResponse(_Wire):
    """The envelope of every error answer."""

    error: ErrorBody
    """The error."""


class Health(_Wire):
    """Liveness or readiness."""

    status: Literal["ok", "ready"]
    """`ok` from /healthz (the process answers), `ready` from /readyz."""
    model: str | None = None
    """The store version being served (readiness only)."""
