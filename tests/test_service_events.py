"""POST /events: positives extend the stored history that the next /score and /rerank see.

The contract: after posting positives A, B for a user, the scores are exactly those of a
request that carries history = the previous history + A, B. Users the MF never saw get a
collaborative vector folded in from their labelled events (when those hold a negative) or
from their history's items.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_service_support import quick_settings, serving

from sellarec.model.artifacts import load_bundle
from sellarec.model.collab import fold_in, fold_in_labelled
from sellarec.service.store.base import (
    InMemoryStore,
    LabelledEvent,
    LikedItem,
    UserRecord,
    bundle_records,
    fold_key,
    merge_events,
)

CANDIDATES = ["i0", "i2", "i5", "i7", {"item_id": "brand-new", "title": "Brand New (2031)"}]
U3_HISTORY = [f"i{k}" for k in range(9)]  # u3's stored history in the tiny bundle


def scores(answer) -> list[float]:
    assert answer.status_code == 200, answer.text
    return [s["score"] for s in answer.json()["scores"]]


async def test_posted_positives_reach_the_next_score_as_if_sent_as_history(tiny_bundle_dir):
    async with serving(tiny_bundle_dir) as (client, _):
        posted = await client.post(
            "/events",
            json={"events": [
                {"user_id": "u3", "item_id": "i9", "label": 1, "event_id": "e1"},
                {"user_id": "u3", "item_id": "i1", "label": 1, "event_id": "e2"},
            ]},
        )  # fmt: skip
        stored = await client.post("/score", json={"user_id": "u3", "items": CANDIDATES})
        explicit = await client.post(
            "/score", json={"user_id": "u3", "items": CANDIDATES, "history": [*U3_HISTORY, "i9", "i1"]}
        )
        before = await client.post(
            "/score", json={"user_id": "u3", "items": CANDIDATES, "history": U3_HISTORY}
        )
        ranked = await client.post("/rerank", json={"user_id": "u3", "candidates": CANDIDATES})
    assert posted.json() == {"recorded": 2, "duplicates": 0, "negatives": 0}
    assert scores(stored) == scores(explicit)
    assert scores(stored) != pytest.approx(scores(before), abs=1e-4)
    by_index = {r["index"]: r["relevance_score"] for r in ranked.json()["results"]}
    assert [by_index[k] for k in range(len(CANDIDATES))] == scores(explicit)


async def test_a_single_event_object_is_accepted_and_negatives_leave_a_known_users_scores(tiny_bundle_dir):
    async with serving(tiny_bundle_dir) as (client, app):
        before = await client.post("/score", json={"user_id": "u2", "items": CANDIDATES})
        negative = await client.post("/events", json={"user_id": "u2", "item_id": "i9", "label": 0})
        after_negative = await client.post("/score", json={"user_id": "u2", "items": CANDIDATES})
        positive = await client.post("/events", json={"user_id": "u2", "item_id": "i9", "label": 1})
        after_positive = await client.post("/score", json={"user_id": "u2", "items": CANDIDATES})
        metrics = app.state.metrics.registry
        assert metrics.get_sample_value("sellarec_events_total", {"outcome": "negative"}) == 1
        assert metrics.get_sample_value("sellarec_events_total", {"outcome": "recorded"}) == 1
        assert (
            metrics.get_sample_value(
                "sellarec_request_duration_seconds_count", {"endpoint": "/events", "status": "200"}
            )
            == 2
        )
    assert negative.json() == {"recorded": 0, "duplicates": 0, "negatives": 1}
    assert positive.json() == {"recorded": 1, "duplicates": 0, "negatives": 0}
    assert scores(after_negative) == scores(before)
    assert scores(after_positive) != pytest.approx(scores(before), abs=1e-4)


async def test_a_repeated_event_id_is_recorded_once(tiny_bundle_dir):
    batch = {"events": [{"user_id": "u4", "item_id": "i1", "label": 1, "event_id": "like-1"}]}
    async with serving(tiny_bundle_dir) as (client, app):
        first = await client.post("/events", json=batch)
        once = await client.post("/score", json={"user_id": "u4", "items": CANDIDATES})
        again = await client.post("/events", json=batch)
        twice = await client.post("/score", json={"user_id": "u4", "items": CANDIDATES})
        duplicates = app.state.metrics.registry.get_sample_value(
            "sellarec_events_total", {"outcome": "duplicate"}
        )
    assert first.json()["recorded"] == 1
    assert again.json() == {"recorded": 0, "duplicates": 1, "negatives": 0}
    assert scores(twice) == scores(once) and duplicates == 1


async def test_events_are_ordered_by_timestamp_not_arrival(tiny_bundle_dir):
    async with serving(tiny_bundle_dir) as (client, _):
        for item, ts in (("i5", 300.0), ("i1", 100.0), ("i9", 200.0)):
            event = {"user_id": "fresh-1", "item_id": item, "label": 1, "timestamp": ts}
            await client.post("/events", json=event)
        stored = await client.post("/score", json={"user_id": "fresh-1", "items": CANDIDATES})
        explicit = await client.post(
            "/score", json={"user_id": "fresh-1", "items": CANDIDATES, "history": ["i1", "i9", "i5"]}
        )
    assert scores(stored) == scores(explicit)


async def test_unknown_items_without_a_title_are_refused_and_nothing_is_recorded(tiny_bundle_dir):
    async with serving(tiny_bundle_dir) as (client, _):
        before = await client.post("/score", json={"user_id": "u1", "items": CANDIDATES})
        refused = await client.post(
            "/events",
            json={"events": [
                {"user_id": "u1", "item_id": "i4", "label": 1},
                {"user_id": "u1", "item_id": "nope", "label": 1},
            ]},
        )  # fmt: skip
        titled = await client.post(
            "/events", json={"user_id": "u1", "item_id": "nope", "label": 1, "title": "Nope (2030)"}
        )
        unchanged = await client.post("/score", json={"user_id": "u1", "items": CANDIDATES, "history": None})
        bad = await client.post("/events", json={"user_id": "u1", "item_id": "i4", "label": 2})
    assert refused.status_code == 422 and refused.json()["error"]["items"] == ["nope"]
    assert titled.json()["recorded"] == 1
    assert scores(unchanged) != pytest.approx(scores(before), abs=1e-4)  # only the titled event
    assert bad.status_code == 422 and bad.json()["error"]["type"] == "invalid_request"


async def test_events_need_the_token_like_score(tiny_bundle_dir):
    event = {"user_id": "u1", "item_id": "i4", "label": 1}
    async with serving(tiny_bundle_dir, quick_settings(api_token="s3cret")) as (client, _):
        anonymous = await client.post("/events", json=event)
        signed = await client.post("/events", json=event, headers={"Authorization": "Bearer s3cret"})
    assert anonymous.status_code == 401 and signed.status_code == 200


async def test_events_check_the_token_before_reading_the_body(tiny_bundle_dir):
    """Like /score (issue 12): no token, no parsing; a huge body without one is 401, not 413."""
    settings = quick_settings(api_token="s3cret", max_body_bytes=4096)
    json_type = {"content-type": "application/json"}
    async with serving(tiny_bundle_dir, settings) as (client, _):
        garbage = await client.post("/events", content=b"{not json", headers=json_type)
        huge = await client.post("/events", content=b"x" * 10_000, headers=json_type)
        signed = {**json_type, "Authorization": "Bearer s3cret"}
        parsed = await client.post("/events", content=b"{not json", headers=signed)
        too_big = await client.post("/events", content=b"x" * 10_000, headers=signed)
    for answer in (garbage, huge):
        assert answer.status_code == 401 and answer.json()["error"]["type"] == "unauthorized"
        assert answer.headers["www-authenticate"] == "Bearer"
    assert parsed.status_code == 422 and parsed.json()["error"]["type"] == "invalid_request"
    assert too_big.status_code == 413 and too_big.json()["error"]["type"] == "too_large"


@pytest.mark.parametrize(
    "body",
    [
        b'{"user_id": "u1", "item_id": "i4", "label": true}',
        b'{"user_id": "u1", "item_id": "i4", "label": 1.0}',
        b'{"user_id": "u1", "item_id": "i4", "label": "1"}',
        b'{"user_id": "u1", "item_id": "i4", "label": 2}',
        b'{"user_id": 7, "item_id": "i4", "label": 1}',
        b'{"user_id": "u1", "item_id": "i4", "label": 1, "timestamp": "now"}',
        b'{"user_id": "u1", "item_id": "i4", "label": 1, "unexpected": 1}',
        b'{"events": []}',
        b'{"events": [{"user_id": "u1", "item_id": "i4", "label": 1}], "extra": 1}',
        b'{"user_id": "u\xff\xfe", "item_id": "i4", "label": 1}',  # invalid UTF-8
        b'{"user_id": "u1", "item_id": "i4", "label": 1, "timestamp": ' + b"9" * 5000 + b"}",
        b'{"events": ' + b"[" * 10_000 + b"]" * 10_000 + b"}",
    ],
)
async def test_malformed_events_answer_422_in_the_envelope_and_record_nothing(tiny_bundle_dir, body):
    async with serving(tiny_bundle_dir) as (client, app):
        answer = await client.post("/events", content=body, headers={"content-type": "application/json"})
        stored = await app.state.runtime.engine.store.lookup(
            app.state.runtime.engine.served().version, "u1", [], []
        )
    assert answer.status_code == 422, answer.text
    error = answer.json()["error"]
    assert error["type"] == "invalid_request" and error["code"] == 422 and error["message"]
    assert stored.liked == () and stored.labelled == ()


async def test_events_are_not_refused_for_time_while_the_model_is_busy(tiny_bundle_dir):
    """POST /events never queues for the model: admission by time and the caller's timeout do
    not apply to it, and it answers while the model is held."""
    import asyncio
    import threading

    gate = threading.Event()
    settings = quick_settings(max_queue=1, batch_wait_ms=0, max_queue_wait_ms=1)
    async with serving(tiny_bundle_dir, settings) as (client, app):
        batcher = app.state.runtime.engine.batcher
        blocker = asyncio.create_task(batcher.call(gate.wait, 30))  # the model thread is busy
        busy = asyncio.create_task(client.post("/score", json={"user_id": "u1", "items": ["i1"]}))
        while not batcher._in_flight:
            await asyncio.sleep(0.01)
        event = await client.post(
            "/events",
            json={"user_id": "u1", "item_id": "i4", "label": 1},
            headers={"X-Request-Timeout-Ms": "1"},
        )
        gate.set()
        await blocker
        assert (await busy).status_code == 200
    assert event.status_code == 200, event.text  # answered while the model was held
    assert event.json()["recorded"] == 1


async def test_too_many_events_answer_413(tiny_bundle_dir):
    events = [{"user_id": "u1", "item_id": "i4", "label": 1}] * 3
    async with serving(tiny_bundle_dir, quick_settings(max_events=2)) as (client, _):
        answer = await client.post("/events", json={"events": events})
    assert answer.status_code == 413 and answer.json()["error"]["type"] == "too_large"


async def test_a_user_the_mf_never_saw_is_scored_with_a_fold_in_vector(tiny_bundle_dir):
    """The events path and the sent-history path both score as if the MF had this user's fold-in row."""
    history = ["i2", "i6", "i8"]
    async with serving(tiny_bundle_dir) as (client, app):
        await client.post(
            "/events", json={"events": [{"user_id": "visitor-9", "item_id": i, "label": 1} for i in history]}
        )
        via_events = await client.post("/score", json={"user_id": "visitor-9", "items": CANDIDATES})
        via_request = await client.post(
            "/score", json={"user_id": "visitor-8", "items": CANDIDATES, "history": history}
        )
        fold_ins = {
            source: app.state.metrics.registry.get_sample_value("sellarec_fold_ins_total", {"source": source})
            for source in ("computed", "cache")
        }
    bundle = load_bundle(tiny_bundle_dir)
    meta, users, items = bundle_records(bundle)
    items = dict(items)
    vector = fold_in(
        torch.stack([torch.from_numpy(items[i].collab.copy()) for i in history]),
        torch.from_numpy(meta.neutral["neutral.user"].copy()),
    ).numpy()
    assert not np.allclose(vector, meta.neutral["neutral.user"], atol=1e-3)
    reference = InMemoryStore()
    titles = tuple(items[i].title for i in history)
    visitor = ("visitor-9", UserRecord(vector, tuple(history), titles))
    reference.add(meta, iter([*users, visitor]), iter(items.items()))
    async with serving(tiny_bundle_dir, store=reference) as (client, _):
        as_if_known = await client.post("/score", json={"user_id": "visitor-9", "items": CANDIDATES})
    assert scores(via_events) == pytest.approx(scores(as_if_known), abs=1e-6)
    assert scores(via_request) == scores(via_events)
    assert all(s["cold"] for s in via_events.json()["scores"])  # still a cold user: no MF row
    assert fold_ins == {"computed": 1, "cache": 1}  # the second request found the cached vector


