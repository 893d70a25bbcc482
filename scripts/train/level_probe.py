"""How the stage-1 LLM's logit answers the MF's levels through the soft tokens (`stage3.level_init`).

    python scripts/train/level_probe.py --config training/configs/ml1m.yaml --run runs/ml1m \
        [--variant sellarec] [--rows 256]

Reuses the stage-1, distillation and stage-2 caches of a finished run (RUN) and builds the
variant's stage-3 scorer as stage 3 starts. On a seeded sample of the stage-3 rows it prints:
the AUC of MF's logit, of its user and item levels alone and of the LLM's logit; each row's
gradient of its logit with respect to its `<User_ID>` and `<Item_ID>` tokens (norms, and how far
they agree with their mean); how well a ridge direction fit on half the rows moves the other
half's logits by one (first order); then the level start itself (training.level_start) and the
LLM's AUC after it. Nothing is written.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from sellarec.model.shared_head import SharedHead
from sellarec.training import assembly
from sellarec.training.batches import row_prompts, split_before_first_slot
from sellarec.training.config import VARIANTS, load_config
from sellarec.training.level_start import mf_levels, slot_directions
from sellarec.training.pipeline import Pipeline, templates
from sellarec.training.stage3 import at_mf_levels, split_logits


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True)
    parser.add_argument("--run", required=True, help="a finished run whose stage caches to reuse")
    parser.add_argument("--variant", default="sellarec")
    parser.add_argument("--rows", type=int, default=256, help="stage-3 rows probed (even)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = load_config(args.config)
    pipe = Pipeline(cfg, args.run, progress=False)
    variant = VARIANTS[args.variant]
    _, spec = templates(cfg, variant)
    adapter, _ = pipe.stage1()
    semantic, _ = pipe.distill()
    collab, _ = pipe.stage2(align=variant.align, holdout=cfg.stage3.held_out_mf)
    s3 = cfg.stage3
    scorer, tables, rows = assembly.stage3_start(cfg, pipe.data, variant, spec, adapter, collab, semantic)
    pieces = [split_before_first_slot(scorer.encoder, p) for p in row_prompts(scorer.spec, rows)]
    uids = torch.as_tensor(rows["uid"].to_numpy(copy=True))
    iids = torch.as_tensor(rows["iid"].to_numpy(copy=True))
    labels = rows["label"].to_numpy()
    shared = SharedHead(scorer, [h for h, _ in pieces])

    def row_inputs(local: list[int]) -> tuple:
        b = torch.as_tensor(local)
        return [pieces[i][0] for i in local], [pieces[i][1] for i in local], uids[b], iids[b]

    probe = np.random.default_rng(99).permutation(len(pieces))[: args.rows].tolist()

    def logits() -> np.ndarray:
        with torch.no_grad():
            parts = [
                split_logits(scorer, tables, *row_inputs(probe[s : s + 32]), shared)
                for s in range(0, len(probe), 32)
            ]
        return torch.cat(parts).numpy()

    y = labels[probe]
    users, items = tables.users.detach(), tables.items.detach()
    user_level, item_level = mf_levels(users, items, uids, iids)
    p = torch.as_tensor(probe)
    mf = (users[uids[p]] * items[iids[p]]).sum(-1).numpy()
    levels = (user_level[uids[p]] + item_level[iids[p]]).numpy()
    before = logits()
    print(f"{len(probe)} stage-3 rows (base rate {y.mean():.3f})")
    print(
        f"AUC: MF {roc_auc_score(y, mf):.4f}, its levels alone {roc_auc_score(y, levels):.4f}, "
        f"LLM {roc_auc_score(y, before):.4f}"
    )

    grads = []
    for s in range(0, len(probe), 32):
        heads, tails, u, i = row_inputs(probe[s : s + 32])
        vectors = tables.vectors(scorer, u, i).detach().requires_grad_(True)
        split_logits(scorer, tables, heads, tails, u, i, shared, vectors=vectors).sum().backward()
        grads.append(vectors.grad)
        norms = vectors.detach().norm(dim=-1).mean(0)
    g = torch.cat(grads)[:, :2]
    print(f"soft-token norms (last chunk): user {norms[0]:.3f}, item {norms[1]:.3f}")
    for k, name in enumerate(("user", "item")):
        mean = g[:, k].mean(0)
        cos = torch.nn.functional.cosine_similarity(g[:, k], mean[None], dim=-1)
        print(
            f"{name} token: per-row gradient norm {g[:, k].norm(dim=-1).mean():.2f}, of their mean "
            f"{mean.norm():.2f}; cosine with the mean {cos.mean():.3f}"
        )
    half = len(probe) // 2
    directions = slot_directions(g[:half])
    for k, name in enumerate(("user", "item")):
        own = g[half:, k] @ directions[k]
        other = g[half:, 1 - k] @ directions[k]
        print(
            f"{name} direction on the other {len(probe) - half} rows: "
            f"own slot {own.mean():.3f} +- {own.std():.3f} "
            f"(1 asked), other slot {other.mean():.3f} +- {other.std():.3f} (0 asked)"
        )

    start = at_mf_levels(
        scorer,
        tables,
        shared,
        row_inputs,
        lambda _: None,
        uids,
        iids,
        cfg.seed,
        s3.level_max_scale,
        s3.level_exclusive,
    )
    print("level start:", start)
    after = logits()
    change = after - before
    slope = np.cov(change, levels)[0, 1] / levels.var(ddof=1)
    print(
        f"after the start: LLM AUC {roc_auc_score(y, after):.4f}; its change against the levels: "
        f"slope {slope:.3f}, correlation {np.corrcoef(change, levels)[0, 1]:.3f}"
    )


if __name__ == "__main__":
    main()
