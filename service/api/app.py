"""The FastAPI application: wiring, lifespan (load, serve, drain) and the error envelope.

route -> engine (validate, snapshot, lookup, encode) -> batcher (queue, batch) ->
backend (model thread) -> engine -> route. Startup loads the model before the server
accepts connections (so /healthz answers only once it is loaded) and does not need the
store: an unreachable store makes /readyz fail and requests answer 503 until it returns.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException

from sellarec.model.loader import LoadedModel, load_scorer
from sellarec.service.api.middleware import Guard
from sellarec.service.api.routes import authorize, authorize_metrics, router
from sellarec.service.backends.torch_backend import Backend, TorchBackend
from sellarec.service.engine.batcher import Batcher
from sellarec.service.engine.engine import Engine
from sellarec.service.engine.jobs import Job, JobResult, run_jobs
from sellarec.service.engine.tracker import VersionTracker
from sellarec.service.errors import ServiceError, StoreUnavailable
from sellarec.service.metrics import Metrics
from sellarec.service.settings import Settings
from sellarec.service.store.base import InMemoryStore, Store
from sellarec.service.store.redis_store import RedisStore
from sellarec.service.store.versions import version_id

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Runtime:
    """What the routes reach through `app.state.runtime`."""

    #: The settings the app was built with.
    settings: Settings
    #: Its metrics.
    metrics: Metrics
    #: The scoring engine.
    engine: Engine


def model_dtype(settings: Settings) -> torch.dtype:
    """bfloat16 on CUDA and float32 on CPU unless the settings name one."""
    if settings.dtype == "auto":
        return torch.bfloat16 if settings.device.startswith("cuda") else torch.float32
    return _DTYPES[settings.dtype]


def load_model(settings: Settings) -> LoadedModel:
    """The bundle's scorer; an MF bundle, or one the backbone does not fit, is an ArtifactError
    (one line: `sellarec-serve` checks the bundle before it starts the server)."""
    if settings.artifacts is None:
        raise ValueError("no artifacts: pass --artifacts DIR or set SELLAREC_ARTIFACTS")
    return load_scorer(settings.artifacts, device=settings.device, dtype=model_dtype(settings))


def make_store(settings: Settings, loaded: LoadedModel) -> Store:
    if settings.redis_url:
        return RedisStore.from_url(
            settings.redis_url,
            settings.redis_prefix,
            timeout_s=settings.redis_timeout_s,
            cluster=settings.redis_cluster,
            distilled_ttl_s=settings.cold_cache_ttl_s,
        )
    return InMemoryStore.from_bundle(loaded.bundle)


def make_backend(settings: Settings, loaded: LoadedModel) -> Backend:
    if settings.backend == "vllm":
        # Imported here: the default install and --backend torch never import vLLM.
        from sellarec.service.backends.vllm_backend import shared_vllm_backend

        return shared_vllm_backend(loaded, max_batch_tokens=settings.max_batch_tokens)
    return TorchBackend(
        loaded.scorer,
        settings.max_batch_tokens,
        cpu_fast_path=settings.cpu_fast_path,
        prefix_cache_bytes=settings.prefix_cache_mb << 20,
    )


def _error(request: Request, status: int, kind: str, message: str, **extra: object) -> JSONResponse:
    request.app.state.metrics.errors.labels(type=kind).inc()
    body = {"message": message, "type": kind, "code": status}
    items = extra.pop("items", None)
    if items:
        body["items"] = items
    return JSONResponse({"error": body}, status_code=status, headers=extra.pop("headers", None))


async def _service_error(request: Request, err: ServiceError) -> JSONResponse:
    return _error(request, err.status, err.type, err.message, items=err.items, headers=err.headers or None)


async def _validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
    problems = []
    for e in err.errors()[:10]:
        if e.get("type") == "json_invalid":
            problems.append(f"body is not valid JSON ({e.get('ctx', {}).get('error', 'decode error')})")
            continue
        where = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"
        problems.append(f"{where}: {e.get('msg', 'invalid')}")
    return _error(request, 422, "invalid_request", "invalid request: " + "; ".join(problems))


#: Why FastAPI could not parse a body, by the exception it hit (it answers those with a 400).
_UNPARSEABLE = {
    UnicodeDecodeError: "body is not valid UTF-8",
    RecursionError: "body is nested too deeply",
    ValueError: "body holds a number too large to read",
}


async def _http_error(request: Request, err: HTTPException) -> JSONResponse:
    if err.status_code == 400:  # a body FastAPI could not parse: malformed input, like bad JSON
        cause = err.__cause__
        reason = next((r for t, r in _UNPARSEABLE.items() if isinstance(cause, t)), "body is not valid JSON")
        log.info("unparseable body on %s: %r", request.url.path, cause)
        return _error(request, 422, "invalid_request", f"invalid request: {reason}")
    kind = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code, "http_error")
    return _error(request, err.status_code, kind, str(err.detail), headers=getattr(err, "headers", None))


def _guarded_paths(settings: Settings) -> set[str]:
    """The paths whose routes check the token (/score, /rerank, /events; /metrics when protected).

    One source for both the outer guard (which refuses before any body is read) and the schema.
    """
    checks = {authorize, authorize_metrics} if settings.protect_metrics else {authorize}
    # Our own router's routes: FastAPI >= 0.16x wraps included routers in app.routes.
    return {
        route.path
        for route in router.routes
        if isinstance(route, APIRoute) and any(d.call in checks for d in route.dependant.dependencies)
    }


def _openapi(app: FastAPI, settings: Settings) -> dict:
    """The schema, declaring the bearer token only on the routes that this server guards.

    The routes always take an optional token (one app serves either way); a client or a
    schema-driven fuzzer must not be told that a server without a token wants one.
    """
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
        guarded = _guarded_paths(settings) if settings.api_token is not None else set()
        for path, operations in schema["paths"].items():
            for operation in operations.values():
                if path not in guarded:
                    operation.pop("security", None)
                    operation.get("responses", {}).pop("401", None)
        if not guarded:
            schema.get("components", {}).pop("securitySchemes", None)
        app.openapi_schema = schema
    return app.openapi_schema


def create_app(
    settings: Settings | None = None, *, loaded: LoadedModel | None = None, store: Store | None = None
) -> FastAPI:
    """The app. `loaded` and `store` replace what the settings would build (tests share a model)."""
    settings = settings or Settings()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        model = loaded or load_model(settings)
        own_store = store is None
        the_store = store or make_store(settings, model)
        scorer = model.scorer
        metrics.model_info.info(
            {
                "artifact": version_id(model.bundle.manifest),
                "backbone": model.backbone.spec,
                "device": str(scorer.device),
                "dtype": str(scorer.dtype).removeprefix("torch."),
                "backend": settings.backend,
                "store": the_store.kind,
            }
        )
        tracker = VersionTracker(the_store, model.identity, scorer.device, metrics, settings.version_poll_s)
        try:
            await tracker.refresh()
        except StoreUnavailable as err:
            log.warning("store unavailable at startup (will retry): %s", err)
        backend = make_backend(settings, model)
        if isinstance(backend, TorchBackend):
            metrics.watch_prefix_cache(backend.prefix_cache)
        batcher: Batcher[Job, JobResult] = Batcher(
            partial(run_jobs, backend),
            metrics,
            max_queue=settings.max_queue,
            max_batch_tokens=settings.max_batch_tokens,
            batch_wait_s=settings.batch_wait_ms / 1000,
            max_batch_requests=settings.max_batch_requests,
            max_wait_s=settings.max_queue_wait_ms / 1000,
        )
        engine = Engine(
            scorer.spec,
            scorer.encoder,
            backend,
            the_store,
            tracker,
            batcher,
            metrics,
            max_candidates=settings.max_candidates,
            max_history=settings.max_history,
            max_request_tokens=settings.max_request_tokens,
        )
        await engine.warm_up()
        app.state.runtime = Runtime(settings=settings, metrics=metrics, engine=engine)
        tracker.start()
        batcher.start()
        log.info(
            "ready to serve %s from the %s store", tracker.current and tracker.current.version, the_store.kind
        )
        try:
            yield
        finally:
            log.info("draining: %d requests queued", batcher.depth)
            await tracker.stop()
            await batcher.drain(settings.shutdown_timeout_s)
            await engine.flush()
            try:
                backend.close()
            except Exception as err:  # exiting anyway
                log.warning("closing the %s backend failed: %s", backend.name, err)
            if own_store:
                try:
                    await asyncio.wait_for(the_store.close(), timeout=2.0)
                except Exception as err:  # exiting anyway; a stuck connection must not hold the process
                    log.warning("closing the store failed: %s", err)

    app = FastAPI(
        title="SeLLa-Rec scoring service",
        summary="CTR scores from an LLM with semantic-aligned collaborative soft tokens.",
        version="1",
        lifespan=lifespan,
    )
    app.state.metrics = metrics
    app.include_router(router)
    app.openapi = partial(_openapi, app, settings)
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_middleware(
        Guard,
        metrics=metrics,
        max_body_bytes=settings.max_body_bytes,
        token=settings.api_token,
        guarded=frozenset(_guarded_paths(settings)),
    )
    return app
