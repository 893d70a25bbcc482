"""Serving the stage-1 LoRA through vLLM's LoRA support vs merged weights, with prompt embeddings.

A random rank-8 LoRA on q_proj/v_proj of SmolLM2 (the training defaults), B drawn so it
matters. Reference: torch, LoRA merged, `SellaRec.score`. Compared: vLLM on the merged
weights (what `service/backends/vllm_backend.py` does) and vLLM on the base weights with the adapter
as a `LoRARequest` (`enable_lora=True`). Prints the largest |dP| of each and candidates/s
for one 100-candidate request (one wave, prefix cache reset before each timed run).

    SELLAREC_CACHE_DIR=~/.cache/sellarec .venv/bin/python scripts/vllm/lora_check.py
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidates", type=int, default=100)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()

    import torch
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    from sellarec.model.backbone import SMOLLM2_ALIAS, fetch_smollm2, load_backbone
    from sellarec.model.lora import LoraSettings, attach_lora, merge
    from sellarec.model.prompts import TemplateSpec, scoring_prompt
    from sellarec.model.sella import SellaRec
    from sellarec.model.soft_tokens import slot_positions

    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp(prefix="sellarec-lora-"))
    model, tokenizer, _ = load_backbone(SMOLLM2_ALIAS)
    peft = attach_lora(model, LoraSettings())
    for name, param in peft.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)
    peft.save_pretrained(work / "adapter")
    merged = merge(peft).eval()
    merged.save_pretrained(work / "merged")
    tokenizer.save_pretrained(work / "merged")
    scorer = SellaRec(merged, tokenizer, TemplateSpec(), collab_dim=32)
    for proj in (scorer.proj_c, scorer.proj_w):
        proj.eval().requires_grad_(False)

    titles = ["Toy Story (1995)", "Heat (1995)", "Matrix, The (1999)", "Fargo (1996)", "Alien (1979)"]
    history = titles * 2
    n = args.candidates
    encoded = [
        scorer.encoder.prompt(scoring_prompt(scorer.spec, history, f"Film {k} (19{k % 100:02d})"))
        for k in range(n)
    ]
    with torch.no_grad():
        vectors = scorer.soft_vectors(
            torch.randn(1, 32).expand(n, -1), torch.randn(n, 32), torch.randn(n, 576), n
        )
        reference = torch.sigmoid(scorer.score(encoded[:8], vectors[:8])).tolist()
        embeds = [
            scorer.embed(torch.tensor([e.ids]), slot_positions([e.slots]), vectors[k : k + 1])[0]
            for k, e in enumerate(encoded)
        ]
    yes, no = scorer.head.yes_id, scorer.head.no_id
    params = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False, logprob_token_ids=[yes, no])
    common = dict(
        dtype="float32",
        enable_prompt_embeds=True,
        enable_prefix_caching=True,
        block_size=32,
        max_model_len=1024,
        kv_cache_memory_bytes=1 << 30,
        enforce_eager=True,
        max_num_batched_tokens=8192,
    )

    def p_yes(outputs) -> list[float]:
        out = []
        for o in outputs:
            lp = o.outputs[0].logprobs[0]
            out.append(1 / (1 + math.exp(-(lp[yes].logprob - lp[no].logprob))))
        return out

    for label, kwargs, lora in [
        ("merged", {"model": str(work / "merged")}, None),
        (
            "lora",
            {"model": str(fetch_smollm2()), "enable_lora": True, "max_lora_rank": 8, "max_loras": 1},
            LoRARequest("stage1", 1, str(work / "adapter")),
        ),
    ]:
        t0 = time.perf_counter()
        llm = LLM(**common, **kwargs)
        started = time.perf_counter() - t0
        prompts = [{"prompt_embeds": e} for e in embeds]
        got = p_yes(llm.generate(prompts[:8], params, lora_request=lora, use_tqdm=False))
        diff = max(abs(a - b) for a, b in zip(got, reference))
        rates = []
        for _ in range(args.reps):
            llm.reset_prefix_cache()
            t0 = time.perf_counter()
            llm.generate(prompts, params, lora_request=lora, use_tqdm=False)
            rates.append(n / (time.perf_counter() - t0))
        print(
            f"{label}: start {started:.1f} s, max |dP| vs torch merged {diff:.2e}, "
            f"{n} candidates: best {max(rates):.2f}/s, worst {min(rates):.2f}/s",
            flush=True,
        )
        llm.llm_engine.engine_core.shutdown()
        del llm


if __name__ == "__main__":
    main()
