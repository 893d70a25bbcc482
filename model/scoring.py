"""P(Yes) from the last prompt position, with only the "Yes" and "No" rows of the head.

Paper Eq. 2-3: p = exp(l_yes) / (exp(l_yes) + exp(l_no)) = sigmoid(l_yes - l_no), where
l_* are the LM logits at the last prompt position. Computing the whole vocabulary would
be waste: only two rows of the output matrix are ever read.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

ANSWERS = ("Yes", "No")


def answer_token_ids(tokenizer: PreTrainedTokenizerBase, cue: str) -> tuple[int, int]:
    """Ids of the first token of " Yes" / " No" as the tokenizer writes them after `cue`.

    The answer follows the cue in the training text ("...Answer: Yes."), so the id is the
    first token that tokenising cue + answer adds beyond the cue's own tokens.
    """
    ids = []
    base = tokenizer(cue, add_special_tokens=False).input_ids
    for answer in ANSWERS:
        full = tokenizer(f"{cue} {answer}.", add_special_tokens=False).input_ids
        if full[: len(base)] != base or len(full) <= len(base):
            raise ValueError(
                f"the tokenizer merges the answer cue {cue!r} with {answer!r}; choose a cue "
                f"that ends on a token boundary (for example one ending with ':')"
            )
        ids.append(full[len(base)])
    if ids[0] == ids[1]:
        raise ValueError("'Yes' and 'No' map to the same first token; the scorer needs two")
    return ids[0], ids[1]


class YesNoHead(nn.Module):
    """The two rows of the LM head that the scorer needs (shares the backbone's weights)."""

    def __init__(
        self,
        lm_head: nn.Module,
        yes_id: int,
        no_id: int,
        logit_scale: float = 1.0,
        softcap: float | None = None,
    ) -> None:
        super().__init__()
        self.lm_head = lm_head
        self.yes_id, self.no_id = yes_id, no_id
        self.register_buffer("rows", torch.tensor([yes_id, no_id]), persistent=False)
        self.logit_scale = logit_scale
        self.softcap = softcap

    @classmethod
    def for_model(cls, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, cue: str) -> YesNoHead:
        yes_id, no_id = answer_token_ids(tokenizer, cue)
        config = model.config.get_text_config()
        return cls(
            model.get_output_embeddings(),
            yes_id,
            no_id,
            logit_scale=float(getattr(config, "logit_scale", None) or 1.0),
            softcap=getattr(config, "final_logit_softcapping", None),
        )

    def answer_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, d_L] final hidden states -> [N, 2] logits of (Yes, No)."""
        weight = self.lm_head.weight.index_select(0, self.rows.to(hidden.device))
        logits = hidden @ weight.to(hidden.dtype).T
        bias = getattr(self.lm_head, "bias", None)
        if bias is not None:
            logits = logits + bias.index_select(0, self.rows.to(hidden.device)).to(hidden.dtype)
        logits = logits * self.logit_scale
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, d_L] -> [N] logit of P(Yes): l_yes - l_no (Eq. 3 in log-odds form)."""
        logits = self.answer_logits(hidden).float()
        return logits[:, 0] - logits[:, 1]
