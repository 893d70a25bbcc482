"""The load tester against a stub service in a real uvicorn server on a free port."""

from __future__ import annotations

import asyncio
import json
import random
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from typer.testing import CliRunner

from sellarec.loadtest.cli import app as cli_app
from sellarec.loadtest.runner import LoadPlan, RunResult, Sample, run_plan
from sellarec.loadtest.stats import summarize
from sellarec.loadtest.workload import Workload, WorkloadConfig, default_ids, load_ids

# The report's keys as callers read them from the JSON; changing one breaks them.
DOCUMENTED_KEYS = {
    "mode", "endpoint", "target_rate", "concurrency", "candidates_per_request", "requests",
    "ok", "errors", "rate_limited", "warmup_requests", "elapsed_s", "sent_per_s", "requests_per_s",
    "ok_requests_per_s", "candidates_per_s", "latency_p50_ms", "latency_p90_ms",
    "latency_p99_ms", "latency_max_ms", "latency_mean_ms", "error_rate", "rate_limited_rate",
    "status_counts", "inflight_cap", "inflight_cap_hits", "max_in_flight", "max_schedule_lag_ms",
}  # fmt: skip


# --- the stub service ---------------------------------------------------------------------


@dataclass
class StubState:
    """What the stub does, and what it saw. Touched only from the server's event loop."""

    delay_s: float = 0.0
    """Sleep before answering."""
    reject_every: int = 0
    """Answer 429 to every n-th request (0: never)."""
    token: str | None = None
    """Bearer token required, if any."""
    requests: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    rejected: int = 0
    bodies: list[dict[str, Any]] = field(default_factory=list)


def _error(status: int, message: str, kind: str, **headers: str) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "code": status}}
    return JSONResponse(body, status_code=status, headers=headers)


def make_stub_app(state: StubState) -> FastAPI:
    """Echoes a score per item; can sleep, reject with 429, and demand a token."""
    stub = FastAPI()

    @stub.get("/readyz")
    async def readyz() -> dict[str, str]:
        return {"status": "ready"}

    async def handle(request: Request, items_key: str) -> JSONResponse | list[str]:
        body = await request.json()
        state.requests += 1
        state.bodies.append(body)
        state.in_flight += 1
        state.max_in_flight = max(state.max_in_flight, state.in_flight)
        try:
            if state.token and request.headers.get("authorization") != f"Bearer {state.token}":
                return _error(401, "missing or wrong token", "unauthorized")
            if state.reject_every and state.requests % state.reject_every == 0:
                state.rejected += 1
                return _error(429, "queue full", "overloaded", **{"Retry-After": "1"})
            await asyncio.sleep(state.delay_s)
            return [i if isinstance(i, str) else i["item_id"] for i in body[items_key]]
        finally:
            state.in_flight -= 1

    @stub.post("/score", response_model=None)
    async def score(request: Request) -> JSONResponse | dict[str, Any]:
        ids = await handle(request, "items")
        if isinstance(ids, JSONResponse):
            return ids
        scores = [{"item_id": i, "score": 0.5, "cold": i.startswith("cold-")} for i in ids]
        return {"model": "stub", "scores": scores}

    @stub.post("/rerank", response_model=None)
    async def rerank(request: Request) -> JSONResponse | dict[str, Any]:
        ids = await handle(request, "candidates")
        if isinstance(ids, JSONResponse):
            return ids
        results = [{"index": n, "item_id": i, "relevance_score": 0.5} for n, i in enumerate(ids)]
        return {"model": "stub", "results": results}

    return stub


@dataclass
class Stub:
    url: str
    state: StubState


@pytest.fixture(scope="module")
def stub_server() -> Iterator[Stub]:
    state = StubState()
    # proto=IPPROTO_TCP matters: asyncio sets TCP_NODELAY only on sockets that say they are
    # TCP, and without it Nagle plus delayed ACKs add ~40 ms to every response.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(make_stub_app(state), log_level="warning", access_log=False, lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "stub server did not start"
        time.sleep(0.01)
    yield Stub(f"http://127.0.0.1:{port}", state)
    server.should_exit = True
    thread.join(timeout=5)
    sock.close()


@pytest.fixture
def stub(stub_server: Stub) -> Stub:
    """The running stub, with fresh behaviour and counters."""
    state = stub_server.state
    fresh = StubState()
    for name in fresh.__dataclass_fields__:
        setattr(state, name, getattr(fresh, name))
    return stub_server


