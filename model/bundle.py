"""The tensors of an artifact bundle: their names, which prompts need which, and the typed views
everything else reads them through (the files around them: model/artifacts.py).

    mf.users [U, d_C], mf.items [I, d_C]     MF tables             prompts with <User_ID>/<Item_ID>
    neutral.user, neutral.item [d_C]         cold-start MF vectors  (the mean trained rows)
    proj_c.*                                 Proj C->L state dict
    semantic.items [I, d_L]                  aligned item semantics prompts with <Warm_ID>
    neutral.semantic [d_L]                   cold-start semantics
    proj_w.*                                 Proj W->L state dict

A variant writes only what its prompt uses: MF bundles the MF tables and their neutral
vectors; zero-shot and TALLRec nothing; CoLLM the MF side; the SeLLa-Rec variants the sides
of their slots. These names are written and read here and nowhere else.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from sellarec.model.collab import CollabProjector, Projections, SemanticProjector
from sellarec.model.prompts import Slot

MF_USERS = "mf.users"
MF_ITEMS = "mf.items"
SEMANTIC_ITEMS = "semantic.items"
NEUTRAL_USER = "neutral.user"
NEUTRAL_ITEM = "neutral.item"
NEUTRAL_SEMANTIC = "neutral.semantic"
#: Key prefixes of the two projections' state dicts ("proj_c.net.0.weight", ...).
PROJ_C = "proj_c"
PROJ_W = "proj_w"
#: The cold-start vectors, in the order a store version lists them.
NEUTRAL = (NEUTRAL_USER, NEUTRAL_ITEM, NEUTRAL_SEMANTIC)

#: What a slot of the prompt needs from the bundle (a projection: at least one of its tensors).
_COLLAB = (MF_USERS, MF_ITEMS, NEUTRAL_USER, NEUTRAL_ITEM, PROJ_C)
_SEMANTIC = (SEMANTIC_ITEMS, NEUTRAL_SEMANTIC, PROJ_W)
NEEDS: dict[Slot, tuple[str, ...]] = {Slot.USER: _COLLAB, Slot.ITEM: _COLLAB, Slot.WARM: _SEMANTIC}


def with_prefix(prefix: str, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A module's state dict as bundle tensors: `net.0.weight` -> `{prefix}.net.0.weight`."""
    return {f"{prefix}.{k}": v for k, v in state.items()}


def without_prefix(tensors: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The state dict stored under `prefix` (PROJ_C, PROJ_W), the prefix removed; empty if none."""
    cut = len(prefix) + 1
    return {k[cut:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}


def projection_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The projections' weights as stored (prefixes kept): what a store version carries."""
    return {k: v for k, v in tensors.items() if k.startswith((PROJ_C + ".", PROJ_W + "."))}


def load_projections(
    tensors: Mapping[str, torch.Tensor],
    llm_dim: int,
    device: torch.device | str = "cpu",
    mf_residual: bool = False,
) -> Projections:
    """The projections stored in `tensors` (a bundle's, or a store version's), frozen on `device`.

    The one place trained projections are rebuilt: dimensions and output norm come from the
    state dicts; a projection with no weights is None (its slots are not in the prompt).
    `mf_residual` comes from the manifest (or the store version's model identity).
    """
    if mf_residual and not without_prefix(tensors, PROJ_C):
        raise ValueError("an MF residual needs the MF vectors, which only a prompt with Proj C->L reads")
    proj_c, proj_w = without_prefix(tensors, PROJ_C), without_prefix(tensors, PROJ_W)
    return Projections(
        llm_dim=llm_dim,
        proj_c=CollabProjector.from_state(proj_c) if proj_c else None,
        proj_w=SemanticProjector.from_state(proj_w) if proj_w else None,
        mf_residual=mf_residual,
    ).frozen(device)


@dataclass(frozen=True)
class Tables:
    """A bundle's embedding tables by role; None where its variant has no such table."""

    #: MF user table [U, d_C].
    users: torch.Tensor | None
    #: MF item table [I, d_C].
    items: torch.Tensor | None
    #: Aligned semantic item table E_I^L [I, d_L].
    semantic: torch.Tensor | None
    #: Collaborative vector of a user the MF never saw [d_C].
    neutral_user: torch.Tensor | None
    #: Collaborative vector of an item the MF never saw [d_C].
    neutral_item: torch.Tensor | None
    #: Semantic vector of an item without one [d_L].
    neutral_semantic: torch.Tensor | None

    @classmethod
    def of(cls, tensors: Mapping[str, torch.Tensor]) -> Tables:
        return cls(
            users=tensors.get(MF_USERS),
            items=tensors.get(MF_ITEMS),
            semantic=tensors.get(SEMANTIC_ITEMS),
            neutral_user=tensors.get(NEUTRAL_USER),
            neutral_item=tensors.get(NEUTRAL_ITEM),
            neutral_semantic=tensors.get(NEUTRAL_SEMANTIC),
        )


def nonfinite(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors holding NaN or infinity, sorted.

    A diverged training run writes such tables or weights with valid checksums and shapes;
    served, they would turn every score into NaN. Bundles are refused for them instead.
    """
    return sorted(
        name for name, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())
    )


def tensor_problems(
    shapes: Mapping[str, tuple[int, ...]],
    slots: Iterable[Slot],
    n_users: int,
    n_items: int,
    collab_dim: int | None,
    llm_dim: int | None,
) -> list[str]:
    """Why tensors of these shapes cannot back a prompt with `slots` (empty: they can).

    A slot's tensors must all be there (a bundle cut short would otherwise fail on its first
    request), and every table must have the rows and width the manifest declares.
    """
    problems = []
    names = set(shapes)
    prefixes = {name.split(".", 1)[0] for name in names}
    for slot in slots:
        missing = [n for n in NEEDS[slot] if n not in names and n not in prefixes]
        if missing:
            problems.append(f"its prompt has {slot.placeholder} but it holds no {', '.join(missing)}")
    expected = {
        MF_USERS: (n_users, collab_dim),
        MF_ITEMS: (n_items, collab_dim),
        SEMANTIC_ITEMS: (n_items, llm_dim),
        NEUTRAL_USER: (collab_dim,),
        NEUTRAL_ITEM: (collab_dim,),
        NEUTRAL_SEMANTIC: (llm_dim,),
    }
    for name, shape in expected.items():
        if name in shapes and tuple(shapes[name]) != shape:
            problems.append(f"{name} has shape {tuple(shapes[name])}, the manifest says {shape}")
    return problems
