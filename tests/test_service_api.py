"""The HTTP API over the in-process store: shapes, ordering, errors, limits, auth, back-pressure, metrics.

Nothing a client can send may produce a 500: every malformed, oversized or odd request
gets the error envelope with a 4xx status.
"""

from __future__ import annotations

import asyncio
import threading

import pytest
from test_service_support import quick_settings, serving

TOKEN = "s3cret-token"


def envelope(response, status: int, kind: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["type"] == kind and error["code"] == status and error["message"]
    return error


async def test_score_answers_in_input_order_with_the_served_version(tiny_bundle_dir):
    async with serving(tiny_bundle_dir) as (client, _):
        ready = (await client.get("/readyz")).json()
        answer = await client.post("/score", json={"user_id": "u1", "items": ["i3", "i0", "i7"]})
    assert answer.status_code == 200
    body = answer.json()
    assert body["model"] == ready["model"] and body["model"].startswith("tiny-")
    assert [s["item_id"] for s in body["scores"]] == ["i3", "i0", "i7"]
    assert all(0.0 < s["score"] < 1.0 and s["cold"] is False for s in body["scores"])


async def test_rerank_sorts_best_first_and_keeps_the_input_index(tiny_bundle_dir):
    candidates = ["i2", "i5", "i8", "i1"]
    async with serving(tiny_bundle_dir) as (client, _):
        scores = (await client.post("/score", json={"user_id": "u4", "items": candidates})).json()["scores"]
        ranked = (await client.post("/rerank", json={"user_id": "u4", "candidates": candidates})).json()
        top = (
            await client.post("/rerank", json={"user_id": "u4", "candidates": candidates, "top_n": 2})
        ).json()
    results = ranked["results"]
    assert sorted(r["index"] for r in results) == [0, 1, 2, 3]
    assert [r["relevance_score"] for r in results] == sorted((s["score"] for s in scores), reverse=True)
    for r in results:
        assert candidates[r["index"]] == r["item_id"]
        assert r["relevance_score"] == pytest.approx(scores[r["index"]]["score"], abs=1e-6)
    assert top["results"] == results[:2]


async def test_duplicates_are_scored_at_each_occurrence(tiny_bundle_dir):
    async with serving(tiny_bundle_dir) as (client, _):
        scores = (await client.post("/score", json={"user_id": "u2", "items": ["i4", "i6", "i4"]})).json()
        ranked = (await client.post("/rerank", json={"user_id": "u2", "candidates": ["i4", "i4"]})).json()
    s = scores["scores"]
    assert len(s) == 3 and s[0]["score"] == s[2]["score"]
    assert [r["index"] for r in ranked["results"]] == [0, 1]  # ties keep input order


async def test_request_history_replaces_the_stored_one(tiny_bundle_dir):
    async with serving(tiny_bundle_dir) as (client, _):
        stored = (await client.post("/score", json={"user_id": "u3", "items": ["i1"]})).json()
        same = (
            await client.post("/score", json={"user_id": "u3", "items": ["i1"], "history": list("")})
        ).json()
        given = [f"i{k}" for k in range(9)]  # u3's stored history
        explicit = (
            await client.post("/score", json={"user_id": "u3", "items": ["i1"], "history": given})
        ).json()
    assert explicit["scores"][0]["score"] == pytest.approx(stored["scores"][0]["score"], abs=1e-6)
    assert same["scores"][0]["score"] != pytest.approx(stored["scores"][0]["score"], abs=1e-6)


async def test_unknown_items_without_title_are_named_in_a_422(tiny_bundle_dir):
    async with serving(tiny_bundle_dir) as (client, _):
        bad = await client.post(
            "/score", json={"user_id": "u1", "items": ["i1", "nope-1", "nope-2", "nope-1"]}
        )
        history = await client.post("/score", json={"user_id": "x", "items": ["i1"], "history": ["gone"]})
        titled = await client.post(
            "/score", json={"user_id": "u1", "items": [{"item_id": "nope-1", "title": "Nope (2001)"}]}
        )
    error = envelope(bad, 422, "unknown_items")
    assert error["items"] == ["nope-1", "nope-2"] and "nope-1" in error["message"]
    assert envelope(history, 422, "unknown_items")["items"] == ["gone"]
    assert titled.status_code == 200 and titled.json()["scores"][0]["cold"] is True


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b"",
        b"[]",
        b"null",
        b'"text"',
        b'{"user_id": "u1"}',
        b'{"items": ["i1"]}',
        b'{"user_id": 7, "items": ["i1"]}',
        b'{"user_id": "u1", "items": "i1"}',
        b'{"user_id": "u1", "items": []}',
        b'{"user_id": "", "items": ["i1"]}',
        b'{"user_id": "u1", "items": [null]}',
        b'{"user_id": "u1", "items": [{"title": "no id"}]}',
        b'{"user_id": "u1", "items": [{"item_id": "i1", "title": ""}]}',
        b'{"user_id": "u1", "items": [["i1"]]}',
        b'{"user_id": "u1", "items": ["i1"], "history": "i2"}',
        b'{"user_id": "u1", "items": ["i1"], "unexpected": 1}',
        b'{"user_id": "\\ud800", "items": ["i1"]}',
        b'{"user_id": "u1", "items": [{"item_id": "x", "title": "\\udfff"}]}',
        b'{"user_id": "u1", "items": [1e999]}',
    ],
)
async def test_malformed_requests_answer_422(tiny_bundle_dir, body):
    async with serving(tiny_bundle_dir) as (client, _):
        answer = await client.post("/score", content=body, headers={"content-type": "application/json"})
    envelope(answer, 422, "invalid_request")


