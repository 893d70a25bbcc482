"""Stage 3 learns: on synthetic data its training loss ends clearly below the base-rate BCE
(what a constant prediction reaches), and a broken pipeline does not.

Stage 1 is not tested this way: at the budgets measured (up to 2,048 rows, lr 1e-4 to 2e-2,
LoRA on 2 to 8 top layers, up to four modules, two epochs), its running loss never fell below
the base rate, on synthetic data or on MovieLens-1M, and neither did a linear read-out of the
frozen backbone's features trained the same way (one pass of Adam, batch 8), although a fitted
read-out of them ranks at 0.64 AUC on synthetic data (docs/results.md, "What stage 1 can learn
from text at 135M"). A test asserting it would fail on a correct pipeline.

These run the real SmolLM2 backbone (slow): a tiny randomly initialised model cannot show
learning through frozen layers, since its near-uniform attention gives an input token
about 1/N of the last position's attention whatever that token holds.

One pass over the rows, so the running loss is measured on rows the model has not yet
trained on: falling below the base rate means it generalises, not that it memorised.
Each broken case (labels shuffled, soft tokens zeroed) runs the same code and must stay
near or above the base rate, which shows the check can fail.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from sellarec.model.prompts import Slot, TemplateSpec
from sellarec.model.sella import SellaRec
from sellarec.training.config import Stage2Config, Stage3Config
from sellarec.training.data import Dataset, sample
from sellarec.training.stage2 import train_stage2
from sellarec.training.stage3 import SoftInputTables, build_scorer, train_stage3
from sellarec.training.synthetic import SyntheticSpec, synthetic_frames

#: How far below the base rate the end of training must be ("clearly below").
MARGIN = 0.03
SPEC = SyntheticSpec(seed=3)
#: Training rows of each LLM stage run (one pass). 512 rows learned on one machine (AMD, AVX2:
#: last quarter about 0.645 against a base rate of 0.69) and not on another (Intel, AVX-512, same
#: code and seeds: 0.711): at 64 steps whether the frozen LLM starts reading the soft tokens
#: depends on the kernels' rounding. At 1,024 rows (128 steps) the second machine ends 0.045
#: below the base rate (quarters 0.695, 0.629, 0.671, 0.648); 768 rows ended 0.050 below, but
#: only in the last quarter.
ROWS = 1024
#: About 220 s per run on an idle 2-core Intel machine (one thread) and about five times that on
#: a 2 GHz AVX2 one. The three runs go side by side, one process each (`runs`), so on two cores
#: they take about 1.5 runs of wall time, not 3. Measured on the AVX2 machine with a training
#: job holding one of its two cores: 3,343 s for the three (the whole suite 65 min). The
#: suite's 900 s timeout is for hangs; these get an hour.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]
CASES = ("learns", "zeroed", "shuffled")


def _synthetic() -> Dataset:
    train, valid, _ = synthetic_frames(SPEC)
    return Dataset.from_frames(train, valid, name="synthetic-learning")


def _shuffled(frame: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    out = frame.copy()
    out["label"] = np.random.default_rng(seed).permutation(out["label"].to_numpy())
    return out


def _end(metrics: dict) -> float:
    """Mean running loss over the last quarter of the steps."""
    losses = metrics["losses"]
    return float(np.mean(losses[-max(1, len(losses) // 4) :]))


def _stage3(case: str, backbone: str, collab_file: str) -> dict:
    """One stage-3 run of `case`, in a process of its own (spawned, so the class patched for
    the zeroed case is this process's only). One torch thread: the same rounding, so the same
    trajectory, on every run of a machine (the margin was measured that way)."""
    torch.set_num_threads(1)
    rows = sample(_synthetic().train, ROWS, seed=0)
    if case == "shuffled":
        rows = _shuffled(rows)
    if case == "zeroed":
        real = SellaRec.soft_vectors
        SellaRec.soft_vectors = lambda self, *a: real(self, *a) * 0.0
    collab = load_file(collab_file)
    spec = TemplateSpec(stage="stage3", history_length=5, slots=(Slot.USER, Slot.ITEM))
    scorer = build_scorer(backbone, None, spec, 32, None, seed=0)
    tables = SoftInputTables(collab["mf.users"], collab["mf.items"], None)
    m = train_stage3(scorer, tables, rows, Stage3Config(lr=1e-3, batch_size=8), seed=0, progress=False)
    return {"losses": [float(x) for x in m["losses"]], "base_rate_bce": float(m["base_rate_bce"])}


@pytest.fixture(scope="module")
def runs(smollm2_spec, tmp_path_factory) -> dict[str, dict | BaseException]:
    """The three stage-3 runs side by side, on the stage-2 MF tables of the synthetic data
    (the soft tokens' inputs); a run that raised is kept as its exception, for its own test."""
    out = tmp_path_factory.mktemp("stage2")
    cfg = Stage2Config(collab_dim=32, lr=1e-2, weight_decay=1e-3, batch_size=128, max_epochs=40, patience=5)
    train_stage2(_synthetic(), cfg, None, None, False, seed=0, out=out, progress=False)
    collab_file = str(out / "collab.safetensors")
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=len(CASES), mp_context=spawn) as pool:
        futures = {case: pool.submit(_stage3, case, smollm2_spec, collab_file) for case in CASES}
        return {case: f.exception() or f.result() for case, f in futures.items()}


def _run(runs: dict, case: str) -> dict:
    got = runs[case]
    if isinstance(got, BaseException):
        raise got
    return got


def test_stage3_loss_ends_below_the_base_rate(runs):
    m = _run(runs, "learns")
    assert _end(m) < m["base_rate_bce"] - MARGIN, (_end(m), m["base_rate_bce"])


def test_stage3_does_not_learn_without_soft_tokens(runs):
    m = _run(runs, "zeroed")
    assert _end(m) > m["base_rate_bce"] - MARGIN / 2, (_end(m), m["base_rate_bce"])


def test_stage3_does_not_learn_shuffled_labels(runs):
    m = _run(runs, "shuffled")
    assert _end(m) > m["base_rate_bce"] - MARGIN / 2, (_end(m), m["base_rate_bce"])
