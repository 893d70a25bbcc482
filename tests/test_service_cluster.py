"""The store on Redis and on a real 3-master Redis Cluster: loads, pointer flips, lookups, events.

The cluster runs on free local ports for this module (redis-server --cluster-enabled, then
`redis-cli --cluster create`); the single Redis is the shared one at 127.0.0.1:6379, under a
unique key prefix per test.
"""

from __future__ import annotations

import asyncio
import subprocess

import pytest
from test_service_support import (
    REDIS_URL,
    cluster_masters,
    delete_prefix,
    derive_bundle,
    quick_settings,
    redis_cluster,
    serving,
    unique_prefix,
)
from typer.testing import CliRunner

from model.artifacts import load_bundle
from service.redis_store import RedisStore, connect
from service.store_admin import StoreAdmin
from service.store_cli import app as store_cli

CANDIDATES = ["i0", "i2", "i5", "i7", {"item_id": "brand-new", "title": "Brand New (2031)"}]
U3_HISTORY = [f"i{k}" for k in range(9)]


@pytest.fixture(scope="module")
def cluster_url(tmp_path_factory):
    with redis_cluster(tmp_path_factory.mktemp("cluster")) as url:
        yield url


@pytest.fixture(scope="module")
def bundle_v2(tiny_bundle_dir, tmp_path_factory):
    return derive_bundle(tiny_bundle_dir, tmp_path_factory.mktemp("v2") / "tiny-v2", "tiny-v2", seed=7)


@pytest.fixture(params=["redis", "cluster"])
async def store_url(request):
    """(url, prefix) on the single Redis and on the cluster; the keys are removed afterwards."""
    url = REDIS_URL if request.param == "redis" else request.getfixturevalue("cluster_url")
    prefix = unique_prefix()
    yield url, prefix
    if url == REDIS_URL:
        await delete_prefix(prefix)
    else:
        client = connect(url, 5.0)
        keys = [k async for k in client.scan_iter(match=f"{prefix}:*", count=1000)]
        if keys:
            await client.unlink(*keys)
        await client.aclose()


@pytest.fixture
async def admin(store_url):
    url, prefix = store_url
    client = connect(url, 5.0)
    yield StoreAdmin(client, prefix, chunk=4)
    await client.aclose()


def scores(answer) -> list[float]:
    assert answer.status_code == 200, answer.text
    return [s["score"] for s in answer.json()["scores"]]


async def wait_for_version(client, version: str) -> None:
    for _ in range(100):  # the server polls every 0.1 s
        if (await client.get("/readyz")).json().get("model") == version:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"the server never switched to {version}")