def workload(endpoint: str = "score", **overrides: Any) -> Workload:
    config = dict(user_ids=default_ids(50), item_ids=default_ids(200), candidates=5, seed=1)
    return Workload(WorkloadConfig(endpoint=endpoint, **{**config, **overrides}))  # type: ignore[arg-type]


# --- open loop ----------------------------------------------------------------------------


async def test_open_loop_achieves_the_asked_poisson_rate(stub: Stub) -> None:
    stub.state.delay_s = 0.002
    plan = LoadPlan(rate=200.0, requests=300, warmup=0, seed=3)
    result = await run_plan(stub.url, workload(), plan)
    report = summarize(result)

    assert report["requests"] == report["ok"] == 300
    # The offered load; completions (requests_per_s) also depend on how fast the stub, which
    # shares this machine, answers, so they are not what this test pins down.
    assert report["sent_per_s"] == pytest.approx(200.0, rel=0.2)
    # Poisson arrivals: exponential gaps, whose coefficient of variation is 1 (periodic: 0).
    gaps = np.diff(sorted(s.due_s for s in result.samples if s.due_s is not None))
    assert gaps.size == 299
    assert 0.8 < gaps.std() / gaps.mean() < 1.2


async def test_open_loop_arrivals_do_not_wait_for_slow_responses(stub: Stub) -> None:
    stub.state.delay_s = 0.25
    plan = LoadPlan(rate=80.0, requests=80, warmup=0, seed=4)
    result = await run_plan(stub.url, workload(), plan)

    starts = sorted(s.start_s for s in result.samples)
    assert starts[-1] - starts[0] < 2.0  # 80 back-to-back requests would take 20 s
    assert stub.state.max_in_flight >= 8
    assert result.inflight_cap_hits == 0


async def test_open_loop_drops_and_reports_arrivals_at_the_in_flight_cap(stub: Stub) -> None:
    stub.state.delay_s = 0.3
    plan = LoadPlan(rate=100.0, requests=50, warmup=0, max_in_flight=5, seed=5)
    report = summarize(await run_plan(stub.url, workload(), plan))

    assert report["inflight_cap_hits"] > 0
    assert report["requests"] + report["inflight_cap_hits"] == 50
    assert report["max_in_flight"] <= 5
    assert stub.state.max_in_flight <= 5


async def test_open_loop_duration_bounds_the_measured_load(stub: Stub) -> None:
    plan = LoadPlan(rate=100.0, duration_s=0.6, warmup=3, seed=6)
    report = summarize(await run_plan(stub.url, workload(), plan))

    assert 30 <= report["requests"] <= 90
    assert report["warmup_requests"] == 3


# --- closed loop --------------------------------------------------------------------------


async def test_closed_loop_never_exceeds_its_concurrency(stub: Stub) -> None:
    stub.state.delay_s = 0.01
    plan = LoadPlan(concurrency=4, requests=60, warmup=4)
    result = await run_plan(stub.url, workload(), plan)

    assert 2 <= stub.state.max_in_flight <= 4
    assert result.max_in_flight == 4
    assert summarize(result)["ok"] == 60


async def test_warmup_requests_are_sent_but_left_out_of_the_stats(stub: Stub) -> None:
    plan = LoadPlan(concurrency=2, requests=10, warmup=5)
    report = summarize(await run_plan(stub.url, workload(), plan))

    assert stub.state.requests == 15
    assert report["requests"] == 10
    assert report["warmup_requests"] == 5


async def test_rerank_endpoint_is_driven_with_candidates_and_top_n(stub: Stub) -> None:
    plan = LoadPlan(concurrency=2, requests=10, warmup=0)
    report = summarize(await run_plan(stub.url, workload("rerank", top_n=3), plan))

    assert report["ok"] == 10
    assert all("candidates" in b and b["top_n"] == 3 for b in stub.state.bodies)


async def test_bearer_token_is_sent(stub: Stub) -> None:
    stub.state.token = "s3cret"
    plan = LoadPlan(concurrency=1, requests=5, warmup=0)
    with_token = summarize(await run_plan(stub.url, workload(), plan, token="s3cret"))
    without = summarize(await run_plan(stub.url, workload(), plan))

    assert with_token["ok"] == 5
    assert without["ok"] == 0
    assert without["status_counts"] == {"401": 5}