async def test_rerank_validates_top_n(tiny_bundle_dir):
    async with serving(tiny_bundle_dir) as (client, _):
        zero = await client.post("/rerank", json={"user_id": "u1", "candidates": ["i1"], "top_n": 0})
        text = await client.post("/rerank", json={"user_id": "u1", "candidates": ["i1"], "top_n": "two"})
        more = await client.post("/rerank", json={"user_id": "u1", "candidates": ["i1"], "top_n": 5})
    envelope(zero, 422, "invalid_request")
    envelope(text, 422, "invalid_request")
    assert len(more.json()["results"]) == 1


async def test_too_many_candidates_or_history_entries_answer_413(tiny_bundle_dir):
    async with serving(tiny_bundle_dir, quick_settings(max_candidates=4, max_history=3)) as (client, _):
        many = await client.post("/score", json={"user_id": "u1", "items": ["i1"] * 5})
        rerank = await client.post("/rerank", json={"user_id": "u1", "candidates": ["i1"] * 5})
        history = await client.post("/score", json={"user_id": "u1", "items": ["i1"], "history": ["i2"] * 4})
        fits = await client.post("/score", json={"user_id": "u1", "items": ["i1"] * 4, "history": ["i2"] * 3})
    for answer in (many, rerank, history):
        envelope(answer, 413, "too_large")
    assert fits.status_code == 200


async def test_huge_bodies_answer_413_with_or_without_a_length(tiny_bundle_dir):
    huge = b'{"user_id": "u1", "items": [' + b'"i1",' * 2000 + b'"i1"]}'

    async def chunked():
        for start in range(0, len(huge), 1000):
            yield huge[start : start + 1000]

    async with serving(tiny_bundle_dir, quick_settings(max_body_bytes=4096)) as (client, _):
        sized = await client.post("/score", content=huge, headers={"content-type": "application/json"})
        streamed = await client.post(
            "/score", content=chunked(), headers={"content-type": "application/json"}
        )
    envelope(sized, 413, "too_large")
    envelope(streamed, 413, "too_large")


