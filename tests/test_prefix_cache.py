"""Users' prefixes kept across requests (service/backends/prefix_cache.py): a returning user's
request runs only its candidates, with the scores of the plain path."""

from __future__ import annotations

import pytest
import torch
from test_fast_path import CANDIDATES, HISTORIES, _batch, _reference
from test_shared_head import TokenCount

from sellarec.model.encoding import Encoded
from sellarec.model.loader import load_scorer
from sellarec.model.sella import PrefixState, row_state
from sellarec.service.backends.prefix_cache import PrefixCache, state_bytes
from sellarec.service.backends.torch_backend import TorchBackend

MIB = 1 << 20


def _state(tokens: int, layers: int = 2, fill: float = 0.0) -> PrefixState:
    kv = torch.full((1, 2, tokens, 4), fill)
    mask = torch.ones(1, tokens, dtype=torch.long)
    return PrefixState(layers=[(kv, kv.clone()) for _ in range(layers)], mask=mask, lengths=mask.sum(1))


def _scores(backend: TorchBackend, batch) -> tuple[torch.Tensor, int]:
    """(P(Yes), token positions the decoder ran) of one backend call."""
    count = TokenCount(backend.scorer)
    try:
        return torch.from_numpy(backend.score(*batch)), count.tokens
    finally:
        backend.scorer.decoder._forward_pre_hooks.clear()


# --- the cache itself ------------------------------------------------------------------


def test_least_recently_used_entries_leave_first_within_the_byte_budget():
    size = state_bytes(_state(10))
    cache = PrefixCache(max_bytes=3 * size)
    for key in (b"a", b"b", b"c"):
        cache.put(key, _state(10))
    assert cache.get(b"a") is not None  # "a" is now the most recent: "b" goes first
    cache.put(b"d", _state(10))
    assert [k for k in (b"a", b"b", b"c", b"d") if cache.get(k) is not None] == [b"a", b"c", b"d"]
    assert cache.bytes == 3 * size and len(cache) == 3


def test_an_entry_over_the_whole_budget_is_not_kept_and_evicts_nothing():
    cache = PrefixCache(max_bytes=state_bytes(_state(10)))
    cache.put(b"small", _state(10))
    cache.put(b"large", _state(11))
    assert cache.get(b"large") is None and cache.get(b"small") is not None
    assert (cache.hits, cache.misses) == (1, 1)


def test_replacing_a_key_counts_its_bytes_once():
    cache = PrefixCache(max_bytes=MIB)
    cache.put(b"a", _state(10))
    cache.put(b"a", _state(20))
    assert len(cache) == 1 and cache.bytes == state_bytes(_state(20))
    cache.clear()
    assert len(cache) == 0 and cache.bytes == 0


def test_the_key_covers_ids_slots_and_the_user_vector():
    vector = torch.arange(4.0)
    base = PrefixCache.key(Encoded((1, 2, 3), (("user", 1),)), vector)
    assert base == PrefixCache.key(Encoded((1, 2, 3), (("user", 1),)), vector.clone())
    assert base != PrefixCache.key(Encoded((1, 2, 4), (("user", 1),)), vector)
    assert base != PrefixCache.key(Encoded((1, 2, 3), (("user", 2),)), vector)
    assert base != PrefixCache.key(Encoded((1, 2, 3), (("user", 1),)), vector + 1e-6)


def test_holds_answers_for_the_prompt_whatever_its_user_vector_until_its_last_entry_leaves():
    one, two = Encoded((1, 2, 3), (("user", 2),)), Encoded((1, 2, 4), (("user", 2),))
    cache = PrefixCache(max_bytes=2 * state_bytes(_state(10)))
    assert not cache.holds(one)
    cache.put(PrefixCache.key(one, torch.zeros(4)), _state(10))
    cache.put(PrefixCache.key(one, torch.ones(4)), _state(10))  # the same prompt, another vector
    cache.put(PrefixCache.key(one, torch.ones(4)), _state(10))  # replaced, not counted twice
    assert cache.holds(one) and not cache.holds(two)
    assert (cache.hits, cache.misses) == (0, 0)  # holds is not a lookup
    cache.put(PrefixCache.key(two, torch.zeros(4)), _state(10))  # evicts (one, zeros)
    assert cache.holds(one) and cache.holds(two)
    cache.put(PrefixCache.key(two, torch.ones(4)), _state(10))  # evicts (one, ones): one's last
    assert not cache.holds(one) and cache.holds(two)
    cache.clear()
    assert not cache.holds(two)
    off = PrefixCache(max_bytes=0)
    off.put(PrefixCache.key(one, torch.zeros(4)), _state(1))
    assert not off.holds(one)


# --- the backend ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference(tiny_bundle_dir):
    return load_scorer(tiny_bundle_dir).scorer


@pytest.fixture()
def cached(tiny_bundle_dir):
    """A backend keeping prefixes (plain weights, for an exact comparison), fresh per test."""
    return TorchBackend(load_scorer(tiny_bundle_dir).scorer, cpu_fast_path=False, prefix_cache_bytes=64 * MIB)


