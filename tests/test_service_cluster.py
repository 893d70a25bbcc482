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

from sellarec.model.artifacts import load_bundle
from sellarec.service.store.admin import StoreAdmin
from sellarec.service.store.base import LabelledEvent, LikedItem
from sellarec.service.store.cli import app as store_cli
from sellarec.service.store.redis_store import RedisStore, connect

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


async def test_labelled_events_fold_in_on_redis_as_in_process(admin, store_url, tiny_bundle_dir):
    """Negatives reach the overlay's labelled list; the fold-in and its cache key follow them."""
    url, prefix = store_url
    version = (await admin.load(load_bundle(tiny_bundle_dir))).version
    events = [("i2", 1, 1.0), ("i3", 0, 2.0), ("i6", 1, 3.0), ("i7", 0, 4.0)]
    batch = {
        "events": [{"user_id": "newcomer", "item_id": i, "label": y, "timestamp": ts} for i, y, ts in events]
    }
    later = {"user_id": "newcomer", "item_id": "i5", "label": 0, "timestamp": 5.0}
    ask = {"user_id": "newcomer", "items": CANDIDATES}
    answers = {}
    on_redis = quick_settings(redis_url=url, redis_prefix=prefix)
    for where, settings in (("memory", quick_settings()), ("redis", on_redis)):
        async with serving(tiny_bundle_dir, settings) as (client, app):
            await client.post("/events", json=batch)
            before = await client.post("/score", json=ask)
            await client.post("/events", json=later)
            after = await client.post("/score", json=ask)
            await app.state.runtime.engine.flush()
            answers[where] = (scores(before), scores(after))
    assert answers["redis"][0] == pytest.approx(answers["memory"][0], abs=1e-6)
    assert answers["redis"][1] == pytest.approx(answers["memory"][1], abs=1e-6)
    assert answers["redis"][0] != answers["redis"][1]
    keys = [k async for k in admin.client.scan_iter(match=f"{prefix}:v:{version}:f:*")]
    assert len(keys) == 2  # one fold-in vector per state of the labelled events


async def test_the_overlay_script_bounds_both_lists_and_reads_the_first_layout(store_url):
    url, prefix = store_url
    store = RedisStore.from_url(url, prefix, timeout_s=5.0)
    try:
        # A lookup reads a version only if its meta key exists (issue 12): a stand-in for one.
        await store.client.hset(store.keys.meta("no-version"), "stand-in", b"1")
        # The first layout (positives only, a bare JSON array) is read and merged into.
        await store.client.set(store.keys.events("old"), b'[["e0", 1.0, "i1", "One"]]')
        added = await store.add_events(
            "old",
            [LikedItem("i2", "Two", 2.0, "e1")],
            [LabelledEvent("i2", 1, 2.0, "e1"), LabelledEvent("i3", 0, 3.0, "e2"), LabelledEvent("i4", 0, 4)],
            keep=2,
        )
        again = await store.add_events("old", [], [LabelledEvent("i3", 0, 3.0, "e2")], keep=2)
        lookup = await store.lookup("no-version", "old", [], [])
        negatives_only = await store.add_events("neg", [], [LabelledEvent("i5", 0, 1.0)], keep=2)
        neg = await store.lookup("no-version", "neg", [], [])
    finally:
        await store.close()
    assert added == (1, 3) and again == (0, 0)
    assert [(e.item_id, e.title) for e in lookup.liked] == [("i1", "One"), ("i2", "Two")]
    assert [(e.item_id, e.label) for e in lookup.labelled] == [("i3", 0), ("i4", 0)]
    assert negatives_only == (0, 1) and neg.liked == () and [e.item_id for e in neg.labelled] == ["i5"]


def test_store_cli_loads_into_a_cluster_url(cluster_url, tiny_bundle_dir):
    prefix = unique_prefix()
    runner = CliRunner()
    common = ["--redis-url", cluster_url, "--prefix", prefix]
    loaded = runner.invoke(store_cli, ["load", "--artifacts", str(tiny_bundle_dir), *common])
    listed = runner.invoke(store_cli, ["list", *common])
    assert loaded.exit_code == 0, loaded.output
    assert "6 users, 10 items" in loaded.output and listed.output.startswith("* tiny-")
