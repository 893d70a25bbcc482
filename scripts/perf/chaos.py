"""Overload and store faults, end to end: what a caller sees when the service is pushed and Redis fails.

    python scripts/perf/chaos.py --bundle artifacts/demo        (or: make chaos)
    python scripts/perf/chaos.py --tiny                          (a random Qwen2 bundle, no training)

It starts its own Redis on a free port and loads the bundle there, starts `sellarec-serve`
on it, scores a fixed set of requests once (the baseline), measures capacity with one
request at a time, then runs an open loop (Poisson arrivals) at `--overload` x capacity for
`--duration` seconds. In the middle it pauses Redis (SIGSTOP, `--pause` seconds), then kills
it (SIGKILL), restarts it empty after `--down` seconds and loads the bundle again. It prints
counts by status, p50/p99 of the admitted (200) requests, how soon the first 429 came once
overloaded, the recovery time after the kill, and every score that differs from the
baseline by more than 1e-5. Everything it started is stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_bundle(root: Path, layers: int, hidden: int) -> Path:
    """A random Qwen2 with the SmolLM2 tokenizer and a full bundle (the test factories)."""
    sys.path.insert(0, str(ROOT / "tests"))
    import factories  # noqa: PLC0415 - the tests' factories, only for --tiny

    from sellarec.model.backbone import random_backbone  # noqa: PLC0415

    backbone = root / "backbone"
    random_backbone(factories.tiny_qwen2_config(layers=layers, hidden=hidden), seed=0).save_pretrained(
        backbone
    )
    factories.tokenizer().save_pretrained(backbone)
    return factories.make_bundle(root, backbone, name="chaos-tiny", n_users=50, n_items=len(factories.TITLES))


def start_redis(port: int) -> subprocess.Popen:
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            return proc
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("redis-server did not start")


async def load_bundle_into(url: str, prefix: str, bundle: Path) -> None:
    from sellarec.model.artifacts import load_bundle  # noqa: PLC0415
    from sellarec.service.store.admin import StoreAdmin  # noqa: PLC0415
    from sellarec.service.store.redis_store import connect  # noqa: PLC0415

    client = connect(url, timeout_s=10)
    try:
        await StoreAdmin(client, prefix).load(load_bundle(bundle))
    finally:
        await client.aclose()


def bodies(bundle: Path, count: int, candidates: int, seed: int) -> list[dict]:
    catalog = json.loads((bundle / "catalog.json").read_text())
    rng = random.Random(seed)
    items = catalog["items"]
    return [
        {"user_id": rng.choice(catalog["users"]), "items": rng.sample(items, min(candidates, len(items)))}
        for _ in range(count)
    ]


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


async def run(args: argparse.Namespace, bundle: Path, work: Path) -> None:
    redis_port, port = free_port(), args.port or free_port()
    url, prefix = f"redis://127.0.0.1:{redis_port}/0", f"chaos-{os.getpid()}"
    started = [start_redis(redis_port)]  # every Redis this run starts, stopped at the end
    server = None
    try:
        await load_bundle_into(url, prefix, bundle)
        env = {**os.environ, "SELLAREC_REDIS_PREFIX": prefix, "PYTHONPATH": str(ROOT)}
        log = (work / "server.log").open("w")
        server = subprocess.Popen(
            [sys.executable, "-m", "sellarec.service.cli", "--artifacts", str(bundle), "--redis-url", url,
             "--port", str(port), "--log-level", "warning"],
            env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        await drive(args, bundle, work, port, server, started, url, prefix, redis_port)
    finally:
        if server is not None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()
        for proc in started:
            proc.kill()
            proc.wait()


async def drive(
    args: argparse.Namespace,
    bundle: Path,
    work: Path,
    port: int,
    server: subprocess.Popen,
    started: list[subprocess.Popen],
    url: str,
    prefix: str,
    redis_port: int,
) -> None:
    base = f"http://127.0.0.1:{port}"
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=1000)
    async with httpx.AsyncClient(base_url=base, timeout=httpx.Timeout(args.timeout), limits=limits) as client:
        for _ in range(int(args.startup_timeout / 0.5)):
            try:
                if (await client.get("/readyz")).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None:
                raise RuntimeError(f"the server exited ({server.returncode}); see {work / 'server.log'}")
            await asyncio.sleep(0.5)
        else:
            raise RuntimeError("the server did not become ready")
        reqs = bodies(bundle, args.bodies, args.candidates, args.seed)
        baseline = []
        for body in reqs:
            answer = await client.post("/score", json=body)
            answer.raise_for_status()
            baseline.append([s["score"] for s in answer.json()["scores"]])
        # Capacity: one request at a time, back to back.
        start, served = time.perf_counter(), 0
        while time.perf_counter() - start < args.capacity_s:
            (await client.post("/score", json=reqs[served % len(reqs)])).raise_for_status()
            served += 1
        capacity = served / (time.perf_counter() - start)
        rate = args.overload * capacity
        print(f"capacity {capacity:.2f} req/s of {args.candidates} candidates (one at a time); "
              f"open loop at {rate:.2f} req/s for {args.duration:.0f} s")  # fmt: skip
        samples: list[dict] = []
        events: dict[str, float] = {}
        t0 = time.perf_counter()

        async def one(k: int) -> None:
            body = reqs[k % len(reqs)]
            sent = time.perf_counter() - t0
            try:
                answer = await client.post("/score", json=body)
                status, retry = answer.status_code, answer.headers.get("retry-after")
                scores = [s["score"] for s in answer.json()["scores"]] if status == 200 else None
            except httpx.HTTPError as err:
                status, retry, scores = 0, None, None
                events.setdefault("transport_error", sent)
                events["last_error"] = type(err).__name__
            drift = None
            if scores is not None:
                drift = float(np.max(np.abs(np.array(scores) - np.array(baseline[k % len(reqs)]))))
            samples.append({"sent": sent, "latency": time.perf_counter() - t0 - sent, "status": status,
                            "retry_after": retry, "drift": drift, "k": k})  # fmt: skip

        async def faults() -> None:
            await asyncio.sleep(args.duration * 0.3)
            events["pause"] = time.perf_counter() - t0
            os.kill(started[0].pid, signal.SIGSTOP)
            await asyncio.sleep(args.pause)
            os.kill(started[0].pid, signal.SIGCONT)
            events["resume"] = time.perf_counter() - t0
            await asyncio.sleep(max(args.duration * 0.6 - (time.perf_counter() - t0), 0))
            events["kill"] = time.perf_counter() - t0
            started[0].kill()
            started[0].wait()
            await asyncio.sleep(args.down)
            started.append(start_redis(redis_port))
            await load_bundle_into(url, prefix, bundle)
            events["restored"] = time.perf_counter() - t0

        rng, tasks, k = random.Random(args.seed), [], 0
        fault_task = asyncio.create_task(faults())
        due = 0.0
        while due < args.duration:
            await asyncio.sleep(max(due - (time.perf_counter() - t0), 0))
            tasks.append(asyncio.create_task(one(k)))
            k += 1
            due += rng.expovariate(rate)
        await fault_task
        await asyncio.gather(*tasks)
        report(samples, events, args)


def report(samples: list[dict], events: dict[str, float], args: argparse.Namespace) -> None:
    def phase(s: dict) -> str:
        if s["sent"] < events["pause"]:
            return "overload"
        if s["sent"] < events["kill"]:
            return "redis paused" if s["sent"] < events["resume"] else "after pause"
        return "redis killed" if s["sent"] < events["restored"] else "after restart"

    print(f"\nevents (s from start): pause {events['pause']:.1f}, resume {events['resume']:.1f}, "
          f"kill {events['kill']:.1f}, redis back and reloaded {events['restored']:.1f}")  # fmt: skip
    print(f"\n{'phase':<14} {'sent':>5}  statuses{'':<30} {'p50 200':>8} {'p99 200':>8}")
    for name in ("overload", "redis paused", "after pause", "redis killed", "after restart", "all"):
        part = [s for s in samples if name == "all" or phase(s) == name]
        ok = [s["latency"] for s in part if s["status"] == 200]
        counts = ", ".join(f"{k}: {v}" for k, v in sorted(Counter(s["status"] for s in part).items()))
        print(f"{name:<14} {len(part):>5}  {counts:<38} {pct(ok, 50):>7.2f}s {pct(ok, 99):>7.2f}s")
    refused = sorted(s["sent"] for s in samples if s["status"] == 429)
    print(f"\nfirst 429 at {refused[0]:.2f}s after the open loop began" if refused else "\nno 429")
    retry = [int(s["retry_after"]) for s in samples if s["retry_after"]]
    if retry:
        print(f"Retry-After: min {min(retry)} s, median {int(np.median(retry))} s, max {max(retry)} s")
    after = sorted(
        s["sent"] + s["latency"] for s in samples if s["status"] == 200 and s["sent"] >= events["kill"]
    )
    if after:
        print(f"recovery: first 200 {after[0] - events['kill']:.2f}s after the kill, "
              f"{after[0] - events['restored']:.2f}s after Redis was back and reloaded")  # fmt: skip
    five = [s for s in samples if s["status"] >= 500]
    print(f"5xx: {len(five)} ({Counter(s['status'] for s in five)})")
    drifted = [s for s in samples if s["drift"] is not None and s["drift"] > 1e-5]
    worst = max((s["drift"] for s in samples if s["drift"] is not None), default=0.0)
    print(
        f"scores differing from the baseline by more than 1e-5: {len(drifted)} "
        f"(largest difference {worst:.2e})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bundle", type=Path, default=None, help="Artifact bundle (default: artifacts/demo)")
    parser.add_argument("--tiny", action="store_true", help="Build and use a random Qwen2 bundle instead")
    parser.add_argument("--tiny-layers", type=int, default=8)
    parser.add_argument("--tiny-hidden", type=int, default=256)
    parser.add_argument("--candidates", type=int, default=3)
    parser.add_argument("--bodies", type=int, default=8, help="Distinct request bodies (each has a baseline)")
    parser.add_argument("--overload", type=float, default=2.0, help="Offered load, x the measured capacity")
    parser.add_argument("--duration", type=float, default=40.0, help="Seconds of open loop")
    parser.add_argument("--capacity-s", type=float, default=8.0, help="Seconds of capacity measurement")
    parser.add_argument("--pause", type=float, default=4.0, help="Seconds Redis stays paused")
    parser.add_argument("--down", type=float, default=3.0, help="Seconds Redis stays dead after the kill")
    parser.add_argument("--timeout", type=float, default=120.0, help="Client timeout per request")
    parser.add_argument("--startup-timeout", type=float, default=600.0)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sellarec-chaos-") as tmp:
        work = Path(tmp)
        if args.tiny:
            bundle = tiny_bundle(work, args.tiny_layers, args.tiny_hidden)
        else:
            bundle = args.bundle or ROOT / "artifacts" / "demo"
            if not (bundle / "manifest.json").exists():
                sys.exit(f"no bundle at {bundle}: run `make demo` first, or pass --bundle DIR or --tiny")
        asyncio.run(run(args, bundle.resolve(), work))


if __name__ == "__main__":
    main()
