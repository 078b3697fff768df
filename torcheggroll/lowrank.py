"""The low-rank population forward: evaluate every member without building per-member weights.

For a matrix ``W`` (m x n) owned by the optimizer, member ``i`` uses
``W_i = W + c_i * A_i B_i^T`` with ``c_i = sigma * sign_i / sqrt(r)``. A layer that consumes ``W``
through a linear map never needs ``W_i``:

    y_i = x_i W^T + b_i + c_i * (x_i B_i) A_i^T

that is one GEMM with the shared ``W`` for all members' rows plus a rank-r correction per member
(the structure of multi-LoRA serving). Extra memory per layer is ``pop * r * (m + n)``.

The model runs under :func:`torch.func.vmap` over members, as in the materialized path, but the
owned low-rank matrices are *not* batched: they stay the module's own tensors, and a
:class:`~torch.overrides.TorchFunctionMode` intercepts the functions that consume them
(``F.linear``, ``F.embedding``, ``F.conv1d/2d/3d``, ``F.multi_head_attention_forward`` and the
GRU/LSTM/RNN kernels) and evaluates them in factored form. Because ``W`` is unbatched, vmap runs
``x W^T`` as one GEMM over all members' rows (or once for all members when the input is shared).
Any other use of an owned matrix (``x @ self.W``, a grouped convolution, an embedding with
``max_norm`` ...) gets that member's materialized ``W_i`` instead, computed once per forward: the
result is always right, only slower, and ``path="lowrank"`` turns such a fallback into an error.
Tensors with dense noise (biases, norm weights, rank 0) are passed per member, batched.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import _pytree as pytree

from . import _ops
from ._dispatch import HandlerMode, is_batched, register
from .fused_linear import OnTheFly, fused_available, lowrank_linear, lowrank_linear_batched
from .materialized import (
    materialized_forward,
    named_tensors,
    recurrent_handlers,
    scratch_buffers,
    vmap_members,
)
from .noise import ParamNoise, compute_dtype

__all__ = ["LowRankFallbackError", "lowrank_forward"]


class LowRankFallbackError(RuntimeError):
    """``path="lowrank"`` was asked for but an owned matrix is used in a way the fast path lacks."""


class _Population(Protocol):
    @property
    def size(self) -> int: ...

    def owns(self, tensor: torch.Tensor) -> bool: ...

    def noise(self, param: torch.Tensor) -> ParamNoise: ...

    def perturbed(self, param: torch.Tensor) -> torch.Tensor: ...

    def coefficients(self, param: torch.Tensor, scale: float = 1.0) -> torch.Tensor: ...

    def lowrank_factors(self, param: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def member_table(self, kind: Any, device: Any, dtype: torch.dtype) -> torch.Tensor: ...

    def entry(self, param: torch.Tensor) -> Any: ...

    def noise_source(self, param: torch.Tensor) -> tuple[Any, Any, int] | None: ...

    def fill_noise(self) -> None: ...

    @property
    def antithetic(self) -> bool: ...


@dataclass
class _Factor:
    """One owned matrix inside the vmapped forward.

    Either this member's factors are given (``cached`` holds ``a`` and ``b``, batched over
    members), or the draws are: ``a_draws`` ``(D, m, r)`` and ``b_draws`` ``(D, n, r)`` are the
    generation's noise (unbatched), ``draw`` and ``coeff`` this member's draw index and scale
    ``sigma * sign / sqrt(r)`` (0-d, batched). The fused linear reads the draws directly; other
    layers get :attr:`a`, :attr:`b` built from them when they first need them.
    """

    weight: torch.Tensor  # the shared centre, shape of the parameter
    name: str
    a_draws: torch.Tensor | None = None
    b_draws: torch.Tensor | None = None
    draw: torch.Tensor | None = None
    coeff: torch.Tensor | None = None
    cached: dict[str, torch.Tensor] = field(default_factory=dict)
    # With the draws: what the noise is a function of, for kernels that make it where they use
    # it, and the hook that fills the draws' buffer before anything reads them.
    source: OnTheFly | None = None

    def _filled(self) -> None:
        if self.source is not None:
            self.source.fill()

    @property
    def a(self) -> torch.Tensor:
        """``(m, r)`` this member's ``A`` scaled by its coefficient, in the weight's dtype."""
        if "a" not in self.cached:
            assert self.a_draws is not None and self.draw is not None and self.coeff is not None
            self._filled()
            self.cached["a"] = (self.a_draws[self.draw] * self.coeff).to(self.weight.dtype)
        return self.cached["a"]

    @property
    def b(self) -> torch.Tensor:
        """``(n, r)`` this member's ``B``, in the weight's dtype."""
        if "b" not in self.cached:
            assert self.b_draws is not None and self.draw is not None
            self._filled()
            self.cached["b"] = self.b_draws[self.draw].to(self.weight.dtype)
        return self.cached["b"]

    def materialized(self) -> torch.Tensor:
        """This member's full weight ``W + a b^T`` (the fallback), cached per forward."""
        if "w" not in self.cached:
            w = self.weight
            delta = self.a.to(compute_dtype(w.dtype)) @ self.b.to(compute_dtype(w.dtype)).T
            self.cached["w"] = (w.to(delta.dtype) + delta.reshape(w.shape)).to(w.dtype)
        return self.cached["w"]

    def linear(
        self, x: torch.Tensor, bias: torch.Tensor | None, rows: slice | None = None
    ) -> torch.Tensor:
        """``x W_i[rows]^T + bias``: the shared GEMM plus the rank-r correction."""
        w = self.weight if rows is None else self.weight[rows]
        if self.a_draws is not None and _fusable(x, w, bias):
            a_draws = self.a_draws if rows is None else self.a_draws[:, rows]
            assert self.b_draws is not None and self.draw is not None and self.coeff is not None
            source = self.source if rows is None else None
            out = lowrank_linear_batched(
                x, w, bias, a_draws, self.b_draws, self.draw, self.coeff, source=source
            )
            if out is None:
                self._filled()
                out = lowrank_linear(x, w, bias, a_draws, self.b_draws, self.draw, self.coeff)
            return out
        a = self.a if rows is None else self.a[rows]
        return _ops.linear_correction(x, a, self.b, base=F.linear(x, w, bias))


