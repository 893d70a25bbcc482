"""What the benchmarks score: model sizes, a tokenizer that needs no download, titles, scorers.

Speed does not depend on trained values, so a benchmark model is either SmolLM2 (the
weights at hand) or a randomly initialised model of a real architecture size. The random
ones are built directly on their device (a 7B model initialised on a GPU takes seconds,
on a CPU minutes). Their tokenizer is SmolLM2's when it is cached here, else a small
byte-level BPE trained in code on the benchmark's own prompts, so that a machine with
only this working tree (no network, no cache: the GPU machines) can run every benchmark.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerFast, Qwen2Config
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from sellarec.model.backbone import SMOLLM2_ALIAS, cache_dir, load_backbone, load_tokenizer, random_backbone
from sellarec.model.prompts import TemplateSpec, distillation_prompt, scoring_prompt
from sellarec.model.sella import SellaRec

#: Architecture sizes of the paper's family, for random-weight speed runs ("tiny": smoke tests).
ARCHES: dict[str, dict[str, int]] = {
    "tiny": dict(  # heads of 32: the smallest that vLLM's CPU attention takes
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1024,
    ),
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

#: Vocabulary of the built-in tokenizer: sized so that the benchmark's prompts get about
#: the token counts SmolLM2's tokenizer gives them (prefix 181 vs 177, suffix 16.5 vs 18.6).
BUILTIN_VOCAB = 440
BUILTIN_EOS = "<|endoftext|>"


def titles(n: int, seed: int) -> list[str]:
    """Movie-like titles of realistic token lengths (1-4 words and a year)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        k = int(torch.randint(1, 5, (1,), generator=g))
        words = [WORDS[int(i)] for i in torch.randint(0, len(WORDS), (k,), generator=g)]
        out.append(f"The {' '.join(words)} ({1950 + int(torch.randint(0, 50, (1,), generator=g))})")
    return out


@lru_cache(maxsize=1)
def builtin_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE trained here, in milliseconds, on the benchmark's own prompts.

    Deterministic (same corpus, same merges); every byte is in its alphabet, so any text
    encodes. Only token counts matter for speed: see BUILTIN_VOCAB.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    corpus = []
    pool = titles(200, seed=7)
    for spec in (TemplateSpec(), TemplateSpec(stage="stage1")):
        for i in range(0, len(pool), 10):
            history = pool[i : i + 10]
            corpus.append(scoring_prompt(spec, history, pool[(i + 37) % len(pool)]).render() + " Yes.")
            corpus.append(scoring_prompt(spec, history, pool[(i + 71) % len(pool)]).render() + " No.")
    corpus += [distillation_prompt(TemplateSpec(), t).render() for t in pool]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BUILTIN_VOCAB,
        special_tokens=[BUILTIN_EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=BUILTIN_EOS, pad_token=BUILTIN_EOS)


def smollm2_cached() -> bool:
    """True when SmolLM2 is converted in the cache (using it then needs no network)."""
    return (cache_dir() / SMOLLM2_ALIAS / "config.json").exists()


def bench_tokenizer(kind: str = "auto") -> tuple[PreTrainedTokenizerBase, str]:
    """(tokenizer, name) for random-weight models: smollm2, builtin, or auto (smollm2 if cached)."""
    if kind == "auto":
        kind = "smollm2" if smollm2_cached() else "builtin"
    if kind == "smollm2":
        return load_tokenizer(SMOLLM2_ALIAS), "smollm2"
    if kind == "builtin":
        return builtin_tokenizer(), "builtin"
    raise ValueError(f"unknown tokenizer {kind!r}: auto, smollm2 or builtin")


def random_model(arch: str, dtype: torch.dtype, device: str | torch.device, seed: int = 0) -> PreTrainedModel:
    """A randomly initialised Qwen2 of size `arch`, allocated and initialised on `device`."""
    config = Qwen2Config(**ARCHES[arch], max_position_embeddings=32768, tie_word_embeddings=False)
    return random_backbone(config, seed=seed, dtype=dtype, device=device)


def build_scorer(arch: str, device: str, dtype: torch.dtype, tokenizer: str = "auto") -> tuple[SellaRec, str]:
    """(scorer, tokenizer name): SmolLM2's real weights, or a random model of size `arch`."""
    if arch == "smollm2":
        model, tok, _ = load_backbone(SMOLLM2_ALIAS, dtype=dtype, device=device)
        name = "smollm2"
    else:
        tok, name = bench_tokenizer(tokenizer)
        if len(tok) > ARCHES[arch]["vocab_size"]:
            raise ValueError(f"the {name} tokenizer ({len(tok)} ids) does not fit {arch}'s vocabulary")
        model = random_model(arch, dtype, device)
    scorer = SellaRec(model, tok, TemplateSpec(), collab_dim=256)
    return scorer.to(device), name


def model_dir_for_vllm(scorer: SellaRec, arch: str, work: Path) -> Path:
    """A directory vLLM can load with the scorer's own weights and tokenizer."""
    if arch == "smollm2":
        from sellarec.model.backbone import resolve

        return Path(resolve(SMOLLM2_ALIAS))
    target = work / arch
    scorer.backbone.save_pretrained(target)
    scorer.tokenizer.save_pretrained(target)
    return target
