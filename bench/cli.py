"""Engine benchmark: the straightforward path, our engine, vLLM and the roofline, in one run.

    sellarec-bench --candidates 1,20,100 --threads 2 --vllm --out runs/bench-cpu.json
    sellarec-bench --candidates sweep --threads 2 --vllm --out runs/bench-cpu.json \
        --plot docs/figures/bench-cpu.png          # sizes 1, 5, 20, 100, 500, and a figure

- naive: each (user, candidate) pair's full prompt through the Hugging Face causal LM,
  padded batches, the full-vocabulary logits, softmax over Yes/No (on the plain model: the
  engine's CPU fast path is not applied to it);
- engine: the service's torch backend (the template's instruction run once at load,
  `model/shared_head.py`; one prefix per request, keys/values shared by all candidates, only
  the two answer rows of the head; on CPU in float32 the linear layers on packed oneDNN
  weights, `model/fast_path.py`);
- vllm (`--vllm`): the peer, vLLM's engine on the same model and the same spliced prompt
  embeddings (`service/backends/vllm_backend.py`: prompt_embeds, prefix caching, the two answer
  log-probabilities). Before every timed request its prefix cache is emptied and then given
  the instruction by another user's request (untimed), as a server's cache holds it under
  traffic; `--no-vllm-head-cached` leaves it empty. On CPU its worker gets the same number
  of threads as the engine (`--threads`). At each size the engine and vLLM take turns
  (`--rounds`, each turn a share of `--min-seconds`), so that a machine drifting over
  minutes slows both alike; while our paths (and the matmul probe) run, vLLM's processes
  are stopped (SIGSTOP: idle, they poll, and took about a fifth of the engine's rate);
- `--returning-user`: each timed request comes from a user who sent an earlier request (one
  other candidate, untimed): the engine's prefix cache (`service/backends/prefix_cache.py`)
  and vLLM's hold that user's prefix; the roofline then counts no prefix FLOPs;
- roofline: the machine's best measured matmul FLOP/s (PyTorch's `aten::mm` or, on CPU,
  oneDNN on packed weights, whichever is faster) divided by the FLOPs one candidate needs
  when the prefix is shared (its suffix tokens through every linear layer, their attention
  over prefix + suffix, and 1/N of the prefix past the instruction the engine keeps).

Random projections and soft vectors: speed does not depend on trained values. Without a
GPU the default is SmolLM2-135M in fp32; `--arch qwen2-7b --device cuda --dtype bfloat16`
builds a randomly initialised model of that architecture for speed runs (bench/workload.py).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import psutil
import torch
import typer
from rich.console import Console
from rich.table import Table
from torch import nn

from sellarec.bench.workload import ARCHES, build_scorer, model_dir_for_vllm, titles
from sellarec.model import fast_path
from sellarec.model.encoding import Encoded, pad
from sellarec.model.prompts import item_prompt, scoring_prompt, user_prompt
from sellarec.model.sella import SellaRec
from sellarec.service.backends.torch_backend import TorchBackend

if TYPE_CHECKING:  # vLLM is optional: imported only when --vllm asks for it
    from sellarec.service.backends.vllm_backend import VllmBackend

#: Prefix cache of the engine under `--returning-user` (the service's default budget).
PREFIX_CACHE_BYTES = 256 << 20
#: The size sweep of `--candidates sweep`.
SWEEP = (1, 5, 20, 100, 500)


@dataclass
class Case:
    """Numbers for one rerank size (rates: best request; p50: median request)."""

    #: Candidates per request.
    candidates: int
    #: Tokens in the user-level prefix.
    prefix_tokens: int
    #: Mean tokens per candidate suffix.
    suffix_tokens: float
    #: The straightforward path (None when not run at this size).
    naive_per_s: float | None
    naive_p50_ms: float | None
    #: The vLLM peer (None when not run).
    vllm_per_s: float | None
    vllm_p50_ms: float | None
    engine_per_s: float
    engine_p50_ms: float
    roofline_per_s: float
    engine_vs_naive: float | None
    engine_vs_vllm: float | None
    engine_vs_roofline: float
    #: Timed requests behind each rate (at least `--reps`; more to fill `--min-seconds`).
    engine_requests: int = 0
    vllm_requests: int | None = None
    #: The matmul rate behind `roofline_per_s` (FLOP/s): the best probe taken beside this
    #: size's engine turns, or the run's one probe.
    matmul_flops: float = 0.0


def matmul_flops(
    device: torch.device, dtype: torch.dtype, size: int = 2048, reps: int = 10
) -> dict[str, float]:
    """Best FLOP/s of a square matmul per kernel: {"aten": ..., "onednn": ... (CPU only)}.

    Best of single products: on a shared machine a preempted run only ever makes one slower.
    """
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    kernels: dict[str, Callable[[], torch.Tensor]] = {"aten": lambda: a @ b}
    if device.type == "cpu" and torch.backends.mkldnn.is_available():
        packed = torch.ops.mkldnn._reorder_linear_weight(b.t().contiguous(), None)
        kernels["onednn"] = lambda: torch.ops.mkldnn._linear_pointwise(a, packed, None, "none", [], "")
    return {name: 2 * size**3 / min(_timed(fn, device, reps)) for name, fn in kernels.items()}


def candidate_flops(model: torch.nn.Module, prefix: int, suffix: float, n: int, cached: int = 0) -> float:
    """FLOPs of one candidate with a shared prefix (linear layers + attention + prefix / n);
    the first `cached` prefix tokens (the template's instruction, whose keys/values a server
    keeps across requests) cost nothing per request."""
    config = model.config.get_text_config()
    layers = config.num_hidden_layers
    linear = sum(
        m.in_features * m.out_features
        for name, m in model.named_modules()
        if "layers." in name and isinstance(m, nn.Linear | fast_path.PackedLinear)
    )
    per_token = 2 * linear + 2 * 2 * config.hidden_size  # decoder linears + the two head rows
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    attn_width = config.num_attention_heads * head_dim
    attention = 4 * layers * attn_width * suffix * (prefix + (suffix + 1) / 2)
    prefix_cost = (prefix - cached) * per_token + 2 * layers * attn_width * (
        prefix * prefix - cached * cached
    )
    return suffix * per_token + attention + prefix_cost / n


def request_flops(scorer: SellaRec, backend: TorchBackend, req: Request, returning: bool = False) -> float:
    """`candidate_flops` of `req` as `backend` serves it: the template's instruction is cached
    when the backend holds it, the whole prefix for a `returning` user."""
    n = len(req.suffixes)
    suffix = sum(len(s) for s in req.suffixes) / n
    cached = len(req.prefix) if returning else backend.head.length if backend.head.usable([req.prefix]) else 0
    return candidate_flops(scorer.backbone, len(req.prefix), suffix, n, cached)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


#: Most timed calls `_timed` makes to fill `min_seconds`.
MAX_REPS = 50


def _timed(
    fn: Callable[[], object],
    device: torch.device,
    reps: int,
    setup: Callable[[], object] | None = None,
    min_seconds: float = 0.0,
) -> list[float]:
    """Seconds of each timed call of `fn` after one warm-up; `setup` runs untimed before each.

    At least `reps` calls, and more (up to MAX_REPS) until the timed calls add up to
    `min_seconds`: a short request's best of three is within a machine's own drift, so both
    sides of a comparison get the same time budget instead.
    """
    if setup is not None:
        setup()
    fn()  # warm-up
    out: list[float] = []
    while len(out) < reps or (sum(out) < min_seconds and len(out) < MAX_REPS):
        if setup is not None:
            setup()
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        out.append(time.perf_counter() - start)
    return out


def naive_scores(scorer: SellaRec, history: list[str], cands: list[str], batch: int) -> torch.Tensor:
    """Full prompt per pair, right-padded batches, full-vocabulary logits (the usual HF way)."""
    model = scorer.backbone
    out = []
    with torch.inference_mode():
        user = torch.randn(1, scorer.llm_dim, device=scorer.device)
        for start in range(0, len(cands), batch):
            encoded = [
                scorer.encoder.prompt(scoring_prompt(scorer.spec, history, t))
                for t in cands[start : start + batch]
            ]
            ids, mask, _ = pad(encoded, scorer.encoder.pad_id)
            ids, mask = ids.to(scorer.device), mask.to(scorer.device)
            embeds = model.get_input_embeddings()(ids)
            for row, e in enumerate(encoded):  # the soft tokens, spliced as the paper does
                for _, pos in e.slots:
                    embeds[row, pos] = user[0].to(embeds.dtype)
            logits = model(inputs_embeds=embeds, attention_mask=mask).logits  # [B, T, vocab]
            last = logits[torch.arange(len(encoded)), mask.sum(1) - 1]
            pair = torch.stack([last[:, scorer.head.yes_id], last[:, scorer.head.no_id]], 1)
            out.append(torch.softmax(pair.float(), 1)[:, 0])
    return torch.cat(out)


def vllm_peer(scorer: SellaRec, arch: str, max_batch_tokens: int, work: Path) -> VllmBackend:
    """vLLM on the scorer's own backbone (its directory, or the random weights saved to `work`)."""
    from sellarec.service.backends.vllm_backend import VllmBackend, VllmOptions

    model_dir = model_dir_for_vllm(scorer, arch, work)
    return VllmBackend(scorer, model_dir, VllmOptions(max_model_len=1024), max_batch_tokens)