def _fusable(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether a linear layer can go to the fused kernels: per-member input rows (a shared input
    is better served by one small GEMM and a broadcast correction) and nothing recording grads."""
    if not torch._C._functorch.is_batchedtensor(x) or not fused_available(x):
        return False
    return not (
        torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, w, bias))
    )


class _LowRankMode(HandlerMode):
    def __init__(self, factors: dict[int, _Factor], strict: bool, fallbacks: set[str]) -> None:
        super().__init__()
        self.factors = factors
        self.strict = strict
        self.fallbacks = fallbacks
        # nn.MultiheadAttention calls under way, innermost last (see _attention_fast_path).
        self.attention: list[bool] = []

    def factor(self, t: Any) -> _Factor | None:
        f = self.factors.get(id(t))
        return f if f is not None and t is f.weight else None

    def claims(self, t: Any) -> bool:
        """Whether a recurrent kernel's weight ``t`` needs the cell equations here: an owned
        matrix, or a per-member (batched) tensor such as a bias with dense noise."""
        return self.factor(t) is not None or is_batched(t)

    def linear(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        return _lin(self, x, w, b)

    def _owned_in(self, args: Any, kwargs: dict[str, Any]) -> list[_Factor]:
        """The owned matrices among the arguments (top level, or inside a list or tuple)."""
        hits = []
        for value in (*args, *kwargs.values()):
            items = value if isinstance(value, (list, tuple)) else (value,)
            for t in items:
                f = self.factor(t)
                if f is not None:
                    hits.append(f)
        return hits

    def decline(
        self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        """Any other use of an owned matrix gets that member's full weight (or, with
        ``path="lowrank"``, an error)."""
        hits = self._owned_in(args, kwargs)
        if not hits:
            return func(*args, **kwargs)
        if getattr(func, "__name__", None) == "__get__" or func in _METADATA:
            out = func(*args, **kwargs)
            if not isinstance(out, torch.Tensor):
                return out  # shape, dtype, device ... are the centre's
        for f in hits:
            if self.strict:
                raise LowRankFallbackError(
                    f"path='lowrank': parameter {f.name!r} is used by "
                    f"{getattr(func, '__name__', func)}, which the low-rank forward does not "
                    "handle; use path='auto' to materialize it"
                )
            self.fallbacks.add(f.name)
        swapped = pytree.tree_map(
            lambda t: f.materialized() if (f := self.factor(t)) is not None else t,
            (args, kwargs),
        )
        return func(*swapped[0], **swapped[1])


_METADATA = {
    torch.Tensor.size,
    torch.Tensor.dim,
    torch.Tensor.ndimension,
    torch.Tensor.numel,
    torch.Tensor.nelement,
    torch.Tensor.stride,
    torch.Tensor.storage_offset,
    torch.Tensor.untyped_storage,
    torch.Tensor.is_floating_point,
    torch.Tensor.is_complex,
    torch.Tensor.is_contiguous,
    torch.Tensor.is_pinned,
    torch.Tensor.is_shared,
    torch.Tensor.element_size,
    torch.Tensor.get_device,
    torch.Tensor.__len__,
}


# ---------------------------------------------------------------------------- handlers
def _h_linear(
    mode: _LowRankMode, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> Any:
    f = mode.factor(weight)
    if f is None or mode.factor(bias) is not None or mode.factor(input) is not None:
        return NotImplemented
    return f.linear(input, bias)


def _h_embedding(
    mode: _LowRankMode,
    input: torch.Tensor,
    weight: torch.Tensor,
    padding_idx: int | None = None,
    max_norm: float | None = None,
    norm_type: float = 2.0,
    scale_grad_by_freq: bool = False,
    sparse: bool = False,
) -> Any:
    f = mode.factor(weight)
    if f is None or max_norm is not None:
        return NotImplemented  # max_norm renormalizes rows of the weight in place: materialize
    base = F.embedding(input, weight, padding_idx)
    return base + _ops.embedding_correction(input, f.a.to(weight.dtype), f.b.to(weight.dtype))


def _h_addmm(
    mode: _LowRankMode,
    input: torch.Tensor,
    mat1: torch.Tensor,
    mat2: torch.Tensor,
    *,
    beta: Any = 1,
    alpha: Any = 1,
    out: Any = None,
) -> Any:
    """``torch.addmm(bias, x, W)`` with ``W`` owned, used as the right operand (GPT-2's
    ``Conv1D``): the shared product plus ``(x a) b^T``."""
    f = mode.factor(mat2)
    if (
        f is None
        or out is not None
        or mode.factor(input) is not None
        or mode.factor(mat1) is not None
    ):
        return NotImplemented
    base = torch.addmm(input, mat1, mat2, beta=beta, alpha=alpha)
    return base + alpha * _ops.right_correction(mat1, f.a, f.b)


def _h_matmul(mode: _LowRankMode, input: torch.Tensor, other: torch.Tensor) -> Any:
    """``x @ W`` with ``W`` owned (``(m, n)``, the right operand)."""
    f = mode.factor(other)
    if f is None or other.dim() != 2 or mode.factor(input) is not None:
        return NotImplemented
    return torch.matmul(input, other) + _ops.right_correction(input, f.a, f.b)


def _conv_handler(conv: Callable[..., torch.Tensor], spatial: int) -> Callable[..., Any]:
    def handler(
        mode: _LowRankMode,
        input: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        stride: Any = 1,
        padding: Any = 0,
        dilation: Any = 1,
        groups: int = 1,
    ) -> Any:
        f = mode.factor(weight)
        if f is None or groups != 1 or mode.factor(bias) is not None:
            return NotImplemented
        base = conv(input, weight, bias, stride, padding, dilation)
        kernel = tuple(weight.shape[2:])
        return base + _ops.conv_correction(conv, input, f.a, f.b, kernel, stride, padding, dilation)

    return handler


def _lin(
    mode: _LowRankMode,
    x: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None,
    rows: slice | None = None,
) -> torch.Tensor:
    f = mode.factor(w)
    if f is not None:
        return f.linear(x, b, rows)
    return F.linear(x, w if rows is None else w[rows], b)


def _h_mha(
    mode: _LowRankMode,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    embed_dim_to_check: int,
    num_heads: int,
    in_proj_weight: torch.Tensor | None,
    in_proj_bias: torch.Tensor | None,
    bias_k: torch.Tensor | None,
    bias_v: torch.Tensor | None,
    add_zero_attn: bool,
    dropout_p: float,
    out_proj_weight: torch.Tensor,
    out_proj_bias: torch.Tensor | None,
    training: bool = True,
    key_padding_mask: torch.Tensor | None = None,
    need_weights: bool = True,
    attn_mask: torch.Tensor | None = None,
    use_separate_proj_weight: bool = False,
    q_proj_weight: torch.Tensor | None = None,
    k_proj_weight: torch.Tensor | None = None,
    v_proj_weight: torch.Tensor | None = None,
    static_k: torch.Tensor | None = None,
    static_v: torch.Tensor | None = None,
    average_attn_weights: bool = True,
    is_causal: bool = False,
) -> Any:
    """``F.multi_head_attention_forward`` with owned projections evaluated in factored form.

    Covers the common configuration (packed or separate projections, masks, dropout,
    attention weights); ``bias_k``/``bias_v``, ``add_zero_attn``, static keys and unbatched
    inputs fall back to materialized weights.
    """
    if (
        bias_k is not None
        or bias_v is not None
        or add_zero_attn
        or static_k is not None
        or static_v is not None
    ):
        return NotImplemented
    if is_causal and attn_mask is None:
        # F.multi_head_attention_forward refuses the causal hint without a mask; PyTorch gets
        # here without raising only through nn.MultiheadAttention's fused inference path, which
        # ignores the hint. Do what PyTorch would have done: the reference call raises, or the
        # hint is dropped.
        if not (mode.attention and mode.attention[-1]):
            # PyTorch raises here: let it do so in its own words (it checks before computing).
            F.multi_head_attention_forward(
                query,
                key,
                value,
                embed_dim_to_check,
                num_heads,
                in_proj_weight,
                in_proj_bias,
                bias_k,
                bias_v,
                add_zero_attn,
                dropout_p,
                out_proj_weight,
                out_proj_bias,
                training,
                key_padding_mask,
                need_weights,
                attn_mask,
                use_separate_proj_weight,
                q_proj_weight,
                k_proj_weight,
                v_proj_weight,
                static_k,
                static_v,
                average_attn_weights,
                is_causal,
            )
            return NotImplemented
        is_causal = False
    if query.dim() != 3 or any(mode.factor(t) is not None for t in (in_proj_bias, out_proj_bias)):
        return NotImplemented
    tgt_len, bsz, embed = query.shape
    src_len = key.shape[0]
    head_dim = embed // num_heads
    if use_separate_proj_weight:
        assert q_proj_weight is not None and k_proj_weight is not None and v_proj_weight is not None
        bq = bk = bv = None
        if in_proj_bias is not None:
            bq, bk, bv = in_proj_bias.chunk(3)
        q = _lin(mode, query, q_proj_weight, bq)
        k = _lin(mode, key, k_proj_weight, bk)
        v = _lin(mode, value, v_proj_weight, bv)
    else:
        assert in_proj_weight is not None
        bq = bk = bv = None
        if in_proj_bias is not None:
            bq, bk, bv = in_proj_bias.chunk(3)
        if query is key and key is value:
            q, k, v = _lin(mode, query, in_proj_weight, in_proj_bias).chunk(3, dim=-1)
        else:
            q = _lin(mode, query, in_proj_weight, bq, slice(0, embed))
            k = _lin(mode, key, in_proj_weight, bk, slice(embed, 2 * embed))
            v = _lin(mode, value, in_proj_weight, bv, slice(2 * embed, 3 * embed))

    def heads(t: torch.Tensor, length: int) -> torch.Tensor:  # (len, bsz, E) -> (bsz, H, len, D)
        return (
            t.reshape(length, bsz * num_heads, head_dim)
            .transpose(0, 1)
            .reshape(bsz, num_heads, length, head_dim)
        )

    q, k, v = heads(q, tgt_len), heads(k, src_len), heads(v, src_len)
    mask = _merge_masks(attn_mask, key_padding_mask, bsz, num_heads, tgt_len, src_len, q.dtype)
    causal = bool(is_causal and mask is None)
    if is_causal and attn_mask is not None and key_padding_mask is None and not need_weights:
        mask, causal = None, True
    p = dropout_p if training else 0.0
    if need_weights or q.device.type != "cuda":
        # Explicit attention: vmap has batching rules for its matmuls and softmax everywhere,
        # while the fused CPU attention kernel has none (it would loop over members).
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(head_dim)
        if causal:
            scores = scores.masked_fill(
                torch.ones(tgt_len, src_len, dtype=torch.bool, device=q.device).triu(1),
                float("-inf"),
            )
        if mask is not None:
            scores = scores + mask
        weights = scores.softmax(dim=-1)
        attn = F.dropout(weights, p=p) if p > 0 else weights
        out = attn @ v
    else:
        weights = None
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=causal)
    if not need_weights:
        weights = None
    out = out.permute(2, 0, 1, 3).reshape(tgt_len, bsz, embed)
    out = _lin(mode, out, out_proj_weight, out_proj_bias)
    if weights is not None and average_attn_weights:
        weights = weights.mean(dim=1)
    return out, weights


def _merge_masks(
    attn_mask: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    bsz: int,
    num_heads: int,
    tgt_len: int,
    src_len: int,
    dtype: torch.dtype,
) -> torch.Tensor | None:
    """One additive float mask of shape broadcastable to ``(bsz, H, tgt, src)``, or None."""

    def additive(m: torch.Tensor) -> torch.Tensor:
        if m.dtype == torch.bool:
            return torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(m, float("-inf"))
        return m.to(dtype)

    mask = None
    if attn_mask is not None:
        mask = additive(attn_mask)
        mask = (
            mask.view(1, 1, tgt_len, src_len)
            if mask.dim() == 2
            else mask.view(bsz, num_heads, tgt_len, src_len)
        )
    if key_padding_mask is not None:
        kpm = additive(key_padding_mask).view(bsz, 1, 1, src_len)
        mask = kpm if mask is None else mask + kpm
    return mask


def _h_transpose(mode: _LowRankMode, self: torch.Tensor, *dims: Any) -> Any:
    """``W.T`` / ``W.t()`` / ``W.mT`` / ``W.transpose(0, 1)`` of an owned matrix (Falcon's
    ``input @ self.weight.T``): an owned matrix of its own whose factors are ``W``'s swapped,
    ``(A B^T)^T = B A^T``."""
    f = mode.factor(self)
    if f is None or not _ops.matrix_transpose(self, dims):
        return NotImplemented
    flipped = _Factor(self.t(), f"{f.name}.T", cached={"a": f.b, "b": f.a})
    mode.factors[id(flipped.weight)] = flipped
    return flipped.weight


def _h_getitem(mode: _LowRankMode, self: torch.Tensor, index: Any) -> Any:
    """``W[ids]`` with an integer tensor of ids: ``F.embedding(ids, W)`` (Whisper's position
    lookups); other indexing falls back."""
    if mode.factor(self) is None or not _ops.is_lookup(index):
        return NotImplemented
    return _h_embedding(mode, index, self)


def _h_data_ptr(mode: _LowRankMode, t: torch.Tensor) -> Any:
    """``Tensor.data_ptr``: the centre's for an owned weight, a stand-in for a batched tensor."""
    if mode.factor(t) is not None:
        return t.data_ptr()
    return _SHARED[torch.Tensor.data_ptr](mode, t)


