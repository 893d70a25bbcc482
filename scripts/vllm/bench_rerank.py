"""Rerank speed on SmolLM2: the plain path, our torch engine and vLLM, same prompts, one run.

Every timed repetition is a new request: a new user (collaborative vector and 10-title
history) and new candidates, so no path can reuse a previous repetition's prefix (vLLM's
prefix cache would otherwise serve the whole prefix from memory). All paths see the same
requests in the same order; each repetition is timed for every path in turn, so the load
that other processes put on the machine spreads over all of them; vLLM's prefix cache is
emptied before each vLLM run (the vLLM paths would otherwise find the request cached).

Paths:
- plain: `SellaRec.score`, the whole prompt of every pair, right-padded batches;
- torch: the service's torch backend (`TorchBackend.score`: each prefix once, candidates
  continue its keys/values, two head rows);
- vllm: `VllmBackend.score` (prompt embeddings, two-token logprobs, one `generate` call)
  with the prefix cache (`vllm`) or without it (`--no-prefix-caching`: `vllm-nocache`).

    SELLAREC_CACHE_DIR=/root/.cache/sellarec VLLM_CPU_OMP_THREADS_BIND=0-1 \\
        .venv/bin/python scripts/vllm/bench_rerank.py --candidates 1,20,100 --reps 3

Titles come from the ML-1M split when it is on disk (read only, nothing is written), else
from a synthetic generator of similar length. Results: one JSON line per (path, size).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
from pathlib import Path

ML1M = Path(os.environ.get("SELLAREC_SHARED", "/work/shared")) / "data/ml-1m/train.parquet"


def title_pool() -> list[str]:
    if ML1M.exists():
        import pandas as pd

        return sorted(set(pd.read_parquet(ML1M, columns=["title"]).title))
    words = [
        "Night",
        "Return",
        "Summer",
        "Blue",
        "Stranger",
        "Empire",
        "Last",
        "River",
        "Secret",
        "House",
        "Dream",
        "Fire",
        "Road",
        "City",
    ]
    rng = random.Random(0)
    return [
        f"{' '.join(rng.choice(words) for _ in range(rng.randint(1, 4)))}, The ({rng.randint(1930, 2000)})"
        for _ in range(4000)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidates", default="1,20,100")
    parser.add_argument("--reps", type=int, default=3, help="timed requests per size and path")
    parser.add_argument("--paths", default="plain,torch,vllm")
    parser.add_argument("--no-prefix-caching", action="store_true")
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--compile", action="store_true", help="vLLM with torch.compile (slow start)")
    parser.add_argument("--plain-batch", type=int, default=16)
    parser.add_argument("--max-batch-tokens", type=int, default=8192)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="append the JSON lines here")
    args = parser.parse_args()

    import torch

    from model.backbone import SMOLLM2_ALIAS, fetch_smollm2, load_backbone
    from model.prompts import TemplateSpec, item_prompt, scoring_prompt, user_prompt
    from model.sella import SellaRec
    from service.backend import TorchBackend

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model, tokenizer, _ = load_backbone(SMOLLM2_ALIAS)
    scorer = SellaRec(model, tokenizer, TemplateSpec(), collab_dim=256)
    for proj in (scorer.proj_c, scorer.proj_w):
        proj.eval().requires_grad_(False)
    torch_backend = TorchBackend(scorer, max_batch_tokens=args.max_batch_tokens)
    paths = args.paths.split(",")
    if args.no_prefix_caching:
        paths = [p for p in paths if not p.startswith("vllm")] + ["vllm-nocache"]
    vllm_backend = None
    start_s = None
    if any(p.startswith("vllm") for p in paths):
        from service.vllm_backend import VllmBackend, VllmOptions

        options = VllmOptions(
            prefix_caching=not args.no_prefix_caching,
            block_size=args.block_size,
            enforce_eager=not args.compile,
            max_model_len=1024,
        )
        t0 = time.perf_counter()
        vllm_backend = VllmBackend(scorer, fetch_smollm2(), options, args.max_batch_tokens)
        start_s = time.perf_counter() - t0

    pool = title_pool()
    rng = random.Random(args.seed)

    def request(n: int):
        history = rng.sample(pool, 10)
        cands = rng.sample(pool, n)
        with torch.inference_mode():
            user = scorer.soft_vectors(torch.randn(1, 256), None, None, 1)
            items = scorer.soft_vectors(None, torch.randn(n, 256), torch.randn(n, scorer.llm_dim), n)
        prefix = scorer.encoder.segments(user_prompt(scorer.spec, history), lead=True)
        suffixes = [scorer.encoder.segments(item_prompt(scorer.spec, t)) for t in cands]
        full = [scorer.encoder.prompt(scoring_prompt(scorer.spec, history, t)) for t in cands]
        vectors = items.clone()
        vectors[:, 0] = user[0, 0]
        return prefix, user, suffixes, items, full, vectors

    def run(path: str, req) -> None:
        prefix, user, suffixes, items, full, vectors = req
        n = len(suffixes)
        with torch.inference_mode():
            if path == "plain":
                for s in range(0, n, args.plain_batch):
                    scorer.score(full[s : s + args.plain_batch], vectors[s : s + args.plain_batch])
            elif path == "torch":
                torch_backend.score([prefix], user, [0] * n, suffixes, items)
            else:
                vllm_backend.score([prefix], user, [0] * n, suffixes, items)

    for n in map(int, args.candidates.split(",")):
        warmup = request(n)
        for path in paths:
            run(path, warmup)
        times: dict[str, list[float]] = {p: [] for p in paths}
        reqs = [request(n) for _ in range(args.reps)]
        for req in reqs:
            for path in paths:
                if path.startswith("vllm"):
                    # Each vLLM path sees the request as new: nothing cached by the path before.
                    vllm_backend.llm.reset_prefix_cache()
                t0 = time.perf_counter()
                run(path, req)
                times[path].append(time.perf_counter() - t0)
        prefix_tokens = statistics.mean(len(r[0]) for r in reqs)
        suffix_tokens = statistics.mean(len(s) for r in reqs for s in r[2])
        for path in paths:
            rates = sorted(n / t for t in times[path])
            line = {
                "path": path,
                "candidates": n,
                "best_per_s": round(rates[-1], 3),
                "median_per_s": round(statistics.median(rates), 3),
                "worst_per_s": round(rates[0], 3),
                "best_ms": round(1000 * min(times[path]), 1),
                "prefix_tokens": round(prefix_tokens, 1),
                "suffix_tokens": round(suffix_tokens, 1),
                "block_size": args.block_size if path.startswith("vllm") else None,
                "vllm_start_s": round(start_s, 1) if path.startswith("vllm") and start_s else None,
                "omp_bind": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto"),
                "threads": args.threads,
                "compile": args.compile,
                "load1": round(os.getloadavg()[0], 2),
            }
            print(json.dumps(line), flush=True)
            if args.out:
                with args.out.open("a") as f:
                    f.write(json.dumps(line) + "\n")
    if vllm_backend is not None:
        vllm_backend.close()


if __name__ == "__main__":
    main()
