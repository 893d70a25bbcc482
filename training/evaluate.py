"""Scoring a CoLLM-format split with any bundle, and the AUC/UAUC metrics (warm/cold).

LLM bundles load through `model.loader.load_scorer`, the service's path. Rows that share
a user-level prefix (same user, same history) run it once; only the per-candidate
suffixes run per row. Users/items the bundle does not know get the neutral vectors.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import roc_auc_score
from tqdm import tqdm

from sellarec.model.artifacts import Bundle, load_bundle
from sellarec.model.loader import load_scorer
from sellarec.model.sella import SellaRec
from sellarec.model.shared_head import SharedHead
from sellarec.training.batches import CollabInputs, pack_groups, prefix_groups, row_prompts

log = logging.getLogger("sellarec.train")


def _auc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    return float(roc_auc_score(labels, scores)) if len(np.unique(labels)) == 2 else None


def uauc(users: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> float | None:
    """Per-user AUC averaged over users whose rows hold both classes (None if no such user)."""
    frame = pd.DataFrame({"u": users, "y": labels, "s": scores})
    aucs = [_auc(g["y"].to_numpy(), g["s"].to_numpy()) for _, g in frame.groupby("u", sort=False)]
    aucs = [a for a in aucs if a is not None]
    return float(np.mean(aucs)) if aucs else None


def metrics(frame: pd.DataFrame, scores: np.ndarray) -> dict:
    """n, auc, uauc and both on the warm (not_cold == 1) and cold (not_cold == 0) subsets."""
    users, labels = frame["uid"].to_numpy(), frame["label"].to_numpy()
    warm = frame["not_cold"].to_numpy() == 1
    out: dict = {"n": int(len(frame)), "n_warm": int(warm.sum()), "n_cold": int((~warm).sum())}
    for suffix, mask in (("", np.ones_like(warm)), ("_warm", warm), ("_cold", ~warm)):
        out[f"auc{suffix}"] = _auc(labels[mask], scores[mask]) if mask.any() else None
        out[f"uauc{suffix}"] = uauc(users[mask], labels[mask], scores[mask]) if mask.any() else None
    return out


def collab_inputs(bundle: Bundle) -> CollabInputs:
    """The bundle's tables by external id (None where its variant has no such table)."""
    t = bundle.tables()
    neutral = {"user": t.neutral_user, "item": t.neutral_item, "semantic": t.neutral_semantic}
    return CollabInputs(
        users=t.users,
        items=t.items,
        semantic=t.semantic,
        user_rows=bundle.catalog.user_rows(),
        item_rows=bundle.catalog.item_rows(),
        neutral={k: v for k, v in neutral.items() if v is not None},
    )


def mf_dot(inputs: CollabInputs, uids: list, iids: list) -> torch.Tensor:
    """[n] MF dot products of (user, item) pairs, neutral vectors for the ids the MF never saw."""
    return (inputs.user(uids) * inputs.item(iids)).sum(-1)


def score_mf(bundle: Bundle, frame: pd.DataFrame) -> np.ndarray:
    """MF variant: the dot product of the (neutral when unknown) user and item vectors."""
    return mf_dot(collab_inputs(bundle), frame["uid"].tolist(), frame["iid"].tolist()).numpy()


@torch.inference_mode()
def score_llm(
    scorer: SellaRec,
    inputs: CollabInputs,
    frame: pd.DataFrame,
    batch_size: int = 16,
    progress: bool = True,
    mf_residual: bool = False,
) -> np.ndarray:
    """Logits of P(Yes) per row, prefix groups shared, packs sorted by prefix length;
    `mf_residual` (a `sellarec-mf` bundle) adds each row's MF dot product."""
    uids, iids = frame["uid"].tolist(), frame["iid"].tolist()
    groups, suffixes = prefix_groups(scorer.encoder, row_prompts(scorer.spec, frame), uids)
    head = SharedHead(scorer, [g.prefix for g in groups])  # the instruction, run once
    scores = np.zeros(len(frame), dtype=np.float64)
    bar = tqdm(total=len(frame), desc="evaluate", disable=not progress, unit="row")
    for pack in pack_groups(groups, batch_size):
        user_vec = inputs.user([g.uid for g in pack])
        state = head.run([g.prefix for g in pack], scorer.soft_vectors(user_vec, None, None, len(pack)))
        rows = [r for g in pack for r in g.rows]
        owner = torch.tensor([k for k, g in enumerate(pack) for _ in g.rows])
        picked = [iids[r] for r in rows]
        vectors = scorer.soft_vectors(None, inputs.item(picked), inputs.item_semantic(picked), len(rows))
        logits = scorer.score_suffixes(state, owner, [suffixes[r] for r in rows], vectors)
        logits = logits.double().cpu()
        if mf_residual:
            logits += mf_dot(inputs, [uids[r] for r in rows], picked).double()
        scores[rows] = logits.numpy()
        bar.update(len(rows))
    bar.close()
    return scores


def score_bundle(
    path: str | Path, frame: pd.DataFrame, batch_size: int = 16, progress: bool = True
) -> np.ndarray:
    """Scores (logits; order-equivalent to P(Yes)) of every row under the bundle at `path`."""
    bundle = load_bundle(path)
    if not bundle.manifest.has_llm:
        return score_mf(bundle, frame)
    loaded = load_scorer(bundle)
    inputs = collab_inputs(bundle)
    return score_llm(loaded.scorer, inputs, frame, batch_size, progress, bundle.manifest.mf_residual)


def evaluate_bundle(
    path: str | Path, frame: pd.DataFrame, batch_size: int = 16, progress: bool = True
) -> tuple[dict, np.ndarray]:
    """(metrics with wall seconds, scores) of a bundle on a normalised split."""
    start = time.perf_counter()
    scores = score_bundle(path, frame, batch_size, progress)
    result = metrics(frame, scores) | {"seconds": time.perf_counter() - start}
    log.info("evaluate %s: %s", path, {k: v for k, v in result.items() if k.startswith(("n", "auc", "uauc"))})
    return result, scores
