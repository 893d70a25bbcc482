"""pytest plugin: run the in-process service tests on the vLLM backend, one engine per session.

    PYTHONPATH=scripts/vllm .venv/bin/pytest -p pytest_vllm_backend \\
        tests/test_service_engine.py tests/test_service_api.py tests/test_service_store.py

`SELLAREC_BACKEND=vllm` alone would stop the engine whenever the last app that holds it
shuts down, and these suites start dozens of apps; this plugin swaps
`sellarec.service.api.app.make_backend` for one that returns the session's shared vLLM backend with an
extra holder, so every app a test starts scores through vLLM and the engine starts once
(the same function the setting uses, `shared_vllm_backend`). It also gives
the tests' tiny Qwen2 two heads of 32 instead of four of 16 (same width d_L = 64): vLLM's
CPU attention kernels take head sizes from 32 up. Tests that start `sellarec-serve` in a
subprocess are out of its reach (start those with `--backend vllm`).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

_TESTS = Path(__file__).resolve().parents[2] / "tests"
if str(_TESTS) not in sys.path:
    sys.path.insert(0, str(_TESTS))

import factories  # noqa: E402

_tiny_config = factories.tiny_qwen2_config


def _tiny_config_for_vllm(layers: int = 2, hidden: int = 64):
    config = _tiny_config(layers=layers, hidden=hidden)
    config.num_attention_heads = max(1, hidden // 32)
    config.num_key_value_heads = max(1, config.num_attention_heads // 2)
    config.head_dim = hidden // config.num_attention_heads
    return config


factories.tiny_qwen2_config = _tiny_config_for_vllm


@pytest.fixture(autouse=True)
def _serve_on_vllm(monkeypatch):
    from sellarec.service.api import app as api_app
    from sellarec.service.backends.vllm_backend import VllmUnavailable, shared_vllm_backend

    def make_backend(settings, loaded):
        try:
            # keep_running: the apps' shutdowns must not stop the session's one engine.
            return shared_vllm_backend(loaded, max_batch_tokens=settings.max_batch_tokens, keep_running=True)
        except VllmUnavailable as err:
            pytest.fail(str(err))

    monkeypatch.setattr(api_app, "make_backend", make_backend)


@pytest.fixture(scope="session", autouse=True)
def _stop_engines():
    yield
    from sellarec.service.backends.vllm_backend import close_shared_backends

    close_shared_backends()


def pytest_report_header(config):
    return "service backend: vllm (scripts/vllm/pytest_vllm_backend.py)"
