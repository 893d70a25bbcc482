"""How close the engine can get to the benchmark's roofline: its linear layers alone.

    .venv/bin/python scripts/perf/roofline_ceiling.py --candidates 1,20,100 --threads 2

`sellarec-bench` reports the engine's rate as a share of the roofline: the request's FLOPs
(`candidate_flops`) at the machine's best square-matmul rate (`matmul_flops`, 2048 x 2048).
This script asks what share is left once everything but the GEMMs is taken away. For each
size it times the engine's request (best of `--reps`), records one request under the torch
profiler with shapes, and sums the decoder's linear layers (`mkldnn::_linear_pointwise`): the
rows, widths and time each GEMM really had. It then replays exactly those GEMMs back to back,
with as many distinct packed weights as the model has layers (so they stream from memory as
the model's do) and nothing else in between. Printed per size:

- the engine's share of the roofline (as the benchmark computes it);
- the GEMMs' rate inside the request and replayed alone, as a share of the probe;
- the ceiling: the share the engine would reach if the request were its GEMMs alone, run at
  the replayed rate (attention, RoPE, norms, residual adds and padding-free at no cost);
- minor page faults and CPU seconds (user, system) per request: `--glibc-defaults` leaves
  malloc as glibc sets it, to compare with `fast_path.keep_freed_memory` (the default).

Padding rows (suffixes shorter than their chunk's longest) count as GEMM work here: they
are part of the GEMMs the request runs, not of the roofline's FLOPs.
"""

from __future__ import annotations

import argparse
import resource
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from sellarec.bench.cli import Request, _timed, build_scorer, matmul_flops, request_flops
from sellarec.model import fast_path
from sellarec.service.backends.torch_backend import TorchBackend

LINEAR = "mkldnn::_linear_pointwise"


def gemms(fn) -> tuple[list[tuple[int, int, int, bool]], float]:
    """(rows, out, in, gated) of every linear call in one run of `fn`, and their total seconds."""
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    calls, seconds = [], 0.0
    for event in prof.events():
        if not event.name.startswith(LINEAR):
            continue
        shapes = event.input_shapes
        binary = len(shapes) == 5  # .binary: (x, other, weight, bias, attr); plain: six inputs
        x, weight = shapes[0], shapes[2] if binary else shapes[1]
        rows = 1
        for size in x[:-1]:
            rows *= size
        calls.append((rows, weight[0], weight[1], binary))
        seconds += event.cpu_time_total / 1e6
    return calls, seconds


def replay(calls: list[tuple[int, int, int, bool]], layers: int, reps: int) -> float:
    """Best seconds of the same GEMMs back to back, `layers` distinct weights per shape."""
    packed: dict[tuple[int, int], list[torch.Tensor]] = {}
    inputs: dict[tuple[int, int], torch.Tensor] = {}
    for rows, out, inp, _ in calls:
        if (out, inp) not in packed:
            packed[(out, inp)] = [
                torch.ops.mkldnn._reorder_linear_weight(torch.randn(out, inp) * 0.05, None)
                for _ in range(layers)
            ]
        if (rows, inp) not in inputs:
            inputs[(rows, inp)] = torch.randn(rows, inp)
    seen: dict[tuple[int, int], int] = defaultdict(int)
    plan = []
    for rows, out, inp, binary in calls:
        weight = packed[(out, inp)][seen[(out, inp)] % layers]
        seen[(out, inp)] += 1
        other = torch.randn(rows, out) if binary else None
        plan.append((inputs[(rows, inp)], weight, other))

    def run() -> None:
        for x, weight, other in plan:
            if other is None:
                torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")
            else:
                torch.ops.mkldnn._linear_pointwise.binary(x, other, weight, None, "mul")

    return min(_timed(run, torch.device("cpu"), reps))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidates", default="1,20,100")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument(
        "--glibc-defaults", action="store_true", help="Leave malloc as glibc sets it (no keep_freed_memory)."
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    scorer, _ = build_scorer("smollm2", "cpu", torch.float32, "auto")
    if not fast_path.supported(scorer.device, scorer.dtype):
        raise SystemExit("needs the CPU fast path (float32 on a PyTorch built with oneDNN)")
    backend = TorchBackend(scorer, keep_freed_memory=not args.glibc_defaults)
    layers = scorer.backbone.config.get_text_config().num_hidden_layers
    malloc = "freed memory kept" if backend.keeps_freed_memory else "glibc's malloc defaults"
    print(f"{args.threads} threads, {malloc}")
    timed = []  # every size timed first, in order (then the profiling)
    for n in (int(c) for c in args.candidates.split(",")):
        req = Request.of(scorer, n)

        def engine(req: Request = req, n: int = n) -> None:
            backend.score([req.prefix], req.user_vec, [0] * n, req.suffixes, req.item_vec)

        usage: list[tuple[int, float, float]] = []  # per call: page faults, user and system seconds

        def counted(engine=engine, usage=usage) -> None:
            before = resource.getrusage(resource.RUSAGE_SELF)
            engine()
            after = resource.getrusage(resource.RUSAGE_SELF)
            usage.append(
                (
                    after.ru_minflt - before.ru_minflt,
                    after.ru_utime - before.ru_utime,
                    after.ru_stime - before.ru_stime,
                )
            )

        times = _timed(counted, scorer.device, args.reps)
        faults, users, systems = zip(*usage[1:], strict=True)  # the first call is _timed's warm-up
        user, system = (sorted(part)[len(part) // 2] for part in (users, systems))
        print(
            f"{n:4d} candidates: best {min(times) * 1e3:7.1f} ms; minor page faults per request "
            f"{min(faults)}-{max(faults)}; CPU seconds per request (median, all threads) user {user:.2f}, "
            f"system {system:.3f}",
            flush=True,
        )
        timed.append((n, req, engine, min(times)))
    # The probe after the timing: its 16 MiB matrices would raise glibc's adaptive thresholds
    # first, which a serving process does not see.
    probe = max(matmul_flops(scorer.device, torch.float32).values())
    print(f"matmul probe {probe / 1e9:.0f} GFLOP/s")
    for n, req, engine, engine_s in timed:
        roofline_s = n * request_flops(scorer, backend, req) / probe
        calls, profiled_s = gemms(engine)
        gemm_flops = sum(2 * rows * out * inp for rows, out, inp, _ in calls)
        alone_s = replay(calls, layers, args.reps)
        inside, alone = gemm_flops / profiled_s, gemm_flops / alone_s
        print(
            f"{n:4d} candidates: engine {roofline_s / engine_s:4.0%} of the roofline | {len(calls)} GEMMs, "
            f"{gemm_flops / 1e9:6.1f} GFLOP: in the request {inside / 1e9:4.0f} GFLOP/s "
            f"({inside / probe:4.0%} of the probe), alone {alone / 1e9:4.0f} ({alone / probe:4.0%}) | "
            f"ceiling, GEMMs alone: {roofline_s / alone_s:4.0%} of the roofline",
            flush=True,
        )


if __name__ == "__main__":
    main()
