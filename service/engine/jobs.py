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

from sellarec.model.encoding import Encoded
from sellarec.service.backends.projections import Projections
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
    #: Distillation prompt of every title this job needs distilled.
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
    """Score a batch of jobs: one distillation call, one scoring call (the backend chunks)."""
    wanted: dict[str, Encoded] = {}
    for job in jobs:
        wanted.update(job.distill)
    titles = list(wanted)
    vectors = backend.distill([wanted[t] for t in titles]) if titles else None
    distilled = {t: vectors[k].numpy() for k, t in enumerate(titles)} if vectors is not None else {}

    prefix_vectors, suffix_vectors, rows, suffixes = [], [], [], []
    for row, job in enumerate(jobs):
        user = torch.from_numpy(np.stack([job.user_collab]))
        prefix_vectors.append(job.projections.soft_vectors(user, None, None, 1).to(backend.device))
        semantic = np.stack(
            [s if s is not None else distilled[t] for s, t in zip(job.item_semantic, job.titles)]
        )
        item = torch.from_numpy(np.stack(list(job.item_collab)))
        suffix_vectors.append(
            job.projections.soft_vectors(None, item, torch.from_numpy(semantic), job.size).to(backend.device)
        )
        rows += [row] * job.size
        suffixes += job.suffixes
    probabilities = backend.score(
        [job.prefix for job in jobs], torch.cat(prefix_vectors), rows, suffixes, torch.cat(suffix_vectors)
    )
    results, start = [], 0
    for job in jobs:
        mine = {t: distilled[t] for t in job.distill}
        results.append(JobResult(probabilities[start : start + job.size], mine))
        start += job.size
    return results
