"""The CPU fast path: the decoder's linear layers on oneDNN with weights packed once.

Why: on CPU, `nn.Linear` runs `aten::mm` through MKL's sgemm, which on the AMD machines
here takes a generic code path: 100 GFLOP/s per core where oneDNN's JIT kernels reach
230 (measured, docs/performance.md). vLLM's CPU backend wins single-candidate requests for
that reason alone: it packs its weights for oneDNN at load. This module does the same in
plain PyTorch, through the kernels that `torch.compile`'s own CPU freezing pass emits
(`mkldnn::_reorder_linear_weight` once, `mkldnn::_linear_pointwise` per call), and fuses
the SwiGLU gate (`silu(gate(x)) * up(x)`) into two oneDNN post-ops.

The scorer reads the last layer's output at one token per prompt (the answer position),
and a prefix's forward reads none of it (only its keys/values). So the last layer's
query projection, output projection and MLP, which act on each token alone, run on the
rows the forward reads (`reading_rows`, set by the scorer) and leave zeros elsewhere: a
thirtieth of SmolLM2's linear work, of any decoder's 1/layers. Keys and values still run
on every token, and attention still sees all of them.

A forward allocates and frees tensors of megabytes layer after layer; `keep_freed_memory`
asks glibc's malloc to keep them for the next layer instead of handing the pages back to
the kernel and faulting them in again (the serving backend calls it on CPU).

Serving only: the model is frozen and its LoRA merged. Packing happens in place (no second
copy of the weights); `state_dict()` still yields the dense `weight` of every packed
layer, so `save_pretrained` and the vLLM export keep working. `enable` checks the packed
decoder against the plain one on a short probe and undoes itself if they disagree, so an
architecture this was not written for falls back to the plain path instead of scoring
wrongly.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import logging
import platform
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

#: Largest relative difference (to the probe's largest hidden value) that counts as the same forward.
PROBE_TOLERANCE = 1e-4


#: glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
#: Allocations up to this size come from the heap (the ceiling of glibc's own adaptive threshold).
MMAP_THRESHOLD = 32 << 20
#: Free memory at the heap's top kept for reuse, up to this much.
TRIM_THRESHOLD = 1 << 30


def keep_freed_memory() -> bool:
    """Let glibc's malloc keep freed memory for the next forward instead of returning it.

    A forward on CPU allocates and frees tensors of megabytes layer after layer (activations,
    the MLP's intermediate, attention outputs). By default glibc gives memory that size back
    to the kernel once freed (fresh mmaps above a threshold that adapts, a heap trimmed at
    its top), so the next layer's tensors fault their pages in, zeroed, again: 13,000 to
    390,000 minor page faults in a 100-candidate request of SmolLM2, depending on what the
    process did before (docs/performance.md). With a fixed 32 MiB mmap threshold and a 1 GiB
    trim threshold the heap keeps them: under 2,200. The price is that the process holds on
    to its peak working set, as jemalloc and tcmalloc (vLLM's CPU recommendation) do.
    Process-wide; a no-op returning False where the C library is not glibc.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)  # the process's own symbols: glibc's malloc is among them
    mmap = libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    trim = libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    return bool(mmap and trim)


_READ_ROWS: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar("read_rows", default=None)


@contextlib.contextmanager
def reading_rows(rows: torch.Tensor | None) -> Iterator[None]:
    """Within: the forward reads the last layer's output only at `rows`, flat indices into
    its [batch * tokens] rows (empty: at none). None: at every row (the default)."""
    token = _READ_ROWS.set(rows)
    try:
        yield
    finally:
        _READ_ROWS.reset(token)


def _on_read_rows(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, width: int) -> torch.Tensor:
    """`fn` (a token-wise map to `width` features) on the rows the forward reads, zeros on
    the others."""
    rows = _READ_ROWS.get()
    if rows is None:
        return fn(x)
    flat = x.reshape(-1, x.shape[-1])
    out = flat.new_zeros(flat.shape[0], width)
    if len(rows):
        out.index_copy_(0, rows, fn(flat.index_select(0, rows)))
    return out.view(*x.shape[:-1], width)


def supported(device: torch.device, dtype: torch.dtype) -> bool:
    """True where the fast path applies: CPU, float32, a PyTorch built with oneDNN."""
    return device.type == "cpu" and dtype == torch.float32 and torch.backends.mkldnn.is_available()


class PackedLinear(nn.Module):
    """`nn.Linear` whose weight lives in oneDNN's blocked layout, packed once at load."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features = int(weight.shape[1])
        self.out_features = int(weight.shape[0])
        #: The weight, reordered for oneDNN (an opaque `_mkldnn` tensor; dense again in state_dict).
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), None)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        #: Whether only the rows the forward reads are computed (`reading_rows`): last layer only.
        self.read_rows_only = False

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> PackedLinear:
        return cls(linear.weight, linear.bias)

    def to_linear(self) -> nn.Linear:
        """The plain layer again (undo)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        linear.weight = nn.Parameter(self.packed.to_dense(), requires_grad=False)
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias.detach(), requires_grad=False)
        return linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.read_rows_only:
            return _on_read_rows(self._linear, x, self.out_features)
        return self._linear(x)

    def _linear(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        bias = self.bias is not None
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={bias}"

    # The checkpoint format stays that of nn.Linear: a dense `weight` (and `bias`).
    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        destination[prefix + "weight"] = self.packed.to_dense()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        weight = state_dict.get(prefix + "weight")
        if weight is None:
            missing_keys.append(prefix + "weight")
        else:
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().float().contiguous(), None)
        if self.bias is not None:
            if prefix + "bias" in state_dict:
                with torch.no_grad():
                    self.bias.copy_(state_dict[prefix + "bias"])
            else:
                missing_keys.append(prefix + "bias")


