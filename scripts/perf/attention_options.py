"""The CPU shared-prefix attention's suffix part, its earlier form against its present one.

    .venv/bin/python scripts/perf/attention_options.py --threads 2 --reps 200

At SmolLM2's shapes (9 query heads, 3 key/value heads, head size 64) and the benchmark's
request shapes (`sellarec-bench`: a 177-token prefix, 56 of them the instruction kept at load):
- `repeat+causal`: the suffix's keys/values repeated per query head, `is_causal` per head,
  merged with the prefix call by log-sum-exp (the form before 2026-12-06);
- `grouped`: query heads grouped by their key/value head, a causal mask tiled per group
  (`model/prefix_attention.py` for runs of several candidates);
- `one call` (one candidate only): the prefix's and the suffix's keys in one call, no merge
  (`model/prefix_attention.py` for a run of one).
Prints each form's best time per call and its largest difference from the first form.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

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


def _merge(o_p: torch.Tensor, lse_p: torch.Tensor, o_s: torch.Tensor, lse_s: torch.Tensor) -> torch.Tensor:
    lse = torch.logaddexp(lse_p, lse_s)
    return o_p * torch.exp(lse_p - lse)[..., None] + o_s * torch.exp(lse_s - lse)[..., None]


def forms(m: int, s: int, p: int) -> dict[str, Callable[[], torch.Tensor]]:
    """Each form's call on random inputs; every one returns [m, KV, G * S, d]."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(m, HEADS, s, HEAD_DIM, generator=g)
    k, v = (torch.randn(m, KV_HEADS, s, HEAD_DIM, generator=g) for _ in range(2))
    k_p, v_p = (torch.randn(1, KV_HEADS, p, HEAD_DIM, generator=g) for _ in range(2))
    grouped_q = q.reshape(m, KV_HEADS, GROUPS * s, HEAD_DIM)
    above = torch.ones(s, s, dtype=torch.bool).triu(1)
    tiled = torch.zeros(s, s).masked_fill(above, float("-inf")).repeat(GROUPS, 1)[None, None]

    def prefix_part() -> tuple[torch.Tensor, torch.Tensor]:
        folded = grouped_q.transpose(0, 1).reshape(1, KV_HEADS, m * GROUPS * s, HEAD_DIM)
        o_p, lse_p = FLASH(folded, k_p, v_p, 0.0, False, scale=SCALE)[:2]
        o_p = o_p.view(KV_HEADS, m, GROUPS * s, HEAD_DIM).transpose(0, 1)
        return o_p, lse_p.view(KV_HEADS, m, GROUPS * s).transpose(0, 1)

    def repeat_causal() -> torch.Tensor:
        k_s, v_s = k.repeat_interleave(GROUPS, 1), v.repeat_interleave(GROUPS, 1)
        o_s, lse_s = FLASH(q, k_s, v_s, 0.0, True, scale=SCALE)[:2]
        shape = (m, KV_HEADS, GROUPS * s)
        return _merge(*prefix_part(), o_s.reshape(*shape, HEAD_DIM), lse_s.reshape(shape))

    def grouped() -> torch.Tensor:
        o_s, lse_s = FLASH(grouped_q, k, v, 0.0, False, attn_mask=tiled, scale=SCALE)[:2]
        return _merge(*prefix_part(), o_s, lse_s)

    out = {"repeat+causal": repeat_causal, "grouped": grouped}
    if m == 1:
        mask = torch.cat([torch.zeros(1, 1, GROUPS * s, p), tiled], -1)

        def one_call() -> torch.Tensor:
            keys, values = torch.cat([k_p, k], 2), torch.cat([v_p, v], 2)
            return FLASH(grouped_q, keys, values, 0.0, False, attn_mask=mask, scale=SCALE)[0]

        out["one call"] = one_call
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for label, m, s, p in CASES:
        calls = forms(m, s, p)
        reference = next(iter(calls.values()))()
        best = {name: float("inf") for name in calls}
        for _ in range(args.reps):  # interleaved, so that a drifting machine slows all alike
            for name, fn in calls.items():
                start = time.perf_counter()
                fn()
                best[name] = min(best[name], time.perf_counter() - start)
        for name, fn in calls.items():
            diff = float((fn() - reference).abs().max())
            print(f"{label:46s} {name:14s} best {best[name] * 1e3:6.3f} ms  max|diff| {diff:.1e}", flush=True)


if __name__ == "__main__":
    main()