async def test_long_and_non_ascii_titles_are_scored(tiny_bundle_dir):
    items = [
        {"item_id": "long", "title": "Épopée " * 146},  # 1022 characters
        {"item_id": "cjk", "title": "千と千尋の神隠し・ハウルの動く城・もののけ姫 (2001) 🎬"},
        {"item_id": "rtl", "title": "عنوان الفيلم (٢٠٠١)"},
        {"item_id": "ctl", "title": "Tab\tNew\nLine\u0000Nul"},
    ]
    async with serving(tiny_bundle_dir) as (client, _):
        answer = await client.post("/score", json={"user_id": "ü-🙂", "items": items, "history": items[:2]})
        too_long = await client.post(
            "/score", json={"user_id": "u1", "items": [{"item_id": "x", "title": "a" * 1025}]}
        )
    assert answer.status_code == 200, answer.text
    assert all(s["cold"] for s in answer.json()["scores"])
    envelope(too_long, 422, "invalid_request")


async def test_a_prompt_longer_than_the_model_context_answers_422(tiny_bundle_dir):
    title = "千と千尋の神隠し " * 110  # about 1 000 characters, many tokens each
    history = [{"item_id": f"h{k}", "title": title} for k in range(10)]
    async with serving(tiny_bundle_dir) as (client, _):
        answer = await client.post(
            "/score", json={"user_id": "u1", "items": [{"item_id": "x", "title": title}], "history": history}
        )
    assert envelope(answer, 422, "prompt_too_long")["items"] == ["x"]


async def test_unknown_routes_and_methods_use_the_envelope(tiny_bundle_dir):
    async with serving(tiny_bundle_dir) as (client, _):
        missing = await client.get("/nope")
        method = await client.get("/score")
    envelope(missing, 404, "not_found")
    envelope(method, 405, "method_not_allowed")


async def test_bearer_token_guards_scoring_but_not_health(tiny_bundle_dir):
    async with serving(tiny_bundle_dir, quick_settings(api_token=TOKEN)) as (client, _):
        body = {"user_id": "u1", "items": ["i1"]}
        none = await client.post("/score", json=body)
        wrong = await client.post("/rerank", json={"user_id": "u1", "candidates": ["i1"]},
                                  headers={"Authorization": "Bearer nope"})  # fmt: skip
        basic = await client.post("/score", json=body, headers={"Authorization": f"Basic {TOKEN}"})
        right = await client.post("/score", json=body, headers={"Authorization": f"Bearer {TOKEN}"})
        open_paths = [(await client.get(p)).status_code for p in ("/healthz", "/readyz", "/metrics", "/docs")]
    assert envelope(none, 401, "unauthorized") and none.headers["www-authenticate"] == "Bearer"
    envelope(wrong, 401, "unauthorized")
    envelope(basic, 401, "unauthorized")
    assert right.status_code == 200
    assert open_paths == [200, 200, 200, 200]


async def test_metrics_can_require_the_token(tiny_bundle_dir):
    async with serving(tiny_bundle_dir, quick_settings(api_token=TOKEN, protect_metrics=True)) as (client, _):
        closed = await client.get("/metrics")
        opened = await client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    envelope(closed, 401, "unauthorized")
    assert opened.status_code == 200


async def test_a_full_queue_answers_429_with_retry_after_at_once(tiny_bundle_dir):
    gate = threading.Event()
    async with serving(tiny_bundle_dir, quick_settings(max_queue=1, batch_wait_ms=0)) as (client, app):
        batcher = app.state.runtime.engine.batcher
        blocker = asyncio.create_task(batcher.call(gate.wait, 30))  # the model thread is busy
        body = {"user_id": "u1", "items": ["i1"]}
        first = asyncio.create_task(
            client.post("/score", json=body)
        )  # taken into a batch, waits for the model
        while batcher.depth or not batcher._in_flight:
            await asyncio.sleep(0.01)
        second = asyncio.create_task(client.post("/score", json=body))  # waits in the queue
        while batcher.depth < 1:
            await asyncio.sleep(0.01)
        refused = await client.post("/score", json=body)
        gate.set()
        await blocker
        assert (await first).status_code == 200 and (await second).status_code == 200
    envelope(refused, 429, "queue_full")
    assert int(refused.headers["retry-after"]) >= 1