def test_a_cut_row_continues_as_the_batched_state(reference):
    prefixes, prefix_vectors, _, suffixes, suffix_vectors = _batch(reference, CANDIDATES, HISTORIES[:2])
    with torch.inference_mode():
        state = reference.run_prefixes(prefixes, prefix_vectors)  # left-padded: the second row has padding
        assert (state.mask == 0).any()
        for row in range(len(prefixes)):
            alone = row_state(state, row)
            assert alone.mask.shape[1] == len(prefixes[row]) and bool(alone.mask.all())
            rows = torch.full((len(suffixes),), row)
            want = reference.score_suffixes(state, rows, suffixes, suffix_vectors)
            got = reference.score_suffixes(alone, torch.zeros_like(rows), suffixes, suffix_vectors)
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "per_user", [CANDIDATES, [["Babe (1995)"]], [["Heat (1995)"], ["Alien (1979)", "Fargo (1996)"]]]
)
def test_a_returning_user_runs_only_the_candidates_with_the_same_scores(reference, cached, per_user):
    batch = _batch(reference, per_user, HISTORIES[: len(per_user)])
    want = _reference(reference, *batch)
    first, ran_first = _scores(cached, batch)
    torch.testing.assert_close(first, want, rtol=0, atol=1e-5)
    assert len(cached.prefix_cache) == len(per_user) and cached.prefix_cache.misses == len(per_user)
    again, ran_again = _scores(cached, batch)
    torch.testing.assert_close(again, want, rtol=0, atol=1e-5)
    assert cached.prefix_cache.hits == len(per_user)
    # The second call runs the candidates' tokens only (padded): none of the prefixes'.
    suffixes = batch[3]
    assert ran_again <= len(suffixes) * max(len(s) for s in suffixes) < ran_first


def test_single_item_calls_of_one_user_keep_the_prefix_from_the_first(reference, cached):
    """A page of one-candidate /score calls: the first keeps the prefix in its one forward."""
    for k, title in enumerate(["Babe (1995)", "Heat (1995)", "Fargo (1996)"]):
        batch = _batch(reference, [[title]], HISTORIES[:1])
        got, ran = _scores(cached, batch)
        torch.testing.assert_close(got, _reference(reference, *batch), rtol=0, atol=1e-5)
        assert cached.prefix_cache.hits == k and len(cached.prefix_cache) == 1
        assert cached.keeps_prefix(batch[0][0])  # admission will price the next call without it
        if k:
            assert ran == len(batch[3][0])  # only the candidate's tokens


def test_another_user_vector_for_the_same_prompt_is_not_served_the_old_keys(reference, cached):
    batch = _batch(reference, CANDIDATES[:1], HISTORIES[:1])
    _scores(cached, batch)
    prefixes, prefix_vectors, rows, suffixes, suffix_vectors = batch
    moved = (prefixes, prefix_vectors * -1.0, rows, suffixes, suffix_vectors)  # e.g. a new store version
    got, _ = _scores(cached, moved)
    torch.testing.assert_close(got, _reference(reference, *moved), rtol=0, atol=1e-5)
    assert cached.prefix_cache.hits == 0 and len(cached.prefix_cache) == 2
    assert (got - _reference(reference, *batch)).abs().max() > 1e-4  # the old keys would have been wrong


def test_a_batch_of_returning_and_new_users_scores_each_right(reference, cached):
    per_user = [["Alien (1979)", "Heat (1995)"], ["Babe (1995)"], ["Fargo (1996)", "Amélie (2001)"]]
    batch = _batch(reference, per_user, HISTORIES[:3])
    prefixes, prefix_vectors, _, suffixes, suffix_vectors = batch
    # User 1 came before, with another candidate.
    _scores(cached, ([prefixes[1]], prefix_vectors[1:2], [0], [suffixes[0]], suffix_vectors[:1]))
    got, _ = _scores(cached, batch)
    torch.testing.assert_close(got, _reference(reference, *batch), rtol=0, atol=1e-5)
    assert cached.prefix_cache.hits == 1


def test_the_packed_fast_path_keeps_prefixes_within_tolerance(reference, tiny_bundle_dir):
    backend = TorchBackend(load_scorer(tiny_bundle_dir).scorer, prefix_cache_bytes=64 * MIB)
    assert backend.fast_path.active
    batch = _batch(reference, CANDIDATES, HISTORIES[:2])
    want = _reference(reference, *batch)
    for _ in range(2):
        torch.testing.assert_close(torch.from_numpy(backend.score(*batch)), want, rtol=0, atol=1e-4)
    assert backend.prefix_cache.hits == 2


def test_nothing_is_kept_without_a_budget_or_without_the_head(reference, tiny_bundle_dir):
    batch = _batch(reference, CANDIDATES, HISTORIES[:2])
    for backend in (
        TorchBackend(load_scorer(tiny_bundle_dir).scorer, cpu_fast_path=False),
        TorchBackend(
            load_scorer(tiny_bundle_dir).scorer,
            cpu_fast_path=False,
            shared_head=False,
            prefix_cache_bytes=MIB,
        ),
    ):
        for _ in range(2):
            got = torch.from_numpy(backend.score(*batch))
        torch.testing.assert_close(got, _reference(reference, *batch), rtol=0, atol=1e-5)
        assert not backend.prefix_cache.enabled and len(backend.prefix_cache) == 0


def test_an_architecture_without_shared_prefix_attention_keeps_the_same_keys(reference, tiny_bundle_dir):
    """The replicated-cache path (e.g. sliding-window models) keeps the same prefixes."""
    scorer = load_scorer(tiny_bundle_dir).scorer
    scorer.share_prefix_attention = False
    backend = TorchBackend(scorer, cpu_fast_path=False, prefix_cache_bytes=64 * MIB)
    for title in ("Babe (1995)", "Heat (1995)"):
        batch = _batch(reference, [[title]], HISTORIES[:1])
        got, _ = _scores(backend, batch)
        torch.testing.assert_close(got, _reference(reference, *batch), rtol=0, atol=1e-5)
    assert backend.prefix_cache.hits == 1