def test_merge_keeps_the_newest_in_time_order_and_skips_repeated_ids():
    def liked(item: str, ts: float, event_id: str = "") -> LikedItem:
        return LikedItem(item, item.upper(), ts, event_id)

    kept, added = merge_events([], [liked("a", 1), liked("c", 3, "x"), liked("b", 2)], keep=10)
    assert [e.item_id for e in kept] == ["a", "b", "c"] and added == 3
    kept, added = merge_events(kept, [liked("c", 3, "x"), liked("d", 3), liked("e", 0)], keep=3)
    assert [e.item_id for e in kept] == ["b", "c", "d"] and added == 2  # "e" is older than the window


def test_merge_applies_to_labelled_events_alike():
    kept, added = merge_events([], [LabelledEvent("a", 0, 2.0, "x"), LabelledEvent("b", 1, 1.0)], keep=2)
    kept, again = merge_events(kept, [LabelledEvent("a", 0, 2.0, "x"), LabelledEvent("c", 0, 3.0)], keep=2)
    assert (added, again) == (2, 1) and [(e.item_id, e.label) for e in kept] == [("a", 0), ("c", 0)]


def _as_if_known(tiny_bundle_dir, user_id: str, vector: np.ndarray, history: list[str]) -> InMemoryStore:
    """A store in which `user_id` has the MF row `vector` and the stored `history`."""
    meta, users, items = bundle_records(load_bundle(tiny_bundle_dir))
    items = dict(items)
    record = UserRecord(vector, tuple(history), tuple(items[i].title for i in history))
    reference = InMemoryStore()
    reference.add(meta, iter([*users, (user_id, record)]), iter(items.items()))
    return reference


