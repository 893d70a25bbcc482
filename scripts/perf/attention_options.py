"""The CPU shared-prefix attention, its earlier form against the one it has now.

    .venv/bin/python scripts/perf/attention_options.py --threads 2 --reps 200

At SmolLM2's shapes (9 query heads, 3 key/value heads, head size 64) and the benchmark's
request shapes (`sellarec-bench`: a 177-token prefix, 56 of them the instruction kept at load):
- `before`: the form before 2026-12-06, written out here (it is no longer in the project): the
  suffix's keys/values repeated per query head, `is_causal` per head, merged with the prefix
  call by log-sum-exp;
- `now`: `model/prefix_attention.py` itself (`_cpu_flash`: query heads grouped by their
  key/value head with a tiled causal mask; a run of one suffix in one call, no merge).
Prints each form's best time per call and its largest difference from `before`.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from sellarec.model import prefix_attention

FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
HEADS, KV_HEADS, HEAD_DIM = 9, 3, 64
GROUPS = HEADS // KV_HEADS
SCALE = HEAD_DIM**-0.5
#: (label, candidates in the run, suffix tokens, prefix tokens attended to)
CASES = [
    ("100 candidates (a chunk of 41)", 41, 21, 177),
    ("20 candidates", 20, 21, 177),
    ("one candidate (prompt after the instruction)", 1, 141, 56),
]


def forms(m: int, s: int, p: int) -> dict[str, Callable[[], torch.Tensor]]:
    """Each form's call on random inputs; both return [m, S, H, d]."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(m, HEADS, s, HEAD_DIM, generator=g)
    k, v = (torch.randn(m, KV_HEADS, s, HEAD_DIM, generator=g) for _ in range(2))
    k_p, v_p = (torch.randn(1, KV_HEADS, p, HEAD_DIM, generator=g) for _ in range(2))

    def before() -> torch.Tensor:
        grouped = q.reshape(m, KV_HEADS, GROUPS * s, HEAD_DIM)  # q head h uses kv head h // GROUPS
        folded = grouped.transpose(0, 1).reshape(1, KV_HEADS, -1, HEAD_DIM)
        o_p, lse_p = FLASH(folded, k_p, v_p, 0.0, False, scale=SCALE)[:2]
        o_p = o_p.view(KV_HEADS, m, GROUPS * s, HEAD_DIM).transpose(0, 1).reshape(m, HEADS, s, HEAD_DIM)
        lse_p = lse_p.view(KV_HEADS, m, GROUPS * s).transpose(0, 1).reshape(m, HEADS, s)
        k_s, v_s = k.repeat_interleave(GROUPS, 1), v.repeat_interleave(GROUPS, 1)
        o_s, lse_s = FLASH(q, k_s, v_s, 0.0, True, scale=SCALE)[:2]
        lse = torch.logaddexp(lse_p, lse_s)
        out = o_p * torch.exp(lse_p - lse)[..., None] + o_s * torch.exp(lse_s - lse)[..., None]
        return out.transpose(1, 2).contiguous()

    # One forward's state: its masks are built by the first call, as by a forward's first layer.
    shared = prefix_attention.SharedPrefix(
        layers=[(k_p, v_p)], key_mask=torch.ones(1, p, dtype=torch.bool), runs=[(0, 0, m)], padded=False
    )

    def now() -> torch.Tensor:
        return prefix_attention._cpu_flash(shared, q, k, v, k_p, v_p, SCALE)[0]

    return {"before": before, "now": now}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for label, m, s, p in CASES:
        calls = forms(m, s, p)
        reference = calls["before"]()
        best = {name: float("inf") for name in calls}
        for _ in range(args.reps):  # interleaved, so that a drifting machine slows both alike
            for name, fn in calls.items():
                start = time.perf_counter()
                fn()
                best[name] = min(best[name], time.perf_counter() - start)
        for name, fn in calls.items():
            diff = float((fn() - reference).abs().max())
            print(f"{label:46s} {name:7s} best {best[name] * 1e3:6.3f} ms  max|diff| {diff:.1e}", flush=True)


if __name__ == "__main__":
    main()
