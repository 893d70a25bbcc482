"""Helpers for the service tests (no tests here): shared model, bundles, Redis prefixes, a breakable proxy.

Fixtures live in each test module (they cannot be shared without a conftest); the
expensive parts are cached here per session.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

import httpx
import redis.asyncio as redis
import torch
from asgi_lifespan import LifespanManager
from fastapi import FastAPI
from safetensors.torch import load_file, save_file

from sellarec.model.artifacts import MANIFEST, TENSORS, Manifest, sha256_file
from sellarec.model.loader import LoadedModel, load_scorer
from sellarec.service.api.app import create_app
from sellarec.service.settings import Settings
from sellarec.service.store.base import Store

REDIS_URL = "redis://127.0.0.1:6379/0"


@lru_cache(maxsize=4)
def shared_model(bundle_dir: str) -> LoadedModel:
    """One loaded model per bundle for the whole session (loading costs about a second)."""
    return load_scorer(bundle_dir)


def quick_settings(**overrides: Any) -> Settings:
    """Settings for an in-test app: fast polling, no env surprises."""
    base: dict[str, Any] = {"version_poll_s": 0.1, "batch_wait_ms": 1.0, "shutdown_timeout_s": 5.0}
    return Settings(_env_file=None, **{**base, **overrides})


@contextlib.asynccontextmanager
async def serving(
    bundle_dir: Path, settings: Settings | None = None, store: Store | None = None
) -> AsyncIterator[tuple[httpx.AsyncClient, FastAPI]]:
    """An app on the shared model, started (lifespan) and reachable through an ASGI client."""
    settings = settings or quick_settings()
    app = create_app(settings, loaded=shared_model(str(bundle_dir)), store=store)
    async with LifespanManager(app, startup_timeout=60, shutdown_timeout=60) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://sellarec.test") as client:
            yield client, app


def derive_bundle(src: Path, dst: Path, name: str, seed: int) -> Path:
    """A retrained version of `src`: same backbone and LoRA, new embeddings and projections."""
    shutil.copytree(src, dst)
    tensors = load_file(dst / TENSORS)
    g = torch.Generator().manual_seed(seed)
    for key, value in tensors.items():
        # Weights and tables change; a projection's scalar scales (out_norm) stay.
        if key.startswith(("mf.", "semantic.", "proj_")) and value.dim() > 0:
            tensors[key] = torch.randn(value.shape, generator=g) * value.std().clamp(min=0.1)
    tensors["neutral.user"] = tensors["mf.users"].mean(0)
    tensors["neutral.item"] = tensors["mf.items"].mean(0)
    save_file(tensors, dst / TENSORS)
    manifest = Manifest.model_validate_json((dst / MANIFEST).read_text())
    manifest.name = name
    manifest.checksums[TENSORS] = sha256_file(dst / TENSORS)
    (dst / MANIFEST).write_text(manifest.model_dump_json(indent=2))
    return dst


def unique_prefix() -> str:
    return f"sellarec-test-{uuid.uuid4().hex[:12]}"


async def delete_prefix(prefix: str) -> None:
    """Remove every key a test wrote under `prefix`."""
    client = redis.from_url(REDIS_URL)
    try:
        keys = [k async for k in client.scan_iter(match=f"{prefix}:*", count=1000)]
        if keys:
            await client.unlink(*keys)
    finally:
        await client.aclose()


class TcpProxy:
    """A TCP forwarder to Redis that a test can cut and restore (the shared server stays up)."""

    def __init__(self, target: tuple[str, int] = ("127.0.0.1", 6379)) -> None:
        self.target = target
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]

    async def cut(self) -> None:
        """Stop listening and drop every open connection."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._writers):
            writer.close()
        self._writers.clear()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(Exception):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


def catalog(bundle_dir: Path) -> dict[str, Any]:
    return json.loads((bundle_dir / "catalog.json").read_text())


def _free_cluster_port() -> int:
    """A port that is free, and whose cluster bus port (+10000) is free too."""
    for _ in range(100):
        port = random.randint(20000, 40000)
        try:
            for p in (port, port + 10000):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair for a Redis Cluster node")


@contextlib.contextmanager
def redis_cluster(workdir: Path, masters: int = 3) -> Iterator[str]:
    """A real Redis Cluster of `masters` masters (no replicas) on local ports; yields its URL."""
    ports = [_free_cluster_port() for _ in range(masters)]
    procs = []
    try:
        for port in ports:
            node_dir = workdir / str(port)
            node_dir.mkdir(parents=True)
            procs.append(
                subprocess.Popen(
                    ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(node_dir),
                     "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                     "--cluster-node-timeout", "2000", "--save", "", "--appendonly", "no"],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )  # fmt: skip
        for port in ports:
            _wait(lambda port=port: _cli(port, "ping") == "PONG")
        subprocess.run(
            ["redis-cli", "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports),
             "--cluster-replicas", "0", "--cluster-yes"],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        for port in ports:
            _wait(lambda port=port: "cluster_state:ok" in _cli(port, "cluster", "info"))
        yield f"redis+cluster://127.0.0.1:{ports[0]}"
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=10)


def cluster_masters(url: str) -> list[int]:
    """Ports of the masters of the local cluster that `url` names."""
    port = int(url.rsplit(":", 1)[1])
    return sorted(
        int(line.split()[1].split("@")[0].rsplit(":", 1)[1])
        for line in _cli(port, "cluster", "nodes").splitlines()
        if "master" in line.split()[2]
    )


def _cli(port: int, *args: str) -> str:
    done = subprocess.run(["redis-cli", "-p", str(port), *args], capture_output=True, text=True, timeout=10)
    return done.stdout.strip()


def _wait(ready: Callable[[], bool], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        if time.monotonic() > deadline:
            raise TimeoutError("the Redis Cluster did not come up")
        time.sleep(0.1)
