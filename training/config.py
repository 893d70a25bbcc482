"""Run configuration: dataclasses whose defaults are the paper's, loaded from one YAML file.

Where the paper gives no value, the default is ours and says so in its field comment
("choice"). A variant (MF, TALLRec, CoLLM, SeLLa-Rec and its ablations) is a set of
switches over the same stages, see `VARIANTS`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sellarec.model.collab import DEFAULT_COLLAB_DIM
from sellarec.model.lora import LoraSettings
from sellarec.model.prompts import ALL_SLOTS, DEFAULT_ANSWER_CUE, HISTORY_LENGTH, Slot


@dataclass
class DataConfig:
    """Where the CoLLM-format splits are."""

    #: Training split (parquet, CoLLM columns); in a YAML file, relative to that file.
    train: str = ""
    #: Validation split: early stopping of stage 2 and the reported table (relative likewise).
    valid: str = ""
    #: Dataset name recorded in manifests.
    name: str = "ml-1m"
    #: Item domain of the prompt wording ("movie" or "book").
    domain: str = "movie"


@dataclass
class PromptConfig:
    """The prompt decision (recorded in every manifest)."""

    #: Text between the template and the answer (choice: the paper does not show one).
    answer_cue: str = DEFAULT_ANSWER_CUE
    #: Liked items listed in the prompt (paper: the last 10).
    history_length: int = HISTORY_LENGTH


@dataclass
class Stage1Config:
    """Stage 1: LoRA on the text-only prompt, BCE on P(Yes) (paper Eq. 5)."""

    #: LoRA rank (paper: 8).
    lora_r: int = 8
    #: LoRA alpha (paper: 16).
    lora_alpha: int = 16
    #: LoRA dropout (choice, TALLRec's 0.05).
    lora_dropout: float = 0.05
    #: Adapted modules (paper: q_proj, v_proj).
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    #: AdamW learning rate (paper: 1e-4).
    lr: float = 1e-4
    #: Rows per optimiser step (choice; the paper's effective batch is larger).
    batch_size: int = 8
    #: Training rows drawn (seeded) from the train split; 0 or less means all of it.
    budget: int = 0
    #: Passes over the drawn rows.
    epochs: int = 1
    #: Optimiser steps of linear learning-rate warm-up from 0 (choice; None: none).
    warmup_steps: int | None = None
    #: LoRA on the top N decoder layers only (budget choice; paper: every layer). None: all.
    lora_top_layers: int | None = None

    def lora(self) -> LoraSettings:
        return LoraSettings(
            r=self.lora_r,
            alpha=self.lora_alpha,
            dropout=self.lora_dropout,
            target_modules=list(self.target_modules),
            top_layers=self.lora_top_layers or 0,
        )


@dataclass
class DistillConfig:
    """Distillation of E_I^L with the stage-1 LoRA on (paper Fig. 3)."""

    #: Titles per forward batch.
    batch_size: int = 64


@dataclass
class Stage2Config:
    """Stage 2: MF + lambda * InfoNCE (paper Eq. 8), early stopping on validation AUC."""

    #: Collaborative dimension d_C (paper: 256).
    collab_dim: int = DEFAULT_COLLAB_DIM
    #: Adam learning rate of MF and Proj C->L (choice, CoLLM's MF uses 1e-3).
    lr: float = 1e-3
    #: Weight decay (choice, CoLLM's MF uses 1e-4... applied as L2 through Adam).
    weight_decay: float = 1e-4
    #: Weight decay of Proj C->L alone (None: `weight_decay`). InfoNCE on cosines does not see
    #: the projection's scale, so decay shrinks it freely, and stage 3 starts from its output.
    proj_weight_decay: float | None = None
    #: Interactions per step (choice).
    batch_size: int = 1024
    #: Weight lambda of the alignment loss (choice; the paper tunes it).
    align_weight: float = 0.1
    #: InfoNCE temperature tau (choice).
    temperature: float = 0.1
    #: Maximum epochs.
    max_epochs: int = 200
    #: Epochs without a better validation AUC before stopping.
    patience: int = 10


@dataclass
class Stage3Config:
    """Stage 3: frozen LLM + LoRA; MF tables, semantic table and both projections trained (Eq. 11)."""

    #: AdamW learning rate (choice, CoLLM's 1e-4 scaled up for small budgets in the YAML).
    lr: float = 1e-4
    #: Weight decay of the projections (choice; none on the embedding tables).
    weight_decay: float = 1e-3
    #: Rows per optimiser step.
    batch_size: int = 8
    #: Training rows drawn (seeded) from the train split; 0 or less means all of it.
    budget: int = 0
    #: Passes over the drawn rows.
    epochs: int = 1
    #: Scale of the soft tokens (choice; the paper leaves it free): "backbone" pins every
    #: projected vector to the median norm of the backbone's token embeddings (only its
    #: direction is learned); "free" is the paper-literal unconstrained output, which
    #: training/configs/ml1m.yaml runs (measured better there, docs/results.md).
    soft_token_scale: str = "backbone"
    #: With `soft_token_scale` "backbone": the pinned norm as a multiple of the vocabulary's
    #: median embedding norm (choice; 1.0 is that norm itself).
    soft_token_gain: float = 1.0
    #: Learning-rate schedule after the warm-up (choice): None holds the rate; "cosine" decays
    #: it to 0 by the last step.
    lr_schedule: str | None = None
    #: Optimiser steps of linear warm-up from 0, as in stage 1 (None: none).
    warmup_steps: int | None = None
    #: How the warm-started Proj C->L (SeLLa-Rec) enters stage 3 (choice): None loads stage 2's
    #: aligned projection as it is (the paper); "anchored" keeps its directions but starts every
    #: token near one shared anchor, as a fresh projection does (model.collab.anchored_warm_start);
    #: "balanced" also gives it a fresh projection's step sizes (model.collab.balanced_warm_start).
    warm_start: str | None = None
    #: AdamW learning rate of the MF and semantic tables (choice; None: `lr`, as the paper
    #: trains them with the rest; 0 freezes them, so stage 3 fits only the projections).
    table_lr: float | None = None
    #: What Proj W->L is trained on (choice): None reads the distilled semantics as they are
    #: (the paper); "centered" trains it on (s - mean) / spread over the items, so its steps
    #: move what tells items apart rather than the direction every item shares (cosine 0.95
    #: on SmolLM2), then folds mean and spread into its weights: the bundle and the serving
    #: path are unchanged (training.stage3.CenteredInputs).
    semantic_inputs: str | None = None
    #: Largest global L2 norm of the summed gradient of one step (choice; None: unclipped, as
    #: in the paper). A larger gradient is scaled down to this norm before the optimiser step,
    #: so one step's spike does not enter Adam's moments at full size.
    max_grad_norm: float | None = None
    #: Share of the stage-3 rows whose user enters as the neutral vector (the mean trained MF
    #: user) instead of their own MF row (choice; 0: every row its own, as in the paper).
    #: Evaluation and the service give that vector to every user the MF never saw, which on
    #: ML-1M's temporal split is about a third of the validation rows; at 0 stage 3 never
    #: shows it to the LLM, so those rows reach it out of distribution. At 0.35 on ML-1M, seeds 0
    #: and 1: CoLLM +0.010 and +0.018 AUC, SeLLa-Rec -0.010 and -0.010 (docs/results.md), so
    #: training/configs/ml1m.yaml leaves it at 0.
    neutral_user_rate: float = 0.0
    #: Where the stage ends (choice; None: at the last step's weights, as in the paper): a
    #: fraction f in [0, 1) ends it at the uniform average of every trained weight over the
    #: steps after the first f of them (training.loop.TailAverage), so the bundle does not
    #: carry wherever the last noisy step of a constant learning rate left the weights. At 0.5
    #: on ML-1M, seeds 0 and 1: CoLLM +0.005 and +0.015 AUC, SeLLa-Rec -0.004 and -0.046
    #: (docs/results.md), so training/configs/ml1m.yaml leaves it unset.
    average_from: float | None = None
    #: Whether the MF whose vectors stage 3 reads is fit without stage 3's own rows (choice;
    #: False: stage 2 fits every train row, as in the paper). On the rows it was fit to an MF
    #: already explains the labels (ML-1M: BCE 0.336 on the stage-3 rows, 0.645 on
    #: validation), so stage 3 learns how far to trust its soft tokens from rows where they
    #: are better than they will be on any new row. True fits stage 2 on the train split less
    #: the stage-3 sample (training.assembly.held_out); the `sellarec-mf` extension always does.
    held_out_mf: bool = False
    #: Share of each stage-3 row's BCE target taken from the MF the soft tokens come from
    #: (choice; 0: the row's label alone, as in the paper). At w > 0 the target is
    #: (1 - w) * label + w * sigmoid(<u, v>), the MF's probability of the row as stage 3 starts
    #: (knowledge distillation; the teacher is frozen). A label says little about one row's
    #: probability; the MF's probability says more, so the same rows teach the LLM to read its
    #: soft tokens with less noise. Only honest with `held_out_mf`: on the rows the MF was fit
    #: to it has learnt their labels (BCE 0.336 there on ML-1M), so it would teach that
    #: confidence. The recorded stage-3 loss is then against the mixed targets, so it does not
    #: fall to the base-rate BCE's scale as a label-only loss does.
    teacher_weight: float = 0.0
    #: Whether stage 3 trains one free scalar added to every logit (choice; False: none, as
    #: in the paper). It starts where the mean P(Yes) of a seeded 64-row sample equals the
    #: train base rate and is trained with the rest. The LLM starts stage 3 miscalibrated (a
    #: loss near 1.0 against the base rate's 0.69 on ML-1M), and without the scalar the first
    #: steps move the soft tokens' projection to shift the mean prediction: its gradient norm
    #: reached 1,676 in the first 10 steps of a seed that then failed (docs/results.md). A
    #: constant added to every score changes no ranking (AUC, UAUC, /rerank), so the bundle and
    #: the service leave it out; done.json records it.
    logit_offset: bool = False
    #: AdamW learning rate of the stage-1 LoRA in stage 3 (choice; None: the LoRA stays frozen,
    #: as the paper's Table 1 has it). When set, the adapter loaded from stage 1 keeps training
    #: beside the tables and projections, so the LLM learns to read its soft tokens instead of
    #: only the soft tokens learning to be read; the bundle then carries that adapter. The prompt
    #: text before the first slot still runs under no_grad (with the current adapter, refreshed
    #: every step): the LoRA learns through the slots-to-answer part of each prompt.
    lora_lr: float | None = None
    #: Whether Proj C->L starts stage 3 with the MF's user and item levels in the LLM's logit
    #: (choice; False: it starts as stage 2 or a fresh initialisation left it, as in the paper).
    #: The MF logit <u, v> is a user level <u, v0>, an item level <u0, v> and their interaction
    #: (u0, v0: the stage-3 rows' mean user and item); the two levels are linear in one vector
    #: each, so a rank-two update of the projection's last layer, along the directions that move
    #: the LLM's logit through one slot and not the other, puts them in the logit from the first
    #: step, rescaled until the measured change follows them with slope 1
    #: (training.level_start). Stage 3 then trains everything as before. The between-user level
    #: is where the LLM rows lose to MF on ML-1M (docs/results.md, "Where the gap to MF lies").
    level_init: bool = False
    #: With `level_init`: the largest multiple of the first-order update the rescaling may
    #: reach (1: the first-order step itself; on ML-1M seed 0 an uncapped rescaling reached
    #: 20x, where the LLM's logit no longer follows, and stage 3 ended lower, docs/results.md).
    level_max_scale: float = 1.0
    #: With `level_init`: whether each level is fit to read zero from the other table (the
    #: projection is shared by `<User_ID>` and `<Item_ID>`), else the directions alone keep the
    #: two slots apart.
    level_exclusive: bool = True
    #: Whether Proj C->L ends stage 3 with the same rank-two update as `level_init`, measured at
    #: the trained weights and kept at the multiple (0, 0.5, 1, 2 or 4) whose BCE on 256 seeded
    #: stage-3 rows is lowest (choice; False: the weights training left, as in the paper). The
    #: levels a start puts in do not survive training (docs/results.md); given at the end they
    #: cannot be trained away. On ML-1M (levels on their own table) +0.009, -0.032 and 0 AUC at
    #: seeds 0, 1, 2, so training/configs/ml1m.yaml leaves it off.
    level_finish: bool = False


@dataclass
class EvalConfig:
    """Evaluation of each variant on the validation split."""

    #: Rows scored per forward (prefix groups are packed up to this many rows).
    batch_size: int = 16
    #: Validation rows drawn with `seed`; 0 or less means all of them.
    limit: int = 0
    #: Seed of the validation sample (shared by every variant).
    seed: int = 0


@dataclass
class RunConfig:
    """Everything a `sellarec-train run` needs."""

    #: Backbone spec (alias, path or hub id).
    backbone: str = "smollm2-135m-instruct"
    #: Seed of sampling and initialisation.
    seed: int = 0
    #: torch intra-op threads (0: leave torch's default).
    threads: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    stage1: Stage1Config = field(default_factory=Stage1Config)
    distill: DistillConfig = field(default_factory=DistillConfig)
    stage2: Stage2Config = field(default_factory=Stage2Config)
    stage3: Stage3Config = field(default_factory=Stage3Config)
    eval: EvalConfig = field(default_factory=EvalConfig)


@dataclass(frozen=True)
class Variant:
    """Switches that turn the shared stages into one of the paper's methods."""

    #: Name used on the command line and in manifests.
    name: str
    #: Train the LoRA (stage 1) and use it.
    lora: bool = True
    #: Score with the LLM (False: MF dot product).
    llm: bool = True
    #: Run stage 3 (False: the stage-1 prompt is the model).
    stage3: bool = True
    #: Stage 2 with the alignment loss.
    align: bool = True
    #: Warm-start Proj C->L from stage 2 (False: random init).
    warm_start: bool = True
    #: Slots of the stage-3 prompt.
    slots: tuple[Slot, ...] = ALL_SLOTS
    #: Extension, not a paper variant: the LLM's logit is a residual on the MF dot product of
    #: the same user and item vectors, in stage 3's loss and in every score of the bundle; its
    #: stage 2 is fit without the stage-3 rows (training.assembly.held_out).
    mf_residual: bool = False


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in [
        Variant("mf", lora=False, llm=False, stage3=False, align=False, warm_start=False, slots=()),
        Variant("zeroshot", lora=False, stage3=False, align=False, warm_start=False, slots=()),
        Variant("tallrec", stage3=False, align=False, warm_start=False, slots=()),
        Variant("collm", align=False, warm_start=False, slots=(Slot.USER, Slot.ITEM)),
        Variant("sellarec"),
        Variant("sella-proj", warm_start=False),
        Variant("sella-warm", slots=(Slot.USER, Slot.ITEM)),
        Variant("sella-ui", slots=(Slot.WARM,)),
        Variant("sellarec-mf", mf_residual=True),  # extension: SeLLa-Rec as a residual on MF
    ]
}


