"""The torch backend with and without its prefix cache, interleaved in one process:

    python scripts/perf/prefix_cache_ab.py --sizes 1,20 --reps 7 --threads 1

Per rerank size, each repetition times the same request three ways: a backend that keeps no
prefix (`no cache`); a backend that keeps prefixes, emptied just before (`miss`: a new user,
whose prefix the call keeps); and the same backend again (`hit`: the user returning). Best
time of each, and each way's largest score difference from `no cache`. Interleaving makes
the ratios usable on a machine with other work beside it; the levels are not.
"""

from __future__ import annotations

import copy
import time

import torch
import typer

from sellarec.bench.cli import PREFIX_CACHE_BYTES, Request, parse_sizes
from sellarec.bench.workload import build_scorer
from sellarec.service.backends.torch_backend import TorchBackend


def main(
    sizes: str = typer.Option("1,20", help="Rerank sizes."),
    reps: int = typer.Option(7, help="Interleaved repetitions (best is reported)."),
    threads: int = typer.Option(1, help="torch threads."),
    arch: str = typer.Option("smollm2", help="smollm2 (real weights) or a random one (bench/workload.py)."),
    tokenizer: str = typer.Option("auto", help="Random archs: smollm2, builtin, auto (smollm2 if cached)."),
) -> None:
    torch.set_num_threads(threads)
    scorer, _ = build_scorer(arch, "cpu", torch.float32, tokenizer)
    plain = TorchBackend(copy.deepcopy(scorer), prefix_cache_bytes=0)
    kept = TorchBackend(scorer, prefix_cache_bytes=PREFIX_CACHE_BYTES)
    for n in parse_sizes(sizes):
        req = Request.of(scorer, n)

        def call(backend: TorchBackend, req: Request = req, n: int = n):
            start = time.perf_counter()
            scores = backend.score([req.prefix], req.user_vec, [0] * n, req.suffixes, req.item_vec)
            return time.perf_counter() - start, scores

        call(plain), call(kept)  # warm-up
        times: dict[str, list[float]] = {"no cache": [], "miss": [], "hit": []}
        diffs = dict.fromkeys(times, 0.0)
        for _ in range(reps):
            t, want = call(plain)
            times["no cache"].append(t)
            kept.prefix_cache.clear()
            for way in ("miss", "hit"):
                t, got = call(kept)
                times[way].append(t)
                diffs[way] = max(diffs[way], float(abs(got - want).max()))
        best = {way: min(ts) for way, ts in times.items()}
        print(
            f"{n} candidates, prefix {len(req.prefix)} tokens: "
            + ", ".join(f"{way} {1000 * t:.0f} ms" for way, t in best.items())
            + f"; hit {best['no cache'] / best['hit']:.2f}x, miss {best['no cache'] / best['miss']:.2f}x"
            + f"; max |score diff| miss {diffs['miss']:.1e}, hit {diffs['hit']:.1e}",
            flush=True,
        )


if __name__ == "__main__":
    typer.run(main)
