"""Latency tail of a single compute-bound server under Poisson arrivals (M/D/1), simulated.

    python scripts/perf/queue_tail.py --load 0.5

Every request costs the same model time S, and merging requests into one batch buys no
throughput (a CPU is compute-bound: a batch of k requests takes k x S). Prints p50, p90
and p99 of the response time, in units of S (S is about the idle p50), for two batchers:
`fifo` runs one request at a time (SELLAREC_MAX_BATCH_REQUESTS=1) and `merge` runs
everything queued when the model frees up as one batch (the default batcher with a
token budget that admits them). docs/performance.md uses it to show that "p99 within 2x
the idle p50 at half the maximum throughput" cannot hold for such a server.
"""

from __future__ import annotations

import argparse

import numpy as np


def simulate(load: float, n: int, merge: bool, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1.0 / load, n))  # S = 1
    out = np.empty(n)
    free_at, i = 0.0, 0
    while i < n:
        start = max(free_at, arrivals[i])
        j = int(np.searchsorted(arrivals, start, side="right")) if merge else i + 1
        free_at = start + (j - i)  # a batch of j - i requests costs j - i
        out[i:j] = free_at - arrivals[i:j]
        i = j
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--load", type=float, default=0.5, help="utilisation: arrival rate x S")
    parser.add_argument("--requests", type=int, default=200_000)
    args = parser.parse_args()
    for name, merge in (("fifo", False), ("merge", True)):
        r = simulate(args.load, args.requests, merge)
        p50, p90, p99 = np.percentile(r, [50, 90, 99])
        print(f"{name:5s} load {args.load:.2f}: p50 {p50:.2f} S, p90 {p90:.2f} S, p99 {p99:.2f} S")


if __name__ == "__main__":
    main()
