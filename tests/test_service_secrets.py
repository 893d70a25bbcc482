"""Secrets and internals stay out of what the service prints and answers; bad bundles are one line."""

from __future__ import annotations

import json
import logging
import shutil

from test_service_support import quick_settings, serving
from typer.testing import CliRunner

from sellarec.service import redact
from sellarec.service.cli import cli_app
from sellarec.service.store.cli import app as store_app
from sellarec.service.store.redis_store import RedisStore

DEAD_REDIS = "redis://:hunter2@127.0.0.1:1/0"  # nothing listens on port 1


def test_redact_masks_url_passwords_and_known_secrets():
    text = "cannot reach redis://:hunter2@10.0.0.5:6379/0 or rediss://app:pa55w0rd@r:6380 with tok-abc123"
    clean = redact.redact(text, ["tok-abc123"])
    assert "hunter2" not in clean and "pa55w0rd" not in clean and "tok-abc123" not in clean
    assert "redis://:***@10.0.0.5:6379/0" in clean and "rediss://app:***@r:6380" in clean
    assert redact.redact("http://host:8000/path@x") == "http://host:8000/path@x"


def test_log_records_are_redacted_once_installed(caplog):
    redact.install(["s3cret-token-value"])
    log = logging.getLogger("sellarec.test")
    with caplog.at_level(logging.INFO):
        log.warning("store %s, token %s", DEAD_REDIS, "s3cret-token-value")
        try:
            raise ConnectionError(f"lost {DEAD_REDIS}")
        except ConnectionError:
            log.exception("failed")
    text = caplog.text + "".join(r.exc_text or "" for r in caplog.records)
    assert "hunter2" not in text and "s3cret-token-value" not in text
    assert "redis://:***@127.0.0.1:1/0" in text


def test_store_cli_never_prints_the_redis_password():
    result = CliRunner().invoke(store_app, ["list", "--redis-url", DEAD_REDIS])
    assert result.exit_code == 2
    assert (
        "hunter2" not in result.output and "cannot reach Redis at redis://:***@127.0.0.1:1/0" in result.output
    )


async def test_a_503_names_the_store_but_not_its_address_or_error(tiny_bundle_dir):
    store = RedisStore.from_url(DEAD_REDIS, "sellarec-test-secrets", timeout_s=0.2)
    async with serving(tiny_bundle_dir, quick_settings(), store=store) as (client, _):
        answer = await client.post("/score", json={"user_id": "u1", "items": ["i1"]})
        ready = await client.get("/readyz")
    for response in (answer, ready):
        assert response.status_code == 503
        error = response.json()["error"]
        assert error["type"] in ("store_unavailable", "not_ready") and "store" in error["message"]
        for leak in ("127.0.0.1", "hunter2", "Errno", "Connection refused", ":1"):
            assert leak not in response.text, (leak, response.text)


def _tampered(src, dst):
    """A copy of `src` with flipped tensor bytes and their checksum entry deleted (issue 12, item 3)."""
    shutil.copytree(src, dst)
    data = bytearray((dst / "tensors.safetensors").read_bytes())
    data[-8:] = bytes(b ^ 0xFF for b in data[-8:])
    (dst / "tensors.safetensors").write_bytes(bytes(data))
    manifest = json.loads((dst / "manifest.json").read_text())
    del manifest["checksums"]["tensors.safetensors"]
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


def test_sellarec_serve_refuses_a_tampered_bundle_in_one_line_before_loading(tiny_bundle_dir, tmp_path):
    bad = _tampered(tiny_bundle_dir, tmp_path / "bad")
    result = CliRunner().invoke(cli_app(), ["--artifacts", str(bad)])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "refusing the bundle" in lines[0] and "tensors.safetensors" in lines[0]


def test_sellarec_serve_refuses_a_manifest_with_non_utf8_bytes(tiny_bundle_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_bundle_dir, bad)
    (bad / "manifest.json").write_bytes(b'{"name": "\xff"' + (bad / "manifest.json").read_bytes()[1:])
    result = CliRunner().invoke(cli_app(), ["--artifacts", str(bad)])
    assert result.exit_code == 1 and "not UTF-8" in result.output
    assert "Traceback" not in result.output


def test_sellarec_store_load_refuses_an_unlisted_file(tiny_bundle_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_bundle_dir, bad)
    (bad / "adapter" / "notes.txt").write_text("unlisted")
    result = CliRunner().invoke(store_app, ["load", "--artifacts", str(bad), "--redis-url", DEAD_REDIS])
    assert result.exit_code == 1
    assert "adapter/notes.txt is not listed in the manifest" in result.output


def test_redis_cluster_urls_are_redacted_too():
    text = "cluster redis+cluster://:hunter2@10.0.0.5:7000/0 and rediss+cluster://app:pa55w0rd@r:7001"
    clean = redact.redact(text)
    assert "hunter2" not in clean and "pa55w0rd" not in clean
    assert "redis+cluster://:***@10.0.0.5:7000/0" in clean and "rediss+cluster://app:***@r:7001" in clean


def test_store_cli_never_prints_a_redis_cluster_password():
    result = CliRunner().invoke(store_app, ["list", "--redis-url", "redis+cluster://:hunter2@127.0.0.1:1/0"])
    assert result.exit_code == 2, result.output
    assert "hunter2" not in result.output and "redis+cluster://:***@127.0.0.1:1/0" in result.output


def test_sellarec_serve_masks_the_password_of_a_cluster_url(tiny_bundle_dir, monkeypatch):
    """The serve CLI installs the password of a redis+cluster:// URL as a secret, like any URL's."""
    import sellarec.service.cli as serve_cli

    installed: list = []
    monkeypatch.setattr(serve_cli.redact, "install", lambda secrets: installed.extend(secrets))
    monkeypatch.setattr(serve_cli.uvicorn, "run", lambda *a, **k: None)
    monkeypatch.setattr(serve_cli, "create_app", lambda settings: None)
    monkeypatch.setattr(serve_cli.signal, "signal", lambda *a: None)  # keep pytest's handlers
    url = "redis+cluster://app:hunter2@127.0.0.1:1/0"
    result = CliRunner().invoke(cli_app(), ["--artifacts", str(tiny_bundle_dir), "--redis-url", url])
    assert result.exit_code == 0, result.output
    assert "hunter2" in installed


async def test_an_unreachable_redis_cluster_is_a_503_that_names_neither_address_nor_password(tiny_bundle_dir):
    """A cluster that cannot be reached raises RedisClusterException (not a RedisError): still a 503."""
    url = "redis+cluster://:hunter2@127.0.0.1:1/0"
    store = RedisStore.from_url(url, "sellarec-test-secrets", timeout_s=0.2)
    async with serving(tiny_bundle_dir, quick_settings(), store=store) as (client, _):
        answer = await client.post("/score", json={"user_id": "u1", "items": ["i1"]})
        event = await client.post("/events", json={"user_id": "u1", "item_id": "i1", "label": 1})
        ready = await client.get("/readyz")
    for response in (answer, event, ready):
        assert response.status_code == 503, response.text
        for leak in ("127.0.0.1", "hunter2", "Errno", "Connection refused"):
            assert leak not in response.text, (leak, response.text)
