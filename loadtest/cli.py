"""`sellarec-loadtest`: drive a running scoring service and report what it sustains.

    sellarec-loadtest run --rate 50 --duration 30                # open loop, Poisson
    sellarec-loadtest run --concurrency 8 --requests 2000        # closed loop
    sellarec-loadtest sweep --rates 10,20,40,80 --duration 20    # latency vs throughput
    sellarec-loadtest idle --requests 50                         # idle p50

The JSON report of `run` holds the keys of `loadtest.stats.REPORT_KEYS` plus `url` and
`workload`; `sweep` writes `{"url", "workload", "mode", "steps": [report, ...]}`.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from dataclasses import asdict
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from sellarec.loadtest.plot import plot_latency_throughput, step_label
from sellarec.loadtest.runner import LoadPlan, check_ready, run_plan
from sellarec.loadtest.stats import render_report, render_sweep, summarize
from sellarec.loadtest.sweep import run_sweep
from sellarec.loadtest.workload import Workload, WorkloadConfig, default_ids, load_ids

app = typer.Typer(
    help="Load tester for the SeLLa-Rec scoring service (talks to it over HTTP only).",
    no_args_is_help=True,
    add_completion=False,
)
console = Console()

DEFAULT_REQUESTS = 200


class EndpointName(str, Enum):
    score = "score"
    rerank = "rerank"


# Options shared by the subcommands.
Url = Annotated[str, typer.Option(help="Base URL of the service.")]
EndpointOpt = Annotated[EndpointName, typer.Option("--endpoint", help="API to drive.")]
Token = Annotated[
    str | None,
    typer.Option(envvar="SELLAREC_LOADTEST_TOKEN", help="Bearer token, if the service wants one."),
]
Timeout = Annotated[float, typer.Option("--timeout", help="Per-request timeout (s).")]
WaitReady = Annotated[
    float, typer.Option(help="Wait up to this long for GET /readyz to answer 200; 0: skip.")
]
Requests = Annotated[
    int | None,
    typer.Option("--requests", "-n", help=f"Measured requests (default {DEFAULT_REQUESTS} if no duration)."),
]
Duration = Annotated[float | None, typer.Option("--duration", help="Seconds of measured load.")]
Warmup = Annotated[int, typer.Option(help="Requests sent first and left out of the stats.")]
MaxInFlight = Annotated[
    int, typer.Option(help="Open loop: cap on requests in flight; arrivals beyond it are dropped.")
]
UsersFile = Annotated[Path | None, typer.Option(help="Known user ids: one per line, or JSON.", exists=True)]
ItemsFile = Annotated[Path | None, typer.Option(help="Known item ids: one per line, or JSON.", exists=True)]
NUsers = Annotated[int, typer.Option(help="Without --users-file: users '1'..'N'.")]
NItems = Annotated[int, typer.Option(help="Without --items-file: items '1'..'N'.")]
Candidates = Annotated[int, typer.Option("--candidates", "-k", help="Candidates per request.")]
ColdUsers = Annotated[float, typer.Option(help="Fraction of requests from unseen users.")]
ColdItems = Annotated[float, typer.Option(help="Fraction of candidates unseen, with a title.")]
History = Annotated[float, typer.Option(help="Fraction of /score requests carrying history.")]
HistoryLen = Annotated[int, typer.Option(help="Items in a carried history.")]
TopN = Annotated[int | None, typer.Option(help="top_n for /rerank.")]
Seed = Annotated[int, typer.Option(help="Seed of the workload and arrival RNGs.")]
ColdTag = Annotated[
    str | None, typer.Option(help="Tag inside cold ids (default: random, so they stay cold).")
]


def _workload(
    endpoint: EndpointName,
    users_file: Path | None,
    items_file: Path | None,
    n_users: int,
    n_items: int,
    candidates: int,
    cold_user_frac: float,
    cold_item_frac: float,
    history_frac: float,
    history_len: int,
    top_n: int | None,
    seed: int,
    cold_tag: str | None,
) -> Workload:
    try:
        config = WorkloadConfig(
            user_ids=load_ids(users_file, "user") if users_file else default_ids(n_users),
            item_ids=load_ids(items_file, "item") if items_file else default_ids(n_items),
            candidates=candidates,
            cold_user_frac=cold_user_frac,
            cold_item_frac=cold_item_frac,
            history_frac=history_frac,
            history_len=history_len,
            endpoint=endpoint.value,
            top_n=top_n,
            seed=seed,
            cold_tag=secrets.token_hex(3) if cold_tag is None else cold_tag,
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    return Workload(config)


def _describe(workload: Workload) -> dict[str, Any]:
    """The workload as it goes into the JSON: the config without the id lists."""
    config = asdict(workload.config)
    config["n_users"] = len(config.pop("user_ids"))
    config["n_items"] = len(config.pop("item_ids"))
    return config


def _plan(**kwargs: Any) -> LoadPlan:
    if kwargs["requests"] is None and kwargs["duration_s"] is None:
        kwargs["requests"] = DEFAULT_REQUESTS
    try:
        return LoadPlan(**kwargs)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc


def _ensure_ready(url: str, token: str | None, wait_ready: float) -> None:
    if wait_ready > 0 and not asyncio.run(check_ready(url, token=token, timeout_s=wait_ready)):
        console.print(f"[red]{url}/readyz did not answer 200 within {wait_ready:g} s[/]")
        raise typer.Exit(2)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    console.print(f"wrote {path}")


@app.command()
def run(
    url: Url = "http://127.0.0.1:8000",
    endpoint: EndpointOpt = EndpointName.score,
    token: Token = None,
    rate: Annotated[float | None, typer.Option(help="Open loop: Poisson arrivals per second.")] = None,
    concurrency: Annotated[
        int | None, typer.Option("--concurrency", "-c", help="Closed loop: workers (default 1).")
    ] = None,
    requests: Requests = None,
    duration: Duration = None,
    warmup: Warmup = 5,
    max_in_flight: MaxInFlight = 1024,
    timeout: Timeout = 30.0,
    wait_ready: WaitReady = 10.0,
    users_file: UsersFile = None,
    items_file: ItemsFile = None,
    n_users: NUsers = 1000,
    n_items: NItems = 1000,
    candidates: Candidates = 20,
    cold_user_frac: ColdUsers = 0.0,
    cold_item_frac: ColdItems = 0.0,
    history_frac: History = 0.0,
    history_len: HistoryLen = 10,
    top_n: TopN = None,
    seed: Seed = 0,
    cold_tag: ColdTag = None,
    json_out: Annotated[Path | None, typer.Option(help="Write the report here as JSON.")] = None,
) -> None:
    """One load run: open loop with --rate, closed loop with --concurrency."""
    if rate is None and concurrency is None:
        concurrency = 1
    workload = _workload(
        endpoint,
        users_file,
        items_file,
        n_users,
        n_items,
        candidates,
        cold_user_frac,
        cold_item_frac,
        history_frac,
        history_len,
        top_n,
        seed,
        cold_tag,
    )
    plan = _plan(
        rate=rate,
        concurrency=concurrency,
        requests=requests,
        duration_s=duration,
        warmup=warmup,
        max_in_flight=max_in_flight,
        seed=seed,
    )
    _ensure_ready(url, token, wait_ready)
    result = asyncio.run(run_plan(url, workload, plan, token=token, timeout_s=timeout))
    report = summarize(result)
    render_report(report, console)
    if json_out is not None:
        _write_json(json_out, {**report, "url": url, "workload": _describe(workload)})
    if report["ok"] == 0:
        raise typer.Exit(1)


@app.command()
def sweep(
    url: Url = "http://127.0.0.1:8000",
    endpoint: EndpointOpt = EndpointName.score,
    token: Token = None,
    rates: Annotated[str | None, typer.Option(help="Open loop: comma-separated rates, e.g. 1,2,4.")] = None,
    concurrencies: Annotated[
        str | None, typer.Option(help="Closed loop: comma-separated concurrencies, e.g. 1,2,4,8.")
    ] = None,
    requests: Requests = None,
    duration: Duration = None,
    warmup: Warmup = 5,
    max_in_flight: MaxInFlight = 1024,
    timeout: Timeout = 30.0,
    wait_ready: WaitReady = 10.0,
    stop_error_rate: Annotated[
        float | None, typer.Option(help="Stop after a step whose error rate exceeds this.")
    ] = None,
    users_file: UsersFile = None,
    items_file: ItemsFile = None,
    n_users: NUsers = 1000,
    n_items: NItems = 1000,
    candidates: Candidates = 20,
    cold_user_frac: ColdUsers = 0.0,
    cold_item_frac: ColdItems = 0.0,
    history_frac: History = 0.0,
    history_len: HistoryLen = 10,
    top_n: TopN = None,
    seed: Seed = 0,
    cold_tag: ColdTag = None,
    json_out: Annotated[Path, typer.Option(help="All steps' reports, as JSON.")] = Path("sweep.json"),
    plot_out: Annotated[Path, typer.Option(help="Latency-vs-throughput PNG.")] = Path("sweep.png"),
) -> None:
    """Step the rate (open loop) or the concurrency (closed loop); plot latency vs throughput."""
    if (rates is None) == (concurrencies is None):
        raise typer.BadParameter("give exactly one of --rates or --concurrencies")
    steps = _parse_steps(rates if rates is not None else concurrencies, float if rates else int)
    workload = _workload(
        endpoint,
        users_file,
        items_file,
        n_users,
        n_items,
        candidates,
        cold_user_frac,
        cold_item_frac,
        history_frac,
        history_len,
        top_n,
        seed,
        cold_tag,
    )
    common = dict(
        requests=requests,
        duration_s=duration,
        warmup=warmup,
        max_in_flight=max_in_flight,
        seed=seed,
    )
    if rates is not None:
        plans = [_plan(rate=step, concurrency=None, **common) for step in steps]
    else:
        plans = [_plan(rate=None, concurrency=int(step), **common) for step in steps]
    _ensure_ready(url, token, wait_ready)

    def progress(report: dict[str, Any]) -> None:
        console.print(
            f"{step_label(report)}: {report['requests']} requests, "
            f"p50 {_num(report['latency_p50_ms'])} ms, "
            f"{_num(report['candidates_per_s'])} candidates/s"
        )

    reports = asyncio.run(
        run_sweep(
            url,
            workload,
            plans,
            token=token,
            timeout_s=timeout,
            stop_error_rate=stop_error_rate,
            on_step=progress,
        )
    )
    render_sweep(reports, console)
    _write_json(
        json_out,
        {
            "url": url,
            "mode": plans[0].mode,
            "endpoint": endpoint.value,
            "workload": _describe(workload),
            "steps": reports,
        },
    )
    plot_latency_throughput(reports, plot_out, title=f"sellarec /{endpoint.value}: {url}")
    console.print(f"wrote {plot_out}")


@app.command()
def idle(
    url: Url = "http://127.0.0.1:8000",
    endpoint: EndpointOpt = EndpointName.score,
    token: Token = None,
    requests: Annotated[int, typer.Option("--requests", "-n", help="Sequential requests.")] = 50,
    warmup: Warmup = 5,
    timeout: Timeout = 30.0,
    wait_ready: WaitReady = 10.0,
    users_file: UsersFile = None,
    items_file: ItemsFile = None,
    n_users: NUsers = 1000,
    n_items: NItems = 1000,
    candidates: Candidates = 20,
    seed: Seed = 0,
    json_out: Annotated[Path | None, typer.Option(help="Write the report here as JSON.")] = None,
) -> None:
    """Idle latency: one request at a time, nothing else in flight."""
    workload = _workload(
        endpoint,
        users_file,
        items_file,
        n_users,
        n_items,
        candidates,
        0.0,
        0.0,
        0.0,
        10,
        None,
        seed,
        None,
    )
    plan = _plan(rate=None, concurrency=1, requests=requests, duration_s=None, warmup=warmup, seed=seed)
    _ensure_ready(url, token, wait_ready)
    report = summarize(asyncio.run(run_plan(url, workload, plan, token=token, timeout_s=timeout)))
    render_report(report, console)
    console.print(f"idle p50: {_num(report['latency_p50_ms'], 2)} ms")
    if json_out is not None:
        _write_json(json_out, {**report, "url": url, "workload": _describe(workload)})
    if report["ok"] == 0:
        raise typer.Exit(1)


def _parse_steps(text: str | None, kind: type) -> list[float]:
    try:
        steps = [kind(part) for part in (text or "").split(",") if part.strip()]
    except ValueError as exc:
        raise typer.BadParameter(f"cannot read steps from {text!r}: {exc}") from exc
    if not steps:
        raise typer.BadParameter("no steps given")
    return steps


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"
