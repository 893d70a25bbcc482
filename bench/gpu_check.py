"""The GPU check (scripts/perf/gpu_check.sh): bf16 agreement, then engine vs straightforward speed.

Needs only this working tree and an environment with torch (CUDA), transformers and peft:
the models are randomly initialised on the GPU at real Qwen2 sizes, and the tokenizer is
the built-in one (bench/workload.py), so nothing is downloaded and no weights travel.

Part 1, agreement: on a random-weight Qwen2 (qwen2-0.5b size), P(Yes) of several users'
candidates from the plain full-prompt path in float32 (the reference), from the engine in
float32 (the tested invariant: within 1e-4) and from the engine in bfloat16 (what the
service runs on a GPU), with its largest and mean difference and the rank correlation per
user. Part 2, speed: the engine against the straightforward path (full prompts, padded
batches, full-vocabulary logits) at qwen2-0.5b and qwen2-7b sizes, 100 and 500 candidates,
bf16, with the roofline for scale. Results go to `<out>/gpu_check.json` after every
measurement (a run cut short keeps what it had), with one figure per size.

`--smoke` runs the same code on a tiny model on the CPU in seconds (the tests do).
"""

from __future__ import annotations

import copy
import gc
import json
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import typer
from rich.console import Console

from sellarec.bench.cli import Case, matmul_flops, results_table, run_case
from sellarec.bench.workload import builtin_tokenizer, random_model, titles
from sellarec.model.encoding import Encoded
from sellarec.model.prompts import TemplateSpec, item_prompt, user_prompt
from sellarec.model.sella import SellaRec
from sellarec.service.backends.torch_backend import TorchBackend

#: The engine in float32 must equal the plain path within this (DESIGN.md section 8).
FP32_TOLERANCE = 1e-4
#: bf16 vs the float32 reference: largest |difference| of P(Yes) allowed, and the lowest
#: rank correlation (Spearman, per user) allowed. bf16 keeps 8 bits of mantissa; through
#: 24 layers that moves a probability by about 1e-2 at most in our runs.
BF16_MAX_DIFF = 0.03
BF16_MIN_SPEARMAN = 0.95
#: Below this spread (std of the reference P(Yes)) the ranking is rounding noise and the
#: rank correlation is reported but not judged (the tiny smoke model: about 0.002; a
#: random qwen2-0.5b: about 0.12).
MIN_SPREAD_TO_RANK = 0.02
#: Items/s per H100 of a 7B-class ranker, the figure the issue gives for scale.
ANCHOR_7B_PER_S = 2200.0


