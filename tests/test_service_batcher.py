"""The micro-batcher on its own: budgets, the wait bound, back-pressure, failures, draining."""

from __future__ import annotations

import asyncio
import threading

import pytest

from sellarec.service.engine.admission import CostModel, Work
from sellarec.service.engine.batcher import Batcher
from sellarec.service.errors import QueueFull, ShuttingDown
from sellarec.service.metrics import Metrics


class Recorder:
    """A runner that records the batches it gets and can be held on a gate."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, payloads: list[str]) -> list[str]:
        self.gate.wait(10)
        self.batches.append(list(payloads))
        if "boom" in payloads:
            raise RuntimeError("model failed")
        return [p.upper() for p in payloads]


def make(runner: Recorder, **kw) -> Batcher[str, str]:
    batcher: Batcher[str, str] = Batcher(runner, Metrics(), **kw)
    batcher.start()
    return batcher


async def test_requests_that_fit_the_token_budget_share_a_batch():
    runner = Recorder()
    batcher = make(runner, max_batch_tokens=100, batch_wait_s=0.2)
    futures = [batcher.submit(p, cost=30, size=1) for p in ("a", "b", "c")]
    assert await asyncio.gather(*futures) == ["A", "B", "C"]
    assert runner.batches == [["a", "b", "c"]]
    await batcher.drain()


async def test_a_batch_never_exceeds_the_token_budget_but_always_takes_one_request():
    runner = Recorder()
    batcher = make(runner, max_batch_tokens=100, batch_wait_s=0.05)
    futures = [batcher.submit(p, cost=c, size=1) for p, c in (("a", 60), ("b", 60), ("huge", 500), ("c", 30))]
    await asyncio.gather(*futures)
    assert runner.batches == [["a"], ["b"], ["huge"], ["c"]]
    await batcher.drain()


async def test_a_request_cap_keeps_requests_that_fit_the_budget_in_separate_batches():
    runner = Recorder()
    runner.gate.clear()  # all three are queued before the first batch runs
    batcher = make(runner, max_batch_tokens=100, batch_wait_s=0.2, max_batch_requests=2)
    futures = [batcher.submit(p, cost=10, size=1) for p in ("a", "b", "c")]
    await asyncio.sleep(0.05)
    runner.gate.set()
    assert await asyncio.gather(*futures) == ["A", "B", "C"]
    assert runner.batches == [["a", "b"], ["c"]]
    await batcher.drain()


async def test_the_wait_bound_limits_how_long_a_lone_request_waits():
    runner = Recorder()
    batcher = make(runner, max_batch_tokens=1000, batch_wait_s=0.05)
    loop = asyncio.get_running_loop()
    start = loop.time()
    assert await batcher.submit("a", cost=1, size=1) == "A"
    assert loop.time() - start < 1.0
    await batcher.drain()


async def test_a_full_queue_refuses_at_once_with_a_retry_after():
    runner = Recorder()
    runner.gate.clear()  # the model is busy
    batcher = make(runner, max_queue=2, batch_wait_s=0)
    first = batcher.submit("a", cost=1, size=1)
    await asyncio.sleep(0.05)  # "a" is running; the next two wait in the queue
    waiting = [batcher.submit(p, cost=1, size=1) for p in ("b", "c")]
    with pytest.raises(QueueFull) as refused:
        batcher.submit("d", cost=1, size=1)
    assert int(refused.value.headers["Retry-After"]) >= 1
    runner.gate.set()
    assert await asyncio.gather(first, *waiting) == ["A", "B", "C"]
    await batcher.drain()


async def test_a_model_failure_fails_every_request_of_its_batch_and_the_batcher_goes_on():
    runner = Recorder()
    batcher = make(runner, batch_wait_s=0.1)
    futures = [batcher.submit(p, cost=1, size=1) for p in ("x", "boom")]
    results = await asyncio.gather(*futures, return_exceptions=True)
    assert all(isinstance(r, RuntimeError) for r in results)
    assert await batcher.submit("y", cost=1, size=1) == "Y"
    await batcher.drain()


async def test_a_cancelled_request_is_skipped():
    runner = Recorder()
    runner.gate.clear()
    batcher = make(runner, batch_wait_s=0)
    running = batcher.submit("a", cost=1, size=1)
    await asyncio.sleep(0.05)
    gone = batcher.submit("gone", cost=1, size=1)
    kept = batcher.submit("kept", cost=1, size=1)
    gone.cancel()
    runner.gate.set()
    assert await asyncio.gather(running, kept) == ["A", "KEPT"]
    assert all("gone" not in b for b in runner.batches)
    await batcher.drain()


async def test_drain_finishes_queued_work_then_refuses_new_work():
    runner = Recorder()
    runner.gate.clear()
    batcher = make(runner, batch_wait_s=0)
    futures = [batcher.submit(p, cost=1, size=1) for p in ("a", "b")]
    await asyncio.sleep(0.05)
    drained = asyncio.create_task(batcher.drain(timeout_s=5))
    await asyncio.sleep(0.05)
    with pytest.raises(ShuttingDown):
        batcher.submit("late", cost=1, size=1)
    runner.gate.set()
    await drained
    assert [f.result() for f in futures] == ["A", "B"]


async def test_the_cost_model_learns_prices_per_prefix_and_suffix_token():
    model = CostModel(decay=0.95)
    for prefix, suffix in [(100, 10), (50, 200), (300, 40), (80, 80)]:
        model.observe(Work(prefix, suffix), 0.002 * prefix + 0.0005 * suffix)
    a, b = model.per_token
    assert a == pytest.approx(0.002, rel=1e-3) and b == pytest.approx(0.0005, rel=1e-3)
    assert model.seconds(Work(1000, 1000)) == pytest.approx(2.5, rel=1e-3)


async def test_a_request_is_refused_once_its_predicted_wait_exceeds_the_budget():
    runner = Recorder()
    runner.gate.clear()  # the model is busy
    cost = CostModel()
    cost.observe(Work(1000, 0), 1.0)  # measured: 1 ms per token position
    batcher = make(runner, batch_wait_s=0, max_wait_s=2.5, max_queue=1000, cost_model=cost)
    running = batcher.submit("a", cost=1, size=1, work=Work(1000, 0))  # about 1 s of work
    await asyncio.sleep(0.05)
    admitted = [batcher.submit("b", cost=1, size=1, work=Work(1000, 0))]  # predicted wait about 1 s
    admitted.append(batcher.submit("c", cost=1, size=1, work=Work(1000, 0)))  # about 2 s
    assert batcher.predicted_wait() == pytest.approx(3.0, abs=0.1)
    with pytest.raises(QueueFull) as refused:
        batcher.submit("d", cost=1, size=1, work=Work(10, 0))  # about 3 s > 2.5 s
    assert "over 2.5s (max_queue_wait)" in refused.value.message
    assert refused.value.headers["Retry-After"] == "1"  # 3 s - 2.5 s, rounded up
    runner.gate.set()
    assert await asyncio.gather(running, *admitted) == ["A", "B", "C"]
    await batcher.drain()


async def test_a_tighter_caller_deadline_refuses_sooner():
    runner = Recorder()
    runner.gate.clear()
    cost = CostModel()
    cost.observe(Work(1000, 0), 1.0)
    batcher = make(runner, batch_wait_s=0, max_wait_s=10, cost_model=cost)
    running = batcher.submit("a", cost=1, size=1, work=Work(1000, 0))
    await asyncio.sleep(0.05)
    with pytest.raises(QueueFull):
        batcher.submit("b", cost=1, size=1, work=Work(10, 0), deadline_s=0.5)
    fits = batcher.submit("c", cost=1, size=1, work=Work(10, 0), deadline_s=5)
    runner.gate.set()
    assert await asyncio.gather(running, fits) == ["A", "C"]
    await batcher.drain()


async def test_a_cancelled_job_leaves_the_queue_at_once_and_never_runs():
    runner = Recorder()
    runner.gate.clear()
    cost = CostModel()
    cost.observe(Work(1000, 0), 1.0)
    batcher = make(runner, batch_wait_s=0, cost_model=cost)
    running = batcher.submit("a", cost=1, size=1, work=Work(10, 0))
    await asyncio.sleep(0.05)
    gone = batcher.submit("gone", cost=1, size=1, work=Work(5000, 0))
    assert batcher.depth == 1 and batcher.predicted_wait() > 4
    gone.cancel()
    await asyncio.sleep(0)
    assert batcher.depth == 0 and batcher.predicted_wait() < 1  # the wait it priced is gone too
    runner.gate.set()
    assert await running == "A"
    assert await batcher.submit("next", cost=1, size=1) == "NEXT"
    assert all("gone" not in b for b in runner.batches)
    await batcher.drain()


async def test_every_batch_teaches_the_cost_model():
    runner = Recorder()
    batcher = make(runner, batch_wait_s=0)
    before = batcher.cost.observations
    await batcher.submit("a", cost=1, size=1, work=Work(10, 5))
    assert batcher.cost.observations == before + 1
    await batcher.drain()


async def test_time_spent_before_the_queue_comes_off_the_budget_but_an_idle_model_admits():
    runner = Recorder()
    runner.gate.clear()
    cost = CostModel()
    cost.observe(Work(1000, 0), 1.0)
    batcher = make(runner, batch_wait_s=0, max_wait_s=2.0, cost_model=cost)
    idle = batcher.submit("a", cost=1, size=1, work=Work(1000, 0), spent_s=5.0)  # nothing ahead of it
    await asyncio.sleep(0.05)
    fits = batcher.submit("b", cost=1, size=1, work=Work(10, 0), spent_s=0.5)  # about 1 s ahead, 1.5 s left
    with pytest.raises(QueueFull):
        batcher.submit("c", cost=1, size=1, work=Work(10, 0), spent_s=1.5)  # about 1 s ahead, 0.5 s left
    runner.gate.set()
    assert await asyncio.gather(idle, fits) == ["A", "B"]
    await batcher.drain()
