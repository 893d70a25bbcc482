"""Shared-prefix attention: many suffixes attend to one prefix's keys/values without copies.

The plain way to continue a prefix for N candidates is to replicate its keys/values N times
(the cache must have the batch size of the queries). On CPU that copying costs more than
the matmuls it feeds. This attention function, registered through transformers'
`AttentionInterface`, instead folds the candidates into the query length and attends to
the single stored prefix, then merges with the causal attention inside each suffix:

    softmax([q K_p^T, q K_s^T]) [V_p; V_s]  computed as  (e_p V_p + e_s V_s) / (sum e_p + sum e_s)

with one shared maximum for numerical stability. It is exact (same numbers as the plain
forward up to float rounding; tested) and works for any HF decoder that dispatches through
the attention interface (Llama, Qwen2, Mistral, ...). Models with sliding-window layers
fall back to the replicated cache.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface, PretrainedConfig

NAME = "sellarec_shared_prefix"


@dataclass
class SharedPrefix:
    """What the attention function needs besides the suffix's own q/k/v."""

    #: Per layer (keys, values), each [B, kv_heads, P, head_dim] (left-padded prefixes).
    layers: list[tuple[torch.Tensor, torch.Tensor]]
    #: [B, P] True on real prefix tokens.
    key_mask: torch.Tensor
    #: (prefix row, start, end): candidates start..end-1 continue prefix `row`.
    runs: list[tuple[int, int, int]]
    #: Whether any prefix has padding (skips masking when not).
    padded: bool
    #: When a list: receives each layer's suffix keys/values, in layer order (to keep them).
    kept: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    #: Attention masks of this forward, built by its first layer and reused by the others
    #: (every layer has the same suffix length, heads and dtype).
    masks: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)

    def mask(self, kind: str, row: int, build: Callable[[int], torch.Tensor]) -> torch.Tensor:
        key = (kind, row)
        if key not in self.masks:
            self.masks[key] = build(row)
        return self.masks[key]


_ACTIVE: contextvars.ContextVar[SharedPrefix | None] = contextvars.ContextVar("shared_prefix", default=None)


def runs_of(rows: list[int]) -> list[tuple[int, int, int]]:
    """Maximal runs of equal consecutive prefix rows."""
    runs: list[tuple[int, int, int]] = []
    for i, row in enumerate(rows):
        if runs and runs[-1][0] == row:
            runs[-1] = (row, runs[-1][1], i + 1)
        else:
            runs.append((row, i, i + 1))
    return runs


def supported(config: PretrainedConfig) -> bool:
    """True when every layer is plain causal attention (no sliding window)."""
    text = config.get_text_config()
    layer_types = getattr(text, "layer_types", None) or []
    if any(t != "full_attention" for t in layer_types):
        return False
    return not (getattr(text, "use_sliding_window", False) and getattr(text, "sliding_window", None))


@contextlib.contextmanager
def sharing(config: PretrainedConfig, prefix: SharedPrefix) -> Iterator[None]:
    """Route the model's attention through the shared-prefix function for one forward."""
    token = _ACTIVE.set(prefix)
    previous = config._attn_implementation
    config._attn_implementation = NAME
    try:
        yield
    finally:
        config._attn_implementation = previous
        _ACTIVE.reset(token)


def shared_prefix_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """query [N, H, S, d], key/value [N, KV, S, d] of the suffixes -> [N, S, H, d]."""
    prefix = _ACTIVE.get()
    if prefix is None:
        raise RuntimeError(f"{NAME} attention used outside model.prefix_attention.sharing()")
    k_prefix, v_prefix = prefix.layers[module.layer_idx]
    if prefix.kept is not None:
        prefix.kept.append((key, value))
    # The flash kernel's backward ignores the log-sum-exp output, so training takes the
    # explicit path below; inference on CPU takes the fused one.
    if query.device.type == "cpu" and not (torch.is_grad_enabled() and query.requires_grad):
        return _cpu_flash(prefix, query, key, value, k_prefix, v_prefix, scaling)
    n, heads, s, d = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    scale = scaling if scaling is not None else d**-0.5
    causal = torch.ones(s, s, dtype=torch.bool, device=query.device).tril()
    out = torch.empty(n, kv_heads, groups * s, d, dtype=query.dtype, device=query.device)
    for row, start, end in prefix.runs:
        m = end - start
        q = query[start:end].reshape(m, kv_heads, groups * s, d)  # q head h uses kv head h // groups
        # Prefix part: candidates folded into the query length, one matmul per kv head.
        q_folded = q.transpose(0, 1).reshape(kv_heads, m * groups * s, d)
        scores_p = torch.matmul(q_folded, k_prefix[row].transpose(-1, -2)).float() * scale
        if prefix.padded:
            scores_p = scores_p.masked_fill(~prefix.key_mask[row], float("-inf"))
        scores_p = scores_p.view(kv_heads, m, groups * s, -1).transpose(0, 1)  # [m, KV, G*S, P]
        # Suffix part: causal attention within each candidate's own tokens.
        scores_s = torch.matmul(q, key[start:end].transpose(-1, -2)).float() * scale
        scores_s = scores_s.view(m, kv_heads, groups, s, s).masked_fill(~causal, float("-inf"))
        scores_s = scores_s.view(m, kv_heads, groups * s, s)
        top = torch.maximum(scores_p.amax(-1, keepdim=True), scores_s.amax(-1, keepdim=True))
        e_p, e_s = torch.exp(scores_p - top), torch.exp(scores_s - top)
        denom = e_p.sum(-1, keepdim=True) + e_s.sum(-1, keepdim=True)
        e_p = e_p.transpose(0, 1).reshape(kv_heads, m * groups * s, -1).to(v_prefix.dtype)
        o_p = torch.matmul(e_p, v_prefix[row]).view(kv_heads, m, groups * s, d).transpose(0, 1)
        o_s = torch.matmul(e_s.to(value.dtype), value[start:end])
        out[start:end] = ((o_p.float() + o_s.float()) / denom).to(query.dtype)
    return out.view(n, heads, s, d).transpose(1, 2).contiguous(), None


