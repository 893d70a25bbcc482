"""The soft tokens: alignment of collaborative and semantic item embeddings (cf. the
paper's Fig. 7) and the scale of the vectors spliced into the prompt."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoConfig

from sellarec.model.backbone import SMOLLM2_ALIAS, cache_dir
from sellarec.model.bundle import MF_ITEMS, PROJ_C, SEMANTIC_ITEMS, with_prefix
from sellarec.training.config import VARIANTS
from sellarec.training.diagnostics import (
    TokenScale,
    cosine_sets,
    latest_stage,
    random_projection,
    token_scale,
    vocabulary_scale,
)
from sellarec.training.report.context import LABELS, Report


def plot_fig7(sets: dict[str, np.ndarray], path: Path) -> Path | None:
    if not sets:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    low = min(float(v.min()) for v in sets.values())
    high = max(float(v.max()) for v in sets.values())
    bins = np.linspace(low - 0.02, high + 0.02, 81)
    for label, values in sets.items():
        ax.hist(
            values,
            bins=bins,
            density=True,
            histtype="step",
            linewidth=1.6,
            label=f"{label} (mean {values.mean():.3f})",
        )
    ax.set_xlabel("cosine similarity of Proj C->L(MF item embedding) and semantic item embedding")
    ax.set_ylabel("density")
    ax.set_title("ML-1M items with training rows (cf. paper Fig. 7)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _compared_items(r: Report) -> tuple[np.ndarray, str]:
    """The item ids Fig. 7 compares, and how the text names them: those with training rows,
    or every item of the distilled table when the train split is not on this machine."""

    train = r.cfg.get("data", {}).get("train")
    if train and Path(train).exists():
        return np.unique(pd.read_parquet(train, columns=["iid"])["iid"]), "the items with training rows"
    distill = latest_stage(r.runs, "distill-*")
    table = distill / "semantic.safetensors" if distill is not None else None
    if table is None or not table.exists():
        return np.array([], dtype=np.int64), "no items"
    with safe_open(str(table), framework="pt") as f:
        count = f.get_slice(SEMANTIC_ITEMS).get_shape()[0]
    return np.arange(count), "every item (the train split is not on this machine)"


def alignment_section(r: Report) -> list[str]:
    lines = ["## Alignment of collaborative and semantic item embeddings (cf. Fig. 7)", ""]
    with_bundles = {n: res for n, res in r.results.items() if _bundle_tensors(res) is not None}
    items, which = _compared_items(r) if r.cfg else (np.array([], dtype=np.int64), "no items")
    sets = cosine_sets(r.runs, with_bundles, items) if len(items) else {}
    fig = plot_fig7({k: v for k, v in sets.items() if v.size}, r.figures / "fig7_cosine_ml1m.png")
    if fig is None:
        return [*lines, "Not yet available (needs the distillation and stage-2 caches)."]
    lines += [
        f"![cosine similarity]({r.figure_link(fig)})",
        "",
        f"Cosine similarity between Proj C->L(e_i^C) and the distilled e_i^L over {which}:",
        "",
    ]
    return lines + [
        f"- {k}: mean {v.mean():.3f}, median {np.median(v):.3f}" for k, v in sets.items() if v.size
    ]


def scale_section(r: Report) -> list[str]:
    return [
        "## Soft-token scale",
        "",
        *(scale_lines(r.runs, r.results, r.cfg) if r.cfg else ["Not yet available."]),
    ]


def _stage2_scale_rows(runs: Path, backbone: str | None) -> list[tuple[str, TokenScale]]:
    """Where stage 3 starts: stage 2's aligned projection, and MF through a random one
    (CoLLM's start; needs the backbone's hidden size, so only when the backbone is here)."""
    rows = []
    align = latest_stage(runs, "stage2-align-*")
    if align is not None and (align / "collab.safetensors").exists():
        scale = token_scale(load_file(align / "collab.safetensors"))
        rows.append(("stage 2, with alignment (the warm start of Proj C->L)", scale))
    mf = latest_stage(runs, "stage2-mf-*")
    if mf is not None and backbone and (mf / "collab.safetensors").exists():
        t = load_file(mf / "collab.safetensors")
        llm_dim = int(AutoConfig.from_pretrained(backbone).get_text_config().hidden_size)
        rand = random_projection(t[MF_ITEMS].shape[1], llm_dim)
        scale = token_scale(t | with_prefix(PROJ_C, rand))
        rows.append(("stage 2, without alignment, random Proj C->L", scale))
    return rows


def scale_lines(runs: Path, results: dict[str, dict], cfg: dict) -> list[str]:
    """Median norms of the spliced soft tokens per model, beside the vocabulary's (diagnostics).

    The backbone is read only when it is on this machine already; otherwise its scale is
    "unknown" and the random-projection row is left out.
    """
    backbone = _local_backbone(cfg["backbone"])
    vocab = vocabulary_scale(backbone) if backbone else None
    rows = _stage2_scale_rows(runs, backbone)
    for name, res in results.items():
        tensors = _bundle_tensors(res)
        if VARIANTS[name].stage3 and tensors is not None:
            rows.append((f"after stage 3, {LABELS[name]}", token_scale(load_file(tensors))))
    if not rows:
        return ["Not yet available (needs the stage-2 or stage-3 caches)."]
    out = [
        "Median L2 norm of each vector spliced into the prompt in place of a placeholder's input "
        f"embedding, over every user or item of the tables. The backbone's own token embeddings have a "
        f"median norm of {'unknown' if vocab is None else f'{vocab:.2f}'}.",
        "",
        "| model | `<User_ID>` | `<Item_ID>` | `<Warm_ID>` |",
        "|---|---|---|---|",
    ]
    for label, t in rows:
        cells = [("-" if v is None else f"{v:.2f}") for v in (t.user, t.item, t.warm)]
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    return out


def _local_backbone(spec: str) -> str | None:
    """The backbone's directory when it is on this machine already (a report never downloads)."""
    if spec == SMOLLM2_ALIAS:
        target = cache_dir() / SMOLLM2_ALIAS
        return str(target) if (target / "config.json").exists() else None
    return spec if (Path(spec) / "config.json").exists() else None


def _bundle_tensors(result: dict) -> Path | None:
    path = Path(result.get("bundle", "")) / "tensors.safetensors"
    return path if result.get("bundle") and path.exists() else None