def _vectors(tiny_bundle_dir, ids: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    meta, _, items = bundle_records(load_bundle(tiny_bundle_dir))
    items = dict(items)
    stacked = torch.stack([torch.from_numpy(items[i].collab.copy()) for i in ids])
    return stacked, torch.from_numpy(meta.neutral["neutral.user"].copy())


async def test_a_new_user_with_negatives_is_folded_in_from_their_labelled_events(tiny_bundle_dir):
    """Positives and negatives give the logistic fold-in (MF's BCE row); the history keeps the positives."""
    events = [("i2", 1, 1.0), ("i3", 0, 2.0), ("i6", 1, 3.0), ("i7", 0, 4.0), ("not-in-the-store", 0, 5.0)]
    batch = [{"user_id": "visitor-7", "item_id": i, "label": y, "timestamp": ts} for i, y, ts in events]
    async with serving(tiny_bundle_dir) as (client, _):
        posted = await client.post("/events", json={"events": batch})
        via_events = await client.post("/score", json={"user_id": "visitor-7", "items": CANDIDATES})
        with_history = await client.post(
            "/score", json={"user_id": "visitor-7", "items": CANDIDATES, "history": ["i2", "i6"]}
        )
    # A negative on an item the version does not know is accepted and skipped by the fold-in.
    assert posted.json() == {"recorded": 2, "duplicates": 0, "negatives": 3}
    vectors, prior = _vectors(tiny_bundle_dir, ["i2", "i3", "i6", "i7"])
    labelled = fold_in_labelled(vectors, torch.tensor([1, 0, 1, 0]), prior).numpy()
    positives_only = fold_in(vectors[[0, 2]], prior).numpy()
    assert not np.allclose(labelled, positives_only, atol=1e-3)
    reference = _as_if_known(tiny_bundle_dir, "visitor-7", labelled, ["i2", "i6"])
    async with serving(tiny_bundle_dir, store=reference) as (client, _):
        as_if_known = await client.post("/score", json={"user_id": "visitor-7", "items": CANDIDATES})
    assert scores(via_events) == pytest.approx(scores(as_if_known), abs=1e-6)
    assert scores(with_history) == scores(via_events)  # stored labelled events, whatever history is sent


async def test_the_fold_in_cache_follows_the_labelled_events(tiny_bundle_dir):
    def event(item: str, label: int, ts: float, event_id: str) -> dict:
        return dict(user_id="visitor-6", item_id=item, label=label, timestamp=ts, event_id=event_id)

    ask = {"user_id": "visitor-6", "items": CANDIDATES}
    async with serving(tiny_bundle_dir) as (client, app):
        engine = app.state.runtime.engine
        await client.post("/events", json={"events": [event("i2", 1, 1, "a"), event("i3", 0, 2, "b")]})
        first = await client.post("/score", json=ask)
        await engine.flush()
        cached = await client.post("/score", json=ask)
        await client.post("/events", json=event("i3", 0, 2, "b"))  # a retry: nothing changes
        retried = await client.post("/score", json=ask)
        await client.post("/events", json=event("i5", 0, 3, "c"))
        changed = await client.post("/score", json=ask)
        registry = app.state.metrics.registry
        counts = [
            registry.get_sample_value("sellarec_fold_ins_total", {"source": s}) for s in ("computed", "cache")
        ]
    assert scores(first) == scores(cached) == scores(retried)
    assert scores(changed) != scores(first)  # the tiny model moves little, but it moves
    assert counts == [2, 2]
    assert fold_key(["i2"], [("i2", 1), ("i3", 0)]) != fold_key(["i2"], [("i2", 1), ("i3", 0), ("i5", 0)])
    assert fold_key(["i2"]) != fold_key(["i2"], [("i2", 1), ("i3", 0)])


async def test_the_labelled_list_keeps_the_last_events_and_negatives_never_crowd_out_positives(
    tiny_bundle_dir,
):
    events = [("i1", 1, 1.0)] + [(f"i{k}", 0, float(k)) for k in range(2, 7)]
    batch = [{"user_id": "visitor-5", "item_id": i, "label": y, "timestamp": ts} for i, y, ts in events]
    async with serving(tiny_bundle_dir, quick_settings(events_keep=3)) as (client, app):
        await client.post("/events", json={"events": batch})
        engine = app.state.runtime.engine
        lookup = await engine.store.lookup(engine.tracker.current.version, "visitor-5", [], [])
        stored = await client.post("/score", json={"user_id": "visitor-5", "items": CANDIDATES})
    assert [e.item_id for e in lookup.liked] == ["i1"]
    assert [(e.item_id, e.label) for e in lookup.labelled] == [("i4", 0), ("i5", 0), ("i6", 0)]
    vectors, prior = _vectors(tiny_bundle_dir, ["i4", "i5", "i6"])
    vector = fold_in_labelled(vectors, torch.zeros(3), prior).numpy()
    reference = _as_if_known(tiny_bundle_dir, "visitor-5", vector, ["i1"])
    async with serving(tiny_bundle_dir, store=reference) as (client, _):
        as_if_known = await client.post("/score", json={"user_id": "visitor-5", "items": CANDIDATES})
    assert scores(stored) == pytest.approx(scores(as_if_known), abs=1e-6)
