"""How far one optimiser step turns the soft tokens, for each way Proj C->L can enter stage 3.

    python scripts/train/step_sizes.py RUN/stages/stage2-align-KEY/collab.safetensors --seed 0

Reads a stage-2 cache (aligned MF tables and Proj C->L), builds the projection stage 3 would
start from under each `stage3.warm_start` (fresh, as CoLLM's; "anchored"; "balanced"), pinned
to `--norm` (the backbone's median embedding norm: 3.15 on SmolLM2), and applies one step of
the size Adam takes (every element moved by `--lr`, random signs) to the MF rows, to the
first-layer weights and to the last-layer weights. It prints the median angle, over every user
and item row, by which the soft token turns, and the mean pairwise cosine of the tokens at the
start (docs/results.md, "Gradient spikes, step sizes and clipping").
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from sellarec.model.bundle import MF_ITEMS, MF_USERS, PROJ_C, without_prefix
from sellarec.model.collab import CollabProjector, anchored_warm_start, balanced_warm_start


def turn(before: torch.Tensor, after: torch.Tensor) -> float:
    """Median angle in degrees between the rows of two token sets."""
    cos = F.cosine_similarity(before, after, dim=-1).clamp(-1, 1)
    return float(torch.rad2deg(torch.acos(cos)).median())


@torch.no_grad()
def step_turns(proj: CollabProjector, rows: torch.Tensor, lr: float, g: torch.Generator) -> dict[str, float]:
    """Median turn of the tokens for one +-lr step of the rows, of layer 1 and of layer 2."""
    start = proj(rows)
    out = {"MF rows": turn(start, proj(rows + lr * torch.sign(torch.randn(rows.shape, generator=g))))}
    for name, layer in (("first layer", 0), ("last layer", 2)):
        moved = CollabProjector.from_state(proj.state_dict())
        w = moved.net[layer].weight
        w.add_(lr * torch.sign(torch.randn(w.shape, generator=g)))
        out[name] = turn(start, moved(rows))
    unit = F.normalize(start, dim=-1)
    pick = torch.randperm(len(unit), generator=g)[:2000]
    out["pairwise cos"] = float((unit[pick] @ unit[pick].T).mean())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("collab", help="a stage-2 cache's collab.safetensors (aligned: stage2-align-*)")
    parser.add_argument("--seed", type=int, default=0, help="the run's seed (the fresh projection's init)")
    parser.add_argument("--norm", type=float, default=3.15, help="soft-token norm (backbone's median)")
    parser.add_argument("--lr", type=float, default=1e-3, help="per-element step (stage3.lr)")
    parser.add_argument("--llm-dim", type=int, default=576, help="backbone hidden size (SmolLM2-135M: 576)")
    args = parser.parse_args()

    collab = load_file(args.collab)
    rows = torch.cat([collab[MF_USERS], collab[MF_ITEMS]]).float()
    aligned = without_prefix(collab, PROJ_C)
    if not aligned:
        raise SystemExit(f"{args.collab} holds no Proj C->L: pass a stage2-align-* cache")
    torch.manual_seed(args.seed)  # as build_scorer draws the fresh projection
    fresh = CollabProjector(rows.shape[1], args.llm_dim, out_norm=args.norm)
    pinned = {"out_norm": torch.tensor(args.norm)}
    starts = {
        "fresh (CoLLM)": fresh,
        "anchored": CollabProjector.from_state(anchored_warm_start(fresh, aligned, rows) | pinned),
        "balanced": CollabProjector.from_state(balanced_warm_start(fresh, aligned, rows) | pinned),
    }
    g = torch.Generator().manual_seed(1)
    print("| start of Proj C->L | MF rows | first layer | last layer | pairwise cos at start |")
    print("|---|---|---|---|---|")
    for name, proj in starts.items():
        t = step_turns(proj, rows, args.lr, g)
        print(
            f"| {name} | {t['MF rows']:.3f} | {t['first layer']:.3f} | {t['last layer']:.3f} "
            f"| {t['pairwise cos']:.3f} |"
        )


if __name__ == "__main__":
    main()