_SHARED = recurrent_handlers()
_LowRankMode.HANDLERS = register(
    {
        **_SHARED,
        torch.Tensor.data_ptr: _h_data_ptr,
        F.linear: _h_linear,
        F.embedding: _h_embedding,
        F.conv1d: _conv_handler(F.conv1d, 1),
        F.conv2d: _conv_handler(F.conv2d, 2),
        F.conv3d: _conv_handler(F.conv3d, 3),
        F.multi_head_attention_forward: _h_mha,
        torch.addmm: _h_addmm,
        torch.matmul: _h_matmul,
        torch.mm: _h_matmul,
        torch.Tensor.__matmul__: _h_matmul,
        torch.Tensor.matmul: _h_matmul,
        **dict.fromkeys(_ops.TRANSPOSES, _h_transpose),
        torch.Tensor.__getitem__: _h_getitem,
    }
)


# ---------------------------------------------------------------------------- entry point
def _attention_fast_path(
    mod: nn.MultiheadAttention, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> bool:
    """Whether plain PyTorch would run this ``nn.MultiheadAttention`` call through its fused
    inference path (``torch._native_multi_head_attention``) rather than
    ``F.multi_head_attention_forward``: the module-level conditions of
    ``nn.MultiheadAttention.forward`` (torch 2.11-2.13). Under the low-rank forward the fused
    path is never taken (an active torch-function mode turns it off), so where the two paths
    differ, the handler needs to know which one PyTorch would have taken."""
    names = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask")
    bound: dict[str, Any] = dict(zip(names, args, strict=False))
    bound.update((k, v) for k, v in kwargs.items() if k in names)
    query: Any = bound.get("query")
    key, value = bound.get("key"), bound.get("value")
    kpm, mask = bound.get("key_padding_mask"), bound.get("attn_mask")
    if any(m is not None and torch.is_floating_point(m) for m in (kpm, mask)):
        return False
    if not isinstance(query, torch.Tensor):
        return False
    dtype: torch.dtype = query.dtype
    needs_grad: bool = query.requires_grad
    if query.dim() != 3 or query is not key or key is not value:
        return False
    projections: list[torch.Tensor] = []
    for proj in (mod.in_proj_weight, mod.in_proj_bias):
        if proj is None or proj.dtype != dtype:
            return False
        projections.append(proj)
    return (
        torch.backends.mha.get_fastpath_enabled()
        and not mod.training
        and mod.num_heads % 2 == 0
        and mod.batch_first
        and mod.bias_k is None
        and mod.bias_v is None
        and not mod.add_zero_attn
        and mod._qkv_same_embed_dim
        and not torch.is_autocast_enabled()
        and not (
            torch.is_grad_enabled() and (needs_grad or any(x.requires_grad for x in projections))
        )
    )


def _track_attention(module: nn.Module, stack: list[bool]) -> list[Any]:
    """Hooks that push, for every ``nn.MultiheadAttention`` call inside ``module``, whether
    plain PyTorch would take its fused path (popped when the call ends)."""

    def enter(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        stack.append(_attention_fast_path(mod, args, kwargs))  # type: ignore[arg-type]

    def leave(mod: nn.Module, args: Any, kwargs: Any, out: Any) -> None:
        stack.pop()

    handles = []
    for mod in module.modules():
        if isinstance(mod, nn.MultiheadAttention):
            handles.append(mod.register_forward_pre_hook(enter, with_kwargs=True))
            handles.append(mod.register_forward_hook(leave, with_kwargs=True, always_call=True))
    return handles


def lowrank_forward(
    population: _Population,
    module: nn.Module,
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any],
    *,
    per_member: bool,
    strict: bool,
    randomness: str,
) -> tuple[Any, list[str]]:
    """Evaluate ``module`` for every local member of ``population`` with the low-rank forward.

    Owned low-rank matrices stay shared (their factors ``(size, m, r)``, ``(size, n, r)`` are
    the only per-member data); owned dense-noise tensors are passed per member.

    Returns:
        The outputs (a leading ``(size,)`` dimension on every tensor) and the sorted names of
        the owned matrices that had to be materialized.
    """
    size = population.size
    if size == 0:
        raise ValueError("Invalid population: it has no local members to evaluate")
    batched: dict[str, torch.Tensor] = {}
    # Owned low-rank matrices stay shared. Those the fused kernels may evaluate (CUDA, half
    # precision) pass the generation's draws plus each member's draw index and scale; the others
    # pass each member's factors, built once per generation (cheaper than a gather under vmap).
    lazy_names: dict[int, str] = {}
    drawn: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (centre, A draws, B draws)
    coeffs: list[torch.Tensor] = []
    given: list[torch.Tensor] = []
    factors_ab: list[tuple[torch.Tensor, torch.Tensor]] = []
    sources: dict[int, OnTheFly] = {}
    # Antithetic pairs that a shard keeps whole: members 2i, 2i + 1 of it share a draw.
    paired = bool(population.antithetic) and size % 2 == 0
    for name, t in named_tensors(module):
        if not population.owns(t):
            continue
        noise = population.entry(t).noise  # views of the noise buffers, maybe not yet filled
        if not noise.is_low_rank:
            batched[name] = population.perturbed(t)
        elif id(t) not in lazy_names:
            lazy_names[id(t)] = name
            if fused_available(t):
                assert noise.a is not None and noise.b is not None
                drawn.append((t, noise.a, noise.b))
                coeffs.append(population.coefficients(t, noise.factor_scale))
                origin = population.noise_source(t)
                sources[id(t)] = (
                    OnTheFly(population.fill_noise, *origin, noise.rank, paired)
                    if origin is not None
                    else OnTheFly(population.fill_noise)
                )
            else:
                given.append(t)
                factors_ab.append(population.lowrank_factors(t))
    kw = dict(kwargs)
    if not lazy_names and not batched and not per_member:
        return materialized_forward(population, module, args, kw, per_member, randomness), []
    batched.update(scratch_buffers(module, size))
    draws = population.member_table("pairs", coeffs[0].device, torch.int64) if coeffs else None
    fallbacks: set[str] = set()
    attention: list[bool] = []

    def call(
        params: dict[str, torch.Tensor],
        draw: torch.Tensor | None,
        cs: list[torch.Tensor],
        ab: list[tuple[torch.Tensor, torch.Tensor]],
        xs: tuple[Any, ...],
        kw: dict[str, Any],
    ) -> Any:
        factors = {
            id(w): _Factor(
                w,
                lazy_names[id(w)],
                a_draws=a,
                b_draws=b,
                draw=draw,
                coeff=c,
                source=sources[id(w)],
            )
            for (w, a, b), c in zip(drawn, cs, strict=True)
        }
        factors.update(
            {
                id(w): _Factor(w, lazy_names[id(w)], cached={"a": a, "b": b})
                for w, (a, b) in zip(given, ab, strict=True)
            }
        )
        mode = _LowRankMode(factors, strict, fallbacks)
        mode.attention = attention
        with mode:
            if not params:
                return module(*xs, **kw)
            return torch.func.functional_call(
                module, params, xs, kw, tie_weights=False, strict=False
            )

    handles = _track_attention(module, attention)
    try:
        out = vmap_members(
            call, randomness, (batched, draws, coeffs, factors_ab), (args, kw), per_member
        )
    finally:
        for h in handles:
            h.remove()
    return out, sorted(fallbacks)