def bind_vllm_threads(threads: int) -> str | None:
    """Give vLLM's CPU worker `threads` cores, as the engine has, unless the caller chose.

    vLLM binds its worker's OpenMP threads itself and by default keeps one core for its
    engine process: with `--threads 2` on 2 cores it would compute on one while the engine
    uses two. Returns the binding set here (None: left as it was).
    """
    if not threads or "VLLM_CPU_OMP_THREADS_BIND" in os.environ:
        return None
    cores = sorted(os.sched_getaffinity(0))[:threads] if hasattr(os, "sched_getaffinity") else []
    if len(cores) < threads:
        return None
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(str(c) for c in cores)
    return os.environ["VLLM_CPU_OMP_THREADS_BIND"]


@dataclass(frozen=True)
class Request:
    """One rerank request of `n` candidates, as every path is asked it."""

    history: list[str]
    cands: list[str]
    prefix: Encoded
    suffixes: list[Encoded]
    user_vec: torch.Tensor
    item_vec: torch.Tensor

    @classmethod
    def of(cls, scorer: SellaRec, n: int, history_seed: int = 1) -> Request:
        history, cands = titles(10, seed=history_seed), titles(n, seed=100 + n)
        gen = torch.Generator().manual_seed(n)
        with torch.inference_mode():
            user_vec = scorer.soft_vectors(torch.randn(1, 256, generator=gen), None, None, 1)
            item_vec = scorer.soft_vectors(
                None, torch.randn(n, 256, generator=gen), torch.randn(n, scorer.llm_dim, generator=gen), n
            )
        return cls(
            history,
            cands,
            scorer.encoder.segments(user_prompt(scorer.spec, history), lead=True),
            [scorer.encoder.segments(item_prompt(scorer.spec, t)) for t in cands],
            user_vec,
            item_vec,
        )


