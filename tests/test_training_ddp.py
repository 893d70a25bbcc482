"""Stage 1 under torchrun with two CPU processes (gloo) equals the single-process run."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

SCRIPT = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    import pandas as pd
    import torch

    from sellarec.model.prompts import TemplateSpec
    from sellarec.training.config import Stage1Config
    from sellarec.training.distributed import world
    from sellarec.training.stage1 import train_stage1

    backbone, out = sys.argv[1], Path(sys.argv[2])
    torch.set_num_threads(1)
    titles = ["Toy Story (1995)", "Heat (1995)", "Alien (1979)", "Fargo (1996)", "Babe (1995)"]
    rows = [
        {"his_title": ["", *titles[: k % 4]], "title": titles[(k * 2) % 5], "label": k % 3 == 0}
        for k in range(10)
    ]
    frame = pd.DataFrame(rows)
    cfg = Stage1Config(lora_dropout=0.0, lr=5e-3, batch_size=4, epochs=2)  # 3 global batches, 2 passes
    out.mkdir(parents=True, exist_ok=True)
    metrics = train_stage1(backbone, TemplateSpec(stage="stage1"), frame, cfg, 0, out, progress=False)
    if world().main:
        (out / "loss.txt").write_text(str(metrics["loss_last20"]))
    """
)


def _run(cmd: list[str], env: dict[str, str]) -> None:
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def test_two_processes_train_the_same_lora_as_one(tmp_path, tiny_backbone_dir):
    script = tmp_path / "stage1_ddp.py"
    script.write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in {"WORLD_SIZE", "RANK", "LOCAL_RANK"}}
    env["PYTHONPATH"] = os.getcwd()
    _run([sys.executable, str(script), str(tiny_backbone_dir), str(tmp_path / "one")], env)
    _run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(script),
            str(tiny_backbone_dir),
            str(tmp_path / "two"),
        ],
        env,
    )
    one = load_file(tmp_path / "one" / "adapter" / "adapter_model.safetensors")
    two = load_file(tmp_path / "two" / "adapter" / "adapter_model.safetensors")
    assert one.keys() == two.keys()
    lora_b = [k for k in one if "lora_B" in k]
    assert lora_b and all(one[k].abs().sum() > 0 for k in lora_b)  # it trained (B starts at zero)
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-6)
    loss_one = float((tmp_path / "one" / "loss.txt").read_text())
    loss_two = float((tmp_path / "two" / "loss.txt").read_text())
    assert loss_two == pytest.approx(loss_one, rel=1e-4)
