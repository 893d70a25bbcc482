"""Interleaved A/B of the CPU fast path's options on the engine (docs/performance.md).

    .venv/bin/python scripts/perf/cpu_options.py --candidates 1,20,100 --threads 1 --reps 7

Variants, each on its own copy of SmolLM2 (fp32), timed in turn within every repetition so
that a busy machine slows them alike: `plain` (nn.Linear, aten::mm), `packed` (linear
layers on packed oneDNN weights), `all-rows` (packed, SwiGLU fused, the last layer
computing every token's row), `packed+swiglu` (the default fast path: the MLP's gate fused
into oneDNN post-ops, the last layer's query/output projections and MLP on the rows the
scorer reads only), at one candidate `split` (the prefix and the suffix as two
forwards, as before the one-candidate rule) against the backend's whole-prompt forward, and
with `--compiled` a `compiled` variant: the plain decoder with every layer's forward under
`torch.compile(dynamic=True)` and Inductor's freezing (its own weight packing and fused
element-wise kernels; the first call compiles, minutes on 2 cores).
Prints the best and median rate of each, its largest score difference from `plain`, and
its speed-up. Environment settings (OMP_WAIT_POLICY, OMP_PROC_BIND) act at start-up:
compare them by running this script under each.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

from sellarec.bench.workload import build_scorer, titles
from sellarec.model import fast_path
from sellarec.model.prompts import item_prompt, user_prompt
from sellarec.model.sella import SellaRec
from sellarec.service.backends.torch_backend import TorchBackend


def variants(base: SellaRec, compiled: bool = False) -> dict[str, TorchBackend]:
    packed = copy.deepcopy(base)
    fast_path.enable(packed.decoder, packed.llm_dim, fuse_mlp=False, skip_unread_rows=False)
    every_row = copy.deepcopy(base)
    fast_path.enable(every_row.decoder, every_row.llm_dim, skip_unread_rows=False)
    out = {
        "plain": TorchBackend(base, cpu_fast_path=False),
        "packed": TorchBackend(packed, cpu_fast_path=False),
        "all-rows": TorchBackend(every_row, cpu_fast_path=False),
        "packed+swiglu": TorchBackend(copy.deepcopy(base)),
    }
    if compiled:
        # Dynamo cannot trace the packed layers' opaque oneDNN weights, so this compiles the
        # plain decoder; freezing lets Inductor pack the weights itself.
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True
        torch._dynamo.config.recompile_limit = 4 * len(base.decoder.layers)  # one guard set per layer
        scorer = copy.deepcopy(base)
        for layer in scorer.decoder.layers:
            layer.forward = torch.compile(layer.forward, dynamic=True)
        out["compiled"] = TorchBackend(scorer, cpu_fast_path=False)
    return out


def requests(backend: TorchBackend, n: int) -> dict[str, Callable[[], np.ndarray]]:
    scorer = backend.scorer
    prefix = scorer.encoder.segments(user_prompt(scorer.spec, titles(10, seed=1)), lead=True)
    suffixes = [scorer.encoder.segments(item_prompt(scorer.spec, t)) for t in titles(n, seed=100 + n)]
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        users = scorer.soft_vectors(torch.randn(1, 256, generator=g), None, None, 1)
        items = scorer.soft_vectors(
            None, torch.randn(n, 256, generator=g), torch.randn(n, scorer.llm_dim, generator=g), n
        )
    out = {"": lambda: backend.score([prefix], users, [0] * n, suffixes, items)}
    if n == 1:

        @torch.inference_mode()
        def split() -> np.ndarray:
            state = scorer.run_prefixes([prefix], users)
            return torch.sigmoid(scorer.score_suffixes(state, torch.tensor([0]), suffixes, items)).numpy()

        out["split"] = split
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidates", default="1,20,100")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--compiled", action="store_true", help="also time torch.compile of the decoder")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base, _ = build_scorer("smollm2", "cpu", torch.float32)
    backends = variants(base, args.compiled)
    for n in [int(x) for x in args.candidates.split(",")]:
        calls = {}
        for name, backend in backends.items():
            for suffix, fn in requests(backend, n).items():
                if suffix and name != "packed+swiglu":
                    continue
                calls[f"{name} {suffix}".strip()] = fn
        reference = calls["plain"]()
        for fn in calls.values():
            fn()  # warm-up (and, for `compiled`, compilation) outside the timed repetitions
        times: dict[str, list[float]] = {name: [] for name in calls}
        for _ in range(args.reps):
            for name, fn in calls.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
        base_best = min(times["plain"])
        for name, ts in times.items():
            diff = float(np.abs(calls[name]() - reference).max())
            print(
                f"{n:4d} candidates, {args.threads} threads  {name:20s} best {n / min(ts):7.2f}/s  "
                f"median {n / statistics.median(ts):7.2f}/s  x{base_best / min(ts):.2f}  max|dP| {diff:.1e}",
                flush=True,
            )


if __name__ == "__main__":
    main()
