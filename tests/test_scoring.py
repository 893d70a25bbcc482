"""The two-row Yes/No scorer and the shared-prefix path against plain computations."""

from __future__ import annotations

import factories
import pytest
import torch

from sellarec.model.backbone import load_backbone
from sellarec.model.encoding import Encoded
from sellarec.model.prompts import Slot, TemplateSpec, scoring_prompt
from sellarec.model.scoring import YesNoHead, answer_token_ids
from sellarec.model.sella import SellaRec

HISTORIES = [["Toy Story (1995)", "Heat (1995)"], [], [f"Film {k}" for k in range(12)]]
TITLES = ["Alien (1979)", "Amélie (2001)", "千と千尋の神隠し (2001)"]


@pytest.fixture(scope="module")
def scorer(tiny_backbone_dir):
    model, tokenizer, _ = load_backbone(str(tiny_backbone_dir))
    torch.manual_seed(1)
    return SellaRec(model, tokenizer, TemplateSpec(), collab_dim=8)


def _vectors(scorer, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return scorer.soft_vectors(
        torch.randn(n, 8, generator=g),
        torch.randn(n, 8, generator=g),
        torch.randn(n, scorer.llm_dim, generator=g),
        n,
    )


def test_answer_ids_are_the_first_tokens_of_yes_and_no(tokenizer):
    yes, no = answer_token_ids(tokenizer, "\nAnswer:")
    assert tokenizer.decode([yes]).strip() == "Yes" and tokenizer.decode([no]).strip() == "No"
    assert tokenizer("\nAnswer: Yes.", add_special_tokens=False).input_ids[-2] == yes


def test_two_row_head_equals_softmax_over_full_vocabulary(scorer):
    prompts = [scoring_prompt(TemplateSpec(stage="stage1"), h, t) for h, t in zip(HISTORIES, TITLES)]
    for prompt in prompts:
        ids = torch.tensor([scorer.encoder.prompt(prompt).ids])
        with torch.no_grad():
            logits = scorer.backbone(input_ids=ids).logits[0, -1]  # all 49k rows
            p_ref = torch.softmax(logits[[scorer.head.yes_id, scorer.head.no_id]], dim=0)[0]
            p = torch.sigmoid(scorer.score([scorer.encoder.prompt(prompt)]))[0]
        assert p.item() == pytest.approx(p_ref.item(), abs=1e-6)


def test_head_reads_only_two_rows_of_the_output_matrix(scorer):
    hidden = torch.randn(4, scorer.llm_dim)
    full = scorer.backbone.get_output_embeddings()(hidden)
    expected = full[:, scorer.head.yes_id] - full[:, scorer.head.no_id]
    torch.testing.assert_close(scorer.head(hidden), expected, rtol=1e-5, atol=1e-5)
    assert isinstance(scorer.head, YesNoHead) and scorer.head.rows.tolist() == [
        scorer.head.yes_id,
        scorer.head.no_id,
    ]


def test_padded_batch_equals_one_prompt_at_a_time(scorer):
    encoded = [scorer.encoder.prompt(scoring_prompt(scorer.spec, h, t)) for h, t in zip(HISTORIES, TITLES)]
    vectors = _vectors(scorer, 3)
    with torch.no_grad():
        batch = scorer.score(encoded, vectors)
        single = torch.cat([scorer.score([e], vectors[i : i + 1]) for i, e in enumerate(encoded)])
    torch.testing.assert_close(batch, single, rtol=0, atol=1e-5)


@pytest.mark.parametrize("rows", [[0, 0, 0, 1, 1], [0, 1, 1, 0, 1]])
def test_shared_prefix_path_equals_plain_forward(scorer, rows):
    """Two users with different prefix lengths (so one prefix is padded), several candidates
    each, in runs of several (one call per prefix) or of one (one call over prefix and suffix)."""
    spec = scorer.spec
    prefixes = [scorer.encoder.split(scoring_prompt(spec, h, "x"))[0] for h in HISTORIES[:2]]
    user_vectors = _vectors(scorer, 2, seed=3)
    rows = torch.tensor(rows)
    titles = [
        "Alien (1979)",
        "Jumanji",
        "Amélie (Le Fabuleux Destin d'Amélie Poulain) (2001)",
        "Babe",
        "Heat",
    ]
    suffixes = [scorer.encoder.split(scoring_prompt(spec, [], t))[1] for t in titles]
    item_vectors = _vectors(scorer, 5, seed=4)
    with torch.no_grad():
        state = scorer.run_prefixes(prefixes, user_vectors)
        fast = scorer.score_suffixes(state, rows, suffixes, item_vectors)
        plain = []
        for n, r in enumerate(rows.tolist()):
            v = torch.stack([user_vectors[r, 0], item_vectors[n, 1], item_vectors[n, 2]])[None]
            plain.append(scorer.score([prefixes[r] + suffixes[n]], v))
    torch.testing.assert_close(fast, torch.cat(plain), rtol=0, atol=1e-5)


def test_extended_prefixes_give_the_numbers_of_whole_prefixes(scorer):
    """A head run once, continued per user by the rest of the prefix, then by the suffixes."""
    spec = scorer.spec
    prefixes = [scorer.encoder.split(scoring_prompt(spec, h, "x"))[0] for h in HISTORIES]
    head = 5
    assert all(p.ids[:head] == prefixes[0].ids[:head] for p in prefixes)
    rests = [Encoded(p.ids[head:], tuple((s, q - head) for s, q in p.slots)) for p in prefixes]
    suffixes = [scorer.encoder.split(scoring_prompt(spec, [], t))[1] for t in TITLES]
    vectors = _vectors(scorer, 3, seed=7)
    rows = torch.tensor([0, 1, 2])
    with torch.no_grad():
        whole = scorer.run_prefixes(prefixes, vectors)
        shared = scorer.run_prefixes([Encoded(prefixes[0].ids[:head])])
        extended = scorer.extend_prefixes(shared, torch.zeros(3, dtype=torch.long), rests, vectors)
        expected = scorer.score_suffixes(whole, rows, suffixes, vectors)
        got = scorer.score_suffixes(extended, rows, suffixes, vectors)
    assert extended.lengths.tolist() == [len(p) for p in prefixes]
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_shared_prefix_gradients_reach_the_soft_tokens(scorer):
    prefix, suffix = scorer.encoder.split(scoring_prompt(scorer.spec, HISTORIES[0], "Heat"))
    vectors = _vectors(scorer, 1).detach().requires_grad_(True)
    with torch.no_grad():
        state = scorer.run_prefixes([prefix], vectors.detach())
    scorer.score_suffixes(state, torch.tensor([0]), [suffix], vectors).sum().backward()
    assert vectors.grad[0, 1].abs().sum() > 0 and vectors.grad[0, 2].abs().sum() > 0
    assert vectors.grad[0, 0].abs().sum() == 0  # the user slot lives in the no-grad prefix


def test_distillation_is_the_last_hidden_state_of_the_title_prompt(scorer):
    out = scorer.distill(["Heat (1995)", "Alien"])
    text_ids = scorer.tokenizer("Movie: Alien", add_special_tokens=False).input_ids
    ids = torch.tensor([list(scorer.encoder.lead) + text_ids])
    with torch.no_grad():
        hidden = scorer.backbone(input_ids=ids, output_hidden_states=True).hidden_states[-1][0, -1]
    assert out.dtype == torch.float32 and out.shape == (2, scorer.llm_dim)
    torch.testing.assert_close(out[1], hidden, rtol=1e-5, atol=1e-5)


def test_missing_slot_columns_are_ignored(tiny_backbone_dir):
    model, tokenizer, _ = load_backbone(str(tiny_backbone_dir))
    scorer = SellaRec(model, tokenizer, TemplateSpec(slots=(Slot.WARM,)), collab_dim=8)
    encoded = [scorer.encoder.prompt(scoring_prompt(scorer.spec, [], "Heat"))]
    a = scorer.soft_vectors(torch.randn(1, 8), torch.randn(1, 8), torch.ones(1, scorer.llm_dim), 1)
    b = scorer.soft_vectors(torch.randn(1, 8), torch.randn(1, 8), torch.ones(1, scorer.llm_dim), 1)
    with torch.no_grad():
        assert scorer.score(encoded, a).item() == pytest.approx(scorer.score(encoded, b).item(), abs=1e-6)


def test_factories_tokenizer_is_real(tokenizer):
    assert len(tokenizer) == factories.tiny_qwen2_config().vocab_size == 49152


@pytest.mark.parametrize("rows", [[0, 0, 1, 1, 1], [1, 0, 1, 0, 0]])
def test_shared_prefix_attention_equals_replicated_cache(scorer, rows):
    """The copy-free attention and the replicated-cache fallback give the same numbers and gradients."""
    spec = scorer.spec
    prefixes = [scorer.encoder.split(scoring_prompt(spec, h, "x"))[0] for h in (HISTORIES[2], HISTORIES[1])]
    suffixes = [
        scorer.encoder.split(scoring_prompt(spec, [], t))[1] for t in TITLES + ["Babe", "Heat (1995)"]
    ]
    rows_t = torch.tensor(rows)
    results = []
    for share in (True, False):
        scorer.share_prefix_attention = share
        vectors = _vectors(scorer, 5, seed=6).detach().requires_grad_(True)
        with torch.no_grad():
            state = scorer.run_prefixes(prefixes, _vectors(scorer, 2, seed=5))
        logits = scorer.score_suffixes(state, rows_t, suffixes, vectors)
        logits.sum().backward()
        results.append((logits.detach(), vectors.grad))
    scorer.share_prefix_attention = True
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=1e-5)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-4, atol=1e-6)
