"""Which store version this server serves, switched without a restart.

The tracker reads the active-version pointer every `poll_s` seconds. A new version is
switched to only if its model identity matches this server's model; otherwise the
server keeps serving the version it has, logs the refusal once and counts it in
`sellarec_version_refused_total`. Requests take `tracker.current` once, at their start.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import numpy as np
import torch

from sellarec.model.bundle import NEUTRAL_ITEM, NEUTRAL_USER, load_projections
from sellarec.model.collab import Projections
from sellarec.model.compat import ModelIdentity
from sellarec.service.errors import StoreUnavailable
from sellarec.service.metrics import Metrics
from sellarec.service.store.base import Store
from sellarec.service.store.versions import VersionMeta

log = logging.getLogger(__name__)


@dataclass
class ServedVersion:
    """A store version ready to serve: its metadata, projections and cold-start vectors."""

    #: The version's metadata.
    meta: VersionMeta
    #: Its projections, on the model's device.
    projections: Projections
    #: Collaborative vector of a cold user [d_C].
    neutral_user: np.ndarray
    #: Collaborative vector of a cold item [d_C].
    neutral_item: np.ndarray

    @property
    def version(self) -> str:
        return self.meta.version

    @classmethod
    def build(cls, meta: VersionMeta, device: torch.device | str) -> ServedVersion:
        """The version's projections rebuilt on `device` (as the scorer's loader builds them)."""
        zeros = np.zeros(meta.model.collab_dim, dtype=np.float32)
        return cls(
            meta=meta,
            projections=load_projections(
                meta.projections, meta.model.llm_dim, device, meta.model.mf_residual
            ),
            neutral_user=meta.neutral.get(NEUTRAL_USER, zeros),
            neutral_item=meta.neutral.get(NEUTRAL_ITEM, zeros),
        )


class VersionTracker:
    """Follows the store's active-version pointer for one model."""

    def __init__(
        self,
        store: Store,
        model: ModelIdentity,
        device: torch.device | str,
        metrics: Metrics,
        poll_s: float = 2.0,
    ) -> None:
        self.store = store
        #: The served model's identity: a version is switched to only if it matches.
        self.model = model
        self.device = device
        self.metrics = metrics
        self.poll_s = poll_s
        #: The version being served (None until one has been read).
        self.current: ServedVersion | None = None
        #: Versions refused, with the reason.
        self.refused: dict[str, str] = {}
        #: Why the last refresh found nothing to serve (None: it did).
        self.problem: str | None = "no version read yet"
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    async def refresh(self) -> None:
        """Read the pointer and switch if it names a new, compatible version."""
        pointer = await self.store.active_version()
        if pointer is None:
            self.problem = "the store holds no active version (run `sellarec-store load`)"
            return
        if (self.current and pointer == self.current.version) or pointer in self.refused:
            self.problem = None if self.current else f"active version {pointer}: {self.refused[pointer]}"
            return
        try:
            meta = await self.store.version_meta(pointer)
        except StoreUnavailable:
            raise
        except Exception as err:  # written by another release, or damaged
            self._refuse(pointer, f"unreadable metadata ({type(err).__name__}: {err})")
            return
        if meta is None:
            self.problem = f"the active version {pointer} has no metadata (incomplete load?)"
            log.warning(self.problem)
            return
        problems = self.model.problems(meta.model)
        if problems:
            self._refuse(pointer, "incompatible with this server's model: " + "; ".join(problems))
            return
        try:
            served = ServedVersion.build(meta, self.device)
        except Exception as err:  # projection weights that do not fit their declared shapes
            self._refuse(pointer, f"unusable projections ({type(err).__name__}: {err})")
            return
        previous = self.current.version if self.current else None
        self.current, self.problem = served, None
        self.metrics.serve_version(served.version, previous)
        log.info("serving store version %s (was %s)", served.version, previous)

    def _refuse(self, version: str, reason: str) -> None:
        """Never switch to `version`; keep serving the current one (if any)."""
        self.refused[version] = reason
        self.metrics.refused_versions.labels(version=version).inc()
        held = f"keeping {self.current.version}" if self.current else "nothing to serve"
        log.error("refusing store version %s (%s); %s", version, reason, held)
        self.problem = None if self.current else f"active version {version}: {reason}"

    async def _poll(self) -> None:
        while not self._stopping:
            await asyncio.sleep(self.poll_s)
            try:
                await self.refresh()
            except StoreUnavailable as err:
                log.warning("version poll failed: %s", err)
            except Exception:  # a bad version must not stop the polling
                log.exception("version poll failed")

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._poll(), name="sellarec-versions")

    async def stop(self, timeout_s: float = 2.0) -> None:
        """Stop polling. Bounded: a store client that swallows the cancellation cannot hold up exit."""
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait({self._task}, timeout=timeout_s)
            self._task = None