async def test_metrics_count_known_traffic(tiny_bundle_dir):
    cold = {"item_id": "fresh", "title": "Fresh (2030)"}
    async with serving(tiny_bundle_dir) as (client, _):
        for _ in range(3):
            assert (
                await client.post("/score", json={"user_id": "u1", "items": ["i1", cold]})
            ).status_code == 200
        assert (
            await client.post("/rerank", json={"user_id": "nobody", "candidates": ["i2"]})
        ).status_code == 200
        assert (await client.post("/score", json={"user_id": "u1", "items": ["nope"]})).status_code == 422
        assert (
            await client.post("/score", content=b"{", headers={"content-type": "application/json"})
        ).status_code == 422
        version = (await client.get("/readyz")).json()["model"]
        text = (await client.get("/metrics")).text
    samples = dict(
        line.rsplit(" ", 1) for line in text.splitlines() if line.startswith("sellarec_") and " " in line
    )

    def value(name: str) -> float:
        return float(samples[name])

    assert value("sellarec_candidates_scored_total") == 7
    assert value('sellarec_cold_scores_total{kind="item"}') == 3
    assert value('sellarec_cold_scores_total{kind="user"}') == 1
    assert value('sellarec_request_duration_seconds_count{endpoint="/score",status="200"}') == 3
    assert value('sellarec_request_duration_seconds_count{endpoint="/rerank",status="200"}') == 1
    assert value('sellarec_request_duration_seconds_count{endpoint="/score",status="422"}') == 2
    assert value('sellarec_errors_total{type="unknown_items"}') == 1
    assert value('sellarec_errors_total{type="invalid_request"}') == 1
    assert value("sellarec_queue_wait_seconds_count") == 4
    assert value("sellarec_batch_size_sum") == 7
    assert value('sellarec_store_lookup_duration_seconds_count{op="lookup"}') == 5
    assert value("sellarec_queue_depth") == 0
    assert value(f'sellarec_model_version{{version="{version}"}}') == 1


async def test_openapi_documents_every_endpoint_and_field(tiny_bundle_dir):
    async with serving(tiny_bundle_dir) as (client, _):
        schema = (await client.get("/openapi.json")).json()
        docs = await client.get("/docs")
    assert docs.status_code == 200
    assert {"/score", "/rerank", "/healthz", "/readyz", "/metrics"} <= set(schema["paths"])
    for name in ("ScoreRequest", "RerankRequest", "ScoreResponse", "RerankResponse", "ErrorResponse"):
        fields = schema["components"]["schemas"][name]["properties"]
        assert all(f.get("description") for f in fields.values()), name
    assert "413" in schema["paths"]["/score"]["post"]["responses"]


@pytest.mark.parametrize(
    ("settings", "guarded"),
    [
        ({}, set()),
        ({"api_token": "s3cret"}, {"/score", "/rerank", "/events"}),
        ({"api_token": "s3cret", "protect_metrics": True}, {"/score", "/rerank", "/events", "/metrics"}),
    ],
    ids=["open", "token", "token-and-metrics"],
)
async def test_openapi_declares_the_bearer_token_only_where_the_server_wants_it(
    tiny_bundle_dir, settings, guarded
):
    async with serving(tiny_bundle_dir, quick_settings(**settings)) as (client, _):
        schema = (await client.get("/openapi.json")).json()
    declared = {
        path for path, ops in schema["paths"].items() if any(op.get("security") for op in ops.values())
    }
    assert declared == guarded
    assert ("securitySchemes" in schema.get("components", {})) == bool(guarded)
    metrics_200 = schema["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert list(metrics_200) == ["text/plain"]


async def test_a_model_failure_answers_500_in_the_envelope_and_the_server_goes_on(tiny_bundle_dir):
    async with serving(tiny_bundle_dir) as (client, app):
        batcher = app.state.runtime.engine.batcher
        working = batcher.runner

        def broken(jobs):
            raise RuntimeError("CUDA out of memory (simulated)")

        batcher.runner = broken
        failed = await client.post("/score", json={"user_id": "u1", "items": ["i1"]})
        batcher.runner = working
        fine = await client.post("/score", json={"user_id": "u1", "items": ["i1"]})
    envelope(failed, 500, "internal_error")
    assert "CUDA" not in failed.text  # internals stay in the log
    assert fine.status_code == 200
