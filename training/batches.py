"""Rows -> prompts -> token ids, batched by length, and the lookup of collaborative inputs.

Length bucketing: training shuffles, then sorts each window of a few batches by length so
that neighbours pad little; evaluation sorts every user-level prefix group by length.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from sellarec.model.encoding import Encoded, PromptEncoder
from sellarec.model.prompts import Prompt, Slot, TemplateSpec, scoring_prompt

#: Batches per window sorted by length in training (the rest of the order stays random).
BUCKET_WINDOW = 8


def row_prompts(spec: TemplateSpec, frame: pd.DataFrame) -> list[Prompt]:
    """The scoring prompt of every row (history titles oldest first, last ones kept)."""
    return [
        scoring_prompt(spec, his, title)
        for his, title in zip(frame["his_title"], frame["title"], strict=True)
    ]


def split_before_first_slot(encoder: PromptEncoder, prompt: Prompt) -> tuple[Encoded, Encoded]:
    """(text before the first slot, rest): the first part has no trainable input (stage 3)."""
    cut = next((k for k, s in enumerate(prompt.segments) if isinstance(s, Slot)), len(prompt.segments))
    return encoder.segments(prompt.segments[:cut], lead=True), encoder.segments(prompt.segments[cut:])


def training_batches(lengths: Sequence[int], batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffled batches of row indices; within each window of batches rows are length-sorted."""
    order = rng.permutation(len(lengths))
    window = batch_size * BUCKET_WINDOW
    batches = []
    for start in range(0, len(order), window):
        chunk = order[start : start + window]
        chunk = chunk[np.argsort([lengths[i] for i in chunk], kind="stable")]
        batches += [chunk[k : k + batch_size] for k in range(0, len(chunk), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def grouped_batches(
    keys: Sequence, lengths: Sequence[int], batch_size: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Like `training_batches`, but rows with the same key (the same no-grad prompt head)
    go to the same batch where they fit, so each batch runs fewer distinct heads.

    Groups are shuffled, length-sorted within windows, and packed whole into batches of at
    most `batch_size` rows (a larger group is split); batch order is shuffled.
    """
    index: dict = {}
    for row, key in enumerate(keys):
        index.setdefault(key, []).append(row)
    groups = [np.asarray(rows) for rows in index.values()]
    groups = [groups[i] for i in rng.permutation(len(groups))]
    window = batch_size * BUCKET_WINDOW
    batches: list[np.ndarray] = []
    current: list[int] = []
    pending: list[np.ndarray] = []
    size = 0

    def flush_window() -> None:
        nonlocal current
        for g in sorted(pending, key=lambda g: lengths[int(g[0])]):
            for start in range(0, len(g), batch_size):
                part = g[start : start + batch_size].tolist()
                if len(current) + len(part) > batch_size:
                    batches.append(np.asarray(current))
                    current = []
                current += part
        pending.clear()

    for g in groups:
        pending.append(g)
        size += len(g)
        if size >= window:
            flush_window()
            size = 0
    flush_window()
    if current:
        batches.append(np.asarray(current))
    return [batches[i] for i in rng.permutation(len(batches))]


@dataclass
class PrefixGroup:
    """Rows that share one user-level prefix (same user, same prompt text up to the item)."""

    #: The encoded prefix (instruction, history, user slot).
    prefix: Encoded
    #: User id whose vector fills the prefix's slot.
    uid: int
    #: Row indices (into the frame) of the candidates.
    rows: list[int]


def prefix_groups(
    encoder: PromptEncoder, prompts: Sequence[Prompt], uids: Sequence[int]
) -> tuple[list[PrefixGroup], list[Encoded]]:
    """Group rows by (user, prefix ids); also return every row's encoded suffix."""
    groups: dict[tuple[int, tuple[int, ...]], PrefixGroup] = {}
    suffixes = []
    for row, (prompt, uid) in enumerate(zip(prompts, uids, strict=True)):
        prefix, suffix = encoder.split(prompt)
        suffixes.append(suffix)
        key = (int(uid), prefix.ids)
        if key not in groups:
            groups[key] = PrefixGroup(prefix=prefix, uid=int(uid), rows=[])
        groups[key].rows.append(row)
    return sorted(groups.values(), key=lambda g: len(g.prefix)), suffixes


def pack_groups(groups: Sequence[PrefixGroup], max_rows: int) -> Iterator[list[PrefixGroup]]:
    """Consecutive groups packed until a pack holds at least `max_rows` rows."""
    pack: list[PrefixGroup] = []
    rows = 0
    for g in groups:
        pack.append(g)
        rows += len(g.rows)
        if rows >= max_rows:
            yield pack
            pack, rows = [], 0
    if pack:
        yield pack


@dataclass
class CollabInputs:
    """Collaborative inputs by external id, neutral vectors for ids the tables do not know."""

    #: [U, d_C] MF user table or None.
    users: torch.Tensor | None
    #: [I, d_C] MF item table or None.
    items: torch.Tensor | None
    #: [I, d_L] semantic item table or None.
    semantic: torch.Tensor | None
    #: External user id -> row.
    user_rows: dict[str, int]
    #: External item id -> row.
    item_rows: dict[str, int]
    #: Neutral vectors (mean of the tables): "user", "item", "semantic".
    neutral: dict[str, torch.Tensor]

    def _take(
        self, table: torch.Tensor | None, rows: dict[str, int], ids: Sequence, neutral: str
    ) -> torch.Tensor | None:
        if table is None:
            return None
        index = torch.tensor([rows.get(str(i), -1) for i in ids], dtype=torch.long)
        out = table[index.clamp(min=0)]
        unknown = index < 0
        if bool(unknown.any()):
            out = torch.where(unknown[:, None], self.neutral[neutral].to(out.dtype)[None, :], out)
        return out

    def user(self, ids: Sequence) -> torch.Tensor | None:
        return self._take(self.users, self.user_rows, ids, "user")

    def item(self, ids: Sequence) -> torch.Tensor | None:
        return self._take(self.items, self.item_rows, ids, "item")

    def item_semantic(self, ids: Sequence) -> torch.Tensor | None:
        return self._take(self.semantic, self.item_rows, ids, "semantic")


def base_rate_bce(labels: torch.Tensor) -> float:
    """BCE of the best constant prediction (the label mean): what a model that learned
    nothing about the rows reaches, and what a training loss must fall clearly below."""
    p = float(labels.float().mean()) if len(labels) else 0.5
    p = min(max(p, 1e-6), 1 - 1e-6)
    return float(-(p * np.log(p) + (1 - p) * np.log(1 - p)))
