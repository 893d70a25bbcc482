"""The Redis store: versioned loads, hot swaps, refusals, the cold cache, outages and recovery.

Every test writes under its own key prefix on the shared Redis at 127.0.0.1:6379 and
removes it afterwards; outages are simulated with a TCP proxy, never by stopping Redis.
"""

from __future__ import annotations

import asyncio
import json
import threading

import factories
import pytest
import redis.asyncio as redis
from test_service_support import (
    REDIS_URL,
    TcpProxy,
    delete_prefix,
    derive_bundle,
    quick_settings,
    serving,
    unique_prefix,
)
from typer.testing import CliRunner

from sellarec.model.artifacts import load_bundle
from sellarec.service.store.admin import LoadRefused, StoreAdmin
from sellarec.service.store.cli import app as store_cli
from sellarec.service.store.versions import version_id

ITEMS = ["i0", "i3", "i9", {"item_id": "brand-new", "title": "Brand New (2031)"}]


@pytest.fixture
async def prefix():
    name = unique_prefix()
    yield name
    await delete_prefix(name)


@pytest.fixture
async def admin(prefix):
    client = redis.from_url(REDIS_URL)
    yield StoreAdmin(client, prefix, chunk=4)  # small chunks: several pipelines per load
    await client.aclose()


@pytest.fixture(scope="module")
def bundle_v2(tiny_bundle_dir, tmp_path_factory):
    """A retrain of the tiny bundle: same backbone and LoRA, new embeddings and projections."""
    return derive_bundle(tiny_bundle_dir, tmp_path_factory.mktemp("v2") / "tiny-v2", "tiny-v2", seed=7)


@pytest.fixture(scope="module")
def bundle_other_dims(tiny_backbone_dir, tmp_path_factory):
    """A bundle the server's model cannot serve: another collaborative dimension and LoRA."""
    return factories.make_bundle(
        tmp_path_factory.mktemp("other"), tiny_backbone_dir, name="other", collab_dim=8
    )


def redis_settings(prefix: str, url: str = REDIS_URL, **kw):
    return quick_settings(redis_url=url, redis_prefix=prefix, **kw)


async def test_load_writes_verifies_and_activates_a_version(admin, prefix, tiny_bundle_dir):
    bundle = load_bundle(tiny_bundle_dir)
    report = await admin.load(bundle)
    assert report.version == version_id(bundle.manifest)
    assert (report.users, report.items, report.previous, report.reused) == (6, 10, None, False)
    assert await admin.active() == report.version
    client = admin.client
    user = await client.hgetall(f"{prefix}:v:{report.version}:u:u3")
    assert len(user[b"collab"]) == 4 * 16 and json.loads(user[b"history"]) == [f"i{k}" for k in range(9)]
    item = await client.hgetall(f"{prefix}:v:{report.version}:i:i4")
    assert item[b"title"].decode() == bundle.catalog.titles[4] and len(item[b"semantic"]) == 4 * 64
    [first] = await admin.versions()
    again = await admin.load(bundle)
    assert again.reused and again.checksum == report.checksum
    [listed] = await admin.versions()
    assert listed["version"] == report.version and listed["active"] and listed["items"] == 10
    assert listed["loaded_at"] is not None and listed["loaded_at"] == first["loaded_at"]  # kept by a re-load


async def test_the_active_version_cannot_be_dropped_but_an_old_one_can(
    admin, prefix, tiny_bundle_dir, bundle_v2
):
    v1 = (await admin.load(load_bundle(tiny_bundle_dir))).version
    v2 = (await admin.load(load_bundle(bundle_v2))).version
    assert v1 != v2 and await admin.active() == v2
    with pytest.raises(LoadRefused, match="active"):
        await admin.drop(v2)
    assert await admin.drop(v1) > 16
    assert [k async for k in admin.client.scan_iter(match=f"{prefix}:v:{v1}:*")] == []
    assert [v["version"] for v in await admin.versions()] == [v2]


