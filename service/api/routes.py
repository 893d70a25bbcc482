"""The HTTP routes, and nothing else: parse (schemas), call the engine, shape the answer."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable
from typing import Annotated, TypeVar

from fastapi import APIRouter, Depends, Header, Request, Response
from fastapi.responses import PlainTextResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from sellarec.service.api.auth import bearer_matches
from sellarec.service.api.schemas import (
    ErrorResponse,
    Event,
    EventBatch,
    EventsResponse,
    Health,
    ItemRef,
    ItemScore,
    RerankRequest,
    RerankResponse,
    RerankResult,
    ScoreRequest,
    ScoreResponse,
)
from sellarec.service.engine.engine import Engine, ItemInput, Outcome
from sellarec.service.engine.events import EventInput, EventRecorder
from sellarec.service.errors import ClientClosed, Unauthorized

_bearer = HTTPBearer(auto_error=False, description="`SELLAREC_API_TOKEN`, when the server sets one.")

_ERRORS = {
    401: {"model": ErrorResponse, "description": "Missing or wrong bearer token."},
    413: {
        "model": ErrorResponse,
        "description": "Too many candidates, history entries, events or token positions, or body too large.",
    },
    422: {
        "model": ErrorResponse,
        "description": "Malformed request, unknown items without title, prompt too long.",
    },
    429: {
        "model": ErrorResponse,
        "description": "Overloaded: the predicted wait exceeds the budget (`queue_full`), or the "
        "X-Request-Timeout-Ms passed while the request was queued (`deadline_exceeded`); retry after "
        "Retry-After seconds.",
    },
    503: {"model": ErrorResponse, "description": "Store unreachable, no servable version, or shutting down."},
}

#: POST /events does not queue for the model: never a 429.
_EVENT_ERRORS = {status: answer for status, answer in _ERRORS.items() if status != 429}

T = TypeVar("T")

#: How long the caller will wait, in milliseconds (optional): a request that would wait longer
#: is refused at once (429 `queue_full`), and one still queued when it passes is dropped (429
#: `deadline_exceeded`, with a Retry-After).
Timeout = Annotated[
    int | None,
    Header(
        alias="X-Request-Timeout-Ms",
        ge=1,
        le=3_600_000,
        description="Milliseconds the caller will wait; tighter than the server's wait budget.",
    ),
]


def engine(request: Request) -> Engine:
    return request.app.state.runtime.engine


def authorize(request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> None:
    """Check the bearer token when the server has one (constant-time comparison)."""
    token = request.app.state.runtime.settings.api_token
    if token is None:
        return
    given = f"Bearer {credentials.credentials}" if credentials is not None else None
    if not bearer_matches(given, token):
        raise Unauthorized()


def authorize_metrics(
    request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)
) -> None:
    if request.app.state.runtime.settings.protect_metrics:
        authorize(request, credentials)


def _items(refs: list[ItemRef] | None) -> list[ItemInput] | None:
    if refs is None:
        return None
    return [ItemInput(r) if isinstance(r, str) else ItemInput(r.item_id, r.title) for r in refs]


def _deadline(timeout_ms: int | None) -> float | None:
    return None if timeout_ms is None else time.monotonic() + timeout_ms / 1000


async def _disconnected(request: Request) -> None:
    """Returns when the client goes away (the body has been read: only a disconnect can come)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """`work`, cancelled (and its queued job dropped) if the client disconnects first."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        gone.cancel()
    if task.cancelled():
        raise ClientClosed("the client disconnected; its request was dropped")
    return task.result()


router = APIRouter()


@router.post("/score", responses=_ERRORS, dependencies=[Depends(authorize)], tags=["scoring"])
async def score(
    request: Request, body: ScoreRequest, timeout_ms: Timeout = None, engine: Engine = Depends(engine)
) -> ScoreResponse:
    """P(Yes) for each item, in input order."""
    outcome: Outcome = await _unless_disconnected(
        request, engine.score(body.user_id, _items(body.items), _items(body.history), _deadline(timeout_ms))
    )
    return ScoreResponse(
        model=outcome.model,
        scores=[ItemScore(item_id=s.item_id, score=s.score, cold=s.cold) for s in outcome.scores],
    )


@router.post("/rerank", responses=_ERRORS, dependencies=[Depends(authorize)], tags=["scoring"])
async def rerank(
    request: Request, body: RerankRequest, timeout_ms: Timeout = None, engine: Engine = Depends(engine)
) -> RerankResponse:
    """Candidates sorted by P(Yes), best first; ties keep input order."""
    outcome: Outcome = await _unless_disconnected(
        request,
        engine.score(body.user_id, _items(body.candidates), _items(body.history), _deadline(timeout_ms)),
    )
    order = sorted(range(len(outcome.scores)), key=lambda k: -outcome.scores[k].score)
    if body.top_n is not None:
        order = order[: body.top_n]
    results = [
        RerankResult(index=k, item_id=s.item_id, relevance_score=s.score, cold=s.cold)
        for k, s in ((k, outcome.scores[k]) for k in order)
    ]
    return RerankResponse(model=outcome.model, results=results)


@router.post("/events", responses=_EVENT_ERRORS, dependencies=[Depends(authorize)], tags=["events"])
async def events(
    body: Event | EventBatch, request: Request, engine: Engine = Depends(engine)
) -> EventsResponse:
    """Record interactions: positives extend the user's stored history, seen by the next /score;
    every event (either label) joins the user's labelled events, the source of fold-in."""
    settings = request.app.state.runtime.settings
    recorder = EventRecorder(engine, keep=settings.events_keep, max_events=settings.max_events)
    given = body.events if isinstance(body, EventBatch) else [body]
    outcome = await recorder.record(
        [EventInput(e.user_id, e.item_id, e.label, e.timestamp, e.event_id, e.title) for e in given]
    )
    return EventsResponse(
        recorded=outcome.recorded, duplicates=outcome.duplicates, negatives=outcome.negatives
    )


@router.get("/healthz", tags=["operations"], response_model_exclude_none=True)
async def healthz() -> Health:
    """The process is up and its model is loaded (answers only after startup)."""
    return Health(status="ok")


@router.get("/readyz", responses={503: _ERRORS[503]}, tags=["operations"])
async def readyz(engine: Engine = Depends(engine)) -> Health:
    """The store answers and a compatible version is being served."""
    return Health(status="ready", model=await engine.ready())


@router.get(
    "/metrics",
    dependencies=[Depends(authorize_metrics)],
    tags=["operations"],
    response_class=PlainTextResponse,
    responses={401: _ERRORS[401]},
)
async def metrics(request: Request) -> Response:
    """Prometheus metrics (text exposition format)."""
    registry = request.app.state.runtime.metrics.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
