"""The template's instruction run once (model/shared_head.py): same scores, fewer tokens run."""

from __future__ import annotations

import pytest
import torch
from test_fast_path import CANDIDATES, HISTORIES, _batch, _reference

from sellarec.model.encoding import Encoded
from sellarec.model.loader import load_scorer
from sellarec.model.prompts import user_prompt
from sellarec.model.shared_head import SharedHead
from sellarec.service.backends.torch_backend import TorchBackend

#: Histories the probe never saw, among them titles that open with what the instruction ends on.
UNSEEN = [["Movie List (2001)"], [": Colon (1999)", "Heat (1995)"], ["  Spaces (1990)"], ["ü (2000)"]]


class TokenCount:
    """Counts the token positions the decoder runs (a forward pre-hook)."""

    def __init__(self, scorer) -> None:
        self.tokens = 0
        scorer.decoder.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs) -> None:
        embeds = kwargs.get("inputs_embeds")
        self.tokens += int(embeds.shape[0] * embeds.shape[1])


@pytest.fixture(scope="module")
def scorers(tiny_bundle_dir):
    """(reference, served with the head, served without it); plain weights for an exact comparison."""
    reference = load_scorer(tiny_bundle_dir).scorer
    with_head = TorchBackend(load_scorer(tiny_bundle_dir).scorer, cpu_fast_path=False)
    without = TorchBackend(load_scorer(tiny_bundle_dir).scorer, cpu_fast_path=False, shared_head=False)
    return reference, with_head, without


def test_the_head_is_what_every_user_prefix_opens_with(scorers):
    reference, backend, _ = scorers
    head = backend.head
    assert head is not None and head.length > 8 and head.state is not None
    prefixes = [
        reference.encoder.segments(user_prompt(reference.spec, h), lead=True) for h in HISTORIES + UNSEEN
    ]
    assert head.usable(prefixes)
    # ... and no longer: one token more and two users' prefixes would disagree.
    assert len({p.ids[: head.length + 1] for p in prefixes}) > 1


@pytest.mark.parametrize(
    "per_user", [CANDIDATES, [["Babe (1995)"]], [["Heat (1995)"], ["Alien (1979)", "Babe (1995)"]]]
)
def test_scores_match_the_plain_path_and_run_fewer_tokens(scorers, per_user):
    reference, with_head, without = scorers
    batch = _batch(reference, per_user, (HISTORIES + UNSEEN)[: len(per_user)])
    want = _reference(reference, *batch)
    counted = {}
    for name, backend in (("with", with_head), ("without", without)):
        count = TokenCount(backend.scorer)
        got = torch.from_numpy(backend.score(*batch))
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        counted[name] = count.tokens
        backend.scorer.decoder._forward_pre_hooks.clear()
    assert len(want) == 1 or want.std() > 1e-3
    users = len(per_user)
    # Each user's prefix skips the head: at least that many positions fewer.
    assert counted["with"] <= counted["without"] - users * with_head.head.length


def test_a_prompt_without_the_head_takes_the_plain_path(scorers):
    reference, backend, _ = scorers
    prefixes, prefix_vectors, rows, suffixes, suffix_vectors = _batch(reference, [["Heat (1995)"]], [[]])
    odd = Encoded(
        prefixes[0].ids[1:], tuple((s, p - 1) for s, p in prefixes[0].slots)
    )  # lost its first token
    batch = ([odd], prefix_vectors, rows, suffixes, suffix_vectors)
    assert not backend.head.usable([odd])
    got = torch.from_numpy(backend.score(*batch))
    torch.testing.assert_close(got, _reference(reference, *batch), rtol=0, atol=1e-5)


def test_the_head_scores_whole_prompts_as_the_scorer_does(scorers):
    reference, backend, _ = scorers
    prefixes, prefix_vectors, rows, suffixes, suffix_vectors = _batch(reference, CANDIDATES, HISTORIES[:2])
    vectors = suffix_vectors.clone()
    vectors[:, 0] = prefix_vectors[rows, 0]
    whole = [prefixes[r] + s for r, s in zip(rows, suffixes, strict=True)]
    head = SharedHead.for_template(reference)
    with torch.inference_mode():
        torch.testing.assert_close(
            head.score(whole, vectors), reference.score(whole, vectors), rtol=0, atol=1e-4
        )