# --- stats --------------------------------------------------------------------------------


async def test_429s_are_counted_as_rate_limited_not_as_successes(stub: Stub) -> None:
    stub.state.reject_every = 3
    plan = LoadPlan(concurrency=2, requests=30, warmup=0)
    report = summarize(await run_plan(stub.url, workload(), plan))

    assert report["rate_limited"] == stub.state.rejected == 10
    assert report["ok"] == 20
    assert report["errors"] == 10
    assert report["status_counts"] == {"200": 20, "429": 10}
    assert report["rate_limited_rate"] == pytest.approx(1 / 3)
    assert report["candidates_per_s"] == pytest.approx(report["ok_requests_per_s"] * 5)


def test_latency_percentiles_are_numpys_over_successful_requests() -> None:
    rng = np.random.default_rng(0)
    latencies = rng.lognormal(mean=-4, sigma=0.8, size=997)
    statuses = rng.choice([200, 200, 200, 429, 503], size=latencies.size)
    samples = [
        Sample(start_s=0.01 * i, latency_s=float(lat), status=int(st), error=None,
               candidates=5, warmup=False)
        for i, (lat, st) in enumerate(zip(latencies, statuses, strict=True))
    ]  # fmt: skip
    result = RunResult(LoadPlan(concurrency=1, requests=1), "score", 5, samples, 0.0)
    report = summarize(result)

    ok_ms = latencies[statuses == 200] * 1000
    p50, p90, p99 = np.percentile(ok_ms, [50, 90, 99])
    assert report["latency_p50_ms"] == pytest.approx(p50, rel=1e-12)
    assert report["latency_p90_ms"] == pytest.approx(p90, rel=1e-12)
    assert report["latency_p99_ms"] == pytest.approx(p99, rel=1e-12)
    assert report["latency_max_ms"] == pytest.approx(ok_ms.max(), rel=1e-12)
    assert report["ok"] == ok_ms.size
    assert report["error_rate"] == pytest.approx(1 - ok_ms.size / latencies.size)


async def test_percentiles_of_a_real_run_match_numpy(stub: Stub) -> None:
    result = await run_plan(stub.url, workload(), LoadPlan(concurrency=3, requests=40, warmup=2))
    report = summarize(result)

    recorded_ms = [s.latency_s * 1000 for s in result.samples if not s.warmup]
    assert report["latency_p50_ms"] == pytest.approx(np.percentile(recorded_ms, 50))
    assert report["latency_p99_ms"] == pytest.approx(np.percentile(recorded_ms, 99))


# --- workload -----------------------------------------------------------------------------


def test_workload_mix_follows_the_asked_fractions() -> None:
    users, items = default_ids(100), default_ids(500)
    gen = Workload(WorkloadConfig(users, items, candidates=10, cold_user_frac=0.3,
                                  cold_item_frac=0.2, history_frac=0.5, seed=7))  # fmt: skip
    bodies = [gen.next_body() for _ in range(3000)]

    cold_users = [b["user_id"] for b in bodies if b["user_id"] not in users]
    all_items = [i for b in bodies for i in b["items"]]
    cold_items = [i for i in all_items if isinstance(i, dict)]
    with_history = [b for b in bodies if "history" in b]
    assert len(cold_users) / len(bodies) == pytest.approx(0.3, abs=0.03)
    assert len(cold_items) / len(all_items) == pytest.approx(0.2, abs=0.02)
    assert len(with_history) / len(bodies) == pytest.approx(0.5, abs=0.03)
    assert all(isinstance(i["title"], str) and i["title"] for i in cold_items)
    assert all(i["item_id"] not in items for i in cold_items)
    assert len({i["item_id"] for i in cold_items}) == len(cold_items)
    assert all(i in items for i in all_items if isinstance(i, str))
    assert all(len(b["history"]) == 10 and set(b["history"]) <= set(items) for b in with_history)
    assert all(len(b["items"]) == 10 for b in bodies)


def test_workload_is_reproducible_from_its_seed() -> None:
    def bodies(seed: int) -> list[dict[str, Any]]:
        gen = workload(cold_user_frac=0.5, cold_item_frac=0.5, history_frac=0.5, seed=seed)
        return [gen.next_body() for _ in range(20)]

    assert bodies(11) == bodies(11)
    assert bodies(11) != bodies(12)


