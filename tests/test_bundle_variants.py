"""Every variant's bundle, as `sellarec-train run <variant>` writes it, serves or is refused at startup.

The bundles are written by training.bundles on the synthetic dataset with the tiny random
Qwen2 (random weights in place of trained ones: serving does not care). Each LLM variant
serves /score over the in-process store and over Redis (loaded with the store admin), for a
known user and for cold ones; an MF bundle has no LLM and is refused, in one line, by
`sellarec-serve`, by the app itself and by `sellarec-store load`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import AsyncIterator
from functools import cache
from pathlib import Path

import factories
import httpx
import pytest
import redis.asyncio as redis
import torch
from asgi_lifespan import LifespanManager
from test_service_support import REDIS_URL, delete_prefix, quick_settings, unique_prefix
from typer.testing import CliRunner

from sellarec.model.artifacts import ArtifactError, load_bundle
from sellarec.model.compat import LLM_VARIANTS
from sellarec.model.loader import LoadedModel, load_scorer
from sellarec.service.api.app import create_app
from sellarec.service.cli import cli_app
from sellarec.service.settings import Settings
from sellarec.service.store.admin import StoreAdmin
from sellarec.service.store.cli import app as store_cli
from sellarec.training.config import VARIANTS

LLM = [name for name, v in VARIANTS.items() if v.llm]
NEW_ITEM = {"item_id": "brand-new", "title": "Brand New (2031)"}


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, tiny_backbone_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("variants")
    return {name: factories.variant_bundle(root, tiny_backbone_dir, name) for name in VARIANTS}


@cache
def loaded(path: str) -> LoadedModel:
    return load_scorer(path)


@contextlib.asynccontextmanager
async def serving(bundle: Path, settings: Settings | None = None) -> AsyncIterator[httpx.AsyncClient]:
    """An app on the bundle's model, started (lifespan), with an ASGI client."""
    settings = settings or quick_settings(artifacts=bundle)
    app = create_app(settings, loaded=loaded(str(bundle)))
    async with LifespanManager(app, startup_timeout=60, shutdown_timeout=60) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://sellarec.test") as client:
            yield client


async def score_known_and_cold(client: httpx.AsyncClient, bundle: Path) -> None:
    """A known user on known items, a cold user (neutral vector, then folded in from a history
    and from labelled events), and a cold item: every score a probability, the cold flags right."""
    catalog = load_bundle(bundle).catalog
    user, items = catalog.users[1], catalog.items[1:4]
    known = await client.post("/score", json={"user_id": user, "items": items})
    cold = await client.post("/score", json={"user_id": "nobody", "items": [*items, NEW_ITEM]})
    folded = await client.post(
        "/score", json={"user_id": "nobody", "items": items, "history": catalog.items[4:7]}
    )
    events = [
        {"user_id": "newcomer", "item_id": catalog.items[4], "label": 1},
        {"user_id": "newcomer", "item_id": catalog.items[5], "label": 0},
    ]
    recorded = await client.post("/events", json={"events": events})
    labelled = await client.post("/score", json={"user_id": "newcomer", "items": items})
    for answer in (known, cold, folded, recorded, labelled):
        assert answer.status_code == 200, answer.text
    for answer in (known, cold, folded, labelled):
        scores = answer.json()["scores"]
        assert all(math.isfinite(s["score"]) and 0.0 < s["score"] < 1.0 for s in scores), scores
    assert [s["cold"] for s in known.json()["scores"]] == [False] * 3
    assert [s["cold"] for s in cold.json()["scores"]] == [True] * 4
    assert [s["item_id"] for s in cold.json()["scores"]] == [*items, "brand-new"]


def test_the_mf_refusal_names_every_llm_variant():
    assert list(LLM_VARIANTS) == LLM


@pytest.mark.parametrize("variant", LLM)
async def test_every_llm_variant_serves_from_the_in_process_store(bundles, variant):
    async with serving(bundles[variant]) as client:
        assert (await client.get("/readyz")).status_code == 200
        await score_known_and_cold(client, bundles[variant])


@pytest.mark.parametrize("variant", LLM)
async def test_every_llm_variant_loads_into_redis_and_serves(bundles, variant):
    prefix = unique_prefix()
    client = redis.from_url(REDIS_URL)
    try:
        report = await StoreAdmin(client, prefix).load(load_bundle(bundles[variant]))
        settings = quick_settings(artifacts=bundles[variant], redis_url=REDIS_URL, redis_prefix=prefix)
        async with serving(bundles[variant], settings) as http:
            assert (await http.get("/readyz")).json()["model"] == report.version
            await score_known_and_cold(http, bundles[variant])
    finally:
        await client.aclose()
        await delete_prefix(prefix)


