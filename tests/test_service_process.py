"""The real `sellarec-serve` process: starts, becomes ready, answers over HTTP, drains on SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from test_service_support import REDIS_URL, delete_prefix, unique_prefix

from sellarec.model.artifacts import load_bundle
from sellarec.service.store.admin import StoreAdmin

SERVE = str(Path(sys.executable).with_name("sellarec-serve"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}: {log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError("server not ready in time")


async def _load(prefix: str, bundle_dir: Path) -> None:
    import redis.asyncio as redis

    client = redis.from_url(REDIS_URL)
    try:
        await StoreAdmin(client, prefix).load(load_bundle(bundle_dir))
    finally:
        await client.aclose()


@pytest.mark.slow
@pytest.mark.parametrize("store", ["embedded", "redis"])
def test_sellarec_serve_answers_and_exits_cleanly_on_sigterm(tiny_bundle_dir, tmp_path, store):
    port, prefix, log_file = free_port(), unique_prefix(), tmp_path / "serve.log"
    url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "SELLAREC_PORT": str(port),
        "SELLAREC_MAX_CANDIDATES": "2000",
        "SELLAREC_MAX_REQUEST_TOKENS": "1000000",  # the big request below is the point
        "SELLAREC_REDIS_PREFIX": prefix,
    }
    args = [SERVE, "--artifacts", str(tiny_bundle_dir), "--host", "127.0.0.1"]
    if store == "redis":
        asyncio.run(_load(prefix, tiny_bundle_dir))
        args += ["--redis-url", REDIS_URL]
    status: int | None = None
    with log_file.open("w") as sink:
        proc = subprocess.Popen(args, env=env, stdout=sink, stderr=subprocess.STDOUT)
    try:
        wait_ready(url, proc, log_file)
        ranked = httpx.post(
            f"{url}/rerank", json={"user_id": "u1", "candidates": ["i1", "i2", "i3"]}, timeout=30
        )
        assert ranked.status_code == 200
        assert sorted(r["index"] for r in ranked.json()["results"]) == [0, 1, 2]

        # A big request is in flight when SIGTERM arrives: it must still get its answer.
        cold = [{"item_id": f"c{k}", "title": f"Film number {k} ({1950 + k % 70})"} for k in range(2000)]
        answers: list[httpx.Response | Exception] = []

        def send() -> None:
            try:
                answers.append(httpx.post(f"{url}/score", json={"user_id": "u2", "items": cold}, timeout=120))
            except Exception as err:  # reported below with the server log
                answers.append(err)

        request = threading.Thread(target=send)
        request.start()
        time.sleep(0.15)
        proc.send_signal(signal.SIGTERM)
        request.join(120)
        status = proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
        asyncio.run(delete_prefix(prefix))
    log = log_file.read_text()
    assert status == 0, log[-3000:]
    assert answers and isinstance(answers[0], httpx.Response), (answers, log[-3000:])
    assert answers[0].status_code == 200, log[-3000:]
    assert len(answers[0].json()["scores"]) == 2000
    assert "Waiting for connections to close" in log  # the request was in flight at SIGTERM
    assert "draining" in log and "Finished server process" in log
