"""Stage 2: MF with BCE on the dot product + lambda * InfoNCE alignment (paper Eq. 8).

Early stopping on validation AUC. Rows of users/items that never occur in train get the
neutral vector (mean of the trained rows), so cold ids look the same however they are
reached (in the tables or unknown to them).
"""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from sklearn.metrics import roc_auc_score
from tqdm import tqdm

from sellarec.model.bundle import MF_ITEMS, MF_USERS, PROJ_C, with_prefix
from sellarec.model.collab import CollabProjector, MatrixFactorization, info_nce
from sellarec.training.config import Stage2Config
from sellarec.training.data import Dataset

log = logging.getLogger("sellarec.train")


def _tensor(frame, col: str) -> torch.Tensor:
    return torch.tensor(frame[col].to_numpy(), dtype=torch.long)


def neutral_rows(table: torch.Tensor, trained: np.ndarray) -> torch.Tensor:
    """Replace untrained rows by the mean of the trained ones."""
    mask = torch.as_tensor(trained)
    mean = table[mask].mean(0) if bool(mask.any()) else table.mean(0)
    return torch.where(mask[:, None], table, mean[None, :])


def train_stage2(
    data: Dataset,
    cfg: Stage2Config,
    semantic: torch.Tensor | None,
    llm_dim: int | None,
    align: bool,
    seed: int,
    out: Path,
    progress: bool = True,
) -> dict:
    """Fit MF (and Proj C->L when `align`); save mf.users, mf.items (and proj_c.*)."""
    torch.manual_seed(seed)
    mf = MatrixFactorization(data.n_users, data.n_items, cfg.collab_dim)
    proj = CollabProjector(cfg.collab_dim, llm_dim) if align and llm_dim else None
    groups = [{"params": list(mf.parameters())}]
    if proj is not None:
        decay = cfg.weight_decay if cfg.proj_weight_decay is None else cfg.proj_weight_decay
        groups.append({"params": list(proj.parameters()), "weight_decay": decay})
    optimizer = torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    users, items, labels = (
        _tensor(data.train, "uid"),
        _tensor(data.train, "iid"),
        _tensor(data.train, "label"),
    )
    vu, vi, vl = _tensor(data.valid, "uid"), _tensor(data.valid, "iid"), data.valid["label"].to_numpy()
    gen = torch.Generator().manual_seed(seed)
    best = {"auc": -1.0, "epoch": -1}
    best_state: dict = {}
    start = time.perf_counter()
    bar = tqdm(range(cfg.max_epochs), desc=f"stage2 align={align}", disable=not progress, unit="epoch")
    for epoch in bar:
        mf.train()
        order = torch.randperm(len(users), generator=gen)
        for s in range(0, len(order), cfg.batch_size):
            b = order[s : s + cfg.batch_size]
            loss = mf.loss(users[b], items[b], labels[b])
            if proj is not None and semantic is not None and cfg.align_weight > 0:
                batch_items = items[b].unique()
                loss = loss + cfg.align_weight * info_nce(  # Eq. 8
                    proj(mf.items(batch_items)), semantic[batch_items], cfg.temperature
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            auc = float(roc_auc_score(vl, mf(vu, vi).numpy()))
        if auc > best["auc"]:
            best = {"auc": auc, "epoch": epoch}
            best_state = {
                "mf": copy.deepcopy(mf.state_dict()),
                "proj": copy.deepcopy(proj.state_dict()) if proj else None,
            }
        bar.set_postfix(val_auc=f"{auc:.4f}", best=f"{best['auc']:.4f}@{best['epoch']}")
        if epoch - best["epoch"] >= cfg.patience:
            break
    mf.load_state_dict(best_state["mf"])
    tensors = {
        MF_USERS: neutral_rows(mf.users.weight.detach(), data.trained_users()),
        MF_ITEMS: neutral_rows(mf.items.weight.detach(), data.trained_items()),
    }
    if proj is not None:
        proj.load_state_dict(best_state["proj"])
        tensors |= with_prefix(PROJ_C, proj.state_dict())
    save_file({k: v.contiguous() for k, v in tensors.items()}, out / "collab.safetensors")
    seconds = time.perf_counter() - start
    log.info(
        "stage2 align=%s: best val AUC %.4f at epoch %d, %.1fs", align, best["auc"], best["epoch"], seconds
    )
    return {"val_auc": best["auc"], "best_epoch": best["epoch"], "epochs": epoch + 1, "seconds": seconds}
