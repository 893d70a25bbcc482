"""The CPU fast path (model/fast_path.py): same scores as the reference path, same checkpoints."""

from __future__ import annotations

import platform
import subprocess
import sys
from types import SimpleNamespace

import factories
import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from sellarec.model import fast_path
from sellarec.model.backbone import load_backbone, random_backbone
from sellarec.model.loader import load_scorer
from sellarec.model.prompts import TemplateSpec, item_prompt, user_prompt
from sellarec.model.sella import SellaRec
from sellarec.service.backends.torch_backend import TorchBackend

HISTORIES = [["Toy Story (1995)", "Heat (1995)"], [], [f"Film {k}" for k in range(12)]]
CANDIDATES = [["Alien (1979)", "Amélie (2001)", "千と千尋の神隠し (2001)", "Fargo (1996)"], ["Babe (1995)"]]


def _batch(scorer: SellaRec, per_user: list[list[str]], histories: list[list[str]]):
    """Prefixes, vectors, rows and suffixes of a batch of requests (one per user)."""
    prefixes = [scorer.encoder.segments(user_prompt(scorer.spec, h), lead=True) for h in histories]
    rows = [u for u, titles in enumerate(per_user) for _ in titles]
    suffixes = [scorer.encoder.segments(item_prompt(scorer.spec, t)) for titles in per_user for t in titles]
    g = torch.Generator().manual_seed(0)
    collab = scorer.proj_c.net[0].in_features  # d_C of the bundle
    with torch.inference_mode():
        prefix_vectors = scorer.soft_vectors(
            torch.randn(len(prefixes), collab, generator=g), None, None, len(prefixes)
        )
        suffix_vectors = scorer.soft_vectors(
            None,
            torch.randn(len(suffixes), collab, generator=g),
            torch.randn(len(suffixes), scorer.llm_dim, generator=g),
            len(suffixes),
        )
    return prefixes, prefix_vectors, rows, suffixes, suffix_vectors


def _reference(scorer: SellaRec, prefixes, prefix_vectors, rows, suffixes, suffix_vectors) -> torch.Tensor:
    """P(Yes) from the plain path: each whole prompt through the unpacked model."""
    vectors = suffix_vectors.clone()
    vectors[:, 0] = prefix_vectors[rows, 0]
    with torch.inference_mode():
        whole = [prefixes[r] + s for r, s in zip(rows, suffixes, strict=True)]
        return torch.sigmoid(scorer.score(whole, vectors).float())


@pytest.fixture(scope="module")
def bundle_scorers(tiny_bundle_dir):
    """(reference, served) scorers of the same bundle, LoRA merged; the served one is packed."""
    reference = load_scorer(tiny_bundle_dir).scorer
    served = load_scorer(tiny_bundle_dir).scorer
    return reference, TorchBackend(served)


def test_backend_packs_the_linear_layers_on_cpu_float32(bundle_scorers):
    _, backend = bundle_scorers
    layers = factories.tiny_qwen2_config().num_hidden_layers
    assert backend.fast_path.active
    assert backend.fast_path.linears == 7 * layers and backend.fast_path.mlps == layers
    assert not any(type(m) is nn.Linear for m in backend.scorer.decoder.modules())
    assert backend.keeps_freed_memory == (platform.libc_ver()[0] == "glibc")


def test_scores_match_the_reference_path(bundle_scorers):
    """Several users, one with a single candidate (its whole prompt runs in one forward)."""
    reference, backend = bundle_scorers
    batch = _batch(reference, CANDIDATES, HISTORIES[:2])
    got = torch.from_numpy(backend.score(*batch))
    want = _reference(reference, *batch)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    assert got.std() > 1e-3  # the scores differ, so agreeing means something


def test_a_single_candidate_scores_as_its_whole_prompt(bundle_scorers):
    reference, backend = bundle_scorers
    batch = _batch(reference, [["Heat (1995)"]], HISTORIES[2:])
    torch.testing.assert_close(
        torch.from_numpy(backend.score(*batch)), _reference(reference, *batch), rtol=0, atol=1e-4
    )