def run_case(
    scorer: SellaRec,
    backend: TorchBackend,
    n: int,
    reps: int,
    naive: bool,
    naive_batch: int,
    flops: float,
    returning: bool = False,
    min_seconds: float = 0.0,
    peer: VllmBackend | None = None,
    vllm_head_cached: bool = True,
    rounds: int = 1,
    paused: Callable[[], AbstractContextManager[None]] = contextlib.nullcontext,
    probe: Callable[[], float] | None = None,
) -> Case:
    """Time one rerank size on our paths and, with a `peer`, on vLLM; `scorer` is the plain
    model (the naive path's).

    The engine and vLLM take turns, `rounds` times, each turn a share of `min_seconds`, so
    that a machine that drifts over minutes slows both alike; our paths run inside
    `paused()`, which stops vLLM's processes (idle, they poll: beside the engine they took
    about a fifth of its rate at one candidate, docs/performance.md).

    `returning`: each timed request comes from a user whose earlier request (another
    candidate, untimed) the backend's prefix cache kept, as vLLM's keeps it.

    `probe` (a matmul rate, FLOP/s): taken right after each of the engine's turns, and the
    best of them sets this size's roofline instead of `flops`, so that the engine and the
    rate it is measured against come from the same minutes (a shared machine's matmul rate
    moved from 138 to 242 GFLOP/s within one run, docs/performance.md).
    """
    device = scorer.device
    req = Request.of(scorer, n)
    suffix_len = sum(len(s) for s in req.suffixes) / n

    def engine() -> None:
        backend.score([req.prefix], req.user_vec, [0] * n, req.suffixes, req.item_vec)

    setup = _earlier_request(scorer, req, backend.score, backend.prefix_cache.clear) if returning else None
    naive_times = None
    if naive:
        with paused():
            naive_times = _timed(
                lambda: naive_scores(scorer, req.history, req.cands, naive_batch), device, max(1, reps // 2)
            )
    vllm_calls = _vllm_calls(scorer, req, peer, vllm_head_cached, returning) if peer is not None else None
    engine_times: list[float] = []
    vllm_times: list[float] = []
    rates: list[float] = []
    for _ in range(rounds):
        with paused():
            engine_times += _timed(engine, device, reps, setup=setup, min_seconds=min_seconds / rounds)
            if probe is not None:
                rates.append(probe())
        if vllm_calls is not None:
            request, vllm_setup = vllm_calls
            vllm_times += _timed(request, device, reps, setup=vllm_setup, min_seconds=min_seconds / rounds)
    engine_rate = n / min(engine_times)
    naive_rate = n / min(naive_times) if naive_times else None
    vllm_rate = n / min(vllm_times) if vllm_times else None
    flops = max(rates) if rates else flops
    roofline = flops / request_flops(scorer, backend, req, returning)
    return Case(
        candidates=n,
        prefix_tokens=len(req.prefix),
        suffix_tokens=round(suffix_len, 1),
        naive_per_s=naive_rate,
        naive_p50_ms=_p50_ms(naive_times),
        vllm_per_s=vllm_rate,
        vllm_p50_ms=_p50_ms(vllm_times),
        engine_per_s=engine_rate,
        engine_p50_ms=_p50_ms(engine_times) or 0.0,
        roofline_per_s=roofline,
        engine_vs_naive=engine_rate / naive_rate if naive_rate else None,
        engine_vs_vllm=engine_rate / vllm_rate if vllm_rate else None,
        engine_vs_roofline=engine_rate / roofline,
        engine_requests=len(engine_times),
        vllm_requests=len(vllm_times) if vllm_times else None,
        matmul_flops=flops,
    )


def _earlier_request(
    scorer: SellaRec, req: Request, score: Callable[..., object], forget: Callable[[], object]
) -> Callable[[], None]:
    """Untimed set-up: `forget` what a backend kept, then `score` the same user's earlier
    request of one other candidate, which leaves the user's prefix (and only it) in its cache."""
    title = next(t for t in titles(len(req.cands) + 1, seed=7) if t not in req.cands)
    earlier = [scorer.encoder.segments(item_prompt(scorer.spec, title))]
    vector = req.item_vec[:1].flip(-1)  # another item's vectors

    def setup() -> None:
        forget()
        score([req.prefix], req.user_vec, [0], earlier, vector)

    return setup


def _vllm_calls(
    scorer: SellaRec, req: Request, peer: VllmBackend, head_cached: bool, returning: bool
) -> tuple[Callable[[], None], Callable[[], None]]:
    """(vLLM's request, its untimed set-up). With `head_cached` its prefix cache holds the
    instruction when the request arrives (as a server's does under traffic, and as the engine
    keeps its own); without it, the cache is empty. `returning`: it holds the user's whole
    prefix, from the same user's earlier request."""
    n = len(req.cands)
    other = Request.of(scorer, 1, history_seed=2) if head_cached else None

    def fresh_cache() -> None:  # untimed
        peer.llm.reset_prefix_cache()  # each timed request is new to vLLM's cache ...
        if other is not None:  # ... but for the instruction, which another user's request left there
            peer.score([other.prefix], other.user_vec, [0], other.suffixes, other.item_vec)

    def request() -> None:
        peer.score([req.prefix], req.user_vec, [0] * n, req.suffixes, req.item_vec)

    if returning:
        return request, _earlier_request(scorer, req, peer.score, peer.llm.reset_prefix_cache)
    return request, fresh_cache


@contextlib.contextmanager
def suspended(processes: list[psutil.Process]) -> Iterator[None]:
    """`processes` stopped for the block (SIGSTOP), then let run again; one that has ended
    in the meantime is passed over."""
    stopped = []
    try:
        for process in processes:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.suspend()
                stopped.append(process)
        yield
    finally:
        for process in stopped:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.resume()


def _p50_ms(times: list[float] | None) -> float | None:
    return 1000 * statistics.median(times) if times else None


def parse_sizes(candidates: str) -> list[int]:
    """ "1,20,100" -> [1, 20, 100]; "sweep" -> SWEEP."""
    if candidates.strip() == "sweep":
        return list(SWEEP)
    sizes = [int(n) for n in candidates.split(",") if n.strip()]
    if not sizes or min(sizes) < 1:
        raise typer.BadParameter(f"positive sizes separated by commas, or 'sweep' (got {candidates!r})")
    return sizes


def results_table(title: str, cases: list[Case]) -> Table:
    table = Table(title=title)
    columns = (
        "candidates",
        "prefix tok",
        "suffix tok",
        "naive/s",
        "vllm/s",
        "engine/s",
        "roofline/s",
        "vllm p50 ms",
        "engine p50 ms",
        "engine/naive",
        "engine/vllm",
        "engine/roofline",
    )
    for col in columns:
        table.add_column(col, justify="right")
    for c in cases:
        table.add_row(
            str(c.candidates),
            str(c.prefix_tokens),
            f"{c.suffix_tokens}",
            _fmt(c.naive_per_s),
            _fmt(c.vllm_per_s),
            f"{c.engine_per_s:.2f}",
            f"{c.roofline_per_s:.2f}",
            _fmt(c.vllm_p50_ms, "{:.0f}"),
            f"{c.engine_p50_ms:.0f}",
            _fmt(c.engine_vs_naive, "{:.1f}x"),
            _fmt(c.engine_vs_vllm, "{:.2f}x"),
            f"{c.engine_vs_roofline:.0%}",
        )
    return table


def _fmt(value: float | None, pattern: str = "{:.2f}") -> str:
    return "-" if value is None else pattern.format(value)


def bench(
    candidates: str = typer.Option("1,20,100", help="Rerank sizes (1,20,100), or 'sweep': 1,5,20,100,500."),
    arch: str = typer.Option("smollm2", help="smollm2 (real weights) or " + ", ".join(ARCHES)),
    device: str = typer.Option("cpu", help="cpu or cuda"),
    dtype: str = typer.Option("float32", help="float32 or bfloat16"),
    reps: int = typer.Option(3, help="Timed repetitions per case, at least (best is reported)."),
    min_seconds: float = typer.Option(
        2.0, help="Engine and vLLM: repeat a case (up to 50 times) until its timed requests add up to this."
    ),
    naive: bool = typer.Option(True, help="Also time the straightforward path."),
    naive_batch: int = typer.Option(16, help="Batch size of the straightforward path."),
    naive_max: int = typer.Option(
        100, help="Largest size the straightforward path runs at (it does not share: its rate is flat)."
    ),
    vllm: bool = typer.Option(False, help="Also time vLLM as the peer (needs the vllm or vllm-cpu extra)."),
    max_batch_tokens: int = typer.Option(8192, help="Engine token budget per forward."),
    threads: int = typer.Option(0, help="torch threads, and vLLM's on CPU (0: leave the defaults)."),
    cpu_fast_path: bool = typer.Option(
        True, help="Engine on CPU fp32: linears on packed oneDNN weights, freed memory kept."
    ),
    shared_head: bool = typer.Option(True, help="Engine: the template's instruction run once, at load."),
    vllm_head_cached: bool = typer.Option(
        True, help="vLLM: its prefix cache holds the instruction (another user's request) when timed."
    ),
    returning_user: bool = typer.Option(
        False, help="Each timed request from a user both sides kept from an earlier request (prefix caches)."
    ),
    rounds: int = typer.Option(
        2, min=1, help="Engine and vLLM take turns this many times per size, sharing --min-seconds."
    ),
    probe_each_size: bool = typer.Option(
        True, help="Probe the matmul rate after each engine turn too; a size's roofline takes their best."
    ),
    tokenizer: str = typer.Option("auto", help="Random archs: smollm2, builtin, auto (smollm2 if cached)."),
    out: Path | None = typer.Option(None, help="Write the results as JSON here."),
    plot: Path | None = typer.Option(None, help="Draw candidates/s and p50 against size into this image."),
) -> None:
    """Measure candidates/s of the naive path, our engine, vLLM and the roofline."""
    sizes = parse_sizes(candidates)
    if threads:
        torch.set_num_threads(threads)
    vllm_binding = bind_vllm_threads(threads) if vllm and device == "cpu" else None
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    scorer, tokenizer_name = build_scorer(arch, device, torch_dtype, tokenizer)
    # The fast path packs the engine's model in place; the straightforward path keeps the
    # plain one, as a straightforward implementation would have it.
    packs = cpu_fast_path and fast_path.supported(scorer.device, scorer.dtype)
    engine_scorer = copy.deepcopy(scorer) if packs and naive else scorer
    backend = TorchBackend(
        engine_scorer,
        max_batch_tokens=max_batch_tokens,
        cpu_fast_path=cpu_fast_path,
        shared_head=shared_head,
        prefix_cache_bytes=PREFIX_CACHE_BYTES if returning_user else 0,
    )
    theirs: list[psutil.Process] = []  # vLLM's processes: stopped while our paths are timed

    def pause() -> AbstractContextManager[None]:
        return suspended(theirs)

    with contextlib.ExitStack() as stack:
        peer = None
        if vllm:  # started first: it takes turns with the engine at every size (`run_case`)
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="sellarec-bench-")))
            ours = {p.pid for p in psutil.Process().children(recursive=True)}
            # vLLM's backend builds a torch backend for distillation: give it the engine's model.
            peer = vllm_peer(engine_scorer, arch, max_batch_tokens, work)
            stack.callback(peer.close)
            theirs += [p for p in psutil.Process().children(recursive=True) if p.pid not in ours]
        with pause():
            kernels = matmul_flops(scorer.device, torch_dtype)
        flops = max(kernels.values())

        def beside() -> float:  # the probe again, between a size's engine turns (run_case)
            return max(matmul_flops(scorer.device, torch_dtype).values())

        cases = [
            run_case(
                scorer,
                backend,
                n,
                reps,
                naive and n <= naive_max,
                naive_batch,
                flops,
                returning_user,
                min_seconds,
                peer,
                vllm_head_cached,
                rounds,
                pause,
                beside if probe_each_size else None,
            )
            for n in sizes
        ]
        with pause():
            kernels_after = matmul_flops(scorer.device, torch_dtype)

    engine_kind = "fast path" if backend.fast_path.active else "plain"
    rates = [c.matmul_flops for c in cases]
    title = (
        f"{arch} {dtype} on {device}, {torch.get_num_threads()} threads, engine: {engine_kind}; "
        "matmul GFLOP/s "
        + ", ".join(f"{k} {v / 1e9:.0f} (after: {kernels_after[k] / 1e9:.0f})" for k, v in kernels.items())
        + (f"; beside each size {min(rates) / 1e9:.0f}-{max(rates) / 1e9:.0f}" if probe_each_size else "")
    )
    Console(width=170).print(results_table(title, cases))
    record = {
        "arch": arch,
        "device": device,
        "dtype": dtype,
        "threads": torch.get_num_threads(),
        "tokenizer": tokenizer_name,
        "engine_fast_path": backend.fast_path.active,
        "engine_head_tokens": backend.head.length,
        "vllm_head_cached": vllm_head_cached if vllm else None,
        "returning_user": returning_user,
        "reps": reps,
        "min_seconds": min_seconds,
        "rounds": rounds,
        "engine_prefix_cache": {"hits": backend.prefix_cache.hits, "misses": backend.prefix_cache.misses},
        "vllm_threads_bind": vllm_binding or os.environ.get("VLLM_CPU_OMP_THREADS_BIND"),
        "matmul_flops": flops,
        "matmul_flops_by_kernel": kernels,
        "matmul_flops_after": max(kernels_after.values()),
        "probe_each_size": probe_each_size,
        "cases": [asdict(c) for c in cases],
    }
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(record, indent=2))
    if plot:
        from sellarec.bench.plot import plot_sweep

        plot_sweep(record["cases"], title, plot)


def main() -> None:
    typer.run(bench)


if __name__ == "__main__":
    main()
