"""Drive the service over HTTP, open loop or closed loop, and record every request.

Open loop: Poisson arrivals at a target rate, each launched as its own task at its
scheduled time whatever the earlier ones are doing, so a slow service builds a queue instead
of slowing the arrivals (the way real callers behave). A cap on requests in flight protects
the client; an arrival that finds the cap reached is dropped and counted, never delayed.

Closed loop: C workers, each sending its next request as soon as its last one returns; the
offered load adapts to the service, so this measures capacity at a fixed concurrency.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx

from sellarec.loadtest.workload import Workload

Clock = Callable[[], float]


@dataclass
class LoadPlan:
    """How much load, in which shape, for how long."""

    rate: float | None = None
    """Open loop: mean arrivals per second (Poisson). Exclusive with `concurrency`."""
    concurrency: int | None = None
    """Closed loop: workers sending back to back. Exclusive with `rate`."""
    requests: int | None = None
    """Measured requests to send (after warmup); None: bounded by `duration_s` only."""
    duration_s: float | None = None
    """Seconds of measured load; None: bounded by `requests` only."""
    warmup: int = 0
    """Requests sent first, same shape, and left out of the statistics."""
    max_in_flight: int = 1024
    """Open loop: safety cap on requests in flight (also the connection pool size)."""
    seed: int = 0
    """Seed of the arrival process (the bodies have their own, in the workload)."""

    def __post_init__(self) -> None:
        if (self.rate is None) == (self.concurrency is None):
            raise ValueError("give exactly one of rate (open loop) or concurrency (closed loop)")
        if self.rate is not None and self.rate <= 0:
            raise ValueError(f"rate must be positive, got {self.rate}")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {self.concurrency}")
        if self.requests is None and self.duration_s is None:
            raise ValueError("give requests, duration_s, or both")
        if self.max_in_flight < 1:
            raise ValueError(f"max_in_flight must be at least 1, got {self.max_in_flight}")

    @property
    def mode(self) -> str:
        """ "open" or "closed"."""
        return "open" if self.rate is not None else "closed"

    @property
    def pool_size(self) -> int:
        """Connections the client needs so that no request waits for one."""
        return self.concurrency if self.concurrency is not None else self.max_in_flight


@dataclass
class Sample:
    """One request, as the client saw it."""

    start_s: float
    """When it was sent, seconds since the run started."""
    latency_s: float
    """Send to full response body (or to the failure)."""
    status: int
    """HTTP status; 0 when no response came back."""
    error: str | None
    """Transport failure (httpx exception name, e.g. "ReadTimeout"), else None."""
    candidates: int
    """Candidates the request carried."""
    warmup: bool
    """Sent during warmup, left out of the statistics."""
    due_s: float | None = None
    """Open loop: when the arrival was scheduled, seconds since the run started."""

    @property
    def ok(self) -> bool:
        """Scored: a 2xx response."""
        return 200 <= self.status < 300


@dataclass
class RunResult:
    """Everything one run recorded; `loadtest.stats.summarize` turns it into a report."""

    plan: LoadPlan
    endpoint: str
    candidates_per_request: int
    samples: list[Sample] = field(default_factory=list)
    measure_start_s: float | None = None
    """When the first measured request was due, seconds since the run started."""
    inflight_cap_hits: int = 0
    """Measured open-loop arrivals dropped because `max_in_flight` requests were out."""
    max_in_flight: int = 0
    """Most requests the client had out at once."""
    max_schedule_lag_s: float = 0.0
    """Open loop: worst lateness of a launch against its schedule (client saturation)."""

    @property
    def measured(self) -> list[Sample]:
        """Samples after warmup."""
        return [s for s in self.samples if not s.warmup]


def make_client(
    url: str, *, pool_size: int, timeout_s: float = 30.0, token: str | None = None
) -> httpx.AsyncClient:
    """An HTTP client whose pool holds a connection for every request the plan puts out."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    limits = httpx.Limits(max_connections=pool_size, max_keepalive_connections=pool_size)
    return httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=httpx.Timeout(timeout_s))


async def wait_ready(client: httpx.AsyncClient, timeout_s: float) -> bool:
    """Poll `GET /readyz` until it answers 200 or `timeout_s` passes."""
    deadline = time.perf_counter() + timeout_s
    while True:
        try:
            if (await client.get("/readyz")).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        if time.perf_counter() >= deadline:
            return False
        await asyncio.sleep(0.2)