def _cpu_flash(
    prefix: SharedPrefix,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    k_prefix: torch.Tensor,
    v_prefix: torch.Tensor,
    scaling: float | None,
) -> tuple[torch.Tensor, None]:
    """The same merge on CPU with PyTorch's flash kernel, which also returns the log-sum-exp.

    Two fused attention calls (prefix, then causal suffix) and a log-sum-exp merge on
    [N, H, S] tensors: no [N, H, S, P] score tensor is ever written to memory. Both calls
    take the query heads grouped by the key/value head they share ([.., KV, G * S, d]), so
    the keys/values are never repeated per query head: in the suffix call a causal mask
    tiled G times does what `is_causal` does per head, with a third of the kernel's
    per-head work items (the suffix blocks are tiny: their count is what costs). A prefix
    with a single suffix (one candidate) takes one call over its keys and the suffix's,
    with no merge.
    """
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    n, heads, s, d = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    scale = scaling if scaling is not None else d**-0.5
    dtype, device = query.dtype, query.device

    def tiled_causal(_: int) -> torch.Tensor:  # row g * S + t is query t of group g
        above = torch.ones(s, s, dtype=torch.bool, device=device).triu(1)
        causal = torch.zeros(s, s, dtype=dtype, device=device).masked_fill(above, float("-inf"))
        return causal.repeat(groups, 1)[None, None]

    def prefix_bias(row: int) -> torch.Tensor:  # [1, 1, 1, P]: -inf on the prefix's padding
        bias = torch.zeros(prefix.key_mask.shape[1], dtype=dtype, device=device)
        return bias.masked_fill(~prefix.key_mask[row], float("-inf"))[None, None, None, :]

    def whole(row: int) -> torch.Tensor:  # [1, 1, G * S, P + S]: the prefix, then the suffix causally
        width = k_prefix.shape[2]
        head = prefix_bias(row) if prefix.padded else torch.zeros(1, 1, 1, width, dtype=dtype, device=device)
        return torch.cat([head.expand(1, 1, groups * s, width), causal_tiled], -1)

    causal_tiled = prefix.mask("tiled causal", -1, tiled_causal)
    out = torch.empty(n, kv_heads, groups * s, d, dtype=dtype, device=device)
    for row, start, end in prefix.runs:
        m = end - start
        q = query[start:end].reshape(m, kv_heads, groups * s, d)  # q head h uses kv head h // groups
        if m == 1:  # one suffix: one call over its prefix and itself (copying one prefix costs less)
            keys = torch.cat([k_prefix[row : row + 1], key[start:end]], 2)
            values = torch.cat([v_prefix[row : row + 1], value[start:end]], 2)
            mask = prefix.mask("prefix and suffix", row, whole)
            out[start:end] = flash(q, keys, values, 0.0, False, attn_mask=mask, scale=scale)[0]
            continue
        bias = prefix.mask("prefix padding", row, prefix_bias) if prefix.padded else None
        q_folded = q.transpose(0, 1).reshape(1, kv_heads, m * groups * s, d)
        o_p, lse_p = flash(
            q_folded,
            k_prefix[row : row + 1],
            v_prefix[row : row + 1],
            0.0,
            False,
            attn_mask=bias,
            scale=scale,
        )
        o_p = o_p.view(kv_heads, m, groups * s, d).transpose(0, 1)  # [m, KV, G*S, d]
        lse_p = lse_p.view(kv_heads, m, groups * s).transpose(0, 1)
        k_s, v_s = key[start:end], value[start:end]
        o_s, lse_s = flash(q, k_s, v_s, 0.0, False, attn_mask=causal_tiled, scale=scale)
        lse = torch.logaddexp(lse_p, lse_s)
        w_p, w_s = torch.exp(lse_p - lse)[..., None], torch.exp(lse_s - lse)[..., None]
        out[start:end] = (o_p.float() * w_p + o_s.float() * w_s).to(query.dtype)
    return out.view(n, heads, s, d).transpose(1, 2).contiguous(), None


AttentionInterface.register(NAME, shared_prefix_attention)
