"""Stage 3 (Eq. 11): frozen LLM + stage-1 LoRA; MF tables, semantic table, Proj C->L and
Proj W->L trained by BCE on P(Yes) of the stage-3 prompt.

The prompt text before the first slot has no trainable input, so its keys/values are
computed under no_grad (once per distinct prefix in the batch) and only the rest of the
prompt (slots, target title, answer cue) runs with autograd. Same numbers as the plain
path (tested), a fraction of the backward.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from peft import PeftModel
from scipy.optimize import brentq
from scipy.special import expit
from torch import nn

from sellarec.model.backbone import load_backbone
from sellarec.model.collab import (
    CollabProjector,
    SemanticProjector,
    anchored_warm_start,
    balanced_warm_start,
    vocabulary_norm,
)
from sellarec.model.encoding import Encoded
from sellarec.model.lora import adapter_parameters, load_lora, merge
from sellarec.model.prompts import Slot, TemplateSpec
from sellarec.model.sella import SellaRec
from sellarec.model.shared_head import SharedHead
from sellarec.training.batches import grouped_batches, row_prompts, split_before_first_slot
from sellarec.training.bundles import masked_mean
from sellarec.training.config import Stage3Config
from sellarec.training.level_start import (
    CHECK_ROWS,
    FINISH_CHECK_ROWS,
    FIT_ROWS,
    LevelRows,
    level_finish,
    level_start,
)
from sellarec.training.loop import TailAverage, lr_scheduler, run_epochs


class SoftInputTables(nn.Module):
    """The trainable inputs of the soft tokens: MF users/items and semantic items.

    `trained_users` masks the users with training rows: their mean row is the neutral user
    vector that evaluation and the service give a user the MF never saw (training.bundles).
    """

    def __init__(
        self,
        users: torch.Tensor | None,
        items: torch.Tensor | None,
        semantic: torch.Tensor | None,
        trained_users: np.ndarray | None = None,
    ):
        super().__init__()
        self.users = nn.Parameter(users.clone().float()) if users is not None else None
        self.items = nn.Parameter(items.clone().float()) if items is not None else None
        self.semantic = nn.Parameter(semantic.clone().float()) if semantic is not None else None
        self.trained_users = (
            torch.as_tensor(trained_users, dtype=torch.bool) if trained_users is not None else None
        )

    def neutral_user(self) -> torch.Tensor:
        """The mean trained user row, as the bundle will store it; a constant for the step."""
        users = self.users.detach()
        return users.mean(0) if self.trained_users is None else masked_mean(users, self.trained_users)

    def vectors(
        self, scorer: SellaRec, uids: torch.Tensor, iids: torch.Tensor, neutral: torch.Tensor | None = None
    ) -> torch.Tensor:
        """[n, 3, d_L] projected soft tokens (Eq. 10) for (user, item) pairs; rows where the
        bool mask `neutral` is set enter with the neutral user vector instead of their own."""
        pick = lambda t, i: t[i] if t is not None else None  # noqa: E731
        users = self._users(uids, neutral)
        return scorer.soft_vectors(users, pick(self.items, iids), pick(self.semantic, iids), len(uids))

    def mf_logits(
        self, uids: torch.Tensor, iids: torch.Tensor, neutral: torch.Tensor | None = None
    ) -> torch.Tensor:
        """[n] MF dot products of the same rows (the `sellarec-mf` residual), neutral users as
        in `vectors`; gradients reach both tables."""
        return (self._users(uids, neutral) * self.items[iids]).sum(-1)

    def _users(self, uids: torch.Tensor, neutral: torch.Tensor | None) -> torch.Tensor | None:
        """The MF user rows of `uids`, the neutral vector where `neutral` is set (None: no table)."""
        if self.users is None:
            return None
        users = self.users[uids]
        if neutral is not None and bool(neutral.any()):
            users = torch.where(neutral[:, None], self.neutral_user(), users)
        return users


def neutral_rows(n: int, rate: float, seed: int) -> torch.Tensor | None:
    """Bool mask of the rows (a seeded `rate` share of `n`) whose user enters stage 3 as the
    neutral vector (`stage3.neutral_user_rate`); None at rate 0, drawing nothing."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"stage3.neutral_user_rate must be in [0, 1), not {rate}")
    if rate == 0.0:
        return None
    return torch.as_tensor(np.random.default_rng([seed, 7]).random(n) < rate)


