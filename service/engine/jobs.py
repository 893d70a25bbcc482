"""One request's model work, and how a batch of them runs on the model thread.

The engine turns a validated request into a `Job` (tokenised prefix and suffixes, the
collaborative and semantic inputs, the version's projections); the batcher hands lists of
jobs to `run_jobs`, which distills cold titles once per batch, projects the soft tokens
and asks the backend for P(Yes).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from sellarec.model.collab import Projections
from sellarec.model.encoding import Encoded
from sellarec.service.backends.torch_backend import Backend


@dataclass
class Job:
    """The work of one request: one user-level prefix and its (distinct) candidates."""

    #: Tokenised user-level prefix (instruction, history, `<User_ID>`).
    prefix: Encoded
    #: Tokenised per-candidate suffixes (`<Item_ID> <Warm_ID>`, title, answer cue).
    suffixes: list[Encoded]
    #: Collaborative vector of the user [d_C] (the neutral one for a cold user).
    user_collab: np.ndarray
    #: Collaborative vectors of the candidates [n, d_C] (neutral rows for cold items).
    item_collab: np.ndarray
    #: Semantic vector [d_L] of each candidate, or None where it must be distilled from its title.
    item_semantic: list[np.ndarray | None]
    #: Title of each candidate (the key of a distilled vector).
    titles: list[str]
    #: Distillation prompt of every title without a semantic vector (distilled only if the
    #: projections take semantics).
    distill: dict[str, Encoded]
    #: Projections of the store version the request snapshotted.
    projections: Projections

    @property
    def cost(self) -> int:
        """Token positions this job puts through the model."""
        return len(self.prefix) + sum(map(len, self.suffixes)) + sum(map(len, self.distill.values()))

    @property
    def size(self) -> int:
        """Candidates this job scores."""
        return len(self.suffixes)


@dataclass
class JobResult:
    """What the model thread gives back for one job."""

    #: P(Yes) per candidate, in the job's order.
    probabilities: np.ndarray
    #: Semantic vectors distilled for this job, by title (to be cached in the store).
    distilled: dict[str, np.ndarray]


def run_jobs(backend: Backend, jobs: Sequence[Job]) -> list[JobResult]:
    """Score a batch of jobs: one distillation call, one scoring call (the backend chunks).

    Inputs a version's projections do not take are never computed nor passed: titles are
    distilled only for a prompt with <Warm_ID>, MF vectors reach only one with <User_ID> or
    <Item_ID> (the soft tokens of absent slots are zeros that no prompt reads).
    """
    wanted: dict[str, Encoded] = {}
    for job in jobs:
        if job.projections.uses_semantic:
            wanted.update(job.distill)
    titles = list(wanted)
    vectors = backend.distill([wanted[t] for t in titles]) if titles else None
    distilled = {t: vectors[k].numpy() for k, t in enumerate(titles)} if vectors is not None else {}

    prefix_vectors, suffix_vectors, rows, suffixes, offsets = [], [], [], [], []
    with torch.inference_mode():
        for row, job in enumerate(jobs):
            projections, user, item, semantic = job.projections, None, None, None
            if projections.uses_collab:
                user = torch.from_numpy(np.stack([job.user_collab]))
                item = torch.from_numpy(np.stack(list(job.item_collab)))
            if projections.uses_semantic:
                pairs = zip(job.item_semantic, job.titles)
                semantic = torch.from_numpy(
                    np.stack([s if s is not None else distilled[t] for s, t in pairs])
                )
            prefix_vectors.append(projections.soft_vectors(user, None, None, 1).to(backend.device))
            suffix_vectors.append(projections.soft_vectors(None, item, semantic, job.size).to(backend.device))
            offsets.append(projections.mf_logits(user, item) if user is not None else None)
            rows += [row] * job.size
            suffixes += job.suffixes
    residual = None  # the MF residual of `sellarec-mf` versions (zero for the others in the batch)
    if any(o is not None for o in offsets):
        zero = lambda job: torch.zeros(job.size, dtype=torch.float64)  # noqa: E731
        residual = torch.cat([o if o is not None else zero(j) for o, j in zip(offsets, jobs, strict=True)])
    probabilities = backend.score(
        [job.prefix for job in jobs],
        torch.cat(prefix_vectors),
        rows,
        suffixes,
        torch.cat(suffix_vectors),
        residual,
    )
    results, start = [], 0
    for job in jobs:
        mine = {t: distilled[t] for t in job.distill if t in distilled}
        results.append(JobResult(probabilities[start : start + job.size], mine))
        start += job.size
    return results