async def test_a_version_spreads_over_every_master_and_the_pointer_flips(
    cluster_url, tiny_bundle_dir, bundle_v2
):
    prefix = unique_prefix()
    client = connect(cluster_url, 5.0)
    admin = StoreAdmin(client, prefix, chunk=4)
    try:
        v1 = await admin.load(load_bundle(tiny_bundle_dir))
        assert (v1.users, v1.items, v1.previous) == (6, 10, None)
        per_master = []
        for port in cluster_masters(cluster_url):
            listed = subprocess.run(
                ["redis-cli", "-p", str(port), "--scan", "--pattern", f"{prefix}:v:{v1.version}:*"],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            per_master.append(len(listed.stdout.split()))
        assert len(per_master) == 3 and all(n > 0 for n in per_master) and sum(per_master) == 6 + 10 + 1
        v2 = await admin.load(load_bundle(bundle_v2))
        assert await admin.active() == v2.version and v2.previous == v1.version
        assert [v["version"] for v in await admin.versions()] == [v1.version, v2.version]
        assert await admin.drop(v1.version) == 6 + 10 + 1
        await admin.activate(v2.version)
        assert [v["version"] for v in await admin.versions()] == [v2.version]
        assert (await admin.load(load_bundle(bundle_v2))).reused
    finally:
        await admin.drop(v2.version, force=True)
        await client.aclose()


async def test_the_server_scores_from_redis_as_from_the_bundle_and_follows_flips(
    admin, store_url, tiny_bundle_dir, bundle_v2
):
    url, prefix = store_url
    v1 = (await admin.load(load_bundle(tiny_bundle_dir))).version
    body = {"user_id": "u3", "items": CANDIDATES}
    async with serving(tiny_bundle_dir) as (client, _):
        embedded = await client.post("/score", json=body)
    settings = quick_settings(redis_url=url, redis_prefix=prefix)
    async with serving(tiny_bundle_dir, settings) as (client, app):
        assert isinstance(app.state.runtime.engine.store, RedisStore)
        stored = await client.post("/score", json=body)
        v2 = (await admin.load(load_bundle(bundle_v2))).version
        await wait_for_version(client, v2)
        flipped = await client.post("/score", json=body)
    assert stored.json()["model"] == v1 and flipped.json()["model"] == v2
    assert scores(stored) == pytest.approx(scores(embedded), abs=1e-6)
    assert scores(flipped) != pytest.approx(scores(stored), abs=1e-4)


async def test_events_reach_the_next_score_and_survive_a_version_flip(
    admin, store_url, tiny_bundle_dir, bundle_v2
):
    url, prefix = store_url
    await admin.load(load_bundle(tiny_bundle_dir))
    batch = {"events": [
        {"user_id": "u3", "item_id": "i9", "label": 1, "event_id": "a", "timestamp": 10.0},
        {"user_id": "u3", "item_id": "i1", "label": 1, "event_id": "b", "timestamp": 11.0},
        {"user_id": "u3", "item_id": "i4", "label": 0, "event_id": "c", "timestamp": 12.0},
    ]}  # fmt: skip
    explicit = {"user_id": "u3", "items": CANDIDATES, "history": [*U3_HISTORY, "i9", "i1"]}
    settings = quick_settings(redis_url=url, redis_prefix=prefix)
    async with serving(tiny_bundle_dir, settings) as (client, _):
        first = await client.post("/events", json=batch)
        again = await client.post("/events", json=batch)
        v1_stored = await client.post("/score", json={"user_id": "u3", "items": CANDIDATES})
        v1_explicit = await client.post("/score", json=explicit)
        v2 = (await admin.load(load_bundle(bundle_v2))).version
        await wait_for_version(client, v2)
        v2_stored = await client.post("/score", json={"user_id": "u3", "items": CANDIDATES})
        v2_explicit = await client.post("/score", json=explicit)
    assert first.json() == {"recorded": 2, "duplicates": 0, "negatives": 1}
    assert again.json() == {"recorded": 0, "duplicates": 2, "negatives": 1}
    assert scores(v1_stored) == scores(v1_explicit)
    assert v2_stored.json()["model"] == v2 and scores(v2_stored) == scores(v2_explicit)


async def test_fold_in_vectors_are_cached_in_redis_under_the_version(admin, store_url, tiny_bundle_dir):
    url, prefix = store_url
    version = (await admin.load(load_bundle(tiny_bundle_dir))).version
    events = {"events": [{"user_id": "newcomer", "item_id": i, "label": 1} for i in ("i2", "i6")]}
    settings = quick_settings(redis_url=url, redis_prefix=prefix)
    async with serving(tiny_bundle_dir, settings) as (client, app):
        await client.post("/events", json=events)
        first = await client.post("/score", json={"user_id": "newcomer", "items": CANDIDATES})
        await app.state.runtime.engine.flush()
        second = await client.post("/score", json={"user_id": "newcomer", "items": CANDIDATES})
        sent = await client.post(
            "/score", json={"user_id": "other", "items": CANDIDATES, "history": ["i2", "i6"]}
        )
        registry = app.state.metrics.registry
        computed = registry.get_sample_value("sellarec_fold_ins_total", {"source": "computed"})
        cached = registry.get_sample_value("sellarec_fold_ins_total", {"source": "cache"})
    keys = [k async for k in admin.client.scan_iter(match=f"{prefix}:v:{version}:f:*")]
    assert len(keys) == 1 and len(await admin.client.get(keys[0])) == 4 * 16
    assert (computed, cached) == (1, 2)
    assert scores(first) == scores(second) == scores(sent)


def test_store_cli_loads_into_a_cluster_url(cluster_url, tiny_bundle_dir):
    prefix = unique_prefix()
    runner = CliRunner()
    common = ["--redis-url", cluster_url, "--prefix", prefix]
    loaded = runner.invoke(store_cli, ["load", "--artifacts", str(tiny_bundle_dir), *common])
    listed = runner.invoke(store_cli, ["list", *common])
    assert loaded.exit_code == 0, loaded.output
    assert "6 users, 10 items" in loaded.output and listed.output.startswith("* tiny-")
