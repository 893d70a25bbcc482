"""Step the offered load (rate or concurrency) and record a report per step."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sellarec.loadtest.runner import LoadPlan, run_plan
from sellarec.loadtest.stats import summarize
from sellarec.loadtest.workload import Workload


async def run_sweep(
    url: str,
    workload: Workload,
    plans: list[LoadPlan],
    *,
    token: str | None = None,
    timeout_s: float = 30.0,
    stop_error_rate: float | None = None,
    on_step: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Run the plans in order, one report each.

    One workload feeds every step, so cold ids stay unique across steps (the service
    caches what it embedded for a cold item; a repeat would no longer be cold).
    Stops early once a step's error rate exceeds `stop_error_rate`: past saturation,
    further steps only measure the queue rejecting requests.
    """
    reports: list[dict[str, Any]] = []
    for plan in plans:
        report = summarize(await run_plan(url, workload, plan, token=token, timeout_s=timeout_s))
        reports.append(report)
        if on_step is not None:
            on_step(report)
        error_rate = report["error_rate"]
        if stop_error_rate is not None and error_rate is not None and error_rate > stop_error_rate:
            break
    return reports