@dataclass
class Agreement:
    """Part 1: scores of the same pairs through three paths."""

    arch: str
    device: str
    users: int
    pairs: int
    #: Spread of the reference scores (std of P(Yes)): how much there is to rank.
    reference_std: float
    fp32_engine_max_diff: float
    bf16_engine_max_diff: float
    bf16_engine_mean_diff: float
    #: Spearman rank correlation of bf16 and reference, per user: mean and worst.
    bf16_spearman_mean: float
    bf16_spearman_min: float
    passed: bool


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Rank correlation (no ties expected in float scores)."""
    ra = a.argsort().argsort().double()
    rb = b.argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()).clamp(min=1e-12))


def _requests(scorer: SellaRec, users: int, per_user: int) -> tuple[list[Encoded], list[int], list[Encoded]]:
    """`users` users with `per_user` candidates each, and one more user with a single candidate."""
    prefixes, rows, suffixes = [], [], []
    for u in range(users + 1):
        prefixes.append(
            scorer.encoder.segments(user_prompt(scorer.spec, titles(10, seed=1000 + u)), lead=True)
        )
        k = per_user if u < users else 1
        for title in titles(k, seed=2000 + u):
            rows.append(u)
            suffixes.append(scorer.encoder.segments(item_prompt(scorer.spec, title)))
    return prefixes, rows, suffixes


def agreement(arch: str, device: str, users: int, per_user: int) -> Agreement:
    """Part 1 on a random-weight model of size `arch` (float32 built, bf16 cast from it)."""
    model = random_model(arch, torch.float32, device)
    scorer = SellaRec(model, builtin_tokenizer(), TemplateSpec(), collab_dim=256).to(device)
    prefixes, rows, suffixes = _requests(scorer, users, per_user)
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        prefix_vectors = scorer.soft_vectors(
            torch.randn(len(prefixes), 256, generator=g), None, None, len(prefixes)
        )
        suffix_vectors = scorer.soft_vectors(
            None,
            torch.randn(len(suffixes), 256, generator=g),
            torch.randn(len(suffixes), scorer.llm_dim, generator=g),
            len(suffixes),
        )
        whole = [prefixes[r] + s for r, s in zip(rows, suffixes, strict=True)]
        vectors = suffix_vectors.clone()
        vectors[:, 0] = prefix_vectors[rows, 0]
        reference = torch.cat(
            [
                torch.sigmoid(scorer.score(whole[i : i + 32], vectors[i : i + 32]).float())
                for i in range(0, len(whole), 32)
            ]
        ).cpu()
    batch = (prefixes, prefix_vectors, rows, suffixes, suffix_vectors)
    fp32 = torch.from_numpy(TorchBackend(copy.deepcopy(scorer), cpu_fast_path=True).score(*batch))
    scorer.backbone.to(torch.bfloat16)  # the service's GPU dtype; projections stay float32
    bf16 = torch.from_numpy(TorchBackend(scorer, cpu_fast_path=False).score(*batch))
    rows_t = torch.tensor(rows)
    rhos = [spearman(bf16[rows_t == u], reference[rows_t == u]) for u in range(users)]
    diff = (bf16 - reference).abs()
    fp32_diff = float((fp32 - reference).abs().max())
    result = Agreement(
        arch=arch,
        device=device,
        users=users,
        pairs=len(suffixes),
        reference_std=float(reference.std()),
        fp32_engine_max_diff=fp32_diff,
        bf16_engine_max_diff=float(diff.max()),
        bf16_engine_mean_diff=float(diff.mean()),
        bf16_spearman_mean=sum(rhos) / len(rhos),
        bf16_spearman_min=min(rhos),
        passed=False,
    )
    ranks_ok = result.reference_std < MIN_SPREAD_TO_RANK or result.bf16_spearman_min >= BF16_MIN_SPEARMAN
    result.passed = fp32_diff <= FP32_TOLERANCE and result.bf16_engine_max_diff <= BF16_MAX_DIFF and ranks_ok
    del scorer, model
    _free(device)
    return result


def speed(
    arch: str, device: str, dtype: torch.dtype, sizes: list[int], reps: int, naive_batch: int, flops: float
) -> list[Case]:
    """Part 2 for one size: engine and straightforward path on a fresh random model."""
    start = time.perf_counter()
    model = random_model(arch, dtype, device)
    scorer = SellaRec(model, builtin_tokenizer(), TemplateSpec(), collab_dim=256).to(device)
    print(f"  {arch}: built on {device} in {time.perf_counter() - start:.1f} s", flush=True)
    backend = TorchBackend(scorer, cpu_fast_path=False)  # the straightforward path shares the model
    cases = [run_case(scorer, backend, n, reps, True, naive_batch, flops) for n in sizes]
    del backend, scorer, model
    _free(device)
    return cases


def _free(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def _environment(device: str) -> dict[str, Any]:
    env: dict[str, Any] = {"torch": torch.__version__, "python": platform.python_version(), "device": device}
    if device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    return env


def check(
    out: Path = typer.Option(Path("runs/gpu-check"), help="Directory for gpu_check.json and the figures."),
    smoke: bool = typer.Option(False, help="A tiny model on the CPU, in seconds (tests, a dry run)."),
    device: str = typer.Option("", help="Device (default: cuda, or cpu with --smoke)."),
    arches: str = typer.Option("qwen2-0.5b,qwen2-7b", help="Part 2 sizes (bench/workload.py ARCHES)."),
    candidates: str = typer.Option("100,500", help="Part 2 rerank sizes."),
    agreement_arch: str = typer.Option("qwen2-0.5b", help="Part 1 size."),
    reps: int = typer.Option(5, help="Timed engine requests per case (the straightforward path: half)."),
    naive_batch: int = typer.Option(32, help="Batch size of the straightforward path."),
    budget_s: float = typer.Option(420.0, help="Start no new part-2 case after this many seconds."),
) -> None:
    """bf16 agreement and engine speed on a GPU; exits 1 if the agreement check fails."""
    began = time.perf_counter()
    if smoke:
        device = device or "cpu"
        arches, candidates, agreement_arch, reps = "tiny", "5,20", "tiny", 2
    device = device or "cuda"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(
            f"no CUDA device visible to torch {torch.__version__}: run with --smoke for a CPU dry run"
        )
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = False  # float32 means float32 in part 1
        torch.backends.cudnn.allow_tf32 = False
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"environment": _environment(device), "smoke": smoke}
    path = out / "gpu_check.json"
    console = Console(width=170)

    def save() -> None:
        report["elapsed_s"] = round(time.perf_counter() - began, 1)
        path.write_text(json.dumps(report, indent=2))

    users, per_user = (2, 6) if smoke else (4, 48)
    print(
        f"part 1: bf16 vs fp32 agreement, random {agreement_arch}, {users} users x {per_user} + 1", flush=True
    )
    part1 = agreement(agreement_arch, device, users, per_user)
    report["agreement"] = asdict(part1)
    save()
    verdict = "PASS" if part1.passed else "FAIL"
    judged = "" if part1.reference_std >= MIN_SPREAD_TO_RANK else ", not judged: the scores hardly spread"
    print(
        f"  {verdict}: fp32 engine vs fp32 reference: max |dP| {part1.fp32_engine_max_diff:.2e} "
        f"(<= {FP32_TOLERANCE:g})\n"
        f"  bf16 engine vs fp32 reference: max |dP| {part1.bf16_engine_max_diff:.4f} (<= {BF16_MAX_DIFF}), "
        f"mean {part1.bf16_engine_mean_diff:.4f}\n"
        f"  Spearman per user: mean {part1.bf16_spearman_mean:.4f}, min {part1.bf16_spearman_min:.4f} "
        f"(>= {BF16_MIN_SPEARMAN}{judged}); reference std of P(Yes) {part1.reference_std:.4f}",
        flush=True,
    )

    dtype = torch.float32 if smoke and device == "cpu" else torch.bfloat16
    sizes = [int(n) for n in candidates.split(",")]
    flops = max(matmul_flops(torch.device(device), dtype, size=512 if smoke else 8192).values())
    report["matmul_flops"] = flops
    report["speed"] = {}
    for arch in arches.split(","):
        if time.perf_counter() - began > budget_s:
            print(f"part 2: {arch} skipped, past the {budget_s:.0f} s budget", flush=True)
            continue
        print(f"part 2: engine vs straightforward, random {arch}, {dtype}, sizes {sizes}", flush=True)
        cases = speed(arch, device, dtype, sizes, reps, naive_batch, flops)
        report["speed"][arch] = [asdict(c) for c in cases]
        save()
        title = f"{arch} {str(dtype).removeprefix('torch.')} on {report['environment'].get('gpu', device)}"
        console.print(results_table(title, cases))
        if arch == "qwen2-7b":
            best = max(c.engine_per_s for c in cases)
            print(
                f"  7B engine {best:.0f} candidates/s; the issue's anchor: {ANCHOR_7B_PER_S:.0f}/s per H100"
            )
        try:
            from sellarec.bench.plot import plot_sweep

            plot_sweep(report["speed"][arch], title, out / f"gpu-{arch}.png")
        except ImportError:  # matplotlib missing: the JSON has the numbers
            pass
    save()
    print(f"done in {report['elapsed_s']:.0f} s; results in {path}", flush=True)
    if not part1.passed:
        raise typer.Exit(1)


def main() -> None:
    typer.run(check)


if __name__ == "__main__":
    main()
