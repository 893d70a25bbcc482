"""Data-parallel training across processes: the same stage code under `torchrun`.

Launched with `torchrun --nproc_per_node N sellarec-train run ...` (or `accelerate launch`),
every process sees the same seeded batches; each takes its slice of every global batch,
sums its loss over its rows, divides by the global batch size and backpropagates; the
gradients are then summed across processes (all-reduce). That is the gradient of the
single-process mean loss, so one optimiser step on every rank keeps the replicas equal and
equal to a single-process run (up to float summation order). Without `WORLD_SIZE` (a plain
run) everything here is a no-op. Only rank 0 writes stage caches and bundles.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    """This process's place among the training processes."""

    #: Index of this process (0 is the one that writes).
    rank: int = 0
    #: Number of processes.
    size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def world() -> World:
    """Join the process group that torchrun/accelerate describe in the environment, once."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
        # Leave the group before the interpreter tears its threads down: a process that exits
        # with the group alive can abort in the backend's destructor ("terminate called
        # without an active exception"), failing a run whose work is done.
        atexit.register(_leave)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return World(rank=dist.get_rank(), size=dist.get_world_size())


def _leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def shard(batch: Sequence[int], w: World) -> list[int]:
    """This process's rows of a global batch (round robin, so lengths stay balanced)."""
    return list(batch[w.rank :: w.size])


def sum_gradients(params: Iterable[torch.nn.Parameter], w: World) -> None:
    """All-reduce (sum) the gradients; ranks without rows contribute zeros."""
    if w.size <= 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)


def total(value: float, w: World) -> float:
    """Sum of a float over the processes (for logging the global loss)."""
    if w.size <= 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t.item())


def barrier(w: World) -> None:
    if w.size > 1:
        dist.barrier()
