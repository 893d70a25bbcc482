"""`sellarec-store`: load artifact bundles into Redis as versions, list, activate, drop them."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, TypeVar

import typer

from sellarec.model.artifacts import ArtifactError, load_bundle
from sellarec.model.compat import require_llm
from sellarec.service.redact import redact
from sellarec.service.store.admin import LoadRefused, StoreAdmin
from sellarec.service.store.redis_store import STORE_ERRORS, connect

T = TypeVar("T")

# No locals in tracebacks: they would print the Redis URL, password included.
app = typer.Typer(
    help="Manage the service's embedding store in Redis.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)

RedisUrl = Annotated[
    str,
    typer.Option(
        envvar="SELLAREC_REDIS_URL",
        help="Redis URL (redis://, rediss://; redis+cluster://, rediss+cluster:// for a Redis Cluster).",
    ),
]
Prefix = Annotated[
    str, typer.Option(envvar="SELLAREC_REDIS_PREFIX", help="Key prefix of the service's keys.")
]


def _run(redis_url: str, prefix: str, work: Callable[[StoreAdmin], Awaitable[T]]) -> T:
    async def go() -> T:
        client = connect(redis_url, timeout_s=10.0)
        try:
            return await work(StoreAdmin(client, prefix))
        finally:
            await client.aclose()

    try:
        return asyncio.run(go())
    except LoadRefused as err:
        typer.secho(redact(f"refused: {err}"), fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from err
    except STORE_ERRORS as err:
        typer.secho(redact(f"cannot reach Redis at {redis_url}: {err}"), fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from err


@app.command()
def load(
    artifacts: Annotated[Path, typer.Option(envvar="SELLAREC_ARTIFACTS", help="Artifact bundle directory.")],
    redis_url: RedisUrl,
    prefix: Prefix = "sellarec",
    force: Annotated[
        bool, typer.Option(help="Activate even if the active version's model differs (a model rollout).")
    ] = False,
    activate: Annotated[bool, typer.Option(help="Flip the active-version pointer after the load.")] = True,
) -> None:
    """Write a bundle as a new version, verify counts and checksum, then make it active.

    Any LLM variant's bundle loads; an MF bundle (no LLM to serve) is refused in one line.
    """
    try:
        bundle = load_bundle(artifacts)
        require_llm(bundle.manifest, artifacts)
    except ArtifactError as err:
        typer.secho(str(err), fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from err
    report = _run(redis_url, prefix, lambda admin: admin.load(bundle, force=force, activate=activate))
    state = "re-verified" if report.reused else "loaded"
    typer.echo(
        f"{state} {report.version}: {report.users} users, {report.items} items, checksum "
        f"{report.checksum[:12]} in {report.seconds:.1f}s"
        + (f"; active (was {report.previous})" if activate else "; not activated")
    )


@app.command("list")
def list_versions(
    redis_url: RedisUrl,
    prefix: Prefix = "sellarec",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Every complete version, the active one marked with *."""
    versions = _run(redis_url, prefix, lambda admin: admin.versions())
    if as_json:
        typer.echo(json.dumps(versions, indent=2))
        return
    for v in versions:
        mark = "*" if v["active"] else " "
        typer.echo(
            f"{mark} {v['version']}  users={v['users']} items={v['items']} loaded={v.get('loaded_at')}"
        )


@app.command()
def drop(version: str, redis_url: RedisUrl, prefix: Prefix = "sellarec") -> None:
    """Delete a version's keys (the active version is refused)."""
    deleted = _run(redis_url, prefix, lambda admin: admin.drop(version))
    typer.echo(f"dropped {version}: {deleted} keys")


@app.command()
def activate(version: str, redis_url: RedisUrl, prefix: Prefix = "sellarec") -> None:
    """Point the servers at an existing version (a rollback)."""
    _run(redis_url, prefix, lambda admin: admin.activate(version))
    typer.echo(f"active: {version}")