class PackedSwiGLU(nn.Module):
    """`down(silu(gate(x)) * up(x))` (Llama, Qwen2, Mistral MLPs) with the gate fused into oneDNN.

    The gate GEMM applies `silu` as a post-op and the up GEMM multiplies by it as a binary
    post-op, so the two [tokens, intermediate] element-wise passes never touch memory.
    The children keep the original names: the state_dict keys do not change.
    """

    def __init__(self, gate_proj: PackedLinear, up_proj: PackedLinear, down_proj: PackedLinear) -> None:
        super().__init__()
        self.gate_proj = gate_proj
        self.up_proj = up_proj
        self.down_proj = down_proj
        #: As `PackedLinear.read_rows_only`.
        self.read_rows_only = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.read_rows_only:
            return _on_read_rows(self._mlp, x, self.down_proj.out_features)
        return self._mlp(x)

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_proj, self.up_proj
        act = torch.ops.mkldnn._linear_pointwise(x, gate.packed, gate.bias, "swish", [], "")
        hidden = torch.ops.mkldnn._linear_pointwise.binary(x, act, up.packed, up.bias, "mul")
        return self.down_proj(hidden)


@dataclass
class FastPath:
    """What `enable` did to a decoder."""

    #: Linear layers now on packed weights.
    linears: int = 0
    #: Gated MLPs now fused.
    mlps: int = 0
    #: Modules of the last layer that compute only the rows a forward reads.
    read_rows_only: int = 0

    @property
    def active(self) -> bool:
        return self.linears > 0


_SWIGLU = ("gate_proj", "up_proj", "down_proj")


def _is_swiglu(module: nn.Module) -> bool:
    if not all(type(getattr(module, n, None)) is nn.Linear for n in _SWIGLU):
        return False
    if set(dict(module.named_children())) - {*_SWIGLU, "act_fn"}:
        return False  # something else happens inside: leave it to its own forward
    act = getattr(module, "act_fn", None)
    return isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"


def _pack(module: nn.Module, fuse_mlp: bool) -> list[tuple[nn.Module, str, nn.Module]]:
    """Replace in place, top down; returns (parent, name, original) for every replacement."""
    replaced = []
    for name, child in list(module.named_children()):
        if fuse_mlp and _is_swiglu(child):
            packed = (PackedLinear.from_linear(getattr(child, n)) for n in _SWIGLU)
            setattr(module, name, PackedSwiGLU(*packed))
        elif type(child) is nn.Linear:
            setattr(module, name, PackedLinear.from_linear(child))
        else:
            replaced += _pack(child, fuse_mlp)
            continue
        replaced.append((module, name, child))
    return replaced


