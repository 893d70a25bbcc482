"""SmolLM2 through vLLM's `prompt_embeds` input vs our torch scorer: same P(Yes)?

Builds stage-3 prompts with spliced soft tokens (random projections, fixed seed) for a
few (history, title) pairs, scores them with `SellaRec.score` (plain torch path) and with
vLLM (`enable_prompt_embeds`, prefix caching, `logprob_token_ids=[yes, no]`), and prints
the largest |P_vllm - P_torch| and the engine start time.

    SELLAREC_CACHE_DIR=~/.cache/sellarec .venv/bin/python scripts/vllm/compare_smollm2.py

vLLM starts an engine-core process (spawn): everything runs under the __main__ guard.
"""

from __future__ import annotations

import argparse
import math
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-prefix-caching", action="store_true")
    parser.add_argument("--compile", action="store_true", help="let vLLM torch.compile (slow start)")
    parser.add_argument("--block-size", type=int, default=32)
    args = parser.parse_args()

    import torch
    from vllm import LLM, SamplingParams

    from sellarec.model.backbone import SMOLLM2_ALIAS, fetch_smollm2, load_backbone
    from sellarec.model.prompts import TemplateSpec, scoring_prompt
    from sellarec.model.sella import SellaRec
    from sellarec.model.soft_tokens import slot_positions

    torch.manual_seed(0)
    model, tokenizer, _ = load_backbone(SMOLLM2_ALIAS)
    scorer = SellaRec(model, tokenizer, TemplateSpec(), collab_dim=32)
    for proj in (scorer.proj_c, scorer.proj_w):
        proj.eval().requires_grad_(False)
    titles = ["Toy Story (1995)", "Heat (1995)", "Matrix, The (1999)", "Fargo (1996)", "Alien (1979)"]
    pairs = [(titles[: k % 6], titles[(k + 2) % 5]) for k in range(8)]
    encoded = [scorer.encoder.prompt(scoring_prompt(scorer.spec, h, t)) for h, t in pairs]
    n = len(encoded)
    with torch.no_grad():
        vectors = scorer.soft_vectors(
            torch.randn(n, 32), torch.randn(n, 32), torch.randn(n, scorer.llm_dim), n
        )
        torch_p = torch.sigmoid(scorer.score(encoded, vectors)).tolist()
        embeds = []
        for k, e in enumerate(encoded):
            ids = torch.tensor([e.ids])
            pos = slot_positions([e.slots])
            embeds.append(scorer.embed(ids, pos, vectors[k : k + 1])[0].contiguous())

    start = time.perf_counter()
    llm = LLM(
        model=str(fetch_smollm2()),
        dtype="float32",
        enable_prompt_embeds=True,
        enable_prefix_caching=not args.no_prefix_caching,
        block_size=args.block_size,
        max_model_len=1024,
        kv_cache_memory_bytes=1 << 30,
        enforce_eager=not args.compile,
        seed=0,
    )
    started = time.perf_counter() - start
    yes, no = scorer.head.yes_id, scorer.head.no_id
    params = SamplingParams(max_tokens=1, temperature=0.0, logprob_token_ids=[yes, no])
    for attempt in range(2):  # the second pass hits the prefix cache
        outputs = llm.generate([{"prompt_embeds": e} for e in embeds], params, use_tqdm=False)
        vllm_p = []
        for out in outputs:
            logprobs = out.outputs[0].logprobs[0]
            vllm_p.append(1 / (1 + math.exp(-(logprobs[yes].logprob - logprobs[no].logprob))))
        diff = max(abs(a - b) for a, b in zip(vllm_p, torch_p))
        print(f"pass {attempt}: max |P_vllm - P_torch| = {diff:.2e}")
    for (h, t), a, b in zip(pairs, torch_p, vllm_p):
        print(f"  history={len(h)} target={t!r}: torch {a:.6f} vllm {b:.6f}")
    print(
        f"engine start {started:.1f} s (prefix caching {not args.no_prefix_caching}, compile {args.compile})"
    )


if __name__ == "__main__":
    main()
