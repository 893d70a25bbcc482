"""Request resolution without a model or a server: which history the prompt uses, and which
distinct candidates a request's items become (service/engine/resolve.py)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from sellarec.service.engine.resolve import ItemInput, candidates, last_entries, prompt_history
from sellarec.service.errors import UnknownItems
from sellarec.service.store.base import ItemRecord, LikedItem, Lookup, UserRecord

NEUTRAL_ITEM = np.zeros(2, dtype=np.float32)
SERVED = SimpleNamespace(neutral_item=NEUTRAL_ITEM)


def _item(title: str, value: float) -> ItemRecord:
    return ItemRecord(title, np.full(2, value, dtype=np.float32), np.full(3, value, dtype=np.float32))


def _lookup(**fields) -> Lookup:
    base = {"user": None, "items": {"i1": _item("Alien (1979)", 1.0)}, "distilled": {}}
    return Lookup(**{**base, **fields})


def test_a_sent_history_keeps_its_last_entries_and_none_stays_none():
    sent = [ItemInput(f"i{k}") for k in range(4)]
    assert [h.item_id for h in last_entries(sent, 2)] == ["i2", "i3"]
    assert last_entries(sent, 0) == []
    assert last_entries(None, 2) is None


def test_the_stored_history_is_the_versions_then_the_recorded_likes_cut_to_the_last_entries():
    user = UserRecord(np.zeros(2, dtype=np.float32), ("i1", "i2"), ("Alien (1979)", "Heat (1995)"))
    liked = (LikedItem("i3", "Up (2009)", 1.0),)
    ids, titles = prompt_history(_lookup(user=user, liked=liked), None, keep=2)
    assert ids == ["i2", "i3"] and titles == ("Heat (1995)", "Up (2009)")


def test_a_sent_history_replaces_the_stored_one_and_uses_stored_titles_of_known_items():
    user = UserRecord(np.zeros(2, dtype=np.float32), ("i9",), ("Stored (2000)",))
    sent = [ItemInput("i1", "ignored"), ItemInput("new", "New (2030)")]
    ids, titles = prompt_history(_lookup(user=user), sent, keep=10)
    assert ids == ["i1", "new"] and titles == ("Alien (1979)", "New (2030)")


def test_unknown_history_items_without_a_title_are_all_named():
    with pytest.raises(UnknownItems) as err:
        prompt_history(_lookup(), [ItemInput("x"), ItemInput("i1"), ItemInput("y")], keep=10)
    assert err.value.items == ["x", "y"]


def test_duplicates_share_one_candidate_and_cold_items_are_keyed_by_title():
    items = [
        ItemInput("i1", "a title the store overrides"),
        ItemInput("c1", "Cold (2031)"),
        ItemInput("i1"),
        ItemInput("c2", "Cold (2031)"),
    ]
    cached = np.ones(3, dtype=np.float32)
    keys, distinct = candidates(SERVED, _lookup(distilled={"Cold (2031)": cached}), items)
    assert keys == [("known", "i1"), ("cold", "Cold (2031)"), ("known", "i1"), ("cold", "Cold (2031)")]
    known, cold = distinct[("known", "i1")], distinct[("cold", "Cold (2031)")]
    assert known.title == "Alien (1979)" and not known.cold
    assert cold.cold and cold.item_id == "c1" and cold.collab is NEUTRAL_ITEM and cold.semantic is cached


def test_unknown_candidates_without_a_title_are_named_once_each():
    with pytest.raises(UnknownItems) as err:
        candidates(SERVED, _lookup(), [ItemInput("x"), ItemInput("i1"), ItemInput("x"), ItemInput("y")])
    assert err.value.items == ["x", "y"]
