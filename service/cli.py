"""`sellarec-serve`: the scoring service under uvicorn.

Flags override `SELLAREC_*` environment variables, which override the defaults
(service/settings.py). SIGTERM stops accepting connections, lets in-flight requests
finish, drains the queue (lifespan shutdown) and exits 0.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Annotated
from urllib.parse import urlsplit

import typer
import uvicorn
from pydantic import ValidationError

from sellarec.model.artifacts import ArtifactError
from sellarec.model.compat import check_servable
from sellarec.service import redact
from sellarec.service.api.app import create_app
from sellarec.service.settings import Settings


def main(
    artifacts: Annotated[
        Path | None, typer.Option(help="Artifact bundle directory (env SELLAREC_ARTIFACTS).")
    ] = None,
    redis_url: Annotated[
        str | None, typer.Option(help="Redis URL; none: in-process store (env SELLAREC_REDIS_URL).")
    ] = None,
    redis_cluster: Annotated[
        bool | None,
        typer.Option(
            "--redis-cluster/--no-redis-cluster",
            help="The Redis URL names a Redis Cluster node (env SELLAREC_REDIS_CLUSTER; "
            "or use a redis+cluster:// URL).",
            show_default=False,
        ),
    ] = None,
    host: Annotated[str | None, typer.Option(help="Interface to listen on (env SELLAREC_HOST).")] = None,
    port: Annotated[int | None, typer.Option(help="Port to listen on (env SELLAREC_PORT).")] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:N (env SELLAREC_DEVICE).")] = None,
    backend: Annotated[
        str | None, typer.Option(help="Scoring backend: torch or vllm (env SELLAREC_BACKEND).")
    ] = None,
    log_level: Annotated[
        str | None, typer.Option(help="debug, info, warning (env SELLAREC_LOG_LEVEL).")
    ] = None,
) -> None:
    """Serve /score, /rerank, /events, /healthz, /readyz, /metrics and /docs."""
    given = {"artifacts": artifacts, "redis_url": redis_url, "redis_cluster": redis_cluster, "host": host,
             "port": port, "device": device,
             "backend": backend, "log_level": log_level}  # fmt: skip
    try:
        settings = Settings(**{k: v for k, v in given.items() if v is not None})
    except ValidationError as err:
        raise typer.BadParameter(_problems(err)) from err
    if settings.artifacts is None:
        raise typer.BadParameter("pass --artifacts DIR or set SELLAREC_ARTIFACTS", param_hint="--artifacts")
    # Every file of the bundle, its tensors against its prompt, and that it has an LLM at all
    # (an MF bundle has none) are checked before the model loads: a bundle that cannot be
    # served is one line and a non-zero exit, never a traceback after minutes of loading.
    try:
        check_servable(settings.artifacts)
    except ArtifactError as err:
        typer.secho(f"sellarec-serve: refusing the bundle: {err}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from err
    secrets = [settings.api_token.get_secret_value() if settings.api_token else None]
    if settings.redis_url:
        secrets.append(urlsplit(settings.redis_url).password)
    redact.install(secrets)
    # uvicorn drains, restores these handlers and re-raises the signal it caught: SIGTERM
    # then ends the process with status 0 (a clean, requested stop), Ctrl-C with 130.
    signal.signal(signal.SIGTERM, _exit_with(0))
    signal.signal(signal.SIGINT, _exit_with(130))
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        timeout_graceful_shutdown=int(settings.shutdown_timeout_s),
        lifespan="on",
    )


def _problems(err: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())


def _exit_with(status: int) -> Callable[[int, FrameType | None], None]:
    def handler(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(status)

    return handler


def cli_app() -> typer.Typer:
    """`sellarec-serve` as a Typer app."""
    # No locals in tracebacks: they would print the settings, token and Redis password included.
    app = typer.Typer(pretty_exceptions_show_locals=False, add_completion=False)
    app.command()(main)
    return app


def serve() -> None:
    """Console entry point `sellarec-serve`."""
    cli_app()()


if __name__ == "__main__":
    serve()