def _probe(decoder: nn.Module, width: int, read: torch.Tensor | None = None) -> torch.Tensor:
    """The last hidden states of a fixed random input (`read`: of its rows the forward reads)."""
    embeds = torch.randn(2, 16, width, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode(), reading_rows(read):
        hidden = decoder(inputs_embeds=embeds, use_cache=False).last_hidden_state.float()
    return hidden if read is None else hidden.reshape(-1, width).index_select(0, read)


def _difference(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max().clamp(min=1e-6))


def _last_layer_row_wise(decoder: nn.Module) -> list[nn.Module]:
    """The last layer's packed query and output projections and MLP (each acts on a token alone)."""
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList) or not len(layers):
        return []
    last = layers[-1]
    attention = getattr(last, "self_attn", None)
    found = [getattr(attention, name, None) for name in ("q_proj", "o_proj")] + [getattr(last, "mlp", None)]
    return [m for m in found if isinstance(m, PackedLinear | PackedSwiGLU)]


def enable(
    decoder: nn.Module, hidden_size: int, fuse_mlp: bool = True, skip_unread_rows: bool = True
) -> FastPath:
    """Pack the decoder's linear layers in place; checked on a probe, undone if it disagrees.

    The original layers (and their dense weights) are let go once the probe passes, so
    memory does not grow. Packing an already packed decoder finds nothing to do.
    `fuse_mlp=False` packs the MLPs' three layers one by one, `skip_unread_rows=False` keeps
    the last layer on every row (both for comparisons).
    """
    if not any(isinstance(m, nn.Linear) for m in decoder.modules()):
        return FastPath()  # already packed (a second backend on the same scorer): no probe forwards
    want = _probe(decoder, hidden_size)
    replaced = _pack(decoder, fuse_mlp)
    if not replaced:
        return FastPath()
    try:
        error = _difference(_probe(decoder, hidden_size), want)
        problem = None if error <= PROBE_TOLERANCE else f"it differs by {error:.2e} on a probe"
    except Exception as err:  # noqa: BLE001 - any failure means: not an architecture this fits
        problem = f"it failed on a probe ({err})"
    if problem:
        for parent, name, original in reversed(replaced):
            setattr(parent, name, original)
        log.warning("CPU fast path not used: %s", problem)
        return FastPath()
    done = FastPath(
        linears=sum(3 if isinstance(m, PackedSwiGLU) else 1 for m in _modules(replaced)),
        mlps=sum(isinstance(m, PackedSwiGLU) for m in _modules(replaced)),
        read_rows_only=_skip_unread_rows(decoder, hidden_size, want) if skip_unread_rows else 0,
    )
    log.info(
        "CPU fast path: %d linear layers packed for oneDNN, %d MLPs fused, %d last-layer modules "
        "on read rows only",
        done.linears,
        done.mlps,
        done.read_rows_only,
    )
    return done


def _skip_unread_rows(decoder: nn.Module, hidden_size: int, want: torch.Tensor) -> int:
    """Let the last layer's row-wise modules compute only the rows a forward reads, if the
    probe's read rows (each sequence's last token) come out the same; returns their number."""
    modules = _last_layer_row_wise(decoder)
    for m in modules:
        m.read_rows_only = True
    read = torch.tensor([15, 31])  # the probe's two sequences of 16: their last tokens
    try:
        error = _difference(_probe(decoder, hidden_size, read), want.reshape(-1, hidden_size)[read])
    except Exception as err:  # noqa: BLE001 - any failure means: keep computing every row
        error, reason = float("inf"), f"it failed on a probe ({err})"
    else:
        reason = f"it differs by {error:.2e} on a probe"
    if error > PROBE_TOLERANCE:
        for m in modules:
            m.read_rows_only = False
        log.warning("last layer kept on every row: %s", reason)
        return 0
    return len(modules)


def _modules(replaced: list[tuple[nn.Module, str, nn.Module]]) -> list[nn.Module]:
    return [getattr(parent, name) for parent, name, _ in replaced]
