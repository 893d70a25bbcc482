"""How long work takes on this machine, measured: the basis of admission by time.

The batcher predicts a request's queue wait from the work ahead of it, priced with a cost
model learnt from the batches it has run, and refuses the request (429) when that wait
exceeds the budget. Nothing here is configured: a GPU and a shared 2-core CPU learn their
own prices within a few batches, and the prices follow the machine as its load changes.

The model is linear in two kinds of work (DESIGN.md section 8): token positions that run
without a cache (user-level prefixes and distillation prompts) and per-candidate suffix
positions, which also attend over their prefix. Seconds = a x prefix + b x suffix, fitted by
least squares on exponentially decayed sums, so recent batches weigh most.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Work:
    """What a request (or a batch) puts through the model."""

    #: Token positions run from scratch: the user-level prefix and any distillation prompts.
    prefix_tokens: int
    #: Per-candidate suffix positions (run over the shared prefix's keys and values).
    suffix_tokens: int

    def __add__(self, other: Work) -> Work:
        return Work(self.prefix_tokens + other.prefix_tokens, self.suffix_tokens + other.suffix_tokens)

    @property
    def tokens(self) -> int:
        return self.prefix_tokens + self.suffix_tokens

    def features(self) -> np.ndarray:
        return np.array([self.prefix_tokens, self.suffix_tokens], dtype=np.float64)


NO_WORK = Work(0, 0)


class CostModel:
    """Seconds per prefix token and per suffix token, learnt from measured batches.

    `decay` is the weight the past keeps at each observation (0.9: about the last ten
    batches count). Until the first observation it assumes `initial_s_per_token` for both.
    """

    def __init__(self, decay: float = 0.9, initial_s_per_token: float = 1e-3) -> None:
        self.decay = decay
        self._xx = np.zeros((2, 2))
        self._xy = np.zeros(2)
        self._seconds = 0.0
        self._tokens = 0.0
        self._initial = initial_s_per_token
        self.observations = 0

    def observe(self, work: Work, seconds: float) -> None:
        """Record that `work` took `seconds` of model time."""
        if work.tokens <= 0 or seconds < 0:
            return
        x = work.features()
        self._xx = self.decay * self._xx + np.outer(x, x)
        self._xy = self.decay * self._xy + x * seconds
        self._seconds = self.decay * self._seconds + seconds
        self._tokens = self.decay * self._tokens + work.tokens
        self.observations += 1

    @property
    def per_token(self) -> tuple[float, float]:
        """(seconds per prefix token, seconds per suffix token)."""
        if self.observations == 0:
            return self._initial, self._initial
        average = self._seconds / self._tokens
        # A tiny ridge towards the average keeps the fit defined when every batch had the
        # same shape; a negative coefficient (noise) falls back to the average.
        ridge = 1e-6 * np.trace(self._xx) + 1e-12
        try:
            coef = np.linalg.solve(self._xx + ridge * np.eye(2), self._xy + ridge * average)
        except np.linalg.LinAlgError:
            return average, average
        if not np.all(np.isfinite(coef)) or np.any(coef < 0):
            return average, average
        return float(coef[0]), float(coef[1])

    def seconds(self, work: Work) -> float:
        """Predicted model time of `work`."""
        a, b = self.per_token
        return a * work.prefix_tokens + b * work.suffix_tokens
