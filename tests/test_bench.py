"""The benchmark tools: size sweep, tokenizer without downloads, thread binding, plot, GPU check."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import typer
from typer.testing import CliRunner

from sellarec.bench import cli, workload
from sellarec.bench.cli import (
    MAX_REPS,
    SWEEP,
    _timed,
    bench,
    bind_vllm_threads,
    candidate_flops,
    matmul_flops,
    parse_sizes,
    run_case,
    suspended,
)
from sellarec.bench.gpu_check import check, spearman
from sellarec.bench.plot import plot_sweep
from sellarec.model.encoding import PromptEncoder
from sellarec.model.prompts import TemplateSpec, item_prompt, user_prompt
from sellarec.model.scoring import answer_token_ids
from sellarec.service.backends.torch_backend import TorchBackend

ROOT = Path(__file__).parents[1]
PNG = b"\x89PNG"


def _app(command) -> typer.Typer:
    app = typer.Typer()
    app.command()(command)
    return app


def test_sweep_is_the_issues_sizes():
    assert parse_sizes("sweep") == list(SWEEP) == [1, 5, 20, 100, 500]
    assert parse_sizes("1,20,100") == [1, 20, 100]
    with pytest.raises(typer.BadParameter):
        parse_sizes("0,5")


def test_builtin_tokenizer_needs_no_files_and_gives_prompts_their_usual_length():
    tokenizer = workload.builtin_tokenizer.__wrapped__()
    again = workload.builtin_tokenizer.__wrapped__()
    assert tokenizer.get_vocab() == again.get_vocab()  # deterministic
    encoder = PromptEncoder(tokenizer)
    spec = TemplateSpec()
    prefix = encoder.segments(user_prompt(spec, workload.titles(10, seed=1)), lead=True)
    suffixes = [encoder.segments(item_prompt(spec, t)) for t in workload.titles(50, seed=3)]
    assert 150 <= len(prefix) <= 210  # SmolLM2's tokenizer: 177
    assert 14 <= sum(map(len, suffixes)) / len(suffixes) <= 22  # SmolLM2's: 18.6
    yes, no = answer_token_ids(tokenizer, spec.answer_cue)
    assert yes != no
    text = "千と千尋の神隠し (2001), Amélie"
    assert tokenizer.decode(tokenizer(text).input_ids) == text  # byte-level: any text encodes


def test_auto_tokenizer_is_smollm2_only_when_cached(monkeypatch):
    monkeypatch.setattr(workload, "smollm2_cached", lambda: False)
    assert workload.bench_tokenizer("auto")[1] == "builtin"
    with pytest.raises(ValueError, match="unknown tokenizer"):
        workload.bench_tokenizer("gpt2")


def test_vllm_gets_the_engines_thread_count_unless_told(monkeypatch):
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    assert bind_vllm_threads(0) is None and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ
    first = min(os.sched_getaffinity(0))
    assert bind_vllm_threads(1) == str(first) == os.environ["VLLM_CPU_OMP_THREADS_BIND"]
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    assert bind_vllm_threads(2) is None and os.environ["VLLM_CPU_OMP_THREADS_BIND"] == "nobind"


def test_roofline_takes_the_faster_kernel_on_cpu():
    kernels = matmul_flops(torch.device("cpu"), torch.float32, size=128, reps=2)
    assert set(kernels) == {"aten", "onednn"} and min(kernels.values()) > 0


def test_plot_draws_the_paths_that_have_numbers(tmp_path):
    cases = [
        dict(
            candidates=n,
            engine_per_s=10.0 * n**0.5,
            engine_p50_ms=50.0 * n**0.5,
            roofline_per_s=20.0 * n**0.5,
        )
        | dict(naive_per_s=1.0, naive_p50_ms=1000.0 * n, vllm_per_s=None, vllm_p50_ms=None)
        for n in SWEEP
    ]
    path = plot_sweep(cases, "test", tmp_path / "figures" / "bench.png")
    assert path.read_bytes()[:4] == PNG


def test_spearman_of_a_ranking_and_its_reverse():
    a = torch.tensor([0.1, 0.5, 0.3, 0.9])
    assert spearman(a, a * 2) == pytest.approx(1.0)
    assert spearman(a, -a) == pytest.approx(-1.0)


#: The benchmark on the tiny random architecture with the built-in tokenizer (no download).
TINY = ["--arch", "tiny", "--tokenizer", "builtin"]


def test_bench_runs_every_path_on_a_tiny_model(tmp_path):
    out, figure = tmp_path / "bench.json", tmp_path / "bench.png"
    args = [*TINY, "--candidates", "1,5", "--reps", "1", "--min-seconds", "0"]
    result = CliRunner().invoke(
        _app(bench), [*args, "--naive-max", "1", "--out", str(out), "--plot", str(figure)]
    )
    assert result.exit_code == 0, result.output
    record = json.loads(out.read_text())
    assert record["engine_fast_path"] and record["tokenizer"] == "builtin"
    assert record["engine_head_tokens"] > 0 and record["vllm_head_cached"] is None  # no --vllm
    assert set(record["matmul_flops_by_kernel"]) == {"aten", "onednn"}
    one, five = record["cases"]
    assert one["naive_per_s"] > 0 and five["naive_per_s"] is None  # --naive-max 1
    assert one["engine_per_s"] > 0 and five["engine_vs_roofline"] > 0
    assert figure.read_bytes()[:4] == PNG


def test_a_returning_user_is_timed_on_the_prefix_its_earlier_request_left(tmp_path):
    out = tmp_path / "bench.json"
    args = [*TINY, "--candidates", "1,5", "--reps", "2", "--no-naive"]
    result = CliRunner().invoke(_app(bench), [*args, "--returning-user", "--out", str(out)])
    assert result.exit_code == 0, result.output
    record = json.loads(out.read_text())
    assert record["returning_user"]
    # Per size: each round's warm-up and every timed call (two a round at least, more to fill
    # --min-seconds), each after an earlier request that missed.
    calls = sum(case["engine_requests"] + record["rounds"] for case in record["cases"])
    assert record["rounds"] == 2 and all(case["engine_requests"] >= 4 for case in record["cases"])
    assert record["engine_prefix_cache"] == {"hits": calls, "misses": calls}
    assert all(case["engine_per_s"] > 0 for case in record["cases"])


def test_without_returning_users_the_engine_keeps_no_prefix(tmp_path):
    out = tmp_path / "bench.json"
    args = [*TINY, "--candidates", "1", "--reps", "1", "--no-naive", "--min-seconds", "0"]
    assert CliRunner().invoke(_app(bench), [*args, "--out", str(out)]).exit_code == 0
    assert json.loads(out.read_text())["engine_prefix_cache"] == {"hits": 0, "misses": 0}


def _status_becomes(process: psutil.Process, stopped: bool, seconds: float = 5.0) -> bool:
    """Whether the process is (or is not) stopped within `seconds` (signals arrive asynchronously)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if (process.status() == psutil.STATUS_STOPPED) == stopped:
            return True
        time.sleep(0.01)
    return False


