"""Small real models and bundles for tests: a tiny random Qwen2 with SmolLM2's tokenizer."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch
from transformers import Qwen2Config

from sellarec.model.artifacts import Catalog, Manifest, TemplateRecord, backbone_record, save_bundle
from sellarec.model.backbone import SMOLLM2_ALIAS, load_backbone, load_tokenizer, random_backbone
from sellarec.model.collab import CollabProjector, SemanticProjector
from sellarec.model.lora import LoraSettings, attach_lora
from sellarec.model.prompts import ALL_SLOTS, Slot, TemplateSpec
from sellarec.model.scoring import answer_token_ids

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
        "mf.users": torch.randn(n_users, collab_dim),
        "mf.items": torch.randn(n_items, collab_dim),
        "semantic.items": torch.randn(n_items, d_l),
    }
    tensors["neutral.user"] = tensors["mf.users"].mean(0)
    tensors["neutral.item"] = tensors["mf.items"].mean(0)
    tensors["neutral.semantic"] = tensors["semantic.items"].mean(0)
    tensors |= {f"proj_c.{k}": v for k, v in proj_c.state_dict().items()}
    tensors |= {f"proj_w.{k}": v for k, v in proj_w.state_dict().items()}
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
