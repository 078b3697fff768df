"""The rank-r corrections of the layers that use an owned matrix, written once for both
population forwards.

Member ``p``'s matrix is ``W + a_p b_p^T`` (``a_p`` ``(m, r)`` already scaled by
``sigma * sign_p / sqrt(r)``, ``b_p`` ``(n, r)``), so every layer that is linear in ``W`` adds a
correction computed from the factors. The functions take the factors with *group* dimensions in
front: none inside ``torch.func.vmap`` (the low-rank forward, where a member sees its own
``(m, r)`` and ``(n, r)``), or ``(P,)`` in the rows-of-one-batch forward, where the input is
regrouped member-major as ``(P, L, ...)`` first. The matrix products then run over the group
with ``torch.matmul``'s batching.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

__all__ = [
    "TRANSPOSES",
    "conv_correction",
    "embedding_correction",
    "is_lookup",
    "linear_correction",
    "matrix_transpose",
    "right_correction",
]

# The ways of transposing a matrix (Falcon's ``input @ self.weight.T``). A transposed owned
# matrix is owned too: ``(W + a b^T)^T = W^T + b a^T``, its factors swapped.
TRANSPOSES = (
    torch.Tensor.T.__get__,  # type: ignore[attr-defined]
    torch.Tensor.mT.__get__,  # type: ignore[attr-defined]
    torch.Tensor.t,
    torch.t,
    torch.Tensor.transpose,
    torch.transpose,
)


def is_lookup(index: Any) -> bool:
    """Whether ``W[index]`` is a table lookup, ``F.embedding(index, W)`` (an integer tensor of
    ids, as Whisper's ``embed_positions.weight[position_ids]``)."""
    return (
        isinstance(index, torch.Tensor)
        and not index.is_floating_point()
        and not index.is_complex()
        and index.dtype != torch.bool
    )


def matrix_transpose(t: torch.Tensor, dims: tuple[Any, ...]) -> bool:
    """Whether one of :data:`TRANSPOSES` called on ``t`` with ``dims`` swaps the two dimensions
    of a matrix."""
    return t.dim() == 2 and (not dims or sorted(int(d) % 2 for d in dims) == [0, 1])


def _groups(a: torch.Tensor) -> int:
    return a.dim() - 2


def _narrow_product(rows: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """``rows @ f`` for a factor ``f`` ``(*G, n, r)`` of few columns. On the CPU, for 16 rows or
    more, it is computed as ``(f^T rows^T)^T``: with an output only ``r`` wide, MKL's (batched)
    GEMM measured 2-4x slower than the transposed product (``(16, 64, 64) @ (16, 64, 4)``: 64
    against 16 us); with fewer rows (a decode step) the transposes cost more than they save."""
    if rows.device.type == "cpu" and rows.dim() >= 2 and rows.shape[-2] >= 16:
        return (f.transpose(-1, -2) @ rows.transpose(-1, -2)).transpose(-1, -2)
    return rows @ f


def linear_correction(
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    base: torch.Tensor | None = None,
    inplace: bool = False,
) -> torch.Tensor:
    """``(x b) a^T``: the rank-r part of ``x W^T`` (``nn.Linear``'s layout, ``W`` ``(m, n)``),
    added to ``base`` (the shared product, same shape as the result) when given; with
    ``inplace``, added into ``base`` itself (a fresh tensor the caller owns, never a view of an
    input: it saves a pass over the result).

    ``x`` is ``(*G, ..., n)`` for factors ``a`` ``(*G, m, r)``, ``b`` ``(*G, n, r)``; returns
    ``(*G, ..., m)``.
    """
    g = _groups(a)
    lead, n, m = x.shape[:g], x.shape[-1], a.shape[-2]
    flat = x.dim() == g + 2  # already (*G, L, n): no reshapes (the rows forward's case)
    rows = x if flat else x.reshape(*lead, -1, n)
    if a.dtype != x.dtype:
        a, b = a.to(x.dtype), b.to(x.dtype)
    h = _narrow_product(rows, b)
    a_t = a.transpose(-1, -2)
    if base is None:
        out = h @ a_t
    elif g == 0:
        base2 = base if flat else base.reshape(-1, m)
        out = base2.addmm_(h, a_t) if inplace else torch.addmm(base2, h, a_t)
    elif g == 1:
        base3 = base if flat else base.reshape(*lead, -1, m)
        out = base3.baddbmm_(h, a_t) if inplace else torch.baddbmm(base3, h, a_t)
    else:
        return base + (h @ a_t).reshape(*x.shape[:-1], m)
    return out if flat else out.reshape(*x.shape[:-1], m)


def right_correction(
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    base: torch.Tensor | None = None,
    inplace: bool = False,
) -> torch.Tensor:
    """``(x a) b^T``: the rank-r part of ``x @ W`` for ``W`` stored ``(m, n)`` and used as the
    right operand (``torch.addmm(bias, x, W)``, as Hugging Face's GPT-2 ``Conv1D`` does), added
    to ``base`` (in place with ``inplace``) as in :func:`linear_correction`.

    ``x`` is ``(*G, ..., m)``; returns ``(*G, ..., n)``.
    """
    return linear_correction(x, b, a, base, inplace)


def embedding_correction(ids: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a[ids] b^T``: the rank-r part of ``F.embedding(ids, W)`` (``W`` ``(V, D)``).

    ``ids`` is ``(*G, ...)``; returns ``(*G, ..., D)``.
    """
    g = _groups(a)
    if g == 0:
        return F.embedding(ids, a) @ b.transpose(-1, -2)
    # One table for the whole group: member p's rows start at p * V.
    groups, vocab, r = a.shape[0], a.shape[-2], a.shape[-1]
    offset = torch.arange(groups, device=ids.device).view(groups, *([1] * (ids.dim() - 1))) * vocab
    rows = F.embedding(ids + offset, a.reshape(groups * vocab, r))  # (P, ..., r)
    flat = rows.reshape(groups, -1, r) @ b.transpose(-1, -2)
    return flat.reshape(*ids.shape, b.shape[-2])


def conv_correction(
    conv: Callable[..., torch.Tensor],
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    kernel: tuple[int, ...],
    stride: Any,
    padding: Any,
    dilation: Any,
) -> torch.Tensor:
    """The rank-r part of ``conv(x, W)`` for a kernel ``W`` ``(out, in, *kernel)`` seen as the
    matrix ``(out, in * prod(kernel))``: ``b`` viewed as ``r`` kernels of shape ``(in, *kernel)``
    (an r-channel convolution), then a 1x1 convolution that mixes the ``r`` channels into the
    outputs with ``a``.

    ``x`` is ``(*G, N, in, *spatial)``; returns ``(*G, N, out, *spatial')``. With a group
    dimension the members' kernels run as one grouped convolution.
    """
    g = _groups(a)
    out_ch, r = a.shape[-2], a.shape[-1]
    in_ch = b.shape[-2] // max(1, _prod(kernel))
    ones = [1] * len(kernel)
    if g == 0:
        k_b = b.to(x.dtype).transpose(-1, -2).reshape(r, in_ch, *kernel)
        k_a = a.to(x.dtype).reshape(out_ch, r, *ones)
        return conv(conv(x, k_b, None, stride, padding, dilation), k_a)
    groups, n = x.shape[0], x.shape[1]
    # (P, N, C, *S) -> (N, P * C, *S): each member's samples meet its own kernels (groups=P).
    xs = x.transpose(0, 1).reshape(n, groups * in_ch, *x.shape[3:])
    k_b = b.to(x.dtype).transpose(-1, -2).reshape(groups * r, in_ch, *kernel)
    k_a = a.to(x.dtype).reshape(groups * out_ch, r, *ones)
    h = conv(xs, k_b, None, stride, padding, dilation, groups)
    out = conv(h, k_a, None, 1, 0, 1, groups)  # (N, P * out, *S')
    return out.reshape(n, groups, out_ch, *out.shape[2:]).transpose(0, 1)


def _prod(values: tuple[int, ...]) -> int:
    p = 1
    for v in values:
        p *= int(v)
    return p