def test_ids_are_read_from_text_and_json_files(tmp_path: Path) -> None:
    (tmp_path / "users.txt").write_text("# users\nu1\n\nu2\n")
    (tmp_path / "items.json").write_text(json.dumps({"item_ids": [1, "2", 3]}))
    (tmp_path / "records.json").write_text(json.dumps([{"item_id": "a"}, {"id": "b"}]))
    (tmp_path / "catalog.json").write_text(json.dumps({"users": {"7": 0, "9": 1}, "item_ids": ["x"]}))

    assert load_ids(tmp_path / "users.txt", "user") == ["u1", "u2"]
    assert load_ids(tmp_path / "items.json", "item") == ["1", "2", "3"]
    assert load_ids(tmp_path / "records.json", "item") == ["a", "b"]
    assert load_ids(tmp_path / "catalog.json", "user") == ["7", "9"]
    assert load_ids(tmp_path / "catalog.json", "item") == ["x"]


# --- CLI ----------------------------------------------------------------------------------


def test_cli_run_writes_a_json_report_with_the_documented_keys(stub: Stub, tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    items = tmp_path / "items.txt"
    items.write_text("\n".join(str(i) for i in range(1, 30)))
    args = ["run", "--url", stub.url, "--concurrency", "2", "--requests", "20", "--warmup", "2",
            "--candidates", "4", "--items-file", str(items), "--cold-item-frac", "0.25",
            "--json-out", str(out)]  # fmt: skip
    result = CliRunner().invoke(cli_app, args)

    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert DOCUMENTED_KEYS | {"url", "workload"} == set(report)
    assert report["ok"] == 20 and report["status_counts"] == {"200": 20}
    assert report["candidates_per_request"] == 4
    assert report["workload"]["n_items"] == 29
    assert "latency_p50_ms" in result.output


def test_cli_sweep_writes_all_steps_as_json_and_a_png(stub: Stub, tmp_path: Path) -> None:
    json_out, plot_out = tmp_path / "sweep.json", tmp_path / "sweep.png"
    args = ["sweep", "--url", stub.url, "--rates", "20,40", "--requests", "15", "--warmup", "2",
            "--json-out", str(json_out), "--plot-out", str(plot_out)]  # fmt: skip
    result = CliRunner().invoke(cli_app, args)

    assert result.exit_code == 0, result.output
    sweep = json.loads(json_out.read_text())
    assert sweep["mode"] == "open"
    assert [step["target_rate"] for step in sweep["steps"]] == [20.0, 40.0]
    assert all(set(step) == DOCUMENTED_KEYS for step in sweep["steps"])
    png = plot_out.read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 1000


def test_cli_sweep_steps_the_concurrency(stub: Stub, tmp_path: Path) -> None:
    json_out = tmp_path / "sweep.json"
    args = ["sweep", "--url", stub.url, "--concurrencies", "1,3", "--requests", "10",
            "--json-out", str(json_out), "--plot-out", str(tmp_path / "sweep.png")]  # fmt: skip
    result = CliRunner().invoke(cli_app, args)

    assert result.exit_code == 0, result.output
    steps = json.loads(json_out.read_text())["steps"]
    assert [(s["mode"], s["concurrency"]) for s in steps] == [("closed", 1), ("closed", 3)]


def test_cli_exits_when_the_service_is_not_ready(tmp_path: Path) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    args = ["run", "--url", f"http://127.0.0.1:{port}", "--wait-ready", "0.3", "--requests", "1"]
    result = CliRunner().invoke(cli_app, args)

    assert result.exit_code == 2
    assert "readyz" in result.output


def test_cli_idle_sends_one_request_at_a_time(stub: Stub) -> None:
    stub.state.delay_s = 0.005
    result = CliRunner().invoke(cli_app, ["idle", "--url", stub.url, "--requests", "8"])

    assert result.exit_code == 0, result.output
    assert stub.state.max_in_flight == 1
    assert "idle p50" in result.output


def test_random_module_is_not_shared_with_the_workload() -> None:
    # Arrivals and bodies have their own RNGs: global random state changes nothing.
    random.seed(123)
    first = workload(cold_user_frac=0.5).next_body()
    random.seed(456)
    assert workload(cold_user_frac=0.5).next_body() == first
