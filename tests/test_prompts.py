"""Prompt templates, history formatting and the prefix/suffix split."""

from __future__ import annotations

import pytest

from sellarec.model.encoding import PromptEncoder
from sellarec.model.prompts import (
    ALL_SLOTS,
    Slot,
    TemplateSpec,
    distillation_prompt,
    format_history,
    scoring_prompt,
)

HISTORY = [f"Movie {k} (19{k:02d})" for k in range(14)]


def test_history_keeps_the_last_ten_oldest_first():
    text = format_history(HISTORY)
    assert text.startswith('"Movie 4 (1904)"') and text.endswith('"Movie 13 (1913)"')
    assert text.count('"') == 20


def test_empty_history_still_gives_a_complete_prompt():
    prompt = scoring_prompt(TemplateSpec(), [], "Heat (1995)")
    text = prompt.render()
    assert "MovieList: none" in text and text.endswith("Target Movie: Heat (1995)\nAnswer:")


def test_padding_titles_are_not_history():
    assert format_history(["", "", "Alien (1979)"]) == '"Alien (1979)"'


def test_stage3_prompt_has_the_three_placeholders_in_paper_order():
    text = scoring_prompt(TemplateSpec(), HISTORY, "Heat (1995)").render()
    u, i, w, t = (text.index(s) for s in ("<User_ID>", "<Item_ID>", "<Warm_ID>", "Target Movie"))
    assert u < i < w < t
    assert "The user's feature is <User_ID>. The target movie's feature is <Item_ID> <Warm_ID>" in text


@pytest.mark.parametrize(
    "slots", [(), (Slot.WARM,), (Slot.USER, Slot.ITEM), (Slot.USER, Slot.ITEM, Slot.WARM)]
)
def test_ablations_carry_exactly_their_slots(slots):
    prompt = scoring_prompt(TemplateSpec(slots=slots), HISTORY, "Heat (1995)")
    present = [s for s in prompt.segments if isinstance(s, Slot)]
    assert present == list(slots)


def test_stage1_and_book_wording():
    text = scoring_prompt(TemplateSpec(stage="stage1", domain="book"), ["Emma"], "Dune").render()
    assert text.startswith("A user has given high ratings to the following books.")
    assert 'BookList: "Emma". Target Book: Dune' in text and "<" not in text
    assert distillation_prompt(TemplateSpec(domain="book"), "Dune").render() == "Book: Dune"


def test_user_level_prefix_does_not_depend_on_the_item():
    spec = TemplateSpec()
    a = scoring_prompt(spec, HISTORY, "Heat (1995)")
    b = scoring_prompt(spec, HISTORY, "Toy Story (1995)")
    assert a.user_part == b.user_part and a.item_part != b.item_part
    assert Slot.USER in a.user_part and Slot.ITEM not in a.user_part


@pytest.mark.parametrize("slots", [ALL_SLOTS, (Slot.WARM,), ()])
@pytest.mark.parametrize("history", [HISTORY, [], ["Amélie (2001)", "千と千尋の神隠し (2001)"]])
def test_prefix_plus_suffix_is_the_whole_prompt(tokenizer, slots, history):
    encoder = PromptEncoder(tokenizer)
    prompt = scoring_prompt(TemplateSpec(slots=slots), history, "Matrix, The (1999)")
    prefix, suffix = encoder.split(prompt)
    whole = encoder.prompt(prompt)
    assert prefix.ids + suffix.ids == whole.ids
    assert (prefix + suffix).slots == whole.slots
    assert [s for s, _ in whole.slots] == list(slots)


@pytest.mark.parametrize("history", [HISTORY, []])
def test_text_only_prompt_tokenises_like_the_whole_string(tokenizer, history):
    """Segment boundaries fall where the tokenizer would split anyway."""
    encoder = PromptEncoder(tokenizer)
    prompt = scoring_prompt(TemplateSpec(stage="stage1"), history, "Matrix, The (1999)")
    assert list(encoder.prompt(prompt).ids) == tokenizer(prompt.render()).input_ids
    prefix, suffix = encoder.split(prompt)
    assert list(prefix.ids + suffix.ids) == tokenizer(prompt.render()).input_ids


def test_slot_positions_hold_the_placeholder_id(tokenizer):
    encoder = PromptEncoder(tokenizer)
    whole = encoder.prompt(scoring_prompt(TemplateSpec(), HISTORY, "Heat (1995)"))
    for _, pos in whole.slots:
        assert whole.ids[pos] == encoder.placeholder_id
