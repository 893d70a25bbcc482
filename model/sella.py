"""The SeLLa-Rec scorer: backbone (+ LoRA), soft tokens, Yes/No head.

Two ways to score, which agree to float precision (tested):
- `score`: the plain path, whole prompts through the decoder in one right-padded batch.
- `run_prefixes` + `score_suffixes`: each user-level prefix runs once, its keys/values
  are shared by all of its candidates, and only the short suffixes run per candidate.
  The service uses it per request; training uses it to keep the text before `<User_ID>`
  (no trainable input) out of the autograd graph.
- `extend_prefixes` grows a prefix state by more tokens, so a head common to every prompt
  (the instruction) can run once and each user's prefix only its remainder.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from peft import PeftModel
from torch import nn
from transformers import DynamicCache, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from sellarec.model import fast_path, prefix_attention
from sellarec.model.collab import CollabProjector, SemanticProjector, soft_vectors
from sellarec.model.encoding import Encoded, PromptEncoder, Side, pad
from sellarec.model.prompts import Slot, TemplateSpec, distillation_prompt
from sellarec.model.scoring import YesNoHead
from sellarec.model.soft_tokens import slot_positions, splice


@dataclass
class PrefixState:
    """Keys/values of a batch of left-padded prefixes, ready to be extended."""

    #: Per layer (keys, values), each [B, kv_heads, P, head_dim].
    layers: list[tuple[torch.Tensor, torch.Tensor]]
    #: [B, P] attention mask (0 on the left padding).
    mask: torch.Tensor
    #: [B] number of real tokens per prefix (the next position id).
    lengths: torch.Tensor


def _last_rows(mask: torch.Tensor) -> torch.Tensor:
    """Flat indices, in the [B * T] rows of a right-padded forward, of each row's last token:
    the only rows whose final hidden state the scorer reads, and so the only rows the last
    layer needs to compute (`fast_path.reading_rows`)."""
    return torch.arange(len(mask), device=mask.device) * mask.shape[1] + mask.sum(1) - 1


def _at_rows(hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """[len(rows), d] rows of `hidden` [B, T, d] at the flat indices `rows`."""
    return hidden.flatten(0, 1).index_select(0, rows)


#: A forward whose hidden states are not read at all (its keys/values are).
_NO_ROWS = torch.empty(0, dtype=torch.long)


def row_state(state: PrefixState, row: int) -> PrefixState:
    """Prefix `row` of `state` alone, its padding and holes dropped, so that its keys/values
    are its own. Positions count real tokens only, so it continues as the batched state does."""
    keep = state.mask[row].nonzero().squeeze(1)
    layers = [(k[row : row + 1, :, keep], v[row : row + 1, :, keep]) for k, v in state.layers]
    mask = torch.ones(1, len(keep), dtype=state.mask.dtype, device=state.mask.device)
    return PrefixState(layers=layers, mask=mask, lengths=mask.sum(1))


def _positions_after(state: PrefixState, rows: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[N, T] position ids of a right-padded continuation [N, T] of prefix `rows[n]`."""
    base = state.lengths.index_select(0, rows)
    return base[:, None] + torch.arange(mask.shape[1], device=base.device)


