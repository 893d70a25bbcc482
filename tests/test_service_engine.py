"""The engine's invariant: every score equals the plain full-prompt forward of the same pair.

Requests mix known and cold users, stored, overridden, empty and over-long histories,
known and cold items (non-ASCII titles), and duplicates; they run batched together
(one multi-request batch) and batched apart with a tiny token budget (prefix groups and
suffix chunks of one), and every score must match `scorer.score` on the whole prompt
within 1e-4 in fp32.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import torch
from test_service_support import quick_settings, serving, shared_model

from sellarec.model.collab import fold_in
from sellarec.model.loader import LoadedModel
from sellarec.model.prompts import scoring_prompt

CASES: list[dict[str, Any]] = [
    {"user_id": "u0", "items": ["i1", "i5"]},  # known user, empty stored history
    {  # nine stored history items, a cold item with a non-ASCII title, a duplicate
        "user_id": "u3",
        "items": ["i0", {"item_id": "new-1", "title": "千と千尋の神隠し 2 (2031)"}, "i9", "i0"],
    },
    {"user_id": "u2", "items": ["i4"], "history": []},  # stored history replaced by an empty one
    {"user_id": "u1", "items": ["i2", "i3", "i8"], "history": ["i7", "i8"]},  # replaced by another
    {"user_id": "cold-a", "items": ["i6", {"item_id": "new-2", "title": "Amélie 2 (2030)"}]},  # cold user
    {  # cold user with a history longer than the prompt keeps (last 10 used)
        "user_id": "cold-b",
        "items": [{"item_id": "i1", "title": "ignored: the store knows i1"}, "i2"],
        "history": [f"i{k % 10}" for k in range(13)],
    },
]


def reference(loaded: LoadedModel, case: dict[str, Any]) -> list[float]:
    """P(Yes) per item from the plain path: the whole prompt through `scorer.score`."""
    scorer, bundle = loaded.scorer, loaded.bundle
    t, cat = bundle.tensors, bundle.catalog
    users, items = cat.user_rows(), cat.item_rows()
    titles = dict(zip(cat.items, cat.titles))
    user_id = case["user_id"]
    if user_id in users:
        user_collab, stored = t["mf.users"][users[user_id]], [titles[i] for i in cat.histories[user_id]]
    else:  # a user the MF never saw: folded in from the history the prompt keeps, else neutral
        recent = (case.get("history") or [])[-scorer.spec.history_length :]
        known = [t["mf.items"][items[i]] for i in recent if i in items]
        user_collab = fold_in(torch.stack(known), t["neutral.user"]) if known else t["neutral.user"]
        stored = []
    history = stored if case.get("history") is None else [titles[i] for i in case["history"]]
    out = []
    for item in case["items"]:
        item_id = item if isinstance(item, str) else item["item_id"]
        if item_id in items:
            row = items[item_id]
            title, item_collab, semantic = titles[item_id], t["mf.items"][row], t["semantic.items"][row]
        else:
            title, item_collab = item["title"], t["neutral.item"]
            semantic = scorer.distill([title])[0]
        vectors = scorer.soft_vectors(user_collab[None], item_collab[None], semantic[None], 1)
        encoded = scorer.encoder.prompt(scoring_prompt(scorer.spec, history, title))
        with torch.no_grad():
            out.append(torch.sigmoid(scorer.score([encoded], vectors)).item())
    return out


@pytest.fixture(scope="module")
def expected(tiny_bundle_dir) -> list[list[float]]:
    return [reference(shared_model(str(tiny_bundle_dir)), case) for case in CASES]


@pytest.mark.parametrize(
    ("budget", "wait_ms", "n_batches"),
    [(8192, 300, 1), (600, 300, None), (64, 0, len(CASES))],
    ids=["one-batch", "prefix-groups-and-suffix-chunks", "one-request-one-candidate-per-call"],
)
async def test_every_score_equals_the_plain_full_prompt_forward(
    tiny_bundle_dir, expected, budget, wait_ms, n_batches
):
    settings = quick_settings(max_batch_tokens=budget, batch_wait_ms=wait_ms)
    async with serving(tiny_bundle_dir, settings) as (client, app):
        answers = await asyncio.gather(*(client.post("/score", json=case) for case in CASES))
        registry = app.state.metrics.registry
        batches = registry.get_sample_value("sellarec_batch_requests_count")
        requests = registry.get_sample_value("sellarec_batch_requests_sum")
    assert requests == len(CASES)
    if n_batches is not None:
        assert batches == n_batches
    for case, answer, want in zip(CASES, answers, expected):
        assert answer.status_code == 200, answer.text
        got = [s["score"] for s in answer.json()["scores"]]
        assert [s["item_id"] for s in answer.json()["scores"]] == [
            i if isinstance(i, str) else i["item_id"] for i in case["items"]
        ]
        assert got == pytest.approx(want, abs=1e-4), case


async def test_cold_flags_mark_cold_users_and_cold_items(tiny_bundle_dir):
    async with serving(tiny_bundle_dir) as (client, _):
        known = (await client.post("/score", json=CASES[1])).json()["scores"]
        cold_user = (await client.post("/score", json=CASES[4])).json()["scores"]
    assert [s["cold"] for s in known] == [False, True, False, False]
    assert [s["cold"] for s in cold_user] == [True, True]


async def test_a_cached_distilled_vector_gives_the_same_score(tiny_bundle_dir, expected):
    async with serving(tiny_bundle_dir) as (client, app):
        first = (await client.post("/score", json=CASES[1])).json()["scores"]
        await app.state.runtime.engine.flush()
        again = (await client.post("/score", json=CASES[1])).json()["scores"]
    assert [s["score"] for s in again] == pytest.approx([s["score"] for s in first], abs=1e-6)
    assert again[1]["score"] == pytest.approx(expected[1][1], abs=1e-4)
