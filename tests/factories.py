"""Small real models and bundles for tests: a tiny random Qwen2 with SmolLM2's tokenizer."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch
from transformers import Qwen2Config

from sellarec.model.artifacts import Catalog, Manifest, TemplateRecord, backbone_record, save_bundle
from sellarec.model.backbone import SMOLLM2_ALIAS, load_backbone, load_tokenizer, random_backbone
from sellarec.model.bundle import (
    MF_ITEMS,
    MF_USERS,
    NEUTRAL_ITEM,
    NEUTRAL_SEMANTIC,
    NEUTRAL_USER,
    PROJ_C,
    PROJ_W,
    SEMANTIC_ITEMS,
    with_prefix,
)
from sellarec.model.collab import CollabProjector, SemanticProjector
from sellarec.model.lora import LoraSettings, attach_lora
from sellarec.model.prompts import ALL_SLOTS, Slot, TemplateSpec
from sellarec.model.scoring import answer_token_ids
from sellarec.training.bundles import collab_tensors, semantic_tensors, write_bundle
from sellarec.training.config import VARIANTS
from sellarec.training.synthetic import synthetic_dataset

TITLES = [
    "Toy Story (1995)",
    "Heat (1995)",
    "Matrix, The (1999)",
    "Amélie (Le Fabuleux Destin d'Amélie Poulain) (2001)",
    "千と千尋の神隠し (2001)",
    "Godfather, The (1972)",
    "Alien (1979)",
    "Fargo (1996)",
    "Babe (1995)",
    "Jumanji (1995)",
]


@lru_cache(maxsize=1)
def tokenizer():
    return load_tokenizer(SMOLLM2_ALIAS)


def tiny_qwen2_config(layers: int = 2, hidden: int = 64) -> Qwen2Config:
    return Qwen2Config(
        vocab_size=len(tokenizer()),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )


def tiny_backbone_dir(root: Path, seed: int = 0) -> Path:
    """A Hugging Face model directory (config, safetensors, tokenizer) of a tiny Qwen2."""
    path = root / "tiny-qwen2"
    if not (path / "config.json").exists():
        model = random_backbone(tiny_qwen2_config(), seed=seed)
        model.save_pretrained(path)
        tokenizer().save_pretrained(path)
    return path


def make_bundle(
    root: Path,
    backbone_dir: Path,
    name: str = "tiny",
    slots: tuple[Slot, ...] = ALL_SLOTS,
    n_users: int = 6,
    n_items: int = len(TITLES),
    collab_dim: int = 16,
    with_adapter: bool = True,
    seed: int = 0,
) -> Path:
    """A complete artifact bundle with random (but non-trivial) weights, LoRA included."""
    torch.manual_seed(seed)
    model, tok, info = load_backbone(str(backbone_dir))
    spec = TemplateSpec(slots=slots)
    adapter = None
    if with_adapter:
        adapter = attach_lora(model, LoraSettings())
        for name_, param in adapter.named_parameters():
            if "lora_B" in name_:  # PEFT starts B at zero; make the adapter matter
                torch.nn.init.normal_(param, std=0.5)
    d_l = info.hidden_size
    proj_c, proj_w = CollabProjector(collab_dim, d_l), SemanticProjector(d_l)
    users = [f"u{i}" for i in range(n_users)]
    items = [f"i{i}" for i in range(n_items)]
    tensors = {
        MF_USERS: torch.randn(n_users, collab_dim),
        MF_ITEMS: torch.randn(n_items, collab_dim),
        SEMANTIC_ITEMS: torch.randn(n_items, d_l),
    }
    tensors[NEUTRAL_USER] = tensors[MF_USERS].mean(0)
    tensors[NEUTRAL_ITEM] = tensors[MF_ITEMS].mean(0)
    tensors[NEUTRAL_SEMANTIC] = tensors[SEMANTIC_ITEMS].mean(0)
    tensors |= with_prefix(PROJ_C, proj_c.state_dict()) | with_prefix(PROJ_W, proj_w.state_dict())
    histories = {u: items[: (k * 3) % (n_items + 1)] for k, u in enumerate(users)}
    yes, no = answer_token_ids(tok, spec.answer_cue)
    manifest = Manifest(
        name=name,
        variant="sellarec",
        dataset="synthetic-test",
        backbone=backbone_record(info),
        collab_dim=collab_dim,
        llm_dim=d_l,
        template=TemplateRecord.from_spec(spec),
        answer_token_ids={"yes": yes, "no": no},
        placeholders=[s.placeholder for s in spec.slots],
        n_users=n_users,
        n_items=n_items,
    )
    catalog = Catalog(users=users, items=items, titles=TITLES[:n_items], histories=histories)
    return save_bundle(root / name, manifest, tensors, catalog, adapter=adapter)


def variant_bundle(root: Path, backbone_dir: Path, variant: str, collab_dim: int = 8, seed: int = 0) -> Path:
    """The bundle `sellarec-train run <variant>` writes (training.bundles, the variant's template,
    slots, adapter and tensors), with random weights in place of trained ones, on the synthetic
    dataset: what serving must take as it is."""
    torch.manual_seed(seed)
    v, data = VARIANTS[variant], synthetic_dataset()
    out = root / variant
    if not v.llm:
        users, items = torch.randn(data.n_users, collab_dim), torch.randn(data.n_items, collab_dim)
        tensors = collab_tensors(data, users, items)
        return write_bundle(out / "bundle", variant, data, tensors, 10, collab_dim=collab_dim)
    model, tok, info = load_backbone(str(backbone_dir))
    adapter = None
    if v.lora:
        adapter = out / "adapter"
        lora = attach_lora(model, LoraSettings())
        for name, param in lora.named_parameters():
            if "lora_B" in name:  # PEFT starts B at zero; make the adapter matter
                torch.nn.init.normal_(param, std=0.5)
        lora.save_pretrained(adapter, safe_serialization=True)
    spec = TemplateSpec(stage="stage3", slots=v.slots) if v.stage3 else TemplateSpec(stage="stage1")
    d_l, tensors = info.hidden_size, {}
    if {Slot.USER, Slot.ITEM} & set(spec.slots):
        users, items = torch.randn(data.n_users, collab_dim), torch.randn(data.n_items, collab_dim)
        tensors |= collab_tensors(data, users, items)
        tensors |= with_prefix(PROJ_C, CollabProjector(collab_dim, d_l).state_dict())
    if Slot.WARM in spec.slots:
        tensors |= semantic_tensors(data, torch.randn(data.n_items, d_l))
        tensors |= with_prefix(PROJ_W, SemanticProjector(d_l).state_dict())
    return write_bundle(
        out / "bundle",
        variant,
        data,
        tensors,
        spec.history_length,
        info=info,
        spec=spec,
        tokenizer=tok,
        adapter=adapter,
        collab_dim=collab_dim if v.stage3 else None,
        mf_residual=v.mf_residual,
    )
