"""Triton kernels for a low-rank linear layer with one input row per member, generating each
member's factors where they are used (never in global memory).

With one row per member (RL observations, LM sampling) the correction ``c_p (x_p B_d) A_d^T`` of
member ``p`` (draw ``d``) reads ``A_d`` and ``B_d`` once for a single row, so a pre-drawn noise
buffer costs as much memory traffic as the GEMM itself at larger ranks. These kernels compute
the factors from the noise definition (:mod:`torcheggroll.noise`; the Philox rounds and the
float transform of :mod:`torcheggroll._triton_noise`) in registers:

* ``h[p] = coeff[p] * x[p] @ B_{draw[p]}`` (``(P, r)``, stream 1 of the parameter's noise);
* ``y[p] += h[p] @ A_{draw[p]}^T (+ bias[p])`` in place on the shared GEMM's output
  (stream 0).

With antithetic pairs (``PAIRED``: members ``2i, 2i + 1`` share a draw) each program draws a
pair's factors once for both members. Entry ``e`` of a draw's stream is lane ``e % 4`` of Philox
block ``e // 4``: a rank that is a multiple of 4 takes one block per row of the factor and lane
``q`` is rank index ``4 kc + q``; ranks 1 and 2 take one block for 4 or 2 rows.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import triton
import triton.language as tl

from ._triton_noise import _key_and_generation, block_normals

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_STREAM_B = 1 << 31


def supported_rank(rank: int) -> bool:
    """Ranks these kernels generate: 1, 2 and multiples of 4."""
    return rank in (1, 2) or rank % 4 == 0


@triton.jit
def _interleave2(a, b):
    """``(D, W)``, ``(D, W)`` -> ``(D, 2W)``: ``a0, b0, a1, b1, ...``."""
    return tl.reshape(tl.join(a, b), (a.shape[0], 2 * a.shape[1]))


@triton.jit
def _interleave4(z0, z1, z2, z3):
    """Four ``(D, W)`` -> ``(D, 4W)``: ``z0[0], z1[0], z2[0], z3[0], z0[1], ...``."""
    return tl.reshape(tl.join(tl.join(z0, z2), tl.join(z1, z3)), (z0.shape[0], 4 * z0.shape[1]))


@triton.jit
def _normals(j, draw, param, gen, k0, k1, STREAM: tl.constexpr):
    """The four normals of blocks ``j`` (``(D, W)``) of stream ``STREAM`` of draws ``draw``
    (``(D, 1)``)."""
    c0 = j.to(tl.uint32)
    if STREAM == 1:
        c0 = c0 | 0x80000000
    c1 = (tl.zeros_like(j) + draw).to(tl.uint32)
    c2 = tl.zeros_like(c0) + param
    c3 = tl.zeros_like(c0) + gen
    x0, x1, x2, x3 = tl.random.philox_impl(c0, c1, c2, c3, k0, k1, 10)
    return block_normals(x0, x1, x2, x3)


@triton.jit
def _column(t, cols, idx):
    """Column ``idx`` of ``t`` ``(D, RANK_P2)`` as ``(D,)``."""
    return tl.sum(tl.where(cols[None, :] == idx, t, 0.0), axis=1)


@triton.jit(do_not_specialize=["k0", "k1", "gen", "param"])
def _projection(
    x_ptr,
    coeff_ptr,
    draw_ptr,
    h_ptr,
    key_ptr,
    gen_ptr,
    k0,
    k1,
    gen,
    param,
    P,
    K,
    stride_x,
    ON_DEVICE: tl.constexpr,
    RANK: tl.constexpr,
    RANK_P2: tl.constexpr,
    PAIRED: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    k0, k1, gen = _key_and_generation(key_ptr, k0, k1, gen_ptr, gen, ON_DEVICE)
    param = param.to(tl.uint32)
    G: tl.constexpr = 2 if PAIRED else 1
    unit = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    first = unit * G
    umask = first < P
    draw = tl.load(draw_ptr + first, mask=umask, other=0)[:, None]
    cols = tl.arange(0, RANK_P2)
    acc0 = tl.zeros((BLOCK_D, RANK_P2), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_D, RANK_P2), dtype=tl.float32)
    row0 = x_ptr + first[:, None].to(tl.int64) * stride_x
    for i0 in range(tl.program_id(1) * BLOCK_K, K, SPLIT_K * BLOCK_K):
        i = i0 + tl.arange(0, BLOCK_K)
        m = umask[:, None] & (i < K)[None, :]
        x0 = tl.load(row0 + i[None, :], mask=m, other=0.0).to(tl.float32)
        x1 = x0
        if PAIRED:
            x1 = tl.load(row0 + stride_x + i[None, :], mask=m, other=0.0).to(tl.float32)
        if RANK % 4 == 0:
            for kc in tl.static_range(RANK // 4):
                j = i[None, :] * (RANK // 4) + kc
                z0, z1, z2, z3 = _normals(j, draw, param, gen, k0, k1, 1)
                acc0 += tl.where(cols[None, :] == 4 * kc + 0, tl.sum(x0 * z0, axis=1)[:, None], 0.0)
                acc0 += tl.where(cols[None, :] == 4 * kc + 1, tl.sum(x0 * z1, axis=1)[:, None], 0.0)
                acc0 += tl.where(cols[None, :] == 4 * kc + 2, tl.sum(x0 * z2, axis=1)[:, None], 0.0)
                acc0 += tl.where(cols[None, :] == 4 * kc + 3, tl.sum(x0 * z3, axis=1)[:, None], 0.0)
                if PAIRED:
                    acc1 += tl.where(
                        cols[None, :] == 4 * kc + 0, tl.sum(x1 * z0, axis=1)[:, None], 0.0
                    )
                    acc1 += tl.where(
                        cols[None, :] == 4 * kc + 1, tl.sum(x1 * z1, axis=1)[:, None], 0.0
                    )
                    acc1 += tl.where(
                        cols[None, :] == 4 * kc + 2, tl.sum(x1 * z2, axis=1)[:, None], 0.0
                    )
                    acc1 += tl.where(
                        cols[None, :] == 4 * kc + 3, tl.sum(x1 * z3, axis=1)[:, None], 0.0
                    )
        elif RANK == 1:
            j = i0 // 4 + tl.arange(0, BLOCK_K // 4)[None, :]
            z0, z1, z2, z3 = _normals(j, draw, param, gen, k0, k1, 1)
            z = _interleave4(z0, z1, z2, z3)
            acc0 += tl.sum(x0 * z, axis=1)[:, None]
            if PAIRED:
                acc1 += tl.sum(x1 * z, axis=1)[:, None]
        else:  # RANK == 2: a block holds rows 2b (lanes 0, 1) and 2b + 1 (lanes 2, 3)
            j = i0 // 2 + tl.arange(0, BLOCK_K // 2)[None, :]
            z0, z1, z2, z3 = _normals(j, draw, param, gen, k0, k1, 1)
            za = _interleave2(z0, z2)
            zb = _interleave2(z1, z3)
            acc0 += tl.where(cols[None, :] == 0, tl.sum(x0 * za, axis=1)[:, None], 0.0)
            acc0 += tl.where(cols[None, :] == 1, tl.sum(x0 * zb, axis=1)[:, None], 0.0)
            if PAIRED:
                acc1 += tl.where(cols[None, :] == 0, tl.sum(x1 * za, axis=1)[:, None], 0.0)
                acc1 += tl.where(cols[None, :] == 1, tl.sum(x1 * zb, axis=1)[:, None], 0.0)
    smask = umask[:, None] & (cols < RANK)[None, :]
    c0 = tl.load(coeff_ptr + first, mask=umask, other=0.0)[:, None]
    out0 = h_ptr + first[:, None].to(tl.int64) * RANK + cols[None, :]
    if SPLIT_K == 1:
        tl.store(out0, acc0 * c0, mask=smask)
    else:
        tl.atomic_add(out0, acc0 * c0, mask=smask)
    if PAIRED:
        c1 = tl.load(coeff_ptr + first + 1, mask=umask, other=0.0)[:, None]
        if SPLIT_K == 1:
            tl.store(out0 + RANK, acc1 * c1, mask=smask)
        else:
            tl.atomic_add(out0 + RANK, acc1 * c1, mask=smask)


@triton.jit(do_not_specialize=["k0", "k1", "gen", "param"])
def _correction(
    y_ptr,
    h_ptr,
    draw_ptr,
    bias_ptr,
    key_ptr,
    gen_ptr,
    k0,
    k1,
    gen,
    param,
    P,
    N,
    stride_y,
    stride_bias,
    HAS_BIAS: tl.constexpr,
    ON_DEVICE: tl.constexpr,
    RANK: tl.constexpr,
    RANK_P2: tl.constexpr,
    PAIRED: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    k0, k1, gen = _key_and_generation(key_ptr, k0, k1, gen_ptr, gen, ON_DEVICE)
    param = param.to(tl.uint32)
    G: tl.constexpr = 2 if PAIRED else 1
    unit = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    first = unit * G
    umask = first < P
    draw = tl.load(draw_ptr + first, mask=umask, other=0)[:, None]
    n0 = tl.program_id(1) * BLOCK_N
    n = n0 + tl.arange(0, BLOCK_N)
    m = umask[:, None] & (n < N)[None, :]
    cols = tl.arange(0, RANK_P2)
    hmask = umask[:, None] & (cols < RANK)[None, :]
    h_rows = h_ptr + first[:, None].to(tl.int64) * RANK + cols[None, :]
    h0 = tl.load(h_rows, mask=hmask, other=0.0)
    h1 = h0
    if PAIRED:
        h1 = tl.load(h_rows + RANK, mask=hmask, other=0.0)
    y_rows = y_ptr + first[:, None].to(tl.int64) * stride_y + n[None, :]
    y0 = tl.load(y_rows, mask=m, other=0.0).to(tl.float32)
    y1 = y0
    if PAIRED:
        y1 = tl.load(y_rows + stride_y, mask=m, other=0.0).to(tl.float32)
    if RANK % 4 == 0:
        for kc in tl.static_range(RANK // 4):
            j = n[None, :] * (RANK // 4) + kc
            z0, z1, z2, z3 = _normals(j, draw, param, gen, k0, k1, 0)
            y0 += (
                _column(h0, cols, 4 * kc)[:, None] * z0
                + _column(h0, cols, 4 * kc + 1)[:, None] * z1
            )
            y0 += (
                _column(h0, cols, 4 * kc + 2)[:, None] * z2
                + _column(h0, cols, 4 * kc + 3)[:, None] * z3
            )
            if PAIRED:
                y1 += (
                    _column(h1, cols, 4 * kc)[:, None] * z0
                    + _column(h1, cols, 4 * kc + 1)[:, None] * z1
                )
                y1 += (
                    _column(h1, cols, 4 * kc + 2)[:, None] * z2
                    + _column(h1, cols, 4 * kc + 3)[:, None] * z3
                )
    elif RANK == 1:
        j = n0 // 4 + tl.arange(0, BLOCK_N // 4)[None, :]
        z0, z1, z2, z3 = _normals(j, draw, param, gen, k0, k1, 0)
        z = _interleave4(z0, z1, z2, z3)
        y0 += _column(h0, cols, 0)[:, None] * z
        if PAIRED:
            y1 += _column(h1, cols, 0)[:, None] * z
    else:
        j = n0 // 2 + tl.arange(0, BLOCK_N // 2)[None, :]
        z0, z1, z2, z3 = _normals(j, draw, param, gen, k0, k1, 0)
        za = _interleave2(z0, z2)
        zb = _interleave2(z1, z3)
        y0 += _column(h0, cols, 0)[:, None] * za + _column(h0, cols, 1)[:, None] * zb
        if PAIRED:
            y1 += _column(h1, cols, 0)[:, None] * za + _column(h1, cols, 1)[:, None] * zb
    if HAS_BIAS:
        b_rows = bias_ptr + first[:, None].to(tl.int64) * stride_bias + n[None, :]
        y0 += tl.load(b_rows, mask=m, other=0.0).to(tl.float32)
        if PAIRED:
            y1 += tl.load(b_rows + stride_bias, mask=m, other=0.0).to(tl.float32)
    tl.store(y_rows, y0.to(y_ptr.dtype.element_ty), mask=m)
    if PAIRED:
        tl.store(y_rows + stride_y, y1.to(y_ptr.dtype.element_ty), mask=m)


def _counters(key: Any, gen: Any, like: torch.Tensor) -> tuple[Any, ...]:
    if isinstance(gen, torch.Tensor) or isinstance(key, torch.Tensor):
        return key, gen, 0, 0, 0, True
    return like, like, int(key[0]), int(key[1]), int(gen), False


def linear_rowwise(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    draw: torch.Tensor,
    coeff: torch.Tensor,
    key: Any,
    gen: Any,
    param_index: int,
    rank: int,
    paired: bool,
) -> torch.Tensor:
    """``y[p] = x[p] W^T + bias[p] + coeff[p] (x[p] B_d) A_d^T`` for one row per member.

    Args:
        x: ``(P, n)``; weight ``(m, n)``; bias ``None``, ``(m,)`` or ``(P, m)``.
        draw, coeff: ``(P,)`` each member's draw and scale ``sigma * sign / sqrt(r)``.
        key, gen: the Philox key ``(k0, k1)`` and the generation, ints or device tensors.
        param_index: the parameter's index (the counter word ``c2``).
        paired: members ``2i, 2i + 1`` share a draw (antithetic pairs; ``P`` even).

    Returns:
        ``(P, m)`` in ``x.dtype``.
    """
    P, n = x.shape
    m = weight.shape[0]
    shared = bias if bias is not None and bias.dim() == 1 else None
    y = torch.nn.functional.linear(x, weight, shared)
    per_member = bias if bias is not None and bias.dim() == 2 else None
    key_t, gen_t, k0, k1, g, on_device = _counters(key, gen, x)
    units = P // 2 if paired else P
    rank_p2 = triton.next_power_of_2(rank)
    block_d = 4 if _INTERPRET else 8
    block_k = 64 if _INTERPRET else 128
    split_k = (
        1 if _INTERPRET else max(1, min(16, triton.cdiv(132 * 2, triton.cdiv(units, block_d))))
    )
    split_k = min(split_k, triton.cdiv(n, block_k))
    # (split over K, the programs add their parts into h)
    h = (torch.zeros if split_k > 1 else torch.empty)(P, rank, device=x.device, dtype=torch.float32)
    if coeff.dtype != torch.float32 or not coeff.is_contiguous():
        coeff = coeff.to(torch.float32).contiguous()
    if draw.dtype != torch.int64 or not draw.is_contiguous():
        draw = draw.to(torch.int64).contiguous()
    xs = x if x.stride(-1) == 1 else x.contiguous()
    _projection[(triton.cdiv(units, block_d), split_k)](
        xs,
        coeff,
        draw,
        h,
        key_t,
        gen_t,
        k0,
        k1,
        g,
        param_index,
        P,
        n,
        xs.stride(0),
        ON_DEVICE=on_device,
        RANK=rank,
        RANK_P2=rank_p2,
        PAIRED=paired,
        BLOCK_D=block_d,
        BLOCK_K=block_k,
        SPLIT_K=split_k,
    )
    block_n = 64 if _INTERPRET else 128
    b = per_member.contiguous() if per_member is not None else y
    _correction[(triton.cdiv(units, block_d), triton.cdiv(m, block_n))](
        y,
        h,
        draw,
        b,
        key_t,
        gen_t,
        k0,
        k1,
        g,
        param_index,
        P,
        m,
        y.stride(0),
        b.stride(0) if per_member is not None else 0,
        HAS_BIAS=per_member is not None,
        ON_DEVICE=on_device,
        RANK=rank,
        RANK_P2=rank_p2,
        PAIRED=paired,
        BLOCK_D=block_d,
        BLOCK_N=block_n,
    )
    return y
