"""The optimisation loop stages 1 and 3 share: batches -> this process's rows -> loss ->
backward -> summed gradients -> one optimiser step, with the loss of every step recorded.

A stage says what differs: its batches (length-bucketed, or grouped by prompt head), its
loss of a batch, its optimiser and scheduler. The loss function receives this process's
rows and the size of the global batch, and returns this process's share of the global
batch's loss (see distributed.py), so the summed gradients are those of one process.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from sellarec.training.batches import base_rate_bce
from sellarec.training.distributed import shard, sum_gradients, total, world

log = logging.getLogger("sellarec.train")

#: Loss of one batch: (this process's row indices, global batch size) -> scalar to backpropagate.
BatchLoss = Callable[[list[int], int], torch.Tensor]


@dataclass
class TrainingRun:
    """What a training loop leaves behind besides the trained weights."""

    #: Global loss of every optimiser step, in order.
    losses: list[float]
    #: Wall time of the loop.
    seconds: float
    #: Global L2 norm of the summed gradient of every step, before any clipping.
    grad_norms: list[float] = field(default_factory=list)
    #: The same norm per named optimiser parameter group ({"name": ...} in the group), so a
    #: spike can be traced to the part of the model it came from.
    group_grad_norms: dict[str, list[float]] = field(default_factory=dict)

    def last20(self) -> float | None:
        """Mean loss of the last 20 steps (None without steps)."""
        return float(np.mean(self.losses[-20:])) if self.losses else None

    def metrics(self, rows: int, labels: torch.Tensor) -> dict:
        """The stage's record in its done.json (the report plots `losses` against `base_rate_bce`)."""
        return {
            "rows": rows,
            "seconds": self.seconds,
            "loss_first": self.losses[0] if self.losses else None,
            "loss_last20": self.last20(),
            "losses": self.losses,
            "grad_norms": self.grad_norms,
            "group_grad_norms": self.group_grad_norms,
            "base_rate_bce": base_rate_bce(labels),
        }

    def log_summary(self, name: str, rows: int, epochs: int) -> None:
        """One line: rows, wall time, throughput, the last-20 loss."""
        log.info(
            "%s: %d rows, %.1fs (%.2f rows/s), last-20 loss %.4f",
            name,
            rows,
            self.seconds,
            rows * epochs / max(self.seconds, 1e-9),
            float(np.mean(self.losses[-20:] or [0.0])),
        )


class TailAverage:
    """Uniform average of `params` over the optimiser steps after the first `start` (Polyak
    averaging, the average of stochastic weight averaging): `apply` puts it in place of the
    last step's weights. At a constant learning rate the weights keep wandering around the
    minimum they reached; their average sits nearer its centre than any one step."""

    def __init__(self, params: Sequence[torch.nn.Parameter], start: int) -> None:
        if start < 0:
            raise ValueError(f"the average starts after step 0 or later, not {start}")
        self.params = list(params)
        self.start = start
        #: Optimiser steps seen, and how many of them are in the average.
        self.steps = 0
        self.averaged = 0
        self._mean: list[torch.Tensor] | None = None
        self._update = torch.optim.swa_utils.get_swa_multi_avg_fn()

    @torch.no_grad()
    def observe(self) -> None:
        """After an optimiser step."""
        self.steps += 1
        if self.steps <= self.start:
            return
        current = [p.detach() for p in self.params]
        if self._mean is None:
            self._mean = [c.clone() for c in current]
        else:
            self._update(self._mean, current, self.averaged)
        self.averaged += 1

    @torch.no_grad()
    def apply(self) -> None:
        """Copy the average into the parameters (nothing to do before the first averaged step)."""
        if self._mean is not None:
            torch._foreach_copy_(self.params, self._mean)


#: Learning-rate schedules a stage may name (None: constant after the warm-up).
SCHEDULES = ("cosine",)


def lr_scheduler(
    optimizer: torch.optim.Optimizer,
    schedule: str | None,
    warmup: int | None,
    steps: Callable[[], int],
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """Linear warm-up over `warmup` steps (none if unset), then the rate held (`schedule` None)
    or decayed along a cosine to 0 at the last of `steps()` (counted only when it is needed)."""
    if schedule is not None and schedule not in SCHEDULES:
        raise ValueError(f"lr_schedule: one of {SCHEDULES} or unset, not {schedule!r}")
    warmup = max(int(warmup or 0), 0)
    ramp = None
    if warmup:  # factor (k + 1) / (warmup + 1) at step k, then 1
        ramp = torch.optim.lr_scheduler.LinearLR(optimizer, 1.0 / (warmup + 1), total_iters=warmup)
    if schedule is None:
        return ramp
    total = steps()
    warmup = min(warmup, max(total - 1, 0))
    decay = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total - warmup, 1))
    if ramp is None or warmup == 0:
        return decay
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [ramp, decay], milestones=[warmup])


def run_epochs(
    name: str,
    epochs: int,
    batches: Callable[[], Sequence[Sequence[int]]],
    batch_loss: BatchLoss,
    optimizer: torch.optim.Optimizer,
    params: Sequence[torch.nn.Parameter],
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    progress: bool = True,
    max_grad_norm: float | None = None,
    average: TailAverage | None = None,
    on_step: Callable[[int], object] | None = None,
) -> TrainingRun:
    """`epochs` passes over `batches()` (called once per epoch, so a seeded generator it
    draws from gives the same order on every process), one optimiser step per batch; with
    `max_grad_norm` the summed gradient is clipped to that global L2 norm before each step;
    `average` observes every step and is applied at the end; `on_step(n)` runs after the
    n-th step (1-based), for snapshots."""
    if max_grad_norm is not None and not max_grad_norm > 0:
        raise ValueError(f"max_grad_norm must be > 0 or unset, not {max_grad_norm}")
    w = world()
    losses: list[float] = []
    grad_norms: list[float] = []
    named = [g for g in optimizer.param_groups if "name" in g]
    by_group: dict[str, list[float]] = {g["name"]: [] for g in named}
    start = time.perf_counter()
    for epoch in range(epochs):
        bar = tqdm(batches(), desc=f"{name} epoch {epoch}", disable=not progress, unit="batch")
        for batch in bar:
            local = shard(batch, w)
            optimizer.zero_grad(set_to_none=True)
            loss = torch.zeros(())
            if local:  # a process without rows still joins the gradient sum, with zeros
                loss = batch_loss(local, len(batch))
                loss.backward()
            sum_gradients(params, w)
            # Norm of the summed gradient (the same on every process), recorded before clipping.
            grads = [p.grad for p in params if p.grad is not None]
            norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
            grad_norms.append(float(norm))
            for g in named:
                own = [p.grad for p in g["params"] if p.grad is not None]
                by_group[g["name"]].append(float(torch.nn.utils.get_total_norm(own)) if own else 0.0)
            if max_grad_norm is not None and grads:
                torch.nn.utils.clip_grads_with_norm_(params, max_grad_norm, norm)
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            if average is not None:
                average.observe()
            losses.append(total(loss.item(), w))
            if on_step is not None:
                on_step(len(losses))
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
    if average is not None:
        average.apply()
    return TrainingRun(losses, time.perf_counter() - start, grad_norms, by_group)