def test_distillation_matches_the_plain_model(bundle_scorers):
    reference, backend = bundle_scorers
    prompts = [reference.encoder.segments([f"Movie: {t}"], lead=True) for t in factories.TITLES[:4]]
    want = TorchBackend(reference, cpu_fast_path=False).distill(prompts)
    torch.testing.assert_close(backend.distill(prompts), want, rtol=0, atol=1e-4)


def _rows_computed(module: nn.Module) -> list[int]:
    """Rows (tokens) that each call of the packed `module` computes, recorded from now on."""
    seen: list[int] = []
    inner = module._mlp if isinstance(module, fast_path.PackedSwiGLU) else module._linear

    def recording(x: torch.Tensor) -> torch.Tensor:
        seen.append(x.reshape(-1, x.shape[-1]).shape[0])
        return inner(x)

    if isinstance(module, fast_path.PackedSwiGLU):
        module._mlp = recording
    else:
        module._linear = recording
    return seen


def test_the_last_layer_computes_only_the_rows_the_scorer_reads(tiny_bundle_dir):
    """One row per candidate through the last layer's query and output projections and MLP,
    every token through the layers before it (whose keys/values the last layer attends to)."""
    reference = load_scorer(tiny_bundle_dir).scorer
    backend = TorchBackend(load_scorer(tiny_bundle_dir).scorer)
    assert backend.fast_path.read_rows_only == 3
    layers = backend.scorer.decoder.layers
    attention = layers[-1].self_attn
    last = [_rows_computed(m) for m in (attention.q_proj, attention.o_proj, layers[-1].mlp)]
    keys, earlier = _rows_computed(attention.k_proj), _rows_computed(layers[-2].mlp)
    batch = _batch(reference, CANDIDATES, HISTORIES[:2])  # 4 candidates of one user, 1 of another
    got = torch.from_numpy(backend.score(*batch))
    torch.testing.assert_close(got, _reference(reference, *batch), rtol=0, atol=1e-4)
    candidates = len(batch[3])
    assert [sum(rows) for rows in last] == [candidates] * 3  # the prefix's forward computes none
    assert sum(keys) == sum(earlier) > 4 * candidates


