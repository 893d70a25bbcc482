"""Stage 2: the projection's own weight decay, and config keys that survive new optional fields."""

from __future__ import annotations

import dataclasses

import torch
from safetensors.torch import load_file

from sellarec.training.config import Stage2Config, fingerprint
from sellarec.training.diagnostics import token_scale
from sellarec.training.stage2 import train_stage2
from sellarec.training.synthetic import synthetic_dataset


def _projected_item_scale(tmp_path, proj_weight_decay: float | None) -> float:
    data = synthetic_dataset()
    semantic = torch.randn(data.n_items, 16, generator=torch.Generator().manual_seed(0))
    cfg = Stage2Config(collab_dim=8, max_epochs=1, batch_size=8, lr=1e-2, weight_decay=0.5)
    cfg = dataclasses.replace(cfg, proj_weight_decay=proj_weight_decay)
    out = tmp_path / str(proj_weight_decay)
    out.mkdir()
    train_stage2(data, cfg, semantic, 16, True, 0, out, progress=False)
    return token_scale(load_file(out / "collab.safetensors")).item


def test_projection_decay_is_its_own_setting(tmp_path):
    shared = _projected_item_scale(tmp_path, None)  # the MF's decay (0.5) also on Proj C->L
    exempt = _projected_item_scale(tmp_path, 0.0)
    assert exempt > 2 * shared  # measured: 11.1 against 3.2


def test_fields_left_at_none_do_not_enter_a_cache_key():
    cfg = Stage2Config()
    fields = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "proj_weight_decay"}
    assert fingerprint(cfg) == fingerprint(fields)
    assert fingerprint(cfg) != fingerprint(dataclasses.replace(cfg, proj_weight_decay=0.0))