def teacher_targets(
    tables: SoftInputTables,
    uids: torch.Tensor,
    iids: torch.Tensor,
    labels: torch.Tensor,
    weight: float,
    neutral: torch.Tensor | None = None,
) -> torch.Tensor:
    """[n] BCE targets of stage 3 (`stage3.teacher_weight`): (1 - weight) * label + weight *
    the MF's probability of the row from the tables as they are now (frozen: computed once);
    the labels themselves at weight 0."""
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"stage3.teacher_weight must be in [0, 1], not {weight}")
    if weight == 0.0:
        return labels
    if tables.users is None or tables.items is None:
        raise ValueError("stage3.teacher_weight needs the MF user and item tables (<User_ID> and <Item_ID>)")
    with torch.no_grad():
        teacher = torch.sigmoid(tables.mf_logits(uids, iids, neutral))
    return (1.0 - weight) * labels + weight * teacher


SOFT_TOKEN_SCALES = ("backbone", "free")
WARM_STARTS = (None, "anchored", "balanced")
SEMANTIC_INPUTS = (None, "centered")


class CenteredInputs(nn.Module):
    """A linear layer trained on `(x - mean) / spread`: `stage3.semantic_inputs=centered`.

    The distilled semantics share one direction (mean pairwise cosine 0.95 on SmolLM2), so a
    gradient step of Proj W->L on the raw vectors mostly moves that shared part, the same for
    every item. Trained on centred, unit-spread inputs its steps act on what tells items
    apart. `folded()` returns the plain layer computing the same map on raw inputs
    (W / spread, b - W mean / spread), which is what the bundle stores.
    """

    def __init__(self, linear: nn.Linear, mean: torch.Tensor, spread: float) -> None:
        super().__init__()
        if not spread > 0:
            raise ValueError(f"the semantics' spread must be > 0, not {spread}")
        self.linear = linear
        self.register_buffer("mean", mean.detach().clone().float())
        self.spread = float(spread)

    @classmethod
    def over(cls, linear: nn.Linear, semantic: torch.Tensor) -> CenteredInputs:
        """Centred on `semantic`'s mean row, scaled by the median norm of the centred rows."""
        mean = semantic.detach().float().mean(0)
        return cls(linear, mean, float((semantic.detach().float() - mean).norm(dim=1).median()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear((x - self.mean) / self.spread)

    @torch.no_grad()
    def folded(self) -> nn.Linear:
        weight = self.linear.weight / self.spread
        out = nn.Linear(weight.shape[1], weight.shape[0])
        out.weight.copy_(weight)
        out.bias.copy_(self.linear.bias - weight @ self.mean)
        return out


def build_scorer(
    backbone: str,
    adapter,
    spec: TemplateSpec,
    collab_dim: int,
    proj_c_state: dict | None,
    seed: int,
    soft_token_scale: str = "backbone",
    warm_start: str | None = None,
    collab_inputs: torch.Tensor | None = None,
    soft_token_gain: float = 1.0,
    train_lora: bool = False,
) -> SellaRec:
    """Frozen backbone with the stage-1 LoRA merged; projections fresh or warm-started.

    `soft_token_scale` "backbone" pins the projections' output norm to the vocabulary's
    median embedding norm (model.collab._Projector), times `soft_token_gain`; "free" leaves it
    as the paper does.
    `warm_start` "anchored" re-bases the warm start on a fresh projection's geometry over the
    MF rows `collab_inputs` (model.collab.anchored_warm_start), "balanced" also on its step
    sizes (model.collab.balanced_warm_start); None loads it as it is.
    `train_lora` keeps the adapter unmerged with its weights trainable (`stage3.lora_lr`).
    """
    if soft_token_scale not in SOFT_TOKEN_SCALES:
        raise ValueError(f"stage3.soft_token_scale: one of {SOFT_TOKEN_SCALES}, not {soft_token_scale!r}")
    if not soft_token_gain > 0:
        raise ValueError(f"stage3.soft_token_gain must be > 0, not {soft_token_gain}")
    if warm_start not in WARM_STARTS:
        raise ValueError(f"stage3.warm_start: one of {WARM_STARTS}, not {warm_start!r}")
    model, tokenizer, info = load_backbone(backbone)
    if train_lora and adapter is None:
        raise ValueError("stage3.lora_lr needs the stage-1 adapter to train")
    if adapter is not None:
        model = load_lora(model, adapter, trainable=True) if train_lora else merge(load_lora(model, adapter))
    pinned = soft_token_scale == "backbone"
    norm = vocabulary_norm(model.get_input_embeddings().weight) * soft_token_gain if pinned else 0.0
    torch.manual_seed(seed)
    uses_collab = Slot.USER in spec.slots or Slot.ITEM in spec.slots
    proj_c = CollabProjector(collab_dim, info.hidden_size, out_norm=norm) if uses_collab else None
    if proj_c is not None and proj_c_state:
        if warm_start is not None:
            if collab_inputs is None:
                raise ValueError(f"a {warm_start} warm start needs the MF rows it will project")
            rebase = anchored_warm_start if warm_start == "anchored" else balanced_warm_start
            proj_c_state = rebase(proj_c, proj_c_state, collab_inputs.float())
        proj_c.load_state_dict(proj_c_state | {"out_norm": torch.tensor(norm)})  # warm start from stage 2
    proj_w = SemanticProjector(info.hidden_size, out_norm=norm) if Slot.WARM in spec.slots else None
    return SellaRec(model, tokenizer, spec, proj_c=proj_c, proj_w=proj_w)


def split_loss(
    scorer: SellaRec,
    tables: SoftInputTables,
    heads: list[Encoded],
    tails: list[Encoded],
    uids: torch.Tensor,
    iids: torch.Tensor,
    labels: torch.Tensor,
    head: SharedHead | None = None,
    neutral: torch.Tensor | None = None,
    mf_residual: bool = False,
    offset: torch.Tensor | None = None,
) -> torch.Tensor:
    """BCE on P(Yes) with the slot-free heads run once each under no_grad; `neutral` as in
    SoftInputTables.vectors; `mf_residual` adds the rows' MF dot products to the logits,
    `offset` (`stage3.logit_offset`) one scalar to all of them."""
    logits = split_logits(scorer, tables, heads, tails, uids, iids, head, neutral, mf_residual)
    if offset is not None:
        logits = logits + offset
    return F.binary_cross_entropy_with_logits(logits, labels)  # Eq. 11


def split_logits(
    scorer: SellaRec,
    tables: SoftInputTables,
    heads: list[Encoded],
    tails: list[Encoded],
    uids: torch.Tensor,
    iids: torch.Tensor,
    head: SharedHead | None = None,
    neutral: torch.Tensor | None = None,
    mf_residual: bool = False,
    vectors: torch.Tensor | None = None,
) -> torch.Tensor:
    """[n] Yes/No logits of the rows, as `split_loss` trains them; `vectors` [n, 3, d_L]: these
    soft tokens instead of the tables' (for gradients with respect to the tokens themselves)."""
    unique: dict[tuple[int, ...], int] = {}
    rows = torch.tensor([unique.setdefault(h.ids, len(unique)) for h in heads])
    distinct = [None] * len(unique)
    for h in heads:
        distinct[unique[h.ids]] = h
    with torch.no_grad():
        state = head.run(distinct) if head is not None else scorer.run_prefixes(distinct)
    if vectors is None:
        vectors = tables.vectors(scorer, uids, iids, neutral)
    logits = scorer.score_suffixes(state, rows, tails, vectors)
    if mf_residual:
        logits = logits + tables.mf_logits(uids, iids, neutral)
    return logits


def calibrated_offset(logits: torch.Tensor, rate: float) -> float:
    """The scalar b with mean(sigmoid(logits + b)) = rate (the mean rises with b: one root)."""
    if not 0.0 < rate < 1.0:
        raise ValueError(f"a base rate must be in (0, 1), not {rate}")
    z = logits.detach().double().numpy()
    return float(brentq(lambda b: float(expit(z + b).mean()) - rate, -50.0, 50.0, xtol=1e-9))


def at_mf_levels(
    scorer: SellaRec,
    tables: SoftInputTables,
    shared: SharedHead,
    row_inputs: Callable[[list[int]], tuple],
    row_neutral: Callable[[list[int]], torch.Tensor | None],
    uids: torch.Tensor,
    iids: torch.Tensor,
    seed: int,
    max_scale: float = 1.0,
    exclusive: bool = True,
    labels: torch.Tensor | None = None,
) -> dict | None:
    """The MF's user and item levels put in the LLM's logit through Proj C->L
    (training.level_start), measured on seeded samples of the rows (`uids`, `iids`): at the
    start of stage 3 (`stage3.level_init`), or, given the rows' `labels`, at its end with the
    multiple chosen on them (`stage3.level_finish`). None where the prompt has neither
    `<User_ID>` nor `<Item_ID>`."""
    slots = [k for k, s in enumerate((Slot.USER, Slot.ITEM)) if s in scorer.spec.slots]
    if scorer.proj_c is None or tables.users is None or not slots:
        return None
    n_rows = len(uids)
    order = np.random.default_rng([seed, 13]).permutation(n_rows).tolist()
    wanted = CHECK_ROWS if labels is None else FINISH_CHECK_ROWS
    n_check = min(wanted, n_rows // 3)  # a small stage 3 (tests, the demo) splits what it has
    n_fit = min(FIT_ROWS, n_rows - n_check)

    def chunks(local: list[int]) -> list[list[int]]:
        return [local[s : s + 32] for s in range(0, len(local), 32)]

    def logits(local: list[int]) -> torch.Tensor:
        return torch.cat(
            [split_logits(scorer, tables, *row_inputs(c), shared, row_neutral(c)) for c in chunks(local)]
        )

    def gradients(local: list[int]) -> torch.Tensor:
        out = []
        for chunk in chunks(local):  # each row's logit depends on its own soft tokens only
            heads, tails, u, i = row_inputs(chunk)
            with torch.enable_grad():
                vectors = tables.vectors(scorer, u, i, row_neutral(chunk)).detach().requires_grad_(True)
                split_logits(scorer, tables, heads, tails, u, i, shared, vectors=vectors).sum().backward()
            out.append(vectors.grad)
        return torch.cat(out)

    rows = LevelRows(
        tables.users.detach(),
        tables.items.detach(),
        uids,
        iids,
        slots,
        fit_rows=order[:n_fit],
        check_rows=order[n_fit : n_fit + n_check],
        logits=logits,
        gradients=gradients,
    )
    if labels is not None:
        return level_finish(scorer.proj_c, rows, labels, exclusive=exclusive)
    return level_start(scorer.proj_c, rows, max_scale=max_scale, exclusive=exclusive)


def train_stage3(
    scorer: SellaRec,
    tables: SoftInputTables,
    train: pd.DataFrame,
    cfg: Stage3Config,
    seed: int,
    progress: bool = True,
    mf_residual: bool = False,
    on_step: Callable[[int], object] | None = None,
) -> dict:
    """Fit tables + projections on `train` (one pass per epoch, length-bucketed batches);
    `mf_residual` (the `sellarec-mf` extension) trains the LLM's logit as a residual on the MF
    dot product of the same rows, which the tables then also receive gradients through;
    `on_step(n)` runs after the n-th optimiser step (`training.loop.run_epochs`)."""
    encoder = scorer.encoder
    pieces = [split_before_first_slot(encoder, p) for p in row_prompts(scorer.spec, train)]
    uids = torch.as_tensor(train["uid"].to_numpy(copy=True), dtype=torch.long)
    iids = torch.as_tensor(train["iid"].to_numpy(copy=True), dtype=torch.long)
    labels = torch.as_tensor(train["label"].to_numpy(copy=True), dtype=torch.float32)
    neutral = neutral_rows(len(train), cfg.neutral_user_rate, seed)
    if cfg.semantic_inputs not in SEMANTIC_INPUTS:
        raise ValueError(f"stage3.semantic_inputs: one of {SEMANTIC_INPUTS}, not {cfg.semantic_inputs!r}")
    centered = cfg.semantic_inputs == "centered" and scorer.proj_w is not None and tables.semantic is not None
    if mf_residual and (tables.users is None or tables.items is None):
        raise ValueError("an MF residual needs the MF user and item tables (<User_ID> and <Item_ID>)")
    targets = teacher_targets(tables, uids, iids, labels, cfg.teacher_weight, neutral)
    if centered:  # trained on centred inputs, folded back into a plain layer below
        scorer.proj_w.net = CenteredInputs.over(scorer.proj_w.net, tables.semantic)
    projections = [p for p in (scorer.proj_c, scorer.proj_w) if p is not None]
    table_lr = cfg.lr if cfg.table_lr is None else cfg.table_lr
    if table_lr < 0:
        raise ValueError(f"stage3.table_lr must be >= 0, not {table_lr}")
    tables.requires_grad_(table_lr > 0)  # 0: the tables stay as stage 2 left them
    # One group per part (the names label the per-group gradient norms of done.json); the two
    # projections share their settings, so splitting them changes no step.
    table_params = list(tables.parameters()) if table_lr > 0 else []
    groups = [
        {"name": "tables", "params": table_params, "weight_decay": 0.0, "lr": table_lr},
        *(
            {"name": name, "params": list(m.parameters()), "weight_decay": cfg.weight_decay}
            for name, m in (("proj_c", scorer.proj_c), ("proj_w", scorer.proj_w))
            if m is not None
        ),
    ]
    lora = []
    if cfg.lora_lr is not None:
        if not isinstance(scorer.backbone, PeftModel) or not cfg.lora_lr >= 0:
            raise ValueError("stage3.lora_lr needs a scorer built with train_lora and a rate >= 0")
        lora = adapter_parameters(scorer.backbone)
        groups.append({"name": "lora", "params": lora, "weight_decay": 0.0, "lr": cfg.lora_lr})
    offset = torch.zeros((), requires_grad=True) if cfg.logit_offset else None
    if offset is not None:
        groups.append({"name": "offset", "params": [offset], "weight_decay": 0.0})
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr)
    params = [p for g in groups for p in g["params"]]
    for m in projections:
        m.train().requires_grad_(True)
    shared = SharedHead(scorer, [h for h, _ in pieces])  # the instruction's keys/values, once
    level = None
    rng = np.random.default_rng(seed)
    # Rows sharing a head (same user and history) share its no-grad forward.
    heads, lengths = [h.ids for h, _ in pieces], [len(h) + len(t) for h, t in pieces]

    def row_inputs(local: list[int]) -> tuple:
        """split_loss/split_logits' per-row arguments (heads, tails, uids, iids) of rows `local`."""
        b = torch.as_tensor(local)
        return [pieces[i][0] for i in local], [pieces[i][1] for i in local], uids[b], iids[b]

    def row_neutral(local: list[int]) -> torch.Tensor | None:
        return neutral[torch.as_tensor(local)] if neutral is not None else None

    def batch_loss(local: list[int], batch_size: int) -> torch.Tensor:
        if lora:  # the instruction's keys/values under the adapter as the last step left it
            shared.refresh()
        # Mean over this process's rows, rescaled to a share of the global batch mean.
        loss = split_loss(
            scorer,
            tables,
            *row_inputs(local),
            targets[torch.as_tensor(local)],
            shared,
            neutral=row_neutral(local),
            mf_residual=mf_residual,
            offset=offset,
        )
        return loss * (len(local) / batch_size)

    # The MF's levels in the LLM's logit (training.level_start); the residual has them already.
    levels = functools.partial(
        at_mf_levels,
        scorer,
        tables,
        shared,
        row_inputs,
        row_neutral,
        uids,
        iids,
        seed,
        exclusive=cfg.level_exclusive,
    )
    if cfg.level_init and not mf_residual:
        level = levels(max_scale=cfg.level_max_scale)
    if offset is not None:  # start at the base rate: the first steps need not move the soft tokens for it
        # A seeded sample of 64 rows, the same on every process.
        sample = np.random.default_rng([seed, 11]).permutation(len(pieces))[:64].tolist()
        with torch.no_grad():
            logits = split_logits(
                scorer, tables, *row_inputs(sample), shared, row_neutral(sample), mf_residual
            )
            offset.fill_(calibrated_offset(logits, float(labels.mean())))
        start_offset = float(offset.detach())

    def steps() -> int:  # counted on a copy of the generator (order unchanged)
        count = copy.deepcopy(rng)
        return sum(len(grouped_batches(heads, lengths, cfg.batch_size, count)) for _ in range(cfg.epochs))

    average = None
    if cfg.average_from is not None:
        if not 0 <= cfg.average_from < 1:
            raise ValueError(f"stage3.average_from must be in [0, 1) or unset, not {cfg.average_from}")
        average = TailAverage(params, start=int(cfg.average_from * steps()))
    run = run_epochs(
        "stage3",
        cfg.epochs,
        lambda: grouped_batches(heads, lengths, cfg.batch_size, rng),
        batch_loss,
        optimizer,
        params,
        lr_scheduler(optimizer, cfg.lr_schedule, cfg.warmup_steps, steps),
        progress=progress,
        max_grad_norm=cfg.max_grad_norm,
        average=average,
        on_step=on_step,
    )
    # After the run (and its averaging): on the weights the bundle ships.
    finish = levels(labels=labels) if cfg.level_finish and not mf_residual else None
    if centered:
        scorer.proj_w.net = scorer.proj_w.net.folded()
    for m in projections:
        m.eval().requires_grad_(False)
    for p in lora:
        p.requires_grad_(False)
    run.log_summary(f"stage3 {list(scorer.spec.slots)}", len(train), cfg.epochs)
    metrics = run.metrics(len(train), labels)
    if level is not None:
        metrics["level_start"] = level
    if finish is not None:
        metrics["level_finish"] = finish
    if offset is not None:  # rank-neutral, so the bundle leaves it out (Stage3Config.logit_offset)
        metrics["logit_offset"] = {"start": start_offset, "end": float(offset.detach())}
    return metrics