async def test_a_variant_without_semantics_scores_alike_from_both_stores(bundles):
    """CoLLM stores no semantic vectors (nor TALLRec any vector): Redis and in process agree."""
    body = {"user_id": "2", "items": ["1", "2", NEW_ITEM], "history": ["3"]}
    prefix = unique_prefix()
    client = redis.from_url(REDIS_URL)
    answers = []
    try:
        for variant in ("collm", "tallrec"):  # another model: a forced load
            await StoreAdmin(client, prefix).load(load_bundle(bundles[variant]), force=True)
            stored = quick_settings(artifacts=bundles[variant], redis_url=REDIS_URL, redis_prefix=prefix)
            for settings in (None, stored):
                async with serving(bundles[variant], settings) as http:
                    answers.append(
                        [s["score"] for s in (await http.post("/score", json=body)).json()["scores"]]
                    )
    finally:
        await client.aclose()
        await delete_prefix(prefix)
    assert answers[1] == pytest.approx(answers[0], abs=1e-6)
    assert answers[3] == pytest.approx(answers[2], abs=1e-6)


def test_sellarec_serve_refuses_an_mf_bundle_in_one_line(bundles):
    result = CliRunner().invoke(cli_app(), ["--artifacts", str(bundles["mf"])])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output and "KeyError" not in result.output
    assert "MF bundle" in lines[0] and "no LLM to serve" in lines[0] and "sellarec, " in lines[0]


async def test_the_app_refuses_an_mf_bundle_at_startup(bundles):
    app = create_app(quick_settings(artifacts=bundles["mf"]))
    with pytest.raises(
        ArtifactError, match="MF bundle .* no LLM to serve; serve the bundle of an LLM variant"
    ):
        async with LifespanManager(app, startup_timeout=60):
            pass


def test_sellarec_store_load_refuses_an_mf_bundle_in_one_line(bundles):
    prefix = unique_prefix()
    result = CliRunner().invoke(
        store_cli, ["load", "--artifacts", str(bundles["mf"]), "--redis-url", REDIS_URL, "--prefix", prefix]
    )
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "MF bundle" in lines[0] and "collm" in lines[0]


async def test_the_store_admin_refuses_an_mf_bundle_before_writing(bundles):
    prefix = unique_prefix()
    client = redis.from_url(REDIS_URL)
    try:
        with pytest.raises(ArtifactError, match="MF bundle"):
            await StoreAdmin(client, prefix).load(load_bundle(bundles["mf"]))
        assert [k async for k in client.scan_iter(match=f"{prefix}:*")] == []
    finally:
        await client.aclose()


@pytest.mark.parametrize("store", ["in-process", "redis"])
async def test_an_mf_residual_bundle_serves_the_llm_logit_plus_the_dot_product(bundles, store):
    """`sellarec-mf` and `sellarec` bundles drawn from one seed hold the same weights: the
    residual bundle's served logits are the other's plus <u, v_i> (neutral rows for the cold)."""
    residual, plain = bundles["sellarec-mf"], bundles["sellarec"]
    bundle = load_bundle(residual)
    tables, catalog = bundle.tables(), bundle.catalog
    assert torch.equal(tables.users, load_bundle(plain).tables().users)
    items = catalog.items[1:4]
    user = catalog.users[1]
    logits = {}
    prefix = unique_prefix()
    client = redis.from_url(REDIS_URL)
    try:
        for name, path in (("plain", plain), ("residual", residual)):
            settings = None
            if store == "redis":
                await StoreAdmin(client, prefix).load(load_bundle(path), force=True)
                settings = quick_settings(artifacts=path, redis_url=REDIS_URL, redis_prefix=prefix)
            async with serving(path, settings) as http:
                for who in (user, "nobody"):
                    answer = await http.post("/score", json={"user_id": who, "items": [*items, NEW_ITEM]})
                    assert answer.status_code == 200, answer.text
                    p = torch.tensor([s["score"] for s in answer.json()["scores"]], dtype=torch.float64)
                    logits[name, who] = torch.log(p) - torch.log1p(-p)
    finally:
        await client.aclose()
        await delete_prefix(prefix)
    rows = catalog.item_rows()
    vectors = torch.stack([*(tables.items[rows[i]] for i in items), tables.neutral_item]).double()
    for who, u in ((user, tables.users[catalog.user_rows()[user]]), ("nobody", tables.neutral_user)):
        dots = vectors @ u.double()
        assert dots.abs().max() > 0.1  # a residual large enough to see
        got = logits["residual", who] - logits["plain", who]
        assert torch.allclose(got, dots, atol=2e-3), (who, got, dots)