async def test_a_load_the_active_model_cannot_serve_is_refused_unless_forced(
    admin, tiny_bundle_dir, bundle_other_dims
):
    v1 = (await admin.load(load_bundle(tiny_bundle_dir))).version
    other = load_bundle(bundle_other_dims)
    with pytest.raises(LoadRefused, match="d_C: artifact 8, model 16"):
        await admin.load(other)
    assert await admin.active() == v1
    forced = await admin.load(other, force=True)
    assert await admin.active() == forced.version


async def test_redis_and_in_process_stores_give_the_same_scores(admin, prefix, tiny_bundle_dir):
    await admin.load(load_bundle(tiny_bundle_dir))
    body = {"user_id": "u3", "items": ITEMS}
    async with serving(tiny_bundle_dir) as (client, _):
        embedded = (await client.post("/score", json=body)).json()
    async with serving(tiny_bundle_dir, redis_settings(prefix)) as (client, _):
        stored = (await client.post("/score", json=body)).json()
    assert stored["model"] == embedded["model"]
    assert [s["score"] for s in stored["scores"]] == pytest.approx(
        [s["score"] for s in embedded["scores"]], abs=1e-6
    )


async def test_the_server_switches_to_a_new_version_without_restart(
    admin, prefix, tiny_bundle_dir, bundle_v2
):
    v1 = (await admin.load(load_bundle(tiny_bundle_dir))).version
    body = {"user_id": "u1", "items": ITEMS}
    async with serving(tiny_bundle_dir, redis_settings(prefix)) as (client, app):
        before = (await client.post("/score", json=body)).json()
        v2 = (await admin.load(load_bundle(bundle_v2))).version
        for _ in range(100):  # the server polls every 0.1 s
            if (await client.get("/readyz")).json()["model"] == v2:
                break
            await asyncio.sleep(0.05)
        after = (await client.post("/score", json=body)).json()
        metrics = app.state.metrics.registry
        assert metrics.get_sample_value("sellarec_model_version", {"version": v2}) == 1
        assert metrics.get_sample_value("sellarec_model_version", {"version": v1}) == 0
    assert before["model"] == v1 and after["model"] == v2
    assert [s["score"] for s in after["scores"]] != pytest.approx(
        [s["score"] for s in before["scores"]], abs=1e-4
    )


async def test_a_request_keeps_the_version_it_started_with(admin, prefix, tiny_bundle_dir, bundle_v2):
    v1 = (await admin.load(load_bundle(tiny_bundle_dir))).version
    body = {"user_id": "u2", "items": ITEMS}
    gate = threading.Event()
    async with serving(tiny_bundle_dir, redis_settings(prefix, version_poll_s=60)) as (client, app):
        engine = app.state.runtime.engine
        reference = (await client.post("/score", json=body)).json()
        blocker = asyncio.create_task(engine.batcher.call(gate.wait, 30))
        started = asyncio.create_task(client.post("/score", json=body))  # snapshots v1, then waits
        while not engine.batcher._in_flight and not engine.batcher.depth:
            await asyncio.sleep(0.01)
        v2 = (await admin.load(load_bundle(bundle_v2))).version
        await engine.tracker.refresh()
        assert engine.tracker.current.version == v2
        gate.set()
        await blocker
        old = (await started).json()
        new = (await client.post("/score", json=body)).json()
    assert old["model"] == v1 and old["scores"] == reference["scores"]
    assert new["model"] == v2