class SellaRec(nn.Module):
    """Frozen LLM + soft-token projections + two-row head (paper Eq. 1-3, 10)."""

    def __init__(
        self,
        backbone: PreTrainedModel | PeftModel,
        tokenizer: PreTrainedTokenizerBase,
        spec: TemplateSpec,
        collab_dim: int | None = None,
        proj_c: CollabProjector | None = None,
        proj_w: SemanticProjector | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.spec = spec
        self.encoder = PromptEncoder(tokenizer)
        self.head = YesNoHead.for_model(self.causal_lm, tokenizer, spec.answer_cue)
        self.llm_dim = int(self.causal_lm.config.get_text_config().hidden_size)
        if proj_c is None and collab_dim is not None:
            proj_c = CollabProjector(collab_dim, self.llm_dim)
        if proj_w is None and Slot.WARM in spec.slots:
            proj_w = SemanticProjector(self.llm_dim)
        self.proj_c = proj_c
        self.proj_w = proj_w
        #: Attend to one stored prefix from many suffixes without copying its keys/values.
        self.share_prefix_attention = True

    @property
    def causal_lm(self) -> PreTrainedModel:
        """The backbone without its PEFT wrapper (LoRA layers in place): its config and LM head."""
        b = self.backbone
        return b.get_base_model() if isinstance(b, PeftModel) else b

    @property
    def decoder(self) -> nn.Module:
        """The transformer body (final norm included, no LM head), LoRA layers in place."""
        return self.causal_lm.get_decoder()

    @property
    def device(self) -> torch.device:
        return self.head.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.head.lm_head.weight.dtype

    # --- soft tokens -----------------------------------------------------------------

    def soft_vectors(
        self,
        user_collab: torch.Tensor | None,
        item_collab: torch.Tensor | None,
        item_semantic: torch.Tensor | None,
        n: int,
    ) -> torch.Tensor:
        """[n, 3, d_L] projected (user, item, warm) vectors; zeros for absent inputs."""
        return soft_vectors(
            self.proj_c, self.proj_w, self.llm_dim, user_collab, item_collab, item_semantic, n, self.device
        )

    # --- inputs ---------------------------------------------------------------------

    def embed(
        self, ids: torch.Tensor, positions: torch.Tensor, vectors: torch.Tensor | None = None
    ) -> torch.Tensor:
        """[B, T, d_L] input embeddings of `ids` [B, T] with the soft tokens `vectors`
        [B, 3, d_L] written at the slot `positions` [B, 3] (Eq. 10).

        Every forward of this model starts here, and a backend that is fed prompt embeddings
        (vLLM) must build them exactly so.
        """
        embeds = self.backbone.get_input_embeddings()(ids)
        if vectors is None:
            return embeds
        return splice(embeds, positions, vectors)

    def _inputs(
        self, encoded: Sequence[Encoded], vectors: torch.Tensor | None, side: Side = "right"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(input embeddings, attention mask) of one padded batch on the model's device."""
        ids, mask, shifts = pad(encoded, self.encoder.pad_id, side)
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = slot_positions([e.slots for e in encoded], offset=shifts, device=self.device)
        return self.embed(ids, positions, vectors), mask

    # --- the plain path -------------------------------------------------------------

    def last_hidden(self, encoded: Sequence[Encoded], vectors: torch.Tensor | None = None) -> torch.Tensor:
        """[B, d_L] final hidden state at each prompt's last token (right-padded batch)."""
        embeds, mask = self._inputs(encoded, vectors)
        read = _last_rows(mask)
        with fast_path.reading_rows(read):
            out = self.decoder(inputs_embeds=embeds, attention_mask=mask, use_cache=False)
        return _at_rows(out.last_hidden_state, read)

    def score(self, encoded: Sequence[Encoded], vectors: torch.Tensor | None = None) -> torch.Tensor:
        """[B] logits of P(Yes) for whole prompts (`vectors`: [B, 3, d_L] or None)."""
        return self.head(self.last_hidden(encoded, vectors))

    # --- the shared-prefix path ------------------------------------------------------

    def run_prefixes(self, prefixes: Sequence[Encoded], vectors: torch.Tensor | None = None) -> PrefixState:
        """Run a batch of prefixes (left-padded) and keep their keys/values."""
        embeds, mask = self._inputs(prefixes, vectors, side="left")
        position_ids = (mask.cumsum(1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.causal_lm.config)
        with fast_path.reading_rows(_NO_ROWS.to(self.device)):
            self.decoder(
                inputs_embeds=embeds,
                attention_mask=mask,
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=True,
            )
        layers = [(layer.keys, layer.values) for layer in cache.layers]
        return PrefixState(layers=layers, mask=mask, lengths=mask.sum(1))

    def extend_prefixes(
        self,
        state: PrefixState,
        rows: torch.Tensor,
        pieces: Sequence[Encoded],
        vectors: torch.Tensor | None = None,
    ) -> PrefixState:
        """Continue prefix `rows[n]` of `state` by `pieces[n]`; the new state has one row per piece.

        The pieces are right-padded, which leaves holes inside the new mask; positions count
        real tokens only, so the numbers are those of running each whole prefix (tested).
        """
        rows = rows.to(self.device)
        embeds, mask = self._inputs(pieces, vectors)
        _, cache, full_mask = self._continue_copied(state, rows, embeds, mask, _NO_ROWS.to(self.device))
        layers = [(layer.keys, layer.values) for layer in cache.layers]
        lengths = state.lengths.index_select(0, rows) + mask.sum(1)
        return PrefixState(layers=layers, mask=full_mask, lengths=lengths)

    def suffix_hidden(
        self,
        state: PrefixState,
        rows: torch.Tensor,
        suffixes: Sequence[Encoded],
        vectors: torch.Tensor | None = None,
        kept: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> torch.Tensor:
        """[N, d_L] last hidden state of each suffix continuing prefix `rows[n]`.

        `kept`, a list, receives each layer's keys/values of the suffixes themselves
        ([N, kv_heads, S, head_dim], right-padded as the suffixes), at no extra cost.
        """
        rows = rows.to(self.device)
        embeds, mask = self._inputs(suffixes, vectors)
        read = _last_rows(mask)
        config = self.causal_lm.config
        if self.share_prefix_attention and prefix_attention.supported(config):
            shared = prefix_attention.SharedPrefix(
                layers=state.layers,
                key_mask=state.mask.bool(),
                runs=prefix_attention.runs_of(rows.tolist()),
                padded=bool((state.mask == 0).any()),
                kept=kept,
            )
            with prefix_attention.sharing(config, shared), fast_path.reading_rows(read):
                hidden = self.decoder(
                    inputs_embeds=embeds, position_ids=_positions_after(state, rows, mask), use_cache=False
                ).last_hidden_state
        else:  # replicate the prefix keys/values per candidate (any architecture)
            hidden, cache, _ = self._continue_copied(state, rows, embeds, mask, read)
            if kept is not None:
                width = state.mask.shape[1]
                kept += [(layer.keys[:, :, width:], layer.values[:, :, width:]) for layer in cache.layers]
        return _at_rows(hidden, read)

    def _continue_copied(
        self,
        state: PrefixState,
        rows: torch.Tensor,
        embeds: torch.Tensor,
        mask: torch.Tensor,
        read: torch.Tensor,
    ) -> tuple[torch.Tensor, DynamicCache, torch.Tensor]:
        """The decoder over `embeds` after prefix `rows[n]`, its keys/values copied per row:
        (hidden states, the grown cache, the mask over prefix and continuation). The hidden
        states are read only at the flat rows `read` (`fast_path.reading_rows`)."""
        cache = DynamicCache(
            ddp_cache_data=[(k.index_select(0, rows), v.index_select(0, rows)) for k, v in state.layers],
            config=self.causal_lm.config,
        )
        full_mask = torch.cat([state.mask.index_select(0, rows), mask], dim=1)
        with fast_path.reading_rows(read):
            hidden = self.decoder(
                inputs_embeds=embeds,
                attention_mask=full_mask,
                position_ids=_positions_after(state, rows, mask),
                past_key_values=cache,
                use_cache=True,
            ).last_hidden_state
        return hidden, cache, full_mask

    def score_suffixes(
        self,
        state: PrefixState,
        rows: torch.Tensor,
        suffixes: Sequence[Encoded],
        vectors: torch.Tensor | None = None,
        kept: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> torch.Tensor:
        """[N] logits of P(Yes) for suffixes continuing the prefixes `rows[n]` (`kept`: as
        `suffix_hidden`)."""
        return self.head(self.suffix_hidden(state, rows, suffixes, vectors, kept))

    # --- distillation ----------------------------------------------------------------

    @torch.no_grad()
    def distill(self, titles: Sequence[str], batch_size: int = 32) -> torch.Tensor:
        """E_I^L: final hidden state at the last token of "Movie: <title>" (float32)."""
        out = []
        for start in range(0, len(titles), batch_size):
            chunk = titles[start : start + batch_size]
            encoded = [self.encoder.prompt(distillation_prompt(self.spec, t)) for t in chunk]
            out.append(self.last_hidden(encoded).float())
        return torch.cat(out) if out else torch.zeros(0, self.llm_dim)