async def run_load(
    client: httpx.AsyncClient,
    workload: Workload,
    plan: LoadPlan,
    clock: Clock = time.perf_counter,
) -> RunResult:
    """Run one plan against the service behind `client` and record every request."""
    cfg = workload.config
    result = RunResult(plan=plan, endpoint=cfg.endpoint, candidates_per_request=cfg.candidates)
    state = _RunState(client, f"/{cfg.endpoint}", workload, result, clock, t0=clock())
    if plan.mode == "open":
        await _open_loop(state, plan)
    else:
        await _closed_loop(state, plan)
    return result


@dataclass
class _RunState:
    client: httpx.AsyncClient
    path: str
    workload: Workload
    result: RunResult
    clock: Clock
    t0: float
    in_flight: int = 0

    def total(self, plan: LoadPlan) -> int | None:
        return None if plan.requests is None else plan.warmup + plan.requests

    def reserve(self) -> None:
        """Count a request as in flight from its launch, before its task first runs, so a
        burst of catch-up launches cannot overshoot the cap."""
        self.in_flight += 1
        self.result.max_in_flight = max(self.result.max_in_flight, self.in_flight)

    async def send(self, warmup: bool, due: float | None = None) -> None:
        """Send one request (already `reserve`d) and record it."""
        body = self.workload.next_body()
        n_candidates = len(body.get("items") or body.get("candidates") or [])
        start = self.clock()
        try:
            response = await self.client.post(self.path, json=body)
            status, error = response.status_code, None
        except httpx.HTTPError as exc:
            status, error = 0, type(exc).__name__
        finally:
            self.in_flight -= 1
        latency = self.clock() - start
        due_s = None if due is None else due - self.t0
        self.result.samples.append(
            Sample(start - self.t0, latency, status, error, n_candidates, warmup, due_s)
        )


async def _open_loop(state: _RunState, plan: LoadPlan) -> None:
    assert plan.rate is not None
    arrivals = random.Random(plan.seed)
    total, result = state.total(plan), state.result
    tasks: set[asyncio.Task[None]] = set()
    due = state.t0
    deadline: float | None = None
    i = 0
    while total is None or i < total:
        # Arrival times accumulate on the clock, never on completions.
        due += arrivals.expovariate(plan.rate)
        warmup = i < plan.warmup
        if not warmup and result.measure_start_s is None:
            result.measure_start_s = due - state.t0
            if plan.duration_s is not None:
                deadline = due + plan.duration_s
        if deadline is not None and due >= deadline:
            break
        delay = due - state.clock()
        if delay > 0:
            await asyncio.sleep(delay)
        result.max_schedule_lag_s = max(result.max_schedule_lag_s, state.clock() - due)
        i += 1
        if state.in_flight >= plan.max_in_flight:
            result.inflight_cap_hits += 0 if warmup else 1
            continue
        state.reserve()
        task = asyncio.create_task(state.send(warmup, due))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.gather(*tasks)


async def _closed_loop(state: _RunState, plan: LoadPlan) -> None:
    assert plan.concurrency is not None
    total, result = state.total(plan), state.result
    issued = 0
    deadline: float | None = None

    async def worker() -> None:
        nonlocal issued, deadline
        while total is None or issued < total:
            warmup = issued < plan.warmup
            if not warmup:
                now = state.clock()
                if result.measure_start_s is None:
                    result.measure_start_s = now - state.t0
                    if plan.duration_s is not None:
                        deadline = now + plan.duration_s
                if deadline is not None and now >= deadline:
                    return
            issued += 1
            state.reserve()
            await state.send(warmup)

    await asyncio.gather(*(worker() for _ in range(plan.concurrency)))


async def run_plan(
    url: str,
    workload: Workload,
    plan: LoadPlan,
    *,
    token: str | None = None,
    timeout_s: float = 30.0,
) -> RunResult:
    """`run_load` with a fresh client whose pool is sized for `plan`."""
    async with make_client(url, pool_size=plan.pool_size, timeout_s=timeout_s, token=token) as c:
        return await run_load(c, workload, plan)


async def check_ready(url: str, *, token: str | None = None, timeout_s: float = 10.0) -> bool:
    """Whether `GET /readyz` answers 200 within `timeout_s`."""
    async with make_client(url, pool_size=1, timeout_s=5.0, token=token) as client:
        return await wait_ready(client, timeout_s)
