"""scripts/train/grad_norms.py: each part's share of a run's gradient spikes, and its figure."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parents[1] / "scripts" / "train" / "grad_norms.py"


def _done(tmp_path: Path) -> Path:
    steps = 40
    tables = [1.0] * steps
    proj_c = [1.0] * steps
    proj_c[7] = 30.0  # one spike, all of it in Proj C->L
    total = [(t * t + c * c) ** 0.5 for t, c in zip(tables, proj_c, strict=True)]
    record = {
        "losses": [0.7 - 0.001 * k for k in range(steps)],
        "grad_norms": total,
        "group_grad_norms": {"tables": tables, "proj_c": proj_c},
        "base_rate_bce": 0.69,
    }
    path = tmp_path / "done.json"
    path.write_text(json.dumps({"stage": "bundle-sellarec", "metrics": record}))
    return path


def test_it_names_the_part_that_spiked_and_draws_the_figure(tmp_path):
    out = tmp_path / "norms.png"
    done = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            str(_done(tmp_path)),
            "--labels",
            "run",
            "--top",
            "1",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    # The largest step is the spike: Proj C->L holds 900 of its 901; at the median step they share.
    assert "tables 0.00 / 0.50, proj_c 1.00 / 0.50" in done.stdout
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_a_run_without_recorded_norms_is_refused(tmp_path):
    path = tmp_path / "done.json"
    path.write_text(json.dumps({"metrics": {"losses": [0.7]}}))
    done = subprocess.run(
        [sys.executable, str(SCRIPT), str(path)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode != 0 and "no gradient norms recorded" in done.stderr
