"""The HTTP API over the in-process store: shapes, ordering, errors, limits, auth, back-pressure, metrics.

Nothing a client can send may produce a 500: every malformed, oversized or odd request
gets the error envelope with a 4xx status.
"""

from __future__ import annotations

import asyncio
import json
import threading

import pytest
from test_service_support import quick_settings, serving

from sellarec.service.engine.admission import CostModel, Work

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
        b'{"user_id": "u\xff\xfe", "items": ["i1"]}',  # invalid UTF-8
        b'{"user_id": "u1", "items": ' + b"[" * 10_000 + b"]" * 10_000 + b"}",  # 10,000 deep
        b'{"user_id": "u1", "items": ["i1"], "top_n": ' + b"9" * 5000 + b"}",  # a huge number
        b'{"user_id": "u1", "items": [' + b"1" * 5000 + b"]}",
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
        digits = await client.post("/rerank", json={"user_id": "u1", "candidates": ["i1"], "top_n": "2"})
        boolean = await client.post("/rerank", json={"user_id": "u1", "candidates": ["i1"], "top_n": True})
        fraction = await client.post("/rerank", json={"user_id": "u1", "candidates": ["i1"], "top_n": 1.5})
        more = await client.post("/rerank", json={"user_id": "u1", "candidates": ["i1"], "top_n": 5})
    for answer in (zero, text, digits, boolean, fraction):
        envelope(answer, 422, "invalid_request")
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


async def test_authentication_comes_before_the_body_is_read(tiny_bundle_dir):
    async with serving(tiny_bundle_dir, quick_settings(api_token=TOKEN, max_body_bytes=4096)) as (client, _):
        garbage = await client.post(
            "/score", content=b"{not json", headers={"content-type": "application/json"}
        )
        huge = await client.post(
            "/rerank", content=b"x" * 10_000, headers={"content-type": "application/json"}
        )
        authorized = await client.post(
            "/score",
            content=b"{not json",
            headers={"content-type": "application/json", "Authorization": f"Bearer {TOKEN}"},
        )
    envelope(garbage, 401, "unauthorized")
    envelope(huge, 401, "unauthorized")
    envelope(authorized, 422, "invalid_request")


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


def _samples(text: str) -> dict[str, float]:
    return {
        name: float(v)
        for name, v in (line.rsplit(" ", 1) for line in text.splitlines() if line.startswith("sellarec_"))
    }


@pytest.mark.parametrize("cache_mb", [256, 0])
async def test_a_returning_user_is_served_from_the_prefix_cache(tiny_bundle_dir, cache_mb):
    async with serving(tiny_bundle_dir, quick_settings(prefix_cache_mb=cache_mb)) as (client, _):
        before = _samples((await client.get("/metrics")).text)
        answers = [
            (await client.post("/score", json={"user_id": "u3", "items": items})).json()["scores"]
            for items in (["i1"], ["i2", "i1"], ["i1"])
        ]
        after = _samples((await client.get("/metrics")).text)
    hits = 'sellarec_prefix_cache_lookups_total{result="hit"}'
    # The same user and item scores the same whether its prefix was kept or not.
    assert answers[2][0]["score"] == pytest.approx(answers[0][0]["score"], abs=1e-5)
    assert answers[1][1]["score"] == pytest.approx(answers[0][0]["score"], abs=1e-5)
    if cache_mb:
        assert after[hits] - before[hits] == 2
        assert after["sellarec_prefix_cache_entries"] >= 1 and after["sellarec_prefix_cache_bytes"] > 0
    else:
        assert after[hits] == 0 and after["sellarec_prefix_cache_entries"] == 0


@pytest.mark.parametrize("cache_mb", [256, 0])
async def test_admission_prices_a_kept_prefix_as_no_work(tiny_bundle_dir, cache_mb):
    """A returning user's request runs only its candidates, so its predicted wait leaves out
    the prefix tokens; a new user's (or any, without the cache) counts them."""
    async with serving(tiny_bundle_dir, quick_settings(prefix_cache_mb=cache_mb)) as (client, app):
        batcher = app.state.runtime.engine.batcher
        priced: list[Work] = []
        submit = batcher.submit

        def recording(*args, work, **kwargs):
            priced.append(work)
            return submit(*args, work=work, **kwargs)

        batcher.submit = recording
        for user in ("u3", "u3", "u4"):
            assert (await client.post("/score", json={"user_id": user, "items": ["i1"]})).status_code == 200
    first, again, other = priced
    assert first.prefix_tokens > 0 and other.prefix_tokens > 0
    assert again.suffix_tokens == first.suffix_tokens
    assert again.prefix_tokens == (0 if cache_mb else first.prefix_tokens)


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


async def test_a_request_over_the_token_cap_answers_413_with_what_to_do(tiny_bundle_dir):
    items = [{"item_id": f"new-{k}", "title": f"A long new title number {k} " * 30} for k in range(8)]
    async with serving(tiny_bundle_dir, quick_settings(max_request_tokens=512)) as (client, app):
        batches = app.state.metrics.batch_seconds
        before = batches._sum.get()
        big = await client.post("/score", json={"user_id": "u1", "items": items})
        assert batches._sum.get() == before  # refused before any model work
        small = await client.post("/score", json={"user_id": "u1", "items": ["i1", "i2"]})
    error = envelope(big, 413, "too_large")
    assert "max_request_tokens" in error["message"] and "8 cold titles" in error["message"]
    assert small.status_code == 200


