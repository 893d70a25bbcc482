"""Stage 1 (LoRA on the text-only prompt, Eq. 5) and the distillation of E_I^L (Fig. 3)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm import tqdm

from sellarec.model.backbone import load_backbone
from sellarec.model.bundle import SEMANTIC_ITEMS
from sellarec.model.lora import attach_lora, load_lora, merge
from sellarec.model.prompts import TemplateSpec
from sellarec.model.sella import SellaRec
from sellarec.training.batches import row_prompts, training_batches
from sellarec.training.config import Stage1Config
from sellarec.training.distributed import world
from sellarec.training.loop import lr_scheduler, run_epochs

log = logging.getLogger("sellarec.train")


def train_stage1(
    backbone: str,
    spec: TemplateSpec,
    train: pd.DataFrame,
    cfg: Stage1Config,
    seed: int,
    out: Path,
    progress: bool = True,
) -> dict:
    """Fit the LoRA by BCE on P(Yes) of the stage-1 prompt; save it under out/adapter."""
    w = world()
    model, tokenizer, _ = load_backbone(backbone)
    # Seeded after the load: a first load converts the GGUF backbone (and draws random numbers
    # doing so) where a later one reads the converted copy, so a seed set before it gave the
    # LoRA another initialisation on a fresh machine than on a warm one.
    torch.manual_seed(seed)
    peft_model = attach_lora(model, cfg.lora())
    peft_model.train()
    scorer = SellaRec(peft_model, tokenizer, spec)
    encoded = [scorer.encoder.prompt(p) for p in row_prompts(spec, train)]
    labels = torch.tensor(train["label"].to_numpy(), dtype=torch.float32)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    rng = np.random.default_rng(seed)
    lengths = [len(e) for e in encoded]

    def batch_loss(local: list[int], batch_size: int) -> torch.Tensor:
        # Eq. 5, as a sum over this process's rows / the global batch (see distributed.py).
        logits = scorer.score([encoded[i] for i in local])
        return F.binary_cross_entropy_with_logits(logits, labels[local], reduction="sum") / batch_size

    run = run_epochs(
        "stage1",
        cfg.epochs,
        lambda: training_batches(lengths, cfg.batch_size, rng),
        batch_loss,
        optimizer,
        params,
        lr_scheduler(optimizer, None, cfg.warmup_steps, lambda: 0),  # warm-up, then constant
        progress,
    )
    if w.main:
        peft_model.save_pretrained(out / "adapter", safe_serialization=True)
    run.log_summary("stage1", len(train), cfg.epochs)
    return run.metrics(len(train), labels)


def distill_items(
    backbone: str,
    adapter: Path,
    spec: TemplateSpec,
    titles: list[str],
    batch_size: int,
    out: Path,
    progress: bool = True,
) -> dict:
    """E_I^L for every item id (with the stage-1 LoRA on), saved as semantic.safetensors."""
    model, tokenizer, _ = load_backbone(backbone)
    model = merge(load_lora(model, adapter))  # identical outputs, no adapter overhead
    scorer = SellaRec(model, tokenizer, spec)
    start = time.perf_counter()
    # Short titles first: batches pad little; the result is put back in id order.
    order = np.argsort([len(t) for t in titles], kind="stable")
    chunks = []
    bar = tqdm(range(0, len(titles), batch_size), desc="distill", disable=not progress, unit="batch")
    with torch.inference_mode():
        for s in bar:
            chunks.append(
                scorer.distill([titles[i] for i in order[s : s + batch_size]], batch_size=batch_size)
            )
    table = torch.empty(len(titles), scorer.llm_dim)
    table[torch.as_tensor(order)] = torch.cat(chunks)
    seconds = time.perf_counter() - start
    save_file({SEMANTIC_ITEMS: table.contiguous()}, out / "semantic.safetensors")
    log.info("distill: %d items, %.1fs", len(titles), seconds)
    return {"items": len(titles), "seconds": seconds}