async def test_the_server_refuses_an_incompatible_version_and_keeps_serving(
    admin, prefix, tiny_bundle_dir, bundle_other_dims
):
    v1 = (await admin.load(load_bundle(tiny_bundle_dir))).version
    async with serving(tiny_bundle_dir, redis_settings(prefix)) as (client, app):
        bad = (await admin.load(load_bundle(bundle_other_dims), force=True)).version
        await app.state.runtime.engine.tracker.refresh()
        await asyncio.sleep(0.3)  # a few polls: refused once, not again and again
        ready = await client.get("/readyz")
        scored = await client.post("/score", json={"user_id": "u1", "items": ["i1"]})
        refused = app.state.metrics.registry.get_sample_value(
            "sellarec_version_refused_total", {"version": bad}
        )
    assert ready.status_code == 200 and ready.json()["model"] == v1
    assert scored.status_code == 200 and scored.json()["model"] == v1
    assert refused == 1


async def test_a_version_with_unreadable_metadata_is_refused(admin, prefix, tiny_bundle_dir):
    v1 = (await admin.load(load_bundle(tiny_bundle_dir))).version
    async with serving(tiny_bundle_dir, redis_settings(prefix)) as (client, app):
        await admin.client.hset(f"{prefix}:v:broken-1:meta", mapping={"meta": b"{not json"})
        await admin.client.set(f"{prefix}:active", "broken-1")
        await app.state.runtime.engine.tracker.refresh()
        scored = await client.post("/score", json={"user_id": "u1", "items": ["i1"]})
        refused = app.state.metrics.registry.get_sample_value(
            "sellarec_version_refused_total", {"version": "broken-1"}
        )
    assert scored.status_code == 200 and scored.json()["model"] == v1 and refused == 1


async def test_a_server_that_starts_on_an_incompatible_version_is_not_ready(
    admin, prefix, tiny_bundle_dir, bundle_other_dims
):
    await admin.load(load_bundle(bundle_other_dims))
    async with serving(tiny_bundle_dir, redis_settings(prefix)) as (client, _):
        ready = await client.get("/readyz")
        scored = await client.post("/score", json={"user_id": "u1", "items": ["i1"]})
    assert ready.status_code == 503 and "incompatible" in ready.json()["error"]["message"]
    assert scored.status_code == 503 and scored.json()["error"]["type"] == "store_unavailable"


async def test_an_empty_store_is_not_ready_and_says_what_to_do(prefix, tiny_bundle_dir):
    async with serving(tiny_bundle_dir, redis_settings(prefix)) as (client, _):
        ready = await client.get("/readyz")
    assert ready.status_code == 503 and "sellarec-store load" in ready.json()["error"]["message"]


async def test_cold_item_vectors_are_cached_under_the_version(admin, prefix, tiny_bundle_dir):
    version = (await admin.load(load_bundle(tiny_bundle_dir))).version
    async with serving(tiny_bundle_dir, redis_settings(prefix)) as (client, app):
        first = (await client.post("/score", json={"user_id": "u1", "items": ITEMS})).json()
        await app.state.runtime.engine.flush()
        keys = [k async for k in admin.client.scan_iter(match=f"{prefix}:v:{version}:d:*")]
        again = (await client.post("/score", json={"user_id": "u1", "items": ITEMS})).json()
    assert len(keys) == 1 and len(await admin.client.get(keys[0])) == 4 * 64
    assert 0 < await admin.client.ttl(keys[0]) <= 7 * 86400
    assert again["scores"] == first["scores"]


async def test_an_unreachable_store_answers_503_and_the_service_recovers(admin, prefix, tiny_bundle_dir):
    await admin.load(load_bundle(tiny_bundle_dir))
    proxy = TcpProxy()
    await proxy.start()
    body = {"user_id": "u1", "items": ["i1", "i2"]}
    settings = redis_settings(prefix, url=proxy.url, redis_timeout_s=0.5)
    async with serving(tiny_bundle_dir, settings) as (client, app):
        assert (await client.get("/readyz")).status_code == 200
        assert (await client.post("/score", json=body)).status_code == 200
        await proxy.cut()
        down_score = await client.post("/score", json=body)
        down_ready = await client.get("/readyz")
        alive = await client.get("/healthz")
        await proxy.start()  # same port
        for _ in range(50):
            if (await client.get("/readyz")).status_code == 200:
                break
            await asyncio.sleep(0.05)
        back = await client.post("/score", json=body)
        errors = app.state.metrics.registry.get_sample_value(
            "sellarec_errors_total", {"type": "store_unavailable"}
        )
    await proxy.cut()
    assert down_score.status_code == 503 and down_score.json()["error"]["type"] == "store_unavailable"
    assert down_ready.status_code == 503 and alive.status_code == 200
    assert back.status_code == 200
    assert errors >= 2


