"""Turn a run's samples into the report: throughput, latency percentiles, errors.

Latency percentiles are over successful (2xx) requests only: a 429 comes back in a
millisecond and would make an overloaded service look fast. `sent_per_s` is the offered
load (how fast requests went out); `requests_per_s` is what completed over the measured
window (first measured send to last measured response), whatever the status;
`candidates_per_s` counts only candidates that were scored (2xx).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from sellarec.loadtest.runner import RunResult

PERCENTILES = (50, 90, 99)

# The report's keys, in the order the table shows them. Callers (benchmarks, dashboards)
# read them from the JSON, so they change only together with those callers.
REPORT_KEYS = (
    "mode",
    "endpoint",
    "target_rate",
    "concurrency",
    "candidates_per_request",
    "requests",
    "ok",
    "errors",
    "rate_limited",
    "warmup_requests",
    "elapsed_s",
    "sent_per_s",
    "requests_per_s",
    "ok_requests_per_s",
    "candidates_per_s",
    "latency_p50_ms",
    "latency_p90_ms",
    "latency_p99_ms",
    "latency_max_ms",
    "latency_mean_ms",
    "error_rate",
    "rate_limited_rate",
    "status_counts",
    "inflight_cap",
    "inflight_cap_hits",
    "max_in_flight",
    "max_schedule_lag_ms",
)


def summarize(result: RunResult) -> dict[str, Any]:
    """The report of one run, as plain JSON-ready values (None where undefined)."""
    plan, measured = result.plan, result.measured
    ok = [s for s in measured if s.ok]
    latencies_ms = np.array([s.latency_s for s in ok]) * 1000.0
    elapsed = 0.0
    if measured and result.measure_start_s is not None:
        end = max(s.start_s + s.latency_s for s in measured)
        elapsed = max(end - result.measure_start_s, 0.0)
    n, n_ok = len(measured), len(ok)
    n_429 = sum(s.status == 429 for s in measured)
    status_counts = Counter(status_key(s.status, s.error) for s in measured)

    def per_s(count: float) -> float | None:
        return count / elapsed if elapsed > 0 else None

    def fraction(count: int) -> float | None:
        return count / n if n else None

    p50, p90, p99 = (
        [float(v) for v in np.percentile(latencies_ms, PERCENTILES)] if n_ok else [None] * len(PERCENTILES)
    )
    report: dict[str, Any] = {
        "mode": plan.mode,
        "endpoint": result.endpoint,
        "target_rate": plan.rate,
        "concurrency": plan.concurrency,
        "candidates_per_request": result.candidates_per_request,
        "requests": n,
        "ok": n_ok,
        "errors": n - n_ok,
        "rate_limited": n_429,
        "warmup_requests": len(result.samples) - n,
        "elapsed_s": elapsed,
        "sent_per_s": _sent_per_s([s.start_s for s in measured]),
        "requests_per_s": per_s(n),
        "ok_requests_per_s": per_s(n_ok),
        "candidates_per_s": per_s(sum(s.candidates for s in ok)),
        "latency_p50_ms": p50,
        "latency_p90_ms": p90,
        "latency_p99_ms": p99,
        "latency_max_ms": float(latencies_ms.max()) if n_ok else None,
        "latency_mean_ms": float(latencies_ms.mean()) if n_ok else None,
        "error_rate": fraction(n - n_ok),
        "rate_limited_rate": fraction(n_429),
        "status_counts": dict(sorted(status_counts.items())),
        "inflight_cap": plan.max_in_flight if plan.mode == "open" else None,
        "inflight_cap_hits": result.inflight_cap_hits,
        "max_in_flight": result.max_in_flight,
        "max_schedule_lag_ms": result.max_schedule_lag_s * 1000.0 if plan.mode == "open" else None,
    }
    assert tuple(report) == REPORT_KEYS
    return report


def _sent_per_s(starts: list[float]) -> float | None:
    """Rate at which requests went out: the offered load. In open loop it follows --rate
    whatever the service does (unless the client itself lags; see max_schedule_lag_ms)."""
    if len(starts) < 2 or max(starts) <= min(starts):
        return None
    return (len(starts) - 1) / (max(starts) - min(starts))


def status_key(status: int, error: str | None) -> str:
    """ "200", "429", ... or the transport failure's name when no response came back."""
    return error if status == 0 and error else str(status)


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {v}" for k, v in value.items()) or "-"
    return str(value)


def render_report(report: dict[str, Any], console: Console | None = None) -> None:
    """Print one report as a two-column table."""
    table = Table(title=f"sellarec load test: {report['mode']} loop, /{report['endpoint']}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in REPORT_KEYS:
        value = report[key]
        if key in ("error_rate", "rate_limited_rate") and value is not None:
            table.add_row(key, f"{100 * value:.2f} %")
        else:
            table.add_row(key, _fmt(value, 3 if key.endswith("_rate") else 1))
    if report["inflight_cap_hits"]:
        table.caption = (
            f"[yellow]{report['inflight_cap_hits']} arrivals dropped at the in-flight cap "
            f"({report['inflight_cap']}): the service (or this client) is not keeping up[/]"
        )
    (console or Console()).print(table)


def render_sweep(reports: list[dict[str, Any]], console: Console | None = None) -> None:
    """Print one row per sweep step."""
    table = Table(title="sellarec load test: sweep")
    for name in (
        "step",
        "req/s",
        "cand/s",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "err %",
        "429 %",
        "cap hits",
    ):
        table.add_column(name, justify="right")
    for r in reports:
        step = f"rate {r['target_rate']:g}" if r["mode"] == "open" else f"C={r['concurrency']}"
        err, r429 = r["error_rate"], r["rate_limited_rate"]
        table.add_row(
            step,
            _fmt(r["requests_per_s"]),
            _fmt(r["candidates_per_s"]),
            _fmt(r["latency_p50_ms"]),
            _fmt(r["latency_p90_ms"]),
            _fmt(r["latency_p99_ms"]),
            _fmt(None if err is None else 100 * err, 2),
            _fmt(None if r429 is None else 100 * r429, 2),
            str(r["inflight_cap_hits"]),
        )
    (console or Console()).print(table)
