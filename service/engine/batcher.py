"""The queue in front of the model and the micro-batcher that empties it.

An entry carries its payload, a future for its result and the time it was queued. One
background task forms batches: it takes the oldest entry, then keeps taking entries
while the batch stays within `max_batch_tokens` (and `max_batch_requests`, when set),
waiting at most `batch_wait_s` for more,
and runs the batch on the single model thread (so the event loop stays free).

Admission is by time, not count: each batch teaches a cost model (service/engine/admission.py)
how long its work took, and a request whose predicted wait (the work queued ahead of it,
plus what remains of the running batch) exceeds `max_wait_s` (or the caller's own
deadline) is refused at once with 429 and a Retry-After of when that wait will have
drained. `max_queue` remains as a backstop on the number of waiting requests. A request
whose future is cancelled (the client went away, its deadline passed) leaves the queue at
once and never runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from sellarec.service.engine.admission import NO_WORK, CostModel, Work
from sellarec.service.errors import QueueFull, ShuttingDown
from sellarec.service.metrics import Metrics

P = TypeVar("P")
R = TypeVar("R")
T = TypeVar("T")

log = logging.getLogger(__name__)


@dataclass
class Entry(Generic[P, R]):
    """One queued request."""

    #: The work for the model thread.
    payload: P
    #: Token positions it puts through the model (the batch budget counts these).
    cost: int
    #: Candidates it scores (for metrics).
    size: int
    #: Resolved with the result (or the error) of its batch.
    future: asyncio.Future[R]
    #: `time.monotonic()` when it was queued.
    enqueued_at: float
    #: What it puts through the model, priced by the cost model.
    work: Work = NO_WORK


class Batcher(Generic[P, R]):
    """Owns the model thread: every model call goes through `submit` or `call`."""

    def __init__(
        self,
        runner: Callable[[list[P]], list[R]],
        metrics: Metrics,
        max_queue: int = 64,
        max_batch_tokens: int = 8192,
        batch_wait_s: float = 0.002,
        max_batch_requests: int | None = None,
        max_wait_s: float = float("inf"),
        cost_model: CostModel | None = None,
    ) -> None:
        self.runner = runner
        self.metrics = metrics
        self.max_queue = max_queue
        self.max_batch_tokens = max_batch_tokens
        self.batch_wait_s = batch_wait_s
        # Where the model is compute-bound (CPU), merging requests buys no throughput and
        # makes each wait for the others: one request per batch gives the shorter tail.
        self.max_batch_requests = max_batch_requests or math.inf
        self._pending: deque[Entry[P, R]] = deque()
        self._arrived = asyncio.Event()
        self._model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sellarec-model")
        self._worker: asyncio.Task[None] | None = None
        self._in_flight: list[Entry[P, R]] = []
        self._closed = False
        #: Longest predicted queue wait a new request is admitted with.
        self.max_wait_s = max_wait_s
        #: Measured model seconds per unit of work.
        self.cost = cost_model or CostModel()
        self._in_flight_work = NO_WORK
        self._in_flight_since = 0.0

    @property
    def depth(self) -> int:
        """Requests waiting (not yet in a running batch)."""
        return len(self._pending)

    def start(self) -> None:
        if self._worker is None:
            self._worker = asyncio.get_running_loop().create_task(self._loop(), name="sellarec-batcher")

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(*args)` on the model thread (for work outside batches, e.g. warm-up)."""
        return await asyncio.get_running_loop().run_in_executor(self._model_thread, fn, *args)

    def predicted_wait(self) -> float:
        """Seconds a request queued now would wait for its batch to start (measured prices)."""
        running = 0.0
        if self._in_flight:
            running = max(
                self.cost.seconds(self._in_flight_work) - (time.monotonic() - self._in_flight_since), 0.0
            )
        queued = sum((e.work for e in self._pending), NO_WORK)
        return running + self.cost.seconds(queued)

    def retry_after(self) -> int:
        """A Retry-After value (whole seconds, at least 1): when today's queue will have drained."""
        return _seconds(self.predicted_wait())

    def submit(
        self,
        payload: P,
        cost: int,
        size: int,
        *,
        work: Work | None = None,
        deadline_s: float | None = None,
        spent_s: float = 0.0,
    ) -> asyncio.Future[R]:
        """Queue `payload`; the future resolves with its result. Raises QueueFull or ShuttingDown.

        `work` prices it for admission (default: `cost` prefix tokens); `deadline_s` is the
        most the caller will wait (a span, not a point), tighter than `max_wait_s` when given;
        `spent_s` is what the request already spent before the queue (a slow store lookup), and
        comes off the budget. Cancelling the future takes the entry out of the queue.
        """
        if self._closed:
            raise ShuttingDown("the server is shutting down")
        if len(self._pending) >= self.max_queue:
            wait = self.predicted_wait()
            raise QueueFull(
                f"the queue holds {len(self._pending)} requests (max_queue); retry later",
                retry_after=_seconds(wait),
            )
        wait = self.predicted_wait()
        self.metrics.predicted_wait.set(wait)
        budget = self.max_wait_s - spent_s
        limit = budget if deadline_s is None else min(budget, deadline_s)
        if wait > max(limit, 0.0):  # an idle model always admits: the work starts at once
            bound = "max_queue_wait" if limit == budget else "the request's timeout"
            raise QueueFull(
                f"overloaded: a new request would wait about {wait:.1f}s for the model, over "
                f"{limit:.1f}s ({bound}); retry later",
                retry_after=_seconds(wait - limit),
            )
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        entry = Entry(payload, cost, size, future, time.monotonic(), work or Work(cost, 0))
        self._pending.append(entry)
        future.add_done_callback(lambda _: self._forget(entry))
        self.metrics.queue_depth.set(len(self._pending))
        self._arrived.set()
        return future

    def _forget(self, entry: Entry[P, R]) -> None:
        """Take a queued entry whose future was cancelled out of the queue (it never runs)."""
        if entry.future.cancelled():
            try:
                self._pending.remove(entry)
            except ValueError:  # already taken into a batch, or drained
                return
            self.metrics.dropped.labels(reason="cancelled").inc()
            self.metrics.queue_depth.set(len(self._pending))

    async def _loop(self) -> None:
        while True:
            if not self._pending:
                self._arrived.clear()
                await self._arrived.wait()
            batch = await self._form_batch()
            if batch:
                await self._run(batch)

    def _take(self, batch: list[Entry[P, R]], tokens: int) -> int:
        """Move queued entries into `batch` while the budget allows; return the new token count."""
        while self._pending:
            entry = self._pending[0]
            if entry.future.done():  # the client went away
                self._pending.popleft()
                continue
            full = tokens + entry.cost > self.max_batch_tokens or len(batch) >= self.max_batch_requests
            if batch and full:
                break
            batch.append(self._pending.popleft())
            tokens += entry.cost
        self.metrics.queue_depth.set(len(self._pending))
        return tokens

    async def _form_batch(self) -> list[Entry[P, R]]:
        batch: list[Entry[P, R]] = []
        tokens = self._take(batch, 0)
        deadline = time.monotonic() + self.batch_wait_s
        while (
            batch
            and tokens < self.max_batch_tokens
            and len(batch) < self.max_batch_requests
            and not self._pending
        ):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except TimeoutError:
                break
            tokens = self._take(batch, tokens)
        return batch

    async def _run(self, batch: list[Entry[P, R]]) -> None:
        now = time.monotonic()
        for entry in batch:
            self.metrics.queue_wait_seconds.observe(now - entry.enqueued_at)
        self.metrics.batch_requests.observe(len(batch))
        self.metrics.batch_candidates.observe(sum(e.size for e in batch))
        self._in_flight = batch
        self._in_flight_work = sum((e.work for e in batch), NO_WORK)
        self._in_flight_since = now
        try:
            results = await self.call(self.runner, [e.payload for e in batch])
        except Exception as err:  # the model failed: every request of the batch gets the error
            log.exception("batch of %d requests failed", len(batch))
            for entry in batch:
                if not entry.future.done():
                    entry.future.set_exception(err)
            return
        finally:
            self._in_flight = []
            seconds = time.monotonic() - now
            self.metrics.batch_seconds.observe(seconds)
            self.observe(self._in_flight_work, seconds)
        for entry, result in zip(batch, results):
            if not entry.future.done():
                entry.future.set_result(result)

    def observe(self, work: Work, seconds: float) -> None:
        """Teach the cost model that `work` took `seconds` (batches, and the warm-up)."""
        self.cost.observe(work, seconds)
        prefix, suffix = self.cost.per_token
        self.metrics.token_seconds.labels(kind="prefix").set(prefix)
        self.metrics.token_seconds.labels(kind="suffix").set(suffix)

    async def drain(self, timeout_s: float = 30.0) -> None:
        """Refuse new work, finish what is queued and running (up to `timeout_s`), stop."""
        self._closed = True
        deadline = time.monotonic() + timeout_s
        while (self._pending or self._in_flight) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        for entry in [*self._in_flight, *self._pending]:
            if not entry.future.done():
                entry.future.set_exception(ShuttingDown("the server stopped before this request ran"))
        self._pending.clear()
        self.metrics.queue_depth.set(0)
        self._model_thread.shutdown(wait=False, cancel_futures=True)


def _seconds(wait: float) -> int:
    """A Retry-After value: whole seconds, at least 1."""
    return max(math.ceil(wait), 1)