def test_the_last_layer_keeps_every_row_where_the_probe_disagrees(monkeypatch):
    """Where computing only the read rows changes them (here: made to), every row is computed."""
    model = random_backbone(factories.tiny_qwen2_config(), seed=1)
    embeds = torch.randn(2, 5, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        want = model.get_decoder()(inputs_embeds=embeds).last_hidden_state
    wrong = fast_path._on_read_rows
    monkeypatch.setattr(fast_path, "_on_read_rows", lambda fn, x, width: 2 * wrong(fn, x, width))
    done = fast_path.enable(model.get_decoder(), model.config.hidden_size)
    assert done.active and done.read_rows_only == 0
    assert not any(m.read_rows_only for m in fast_path._last_layer_row_wise(model.get_decoder()))
    with torch.inference_mode(), fast_path.reading_rows(torch.tensor([4, 9])):
        got = model.get_decoder()(inputs_embeds=embeds).last_hidden_state
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


#: Three 10 MiB tensors written and freed, twenty times, with glibc's starting thresholds (128 KiB)
#: made fixed; "keep" then calls keep_freed_memory. Prints the minor page faults of the last five.
_ALLOCATIONS = """
import ctypes, resource, sys, torch
from sellarec.model import fast_path
libc = ctypes.CDLL(None)
for parameter in (fast_path._M_MMAP_THRESHOLD, fast_path._M_TRIM_THRESHOLD):
    assert libc.mallopt(parameter, 128 << 10)
if sys.argv[1] == "keep":
    assert fast_path.keep_freed_memory()
faults = []
for _ in range(20):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    a, b, c = torch.ones(5 << 19), torch.ones(5 << 19), torch.ones(5 << 19)
    del a, b, c
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(sum(faults[-5:]))
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_freed_memory_is_reused_without_page_faults():
    """The pattern of a forward (tensors of megabytes, freed, then the same again): where
    glibc hands such memory back (mmap above its threshold, a trimmed heap), every round
    faults its pages in again; kept, they are reused. glibc's own thresholds adapt, so
    whether a process is in that state depends on its history: the test fixes them at
    their starting values first, which keep_freed_memory must override."""

    def faults(mode: str) -> int:
        command = [sys.executable, "-c", _ALLOCATIONS, mode]
        return int(subprocess.run(command, capture_output=True, text=True, check=True).stdout.split()[-1])

    pages = 3 * (10 << 20) // 4096  # one round of the three tensors, in 4 KiB pages
    assert faults("default") > 4 * pages  # the control: five rounds, each faulting its pages in
    assert faults("keep") < pages // 10


def test_checkpoint_is_unchanged_by_packing(tmp_path):
    model = random_backbone(factories.tiny_qwen2_config(), seed=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert fast_path.enable(model.get_decoder(), model.config.hidden_size).active
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    model.save_pretrained(tmp_path / "packed")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "packed")
    assert all(torch.equal(reloaded.state_dict()[k], before[k]) for k in before)


def test_packing_twice_finds_nothing_to_do():
    model = random_backbone(factories.tiny_qwen2_config())
    assert fast_path.enable(model.get_decoder(), model.config.hidden_size).active
    assert not fast_path.enable(model.get_decoder(), model.config.hidden_size).active


def test_packing_an_already_packed_decoder_runs_no_probe(monkeypatch):
    model = random_backbone(factories.tiny_qwen2_config())
    assert fast_path.enable(model.get_decoder(), model.config.hidden_size).active
    probes = []
    monkeypatch.setattr(fast_path, "_probe", lambda *args: probes.append(args))
    assert not fast_path.enable(model.get_decoder(), model.config.hidden_size).active
    assert probes == []


def test_not_applied_with_an_unmerged_lora_in_bf16_or_when_off(tiny_bundle_dir, tiny_backbone_dir):
    unmerged = load_scorer(tiny_bundle_dir, merge_adapter=False).scorer
    assert not TorchBackend(unmerged).fast_path.active
    merged = load_scorer(tiny_bundle_dir).scorer
    off = TorchBackend(merged, cpu_fast_path=False)
    assert not off.fast_path.active and not off.keeps_freed_memory
    assert any(type(m) is nn.Linear for m in merged.decoder.modules())
    assert not TorchBackend(load_scorer(tiny_bundle_dir).scorer, keep_freed_memory=False).keeps_freed_memory
    assert not fast_path.supported(torch.device("cpu"), torch.bfloat16)
    assert not fast_path.supported(torch.device("cuda"), torch.float32)


class _ReadsWeights(nn.Module):
    """A decoder whose forward reads a projection's `.weight` itself (packing cannot serve it)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.proj = nn.Linear(width, width)

    def forward(self, inputs_embeds: torch.Tensor, use_cache: bool = False) -> SimpleNamespace:
        hidden = nn.functional.linear(inputs_embeds, self.proj.weight, self.proj.bias)
        return SimpleNamespace(last_hidden_state=hidden)


def test_an_architecture_it_cannot_serve_is_left_as_it_was():
    decoder = _ReadsWeights(8)
    original = decoder.proj
    done = fast_path.enable(decoder, 8)
    assert not done.active
    assert decoder.proj is original


@pytest.mark.slow
def test_smollm2_scores_match_the_reference_path(smollm2_spec):
    reference_model, tokenizer, _ = load_backbone(smollm2_spec)
    served_model, _, _ = load_backbone(smollm2_spec)
    torch.manual_seed(0)
    reference = SellaRec(reference_model, tokenizer, TemplateSpec(), collab_dim=16)
    served = SellaRec(
        served_model, tokenizer, TemplateSpec(), proj_c=reference.proj_c, proj_w=reference.proj_w
    )
    backend = TorchBackend(served)
    assert backend.fast_path.active
    batch = _batch(reference, CANDIDATES, HISTORIES[:2])
    torch.testing.assert_close(
        torch.from_numpy(backend.score(*batch)), _reference(reference, *batch), rtol=0, atol=1e-4
    )