def test_suspended_processes_are_stopped_for_the_block_and_run_after_it():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        process = psutil.Process(child.pid)
        with suspended([process]):
            assert _status_becomes(process, stopped=True)
        assert _status_becomes(process, stopped=False)
    finally:
        child.kill()
        child.wait()
    with suspended([process]):  # ended since: passed over
        pass


@pytest.mark.slow
def test_vllm_takes_turns_with_the_engine_at_every_size(tmp_path, monkeypatch):
    """Both sides timed in each of two rounds; vLLM's processes stopped while the engine runs."""
    pytest.importorskip("vllm")
    out = tmp_path / "bench.json"
    args = [*TINY, "--candidates", "1,5", "--reps", "2", "--min-seconds", "0", "--no-naive", "--vllm"]
    stopped_during_engine = []

    def recording(processes):
        stopped_during_engine.append(len(processes))
        return suspended(processes)

    monkeypatch.setattr(cli, "suspended", recording)
    result = CliRunner().invoke(_app(bench), [*args, "--threads", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    record = json.loads(out.read_text())
    assert record["rounds"] == 2
    for case in record["cases"]:
        assert case["vllm_per_s"] > 0 and case["engine_vs_vllm"] > 0
        assert case["engine_requests"] == 4 and case["vllm_requests"] == 4  # 2 rounds x 2 reps
    # The probe twice, and two engine turns per size: each with vLLM's processes stopped.
    assert len(stopped_during_engine) == 2 + 2 * 2 and min(stopped_during_engine) >= 1


def test_gpu_check_smoke_runs_on_the_cpu(tmp_path):
    result = CliRunner().invoke(_app(check), ["--smoke", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "PASS" in result.output
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["agreement"]["passed"]
    assert report["agreement"]["fp32_engine_max_diff"] <= 1e-4
    cases = report["speed"]["tiny"]
    assert [c["candidates"] for c in cases] == [5, 20]
    assert all(c["engine_per_s"] > 0 and c["naive_per_s"] > 0 for c in cases)
    assert (tmp_path / "gpu-tiny.png").read_bytes()[:4] == PNG


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without a GPU")
def test_gpu_script_says_so_when_there_is_no_gpu(tmp_path):
    env = os.environ | {"PYTHON": sys.executable}
    done = subprocess.run(
        ["bash", str(ROOT / "scripts/perf/gpu_check.sh"), str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
    )
    assert done.returncode == 2
    assert "sees no CUDA GPU" in done.stderr and "--smoke" in done.stderr


@pytest.mark.slow
def test_gpu_script_smoke_run_writes_its_results(tmp_path):
    env = os.environ | {"PYTHON": sys.executable}
    done = subprocess.run(
        ["bash", str(ROOT / "scripts/perf/gpu_check.sh"), str(tmp_path), "--smoke"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads((tmp_path / "gpu_check.json").read_text())["agreement"]["passed"]
    assert "PASS" in (tmp_path / "gpu_check.log").read_text()


def test_each_size_is_measured_against_the_probe_taken_beside_its_engine_turns():
    """The probe runs after each engine turn, inside the pause, and the best reading sets
    the roofline; without one, the run's single probe does."""
    scorer = workload.build_scorer("tiny", "cpu", torch.float32, "builtin")[0]
    backend = TorchBackend(scorer)
    events, readings = [], iter([2e9, 6e9, 4e9])

    @contextlib.contextmanager
    def paused():
        events.append("pause")
        yield
        events.append("resume")

    def probe() -> float:
        events.append("probe")
        return next(readings)

    case = run_case(scorer, backend, 3, 1, False, 4, 1e9, rounds=3, paused=paused, probe=probe)
    assert events == ["pause", "probe", "resume"] * 3
    plain = run_case(scorer, backend, 3, 1, False, 4, 1e9)  # the same request, the run's probe
    assert case.matmul_flops == 6e9 and plain.matmul_flops == 1e9
    assert case.roofline_per_s == pytest.approx(6 * plain.roofline_per_s)
    assert case.engine_vs_roofline == pytest.approx(case.engine_per_s / case.roofline_per_s)


def test_the_cached_instruction_is_not_counted_in_the_roofline_work():
    model = workload.build_scorer("tiny", "cpu", torch.float32, "builtin")[0].backbone
    config = model.config
    whole = candidate_flops(model, 100, 20, 1)
    cached = candidate_flops(model, 100, 20, 1, cached=40)
    linear = sum(
        m.in_features * m.out_features
        for n, m in model.named_modules()
        if "layers." in n and isinstance(m, torch.nn.Linear)
    )
    per_token = 2 * linear + 4 * config.hidden_size
    attention = (
        2
        * config.num_hidden_layers
        * config.num_attention_heads
        * (getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
    )
    assert whole - cached == pytest.approx(40 * per_token + attention * 40 * 40)
    # Shared by many candidates, the prefix matters less and so does what is cached of it.
    assert candidate_flops(model, 100, 20, 100) - candidate_flops(
        model, 100, 20, 100, cached=40
    ) == pytest.approx((whole - cached) / 100)


def test_setup_runs_before_every_call_and_outside_the_timing():
    calls = []
    times = _timed(lambda: calls.append("fn"), torch.device("cpu"), 2, setup=lambda: calls.append("setup"))
    assert calls == ["setup", "fn"] * 3 and len(times) == 2


def test_short_calls_are_repeated_until_the_time_budget_and_no_further_than_the_cap(monkeypatch):
    clock = iter(range(10_000))  # every perf_counter() reading is one second later
    monkeypatch.setattr("sellarec.bench.cli.time.perf_counter", lambda: next(clock))
    # Each timed call reads the clock twice: 1 s per call, so 5 s of budget takes 5 calls, not 2.
    assert len(_timed(lambda: None, torch.device("cpu"), 2, min_seconds=5.0)) == 5
    # With no budget, exactly `reps`; a budget out of reach stops at the cap.
    assert len(_timed(lambda: None, torch.device("cpu"), 2)) == 2
    assert len(_timed(lambda: None, torch.device("cpu"), 2, min_seconds=1e9)) == MAX_REPS