def _build(cls: type, values: dict[str, Any]) -> Any:
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(values) - set(known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys {sorted(unknown)}; known: {sorted(known)}")
    kwargs = {}
    for name, value in values.items():
        sub = known[name].default_factory if known[name].default_factory is not dataclasses.MISSING else None
        if sub is not None and dataclasses.is_dataclass(sub) and isinstance(value, dict):
            value = _build(sub, value)
        kwargs[name] = _number(cls, name, value)
    return cls(**kwargs)


def _number(cls: type, name: str, value: Any) -> Any:
    """`value` as the float a float field expects: YAML 1.1 reads "3e-3" (no dot) as a string."""
    hint = typing.get_type_hints(cls).get(name)
    if float not in (hint, *typing.get_args(hint)) or not isinstance(value, str):
        return value
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"{cls.__name__}.{name} must be a number, not {value!r}") from None


def parse_sets(items: list[str] | None) -> dict[str, Any]:
    """`--set KEY=VALUE` items as load_config overrides: a dotted key, a YAML value."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{item!r} is not KEY=VALUE")
        out[key.strip()] = yaml.safe_load(value)
    return out


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read a YAML file into RunConfig; `overrides` use dotted keys ("stage1.budget").

    Data paths in the file are relative to the file; paths given as overrides, to the
    working directory.
    """
    raw: dict[str, Any] = yaml.safe_load(Path(path).read_text()) or {} if path else {}
    data = raw.get("data") if isinstance(raw.get("data"), dict) else None
    if path and data:
        for split in ("train", "valid"):
            if isinstance(data.get(split), str) and data[split]:
                data[split] = str((Path(path).parent / Path(data[split]).expanduser()).resolve())
    for dotted, value in (overrides or {}).items():
        node = raw
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        if dotted in ("data.train", "data.valid") and isinstance(value, str) and value:
            value = str(Path(value).expanduser().resolve())
        node[leaf] = value
    return _build(RunConfig, raw)


def fingerprint(*parts: Any) -> str:
    """Short stable hash of config pieces: the cache key of a stage."""
    blob = json.dumps(
        [_keyed(dataclasses.asdict(p)) if dataclasses.is_dataclass(p) else p for p in parts],
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def _keyed(fields: dict[str, Any]) -> dict[str, Any]:
    """A config's fields minus those left at None: an optional field added later keeps every
    existing cache key (and every earlier run directory) valid."""
    return {k: _keyed(v) if isinstance(v, dict) else v for k, v in fields.items() if v is not None}