async def test_a_request_is_refused_with_429_once_the_predicted_wait_exceeds_the_budget(tiny_bundle_dir):
    gate = threading.Event()
    async with serving(tiny_bundle_dir, quick_settings(max_queue_wait_ms=1000, batch_wait_ms=0)) as (
        client,
        app,
    ):
        batcher = app.state.runtime.engine.batcher
        batcher.cost = CostModel()
        batcher.cost.observe(Work(100, 0), 1.0)  # as if the model took 10 ms per token position
        blocker = asyncio.create_task(batcher.call(gate.wait, 30))  # the model thread is busy
        body = {"user_id": "u1", "items": ["i1", "i2"]}
        first = asyncio.create_task(client.post("/score", json=body))  # over 1 s of work, in a batch
        for _ in range(500):
            if batcher._in_flight:
                break
            await asyncio.sleep(0.01)
        predicted = batcher.predicted_wait()
        refused = await client.post("/score", json=body)
        gate.set()
        await blocker
        assert (await first).status_code == 200
    assert predicted > 1.0
    error = envelope(refused, 429, "queue_full")
    assert "max_queue_wait" in error["message"]
    assert int(refused.headers["retry-after"]) >= 1


def hold_the_model(batcher, gate: threading.Event) -> list[list]:
    """Make the batcher's runner record each batch and hold the first one until `gate` is set."""
    batches: list[list] = []
    working = batcher.runner

    def runner(jobs):
        batches.append(jobs)
        gate.wait(30)
        return working(jobs)

    batcher.runner = runner
    return batches


async def until(condition, timeout_s: float = 10.0) -> None:
    for _ in range(int(timeout_s / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


async def test_a_request_whose_timeout_passes_in_the_queue_is_dropped_unrun(tiny_bundle_dir):
    gate = threading.Event()
    async with serving(tiny_bundle_dir, quick_settings(batch_wait_ms=0)) as (client, app):
        batcher = app.state.runtime.engine.batcher
        batches = hold_the_model(batcher, gate)
        first = asyncio.create_task(client.post("/score", json={"user_id": "u1", "items": ["i1"]}))
        await until(lambda: batches)  # the first request holds the model
        late = await client.post(
            "/score", json={"user_id": "u2", "items": ["i2"]}, headers={"X-Request-Timeout-Ms": "300"}
        )
        depth = batcher.depth
        gate.set()
        assert (await first).status_code == 200
        bad = await client.post(
            "/score", json={"user_id": "u1", "items": ["i1"]}, headers={"X-Request-Timeout-Ms": "soon"}
        )
    # A 429 (no 5xx for anything a client sends) with a Retry-After, like any overload answer.
    envelope(late, 429, "deadline_exceeded")
    assert int(late.headers["Retry-After"]) >= 1
    assert depth == 0 and len(batches) == 1  # it left the queue and never ran
    envelope(bad, 422, "invalid_request")


async def test_a_client_that_disconnects_takes_its_queued_work_away(tiny_bundle_dir):
    gate = threading.Event()
    async with serving(tiny_bundle_dir, quick_settings(batch_wait_ms=0)) as (client, app):
        batcher = app.state.runtime.engine.batcher
        batches = hold_the_model(batcher, gate)
        first = asyncio.create_task(client.post("/score", json={"user_id": "u1", "items": ["i1"]}))
        await until(lambda: batches)
        hang_up = asyncio.Event()
        messages = [{"type": "http.request", "body": json.dumps({"user_id": "u2", "items": ["i2"]}).encode()}]
        sent: list[dict] = []

        async def receive():
            if messages:
                return messages.pop()
            await hang_up.wait()
            return {"type": "http.disconnect"}

        async def send(message):
            sent.append(message)

        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
            "scheme": "http", "path": "/score", "raw_path": b"/score", "query_string": b"", "root_path": "",
            "headers": [(b"content-type", b"application/json"), (b"host", b"test")],
            "client": ("127.0.0.1", 1), "server": ("test", 80), "state": {},
        }  # fmt: skip
        call = asyncio.create_task(app(scope, receive, send))
        await until(lambda: batcher.depth == 1)
        hang_up.set()
        await asyncio.wait_for(call, 10)
        depth = batcher.depth
        gate.set()
        assert (await first).status_code == 200
    assert depth == 0 and len(batches) == 1  # dropped before it ran; no batch waited on it
    assert sent[0]["status"] == 499


async def test_scores_do_not_depend_on_batch_mates_beyond_1e_5(tiny_bundle_dir):
    """Batching pads prefixes and suffixes to shared lengths; the scores move by float rounding only."""
    target = {"user_id": "u1", "items": ["i1", "i4", {"item_id": "n", "title": "Brand New (2031)"}]}
    mates = [
        {"user_id": "u3", "items": ["i2", "i7", "i9", "i0"]},
        {"user_id": "nobody", "items": ["i5"], "history": ["i1", "i2", "i3", "i4", "i5", "i6"]},
        {"user_id": "u5", "items": [{"item_id": "m", "title": "Another Rather Long Title, The (1977)"}]},
    ]
    async with serving(tiny_bundle_dir, quick_settings(batch_wait_ms=200)) as (client, app):
        alone = (await client.post("/score", json=target)).json()["scores"]
        batches = app.state.metrics.batch_requests
        before = batches._sum.get()
        answers = await asyncio.gather(*(client.post("/score", json=b) for b in [target, *mates]))
        merged = batches._sum.get() - before
    together = answers[0].json()["scores"]
    assert merged == 4  # one batch of four requests
    for a, b in zip(alone, together):
        assert abs(a["score"] - b["score"]) < 1e-5
