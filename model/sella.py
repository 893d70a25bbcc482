"""The SeLLa-Rec scorer: backbone (+ LoRA), soft tokens, Yes/No head.

Two ways to score, which agree to float precision (tested):
- `score`: the plain path, whole prompts through the decoder in one right-padded batch.
- `run_prefixes` + `score_suffixes`: each user-level prefix runs once, its keys/values
  are shared by all of its candidates, and only the short suffixes run per candidate.
  The service uses it per request; training uses it to keep the text before `<User_ID>`
  (no trainable input) out of the autograd graph.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from peft import PeftModel
from torch import nn
from transformers import DynamicCache, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from sellarec.model import prefix_attention
from sellarec.model.collab import CollabProjector, SemanticProjector
from sellarec.model.encoding import Encoded, PromptEncoder
from sellarec.model.prompts import ALL_SLOTS, Slot, TemplateSpec, distillation_prompt
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


def decoder_of(backbone: PreTrainedModel | PeftModel) -> nn.Module:
    """The transformer body (final norm included, no LM head), LoRA layers in place."""
    model = backbone.get_base_model() if isinstance(backbone, PeftModel) else backbone
    return model.get_decoder()


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
        self.head = YesNoHead.for_model(self._causal_lm(), tokenizer, spec.answer_cue)
        self.llm_dim = int(self._causal_lm().config.get_text_config().hidden_size)
        if proj_c is None and collab_dim is not None:
            proj_c = CollabProjector(collab_dim, self.llm_dim)
        if proj_w is None and Slot.WARM in spec.slots:
            proj_w = SemanticProjector(self.llm_dim)
        self.proj_c = proj_c
        self.proj_w = proj_w
        #: Attend to one stored prefix from many suffixes without copying its keys/values.
        self.share_prefix_attention = True

    def _causal_lm(self) -> PreTrainedModel:
        b = self.backbone
        return b.get_base_model() if isinstance(b, PeftModel) else b

    @property
    def decoder(self) -> nn.Module:
        return decoder_of(self.backbone)

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
        out = torch.zeros(n, len(ALL_SLOTS), self.llm_dim, device=self.device)
        parts = [(user_collab, self.proj_c), (item_collab, self.proj_c), (item_semantic, self.proj_w)]
        columns = []
        for k, (x, proj) in enumerate(parts):
            if x is not None and proj is not None:
                columns.append((k, proj(x.to(self.device, torch.float32))))
        if not columns:
            return out
        return torch.stack([dict(columns).get(k, out[:, k]) for k in range(len(ALL_SLOTS))], dim=1)

    def _embed(
        self, ids: torch.Tensor, positions: torch.Tensor, vectors: torch.Tensor | None
    ) -> torch.Tensor:
        embeds = self.backbone.get_input_embeddings()(ids)
        if vectors is None:
            return embeds
        return splice(embeds, positions, vectors)

    # --- the plain path -------------------------------------------------------------

    def last_hidden(self, encoded: Sequence[Encoded], vectors: torch.Tensor | None = None) -> torch.Tensor:
        """[B, d_L] final hidden state at each prompt's last token (right-padded batch)."""
        width = max(len(e) for e in encoded)
        ids = torch.full((len(encoded), width), self.encoder.pad_id, dtype=torch.long)
        mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for row, e in enumerate(encoded):
            ids[row, : len(e)] = torch.tensor(e.ids)
            mask[row, : len(e)] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = slot_positions([e.slots for e in encoded], device=self.device)
        embeds = self._embed(ids, positions, vectors)
        hidden = self.decoder(inputs_embeds=embeds, attention_mask=mask, use_cache=False).last_hidden_state
        last = mask.sum(1) - 1
        return hidden[torch.arange(len(encoded), device=self.device), last]

    def score(self, encoded: Sequence[Encoded], vectors: torch.Tensor | None = None) -> torch.Tensor:
        """[B] logits of P(Yes) for whole prompts (`vectors`: [B, 3, d_L] or None)."""
        return self.head(self.last_hidden(encoded, vectors))

    # --- the shared-prefix path ------------------------------------------------------

    def run_prefixes(self, prefixes: Sequence[Encoded], vectors: torch.Tensor | None = None) -> PrefixState:
        """Run a batch of prefixes (left-padded) and keep their keys/values."""
        width = max(len(p) for p in prefixes)
        ids = torch.full((len(prefixes), width), self.encoder.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prefixes), width), dtype=torch.long)
        shifts = []
        for row, p in enumerate(prefixes):
            shift = width - len(p)
            ids[row, shift:] = torch.tensor(p.ids)
            mask[row, shift:] = 1
            shifts.append(shift)
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = slot_positions([p.slots for p in prefixes], offset=shifts, device=self.device)
        embeds = self._embed(ids, positions, vectors)
        position_ids = (mask.cumsum(1) - 1).clamp(min=0)
        cache = DynamicCache(config=self._causal_lm().config)
        self.decoder(
            inputs_embeds=embeds,
            attention_mask=mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
        )
        layers = [(layer.keys, layer.values) for layer in cache.layers]
        return PrefixState(layers=layers, mask=mask, lengths=mask.sum(1))

    def suffix_hidden(
        self,
        state: PrefixState,
        rows: torch.Tensor,
        suffixes: Sequence[Encoded],
        vectors: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """[N, d_L] last hidden state of each suffix continuing prefix `rows[n]`."""
        rows = rows.to(self.device)
        width = max(len(s) for s in suffixes)
        n = len(suffixes)
        ids = torch.full((n, width), self.encoder.pad_id, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for row, s in enumerate(suffixes):
            ids[row, : len(s)] = torch.tensor(s.ids)
            mask[row, : len(s)] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = slot_positions([s.slots for s in suffixes], device=self.device)
        embeds = self._embed(ids, positions, vectors)

        position_ids = state.lengths.index_select(0, rows)[:, None] + torch.arange(width, device=self.device)
        config = self._causal_lm().config
        if self.share_prefix_attention and prefix_attention.supported(config):
            shared = prefix_attention.SharedPrefix(
                layers=state.layers,
                key_mask=state.mask.bool(),
                runs=prefix_attention.runs_of(rows.tolist()),
                padded=bool((state.mask == 0).any()),
            )
            with prefix_attention.sharing(config, shared):
                hidden = self.decoder(
                    inputs_embeds=embeds, position_ids=position_ids, use_cache=False
                ).last_hidden_state
        else:  # replicate the prefix keys/values per candidate (any architecture)
            cache = DynamicCache(
                ddp_cache_data=[(k.index_select(0, rows), v.index_select(0, rows)) for k, v in state.layers],
                config=config,
            )
            full_mask = torch.cat([state.mask.index_select(0, rows), mask], dim=1)
            hidden = self.decoder(
                inputs_embeds=embeds,
                attention_mask=full_mask,
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=True,
            ).last_hidden_state
        last = mask.sum(1) - 1
        return hidden[torch.arange(n, device=self.device), last]

    def score_suffixes(
        self,
        state: PrefixState,
        rows: torch.Tensor,
        suffixes: Sequence[Encoded],
        vectors: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """[N] logits of P(Yes) for suffixes continuing the prefixes `rows[n]`."""
        return self.head(self.suffix_hidden(state, rows, suffixes, vectors))

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
