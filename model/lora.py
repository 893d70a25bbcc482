"""PEFT LoRA on the backbone: attach for stage 1, load frozen for stages 2-3 and serving (or
trainable for stage 3 with `stage3.lora_lr`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import PreTrainedModel


@dataclass
class LoraSettings:
    """LoRA hyper-parameters; defaults follow TALLRec/CoLLM, which the paper builds on."""

    #: Rank of the update.
    r: int = 8
    #: Scaling numerator (the update is scaled by alpha / r).
    alpha: int = 16
    #: Dropout on the LoRA input during training.
    dropout: float = 0.05
    #: Module names to adapt; q_proj/v_proj exist in Llama, Qwen2 and most HF decoders.
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    #: Adapt only the top `top_layers` decoder layers (0: every layer). Nothing below the
    #: lowest adapted layer needs gradients, so the backward pass stops there.
    top_layers: int = 0


def attach_lora(model: PreTrainedModel, settings: LoraSettings) -> PeftModel:
    """Wrap the backbone with a fresh, trainable LoRA (the backbone itself stays frozen)."""
    layers = None
    if settings.top_layers > 0:
        n = int(model.config.get_text_config().num_hidden_layers)
        layers = list(range(max(0, n - settings.top_layers), n))
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(settings.target_modules),
        layers_to_transform=layers,
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def load_lora(model: PreTrainedModel, adapter_dir: str | Path, trainable: bool = False) -> PeftModel:
    """Load a saved adapter (PEFT's safetensors layout) in eval mode (no LoRA dropout), frozen;
    `trainable` leaves the adapter's own weights (never the backbone's) receiving gradients."""
    peft_model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=trainable)
    if not trainable:
        return freeze(peft_model)
    return peft_model.eval()


def adapter_parameters(model: PeftModel) -> list[nn.Parameter]:
    """The LoRA weights of `model` that receive gradients."""
    return [p for n, p in model.named_parameters() if "lora_" in n and p.requires_grad]


def freeze(model: PeftModel | PreTrainedModel) -> PeftModel | PreTrainedModel:
    """No parameter of the LLM (backbone or LoRA) receives gradients any more."""
    model.requires_grad_(False)
    return model.eval()


def merge(model: PeftModel) -> PreTrainedModel:
    """Fold the LoRA into the backbone weights: same outputs, no adapter overhead."""
    return model.merge_and_unload()