async def test_a_server_started_while_the_store_is_down_becomes_ready_when_it_returns(
    admin, prefix, tiny_bundle_dir
):
    await admin.load(load_bundle(tiny_bundle_dir))
    proxy = TcpProxy()
    await proxy.start()
    await proxy.cut()  # the port is known, nothing listens on it
    async with serving(tiny_bundle_dir, redis_settings(prefix, url=proxy.url, redis_timeout_s=0.5)) as (
        client,
        _,
    ):
        assert (await client.get("/healthz")).status_code == 200
        assert (await client.get("/readyz")).status_code == 503
        assert (await client.post("/score", json={"user_id": "u1", "items": ["i1"]})).status_code == 503
        await proxy.start()
        for _ in range(50):
            if (await client.get("/readyz")).status_code == 200:
                break
            await asyncio.sleep(0.05)
        scored = await client.post("/score", json={"user_id": "u1", "items": ["i1"]})
    await proxy.cut()
    assert scored.status_code == 200


def test_store_cli_loads_lists_and_drops(tiny_bundle_dir, bundle_v2):
    runner = CliRunner()
    prefix = unique_prefix()
    common = ["--redis-url", REDIS_URL, "--prefix", prefix]
    try:
        first = runner.invoke(store_cli, ["load", "--artifacts", str(tiny_bundle_dir), *common])
        second = runner.invoke(store_cli, ["load", "--artifacts", str(bundle_v2), *common])
        listed = runner.invoke(store_cli, ["list", "--json", *common])
        versions = {v["version"]: v["active"] for v in json.loads(listed.stdout)}
        active = next(v for v, is_active in versions.items() if is_active)
        old = next(v for v, is_active in versions.items() if not is_active)
        refused = runner.invoke(store_cli, ["drop", active, *common])
        dropped = runner.invoke(store_cli, ["drop", old, *common])
        after = runner.invoke(store_cli, ["list", *common])
    finally:
        asyncio.run(delete_prefix(prefix))
    assert first.exit_code == 0 and "loaded" in first.stdout and "6 users, 10 items" in first.stdout
    assert second.exit_code == 0 and len(versions) == 2
    assert refused.exit_code == 1 and "active" in refused.output
    assert dropped.exit_code == 0 and old not in after.stdout and f"* {active}" in after.stdout


def test_store_cli_reports_an_unreachable_redis():
    result = CliRunner().invoke(store_cli, ["list", "--redis-url", "redis://127.0.0.1:1/0", "--prefix", "x"])
    assert result.exit_code == 2 and "cannot reach Redis" in result.output


async def test_a_version_wiped_under_the_server_answers_503_not_unknown_items(admin, prefix, tiny_bundle_dir):
    """A Redis restarted empty and being reloaded holds part of the version: that is the store's fault."""
    version = (await admin.load(load_bundle(tiny_bundle_dir))).version
    body = {"user_id": "u1", "items": ["i1", "i2"]}
    async with serving(tiny_bundle_dir, redis_settings(prefix)) as (client, _):
        assert (await client.post("/score", json=body)).status_code == 200
        await admin.client.delete(f"{prefix}:v:{version}:meta", f"{prefix}:v:{version}:i:i2")
        wiped = await client.post("/score", json=body)
    assert wiped.status_code == 503 and wiped.json()["error"]["type"] == "store_unavailable"
