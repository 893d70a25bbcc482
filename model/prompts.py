"""Prompt templates of the paper (Fig. 2-4), per domain, as segments of text and slots.

A prompt is a sequence of text segments and *slots*: the placeholders `<User_ID>`,
`<Item_ID>`, `<Warm_ID>` whose input embeddings are replaced by projected soft tokens.
Everything before `item_start` depends on the user only (instruction, history, user slot):
that is the *user-level prefix* a request computes once; the rest is the per-candidate
suffix. Whatever follows the template before the answer (the answer cue) is part of the
template spec and recorded in the artifact manifest.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

#: The paper's history length: the user's last 10 liked items, oldest first.
HISTORY_LENGTH = 10
#: Template family id, recorded in manifests so that training and serving agree.
TEMPLATE_ID = "sellarec-v1"
#: Text between the template and the answer; "Yes"/"No" ids are derived after it.
DEFAULT_ANSWER_CUE = "\nAnswer:"


class Slot(str, Enum):
    """A placeholder position filled by a soft token (paper Eq. 10)."""

    USER = "user"
    ITEM = "item"
    WARM = "warm"

    @property
    def placeholder(self) -> str:
        return {"user": "<User_ID>", "item": "<Item_ID>", "warm": "<Warm_ID>"}[self.value]


ALL_SLOTS: tuple[Slot, ...] = (Slot.USER, Slot.ITEM, Slot.WARM)

Segment = str | Slot


@dataclass(frozen=True)
class Domain:
    """Wording of one item domain."""

    #: Singular noun ("movie").
    noun: str
    #: Plural noun ("movies").
    plural: str

    @property
    def label(self) -> str:
        return self.noun.capitalize()


DOMAINS: dict[str, Domain] = {
    "movie": Domain(noun="movie", plural="movies"),
    "book": Domain(noun="book", plural="books"),
}


@dataclass(frozen=True)
class TemplateSpec:
    """Everything that fixes the prompt text; stored in the artifact manifest."""

    #: Item domain, a key of DOMAINS.
    domain: str = "movie"
    #: "stage1" (Fig. 2, text only) or "stage3" (Fig. 4, with soft tokens).
    stage: str = "stage3"
    #: Which slots the stage-3 prompt carries (the ablations drop some).
    slots: tuple[Slot, ...] = ALL_SLOTS
    #: Text appended after the template, right before the answer.
    answer_cue: str = DEFAULT_ANSWER_CUE
    #: How many of the most recent liked items the prompt lists.
    history_length: int = HISTORY_LENGTH

    def __post_init__(self) -> None:
        if self.domain not in DOMAINS:
            raise ValueError(f"unknown domain {self.domain!r}; known: {sorted(DOMAINS)}")
        if self.stage not in {"stage1", "stage3"}:
            raise ValueError(f"unknown stage {self.stage!r}; expected 'stage1' or 'stage3'")
        object.__setattr__(self, "slots", tuple(Slot(s) for s in self.slots))
        if self.stage == "stage1" and self.slots:
            object.__setattr__(self, "slots", ())


@dataclass(frozen=True)
class Prompt:
    """A prompt as segments; `segments[:item_start]` is the user-level prefix."""

    segments: tuple[Segment, ...]
    item_start: int

    @property
    def user_part(self) -> tuple[Segment, ...]:
        return self.segments[: self.item_start]

    @property
    def item_part(self) -> tuple[Segment, ...]:
        return self.segments[self.item_start :]

    def render(self) -> str:
        """Human-readable text with the placeholders spelled out."""
        return "".join(s.placeholder if isinstance(s, Slot) else s for s in self.segments)


def format_history(titles: Sequence[str], length: int = HISTORY_LENGTH) -> str:
    """The last `length` liked titles, oldest first, quoted; an empty history says so."""
    recent = [t for t in titles if t][-length:] if length > 0 else []
    if not recent:
        return "none"
    return ", ".join(f'"{t}"' for t in recent)


def user_prompt(spec: TemplateSpec, history: Sequence[str]) -> tuple[Segment, ...]:
    """The user-level prefix of the prompt (depends on the user only)."""
    d = DOMAINS[spec.domain]
    movies = format_history(history, spec.history_length)
    list_label = f"{d.label}List"
    if spec.stage == "stage1":
        return (
            f"A user has given high ratings to the following {d.plural}. Given the {d.noun} "
            f"list and a target {d.noun}'s title. Please identify whether the user would like "
            f"the target {d.noun} by answering 'Yes.' or 'No.' {list_label}: {movies}.",
        )
    has_user = Slot.USER in spec.slots
    has_item = Slot.ITEM in spec.slots or Slot.WARM in spec.slots
    target = f"a target {d.noun}'s feature and title" if has_item else f"a target {d.noun}'s title"
    given = (
        f"the {d.noun} list, the user's feature and {target}"
        if has_user
        else f"the {d.noun} list and {target}"
    )
    segments: list[Segment] = [
        f"A user has given high ratings to the following {d.plural}. Given {given}. Please "
        f"Use all available information to identify whether the user would like the target "
        f"{d.noun} by answering 'Yes.' or 'No.' {list_label}: {movies}"
    ]
    if has_user:
        segments += [" The user's feature is ", Slot.USER, "."]
    if has_item:
        segments.append(f" The target {d.noun}'s feature is ")
    return tuple(segments)


def item_prompt(spec: TemplateSpec, title: str) -> tuple[Segment, ...]:
    """The per-candidate suffix: item slots, the target title and the answer cue."""
    d = DOMAINS[spec.domain]
    segments: list[Segment] = []
    if Slot.ITEM in spec.slots:
        segments.append(Slot.ITEM)
    if Slot.WARM in spec.slots:
        if segments:
            segments.append(" ")
        segments.append(Slot.WARM)
    segments.append(f" Target {d.label}: {title}{spec.answer_cue}")
    return tuple(segments)


def scoring_prompt(spec: TemplateSpec, history: Sequence[str], title: str) -> Prompt:
    """The full stage-1 or stage-3 prompt for one (user, item) pair."""
    head = user_prompt(spec, history)
    return Prompt(segments=head + item_prompt(spec, title), item_start=len(head))


def distillation_prompt(spec: TemplateSpec, title: str) -> Prompt:
    """Fig. 3: the prompt whose last hidden state is the item's semantic embedding."""
    return Prompt(segments=(f"{DOMAINS[spec.domain].label}: {title}",), item_start=0)
