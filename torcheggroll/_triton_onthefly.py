"""Triton kernels for a low-rank linear layer with a few input rows per member, generating each
member's factors where they are used (never in global memory).

With one row per member (RL observations, LM sampling) or a few (a decode step of several
prompts each) the correction ``c_p (x_i B_d) A_d^T`` of member ``p`` (draw ``d``) reads ``A_d``
and ``B_d`` for a handful of rows, so a pre-drawn noise buffer costs as much memory traffic as
the GEMM itself at larger ranks. These kernels compute the factors from the noise definition
(:mod:`torcheggroll.noise`; the Philox rounds and the float transform of
:mod:`torcheggroll._triton_noise`) in registers:

* ``h[i] = coeff[p] * x[i] @ B_{draw[p]}`` (``(M, r)``, stream 1 of the parameter's noise);
* ``y[i] += h[i] @ A_{draw[p]}^T (+ bias[p])`` in place on the shared GEMM's output
  (stream 0).

A *unit* is the ``G`` consecutive rows that share a draw: a member's rows, or with antithetic
pairs (members ``2i, 2i + 1`` share a draw) both members' rows. Each program draws a unit's
factors once for all of its rows. Entry ``e`` of a draw's stream is lane ``e % 4`` of Philox
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
    """Column ``idx`` of ``t`` ``(D, G, RANK_P2)`` as ``(D, G)``."""
    return tl.sum(tl.where(cols[None, None, :] == idx, t, 0.0), axis=2)


@triton.jit
def _dot_rows(x, z):
    """``x`` ``(D, G, W)`` against one noise row per unit ``z`` ``(D, W)``: ``(D, G, 1)``."""
    return tl.sum(x * z[:, None, :], axis=2)[:, :, None]


@triton.jit
def _add4(acc, x, z0, z1, z2, z3, cols, base):
    """``acc`` ``(D, RANK_P2)`` plus the dot products of rows ``x`` ``(D, W)`` with four noise
    rows ``(D, W)`` in columns ``base .. base + 3``."""
    acc += tl.where(cols[None, :] == base + 0, tl.sum(x * z0, axis=1)[:, None], 0.0)
    acc += tl.where(cols[None, :] == base + 1, tl.sum(x * z1, axis=1)[:, None], 0.0)
    acc += tl.where(cols[None, :] == base + 2, tl.sum(x * z2, axis=1)[:, None], 0.0)
    acc += tl.where(cols[None, :] == base + 3, tl.sum(x * z3, axis=1)[:, None], 0.0)
    return acc


@triton.jit
def _add2(acc, x, za, zb, cols):
    """``acc`` ``(D, RANK_P2)`` plus the dot products of ``x`` with ``za``, ``zb`` in columns
    0 and 1 (rank 2)."""
    acc += tl.where(cols[None, :] == 0, tl.sum(x * za, axis=1)[:, None], 0.0)
    acc += tl.where(cols[None, :] == 1, tl.sum(x * zb, axis=1)[:, None], 0.0)
    return acc


@triton.jit
def _col(h, cols, idx):
    """Column ``idx`` of ``h`` ``(D, RANK_P2)`` as ``(D, 1)``."""
    return tl.sum(tl.where(cols[None, :] == idx, h, 0.0), axis=1)[:, None]


@triton.jit
def _expand4(y, h, cols, base, z0, z1, z2, z3):
    """``y`` ``(D, W)`` plus columns ``base .. base + 3`` of ``h`` times four noise rows."""
    y += _col(h, cols, base) * z0 + _col(h, cols, base + 1) * z1
    y += _col(h, cols, base + 2) * z2 + _col(h, cols, base + 3) * z3
    return y


@triton.jit(do_not_specialize=["k0", "k1", "gen", "param"])
def _projection_pair(
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
    ROWS,
    stride_x,
    ON_DEVICE: tl.constexpr,
    RANK: tl.constexpr,
    RANK_P2: tl.constexpr,
    G: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    """:func:`_projection` for units of one or two rows, held as two ``(BLOCK_D, .)`` tiles
    (measured faster than the ``(BLOCK_D, G, .)`` layout at rank 16)."""
    k0, k1, gen = _key_and_generation(key_ptr, k0, k1, gen_ptr, gen, ON_DEVICE)
    param = param.to(tl.uint32)
    first = (tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)) * G
    umask = first < P
    draw = tl.load(draw_ptr + first // ROWS, mask=umask, other=0)[:, None]
    cols = tl.arange(0, RANK_P2)
    acc0 = tl.zeros((BLOCK_D, RANK_P2), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_D, RANK_P2), dtype=tl.float32)
    row0 = x_ptr + first[:, None].to(tl.int64) * stride_x
    for i0 in range(tl.program_id(1) * BLOCK_K, K, SPLIT_K * BLOCK_K):
        i = i0 + tl.arange(0, BLOCK_K)
        m = umask[:, None] & (i < K)[None, :]
        x0 = tl.load(row0 + i[None, :], mask=m, other=0.0).to(tl.float32)
        x1 = x0
        if G == 2:
            x1 = tl.load(row0 + stride_x + i[None, :], mask=m, other=0.0).to(tl.float32)
        if RANK % 4 == 0:
            for kc in tl.static_range(RANK // 4):
                z0, z1, z2, z3 = _normals(
                    i[None, :] * (RANK // 4) + kc, draw, param, gen, k0, k1, 1
                )
                acc0 = _add4(acc0, x0, z0, z1, z2, z3, cols, 4 * kc)
                if G == 2:
                    acc1 = _add4(acc1, x1, z0, z1, z2, z3, cols, 4 * kc)
        elif RANK == 1:
            j = i0 // 4 + tl.arange(0, BLOCK_K // 4)[None, :]
            z0, z1, z2, z3 = _normals(j, draw, param, gen, k0, k1, 1)
            z = _interleave4(z0, z1, z2, z3)
            acc0 += tl.sum(x0 * z, axis=1)[:, None]
            if G == 2:
                acc1 += tl.sum(x1 * z, axis=1)[:, None]
        else:
            j = i0 // 2 + tl.arange(0, BLOCK_K // 2)[None, :]
            z0, z1, z2, z3 = _normals(j, draw, param, gen, k0, k1, 1)
            za = _interleave2(z0, z2)
            zb = _interleave2(z1, z3)
            acc0 = _add2(acc0, x0, za, zb, cols)
            if G == 2:
                acc1 = _add2(acc1, x1, za, zb, cols)
    smask = umask[:, None] & (cols < RANK)[None, :]
    part = h_ptr + tl.program_id(1).to(tl.int64) * P * RANK  # this split's partial sums
    out0 = part + first[:, None].to(tl.int64) * RANK + cols[None, :]
    c0 = tl.load(coeff_ptr + first // ROWS, mask=umask, other=0.0)[:, None]
    tl.store(out0, acc0 * c0, mask=smask)
    if G == 2:
        c1 = tl.load(coeff_ptr + (first + 1) // ROWS, mask=umask, other=0.0)[:, None]
        tl.store(out0 + RANK, acc1 * c1, mask=smask)


@triton.jit(do_not_specialize=["k0", "k1", "gen", "param"])
def _correction_pair(
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
    ROWS,
    stride_y,
    stride_bias,
    HAS_BIAS: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    ON_DEVICE: tl.constexpr,
    RANK: tl.constexpr,
    RANK_P2: tl.constexpr,
    SPLITS: tl.constexpr,
    G: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """:func:`_correction` for units of one or two rows, as two ``(BLOCK_D, BLOCK_N)`` tiles."""
    k0, k1, gen = _key_and_generation(key_ptr, k0, k1, gen_ptr, gen, ON_DEVICE)
    param = param.to(tl.uint32)
    first = (tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)) * G
    umask = first < P
    draw = tl.load(draw_ptr + first // ROWS, mask=umask, other=0)[:, None]
    n0 = tl.program_id(1) * BLOCK_N
    n = n0 + tl.arange(0, BLOCK_N)
    m = umask[:, None] & (n < N)[None, :]
    cols = tl.arange(0, RANK_P2)
    h_rows = h_ptr + first[:, None].to(tl.int64) * RANK + cols[None, :]
    hmask = umask[:, None] & (cols < RANK)[None, :]
    h0 = tl.zeros((BLOCK_D, RANK_P2), dtype=tl.float32)
    h1 = h0
    for _ in tl.static_range(SPLITS):  # the projection's partial sums, in a fixed order
        h0 += tl.load(h_rows, mask=hmask, other=0.0)
        if G == 2:
            h1 += tl.load(h_rows + RANK, mask=hmask, other=0.0)
        h_rows += P * RANK  # (a pointer step: no product that could overflow)
    y_rows = y_ptr + first[:, None].to(tl.int64) * stride_y + n[None, :]
    if ACCUMULATE:
        y0 = tl.load(y_rows, mask=m, other=0.0).to(tl.float32)
        y1 = y0
        if G == 2:
            y1 = tl.load(y_rows + stride_y, mask=m, other=0.0).to(tl.float32)
    else:
        y0 = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
        y1 = y0
    if RANK % 4 == 0:
        for kc in tl.static_range(RANK // 4):
            z0, z1, z2, z3 = _normals(n[None, :] * (RANK // 4) + kc, draw, param, gen, k0, k1, 0)
            y0 = _expand4(y0, h0, cols, 4 * kc, z0, z1, z2, z3)
            if G == 2:
                y1 = _expand4(y1, h1, cols, 4 * kc, z0, z1, z2, z3)
    elif RANK == 1:
        j = n0 // 4 + tl.arange(0, BLOCK_N // 4)[None, :]
        z0, z1, z2, z3 = _normals(j, draw, param, gen, k0, k1, 0)
        z = _interleave4(z0, z1, z2, z3)
        y0 += _col(h0, cols, 0) * z
        if G == 2:
            y1 += _col(h1, cols, 0) * z
    else:
        j = n0 // 2 + tl.arange(0, BLOCK_N // 2)[None, :]
        z0, z1, z2, z3 = _normals(j, draw, param, gen, k0, k1, 0)
        za = _interleave2(z0, z2)
        zb = _interleave2(z1, z3)
        y0 += _col(h0, cols, 0) * za + _col(h0, cols, 1) * zb
        if G == 2:
            y1 += _col(h1, cols, 0) * za + _col(h1, cols, 1) * zb
    if HAS_BIAS:
        b_rows = bias_ptr + (first // ROWS)[:, None].to(tl.int64) * stride_bias + n[None, :]
        y0 += tl.load(b_rows, mask=m, other=0.0).to(tl.float32)
        if G == 2:
            b1 = bias_ptr + ((first + 1) // ROWS)[:, None].to(tl.int64) * stride_bias + n[None, :]
            y1 += tl.load(b1, mask=m, other=0.0).to(tl.float32)
    tl.store(y_rows, y0.to(y_ptr.dtype.element_ty), mask=m)
    if G == 2:
        tl.store(y_rows + stride_y, y1.to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _unit_rows(P, ROWS, G: tl.constexpr, G_P2: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's units (``G`` consecutive rows sharing a draw): the first row of each
    ``(BLOCK_D,)``, every row ``(BLOCK_D, G_P2)`` and its mask."""
    unit = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    first = unit * G
    g = tl.arange(0, G_P2)
    rows = first[:, None] + g[None, :]
    rmask = (first < P)[:, None] & (g < G)[None, :]
    return first, rows, rmask


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
    ROWS,
    stride_x,
    ON_DEVICE: tl.constexpr,
    RANK: tl.constexpr,
    RANK_P2: tl.constexpr,
    G: tl.constexpr,
    G_P2: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    k0, k1, gen = _key_and_generation(key_ptr, k0, k1, gen_ptr, gen, ON_DEVICE)
    param = param.to(tl.uint32)
    first, rows, rmask = _unit_rows(P, ROWS, G, G_P2, BLOCK_D)
    draw = tl.load(draw_ptr + first // ROWS, mask=first < P, other=0)[:, None]
    cols = tl.arange(0, RANK_P2)
    c3 = cols[None, None, :]
    acc = tl.zeros((BLOCK_D, G_P2, RANK_P2), dtype=tl.float32)
    row_ptr = x_ptr + rows[:, :, None].to(tl.int64) * stride_x
    for i0 in range(tl.program_id(1) * BLOCK_K, K, SPLIT_K * BLOCK_K):
        i = i0 + tl.arange(0, BLOCK_K)
        m = rmask[:, :, None] & (i < K)[None, None, :]
        x = tl.load(row_ptr + i[None, None, :], mask=m, other=0.0).to(tl.float32)
        if RANK % 4 == 0:
            for kc in tl.static_range(RANK // 4):
                j = i[None, :] * (RANK // 4) + kc
                z0, z1, z2, z3 = _normals(j, draw, param, gen, k0, k1, 1)
                acc += tl.where(c3 == 4 * kc + 0, _dot_rows(x, z0), 0.0)
                acc += tl.where(c3 == 4 * kc + 1, _dot_rows(x, z1), 0.0)
                acc += tl.where(c3 == 4 * kc + 2, _dot_rows(x, z2), 0.0)
                acc += tl.where(c3 == 4 * kc + 3, _dot_rows(x, z3), 0.0)
        elif RANK == 1:
            j = i0 // 4 + tl.arange(0, BLOCK_K // 4)[None, :]
            z0, z1, z2, z3 = _normals(j, draw, param, gen, k0, k1, 1)
            acc += _dot_rows(x, _interleave4(z0, z1, z2, z3))
        else:  # RANK == 2: a block holds rows 2b (lanes 0, 1) and 2b + 1 (lanes 2, 3)
            j = i0 // 2 + tl.arange(0, BLOCK_K // 2)[None, :]
            z0, z1, z2, z3 = _normals(j, draw, param, gen, k0, k1, 1)
            acc += tl.where(c3 == 0, _dot_rows(x, _interleave2(z0, z2)), 0.0)
            acc += tl.where(c3 == 1, _dot_rows(x, _interleave2(z1, z3)), 0.0)
    c = tl.load(coeff_ptr + rows // ROWS, mask=rmask, other=0.0)[:, :, None]
    part = h_ptr + tl.program_id(1).to(tl.int64) * P * RANK  # this split's partial sums
    out = part + rows[:, :, None].to(tl.int64) * RANK + c3
    smask = rmask[:, :, None] & (c3 < RANK)
    tl.store(out, acc * c, mask=smask)


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
    ROWS,
    stride_y,
    stride_bias,
    HAS_BIAS: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    ON_DEVICE: tl.constexpr,
    RANK: tl.constexpr,
    RANK_P2: tl.constexpr,
    SPLITS: tl.constexpr,
    G: tl.constexpr,
    G_P2: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    k0, k1, gen = _key_and_generation(key_ptr, k0, k1, gen_ptr, gen, ON_DEVICE)
    param = param.to(tl.uint32)
    first, rows, rmask = _unit_rows(P, ROWS, G, G_P2, BLOCK_D)
    draw = tl.load(draw_ptr + first // ROWS, mask=first < P, other=0)[:, None]
    n0 = tl.program_id(1) * BLOCK_N
    n = n0 + tl.arange(0, BLOCK_N)
    m = rmask[:, :, None] & (n < N)[None, None, :]
    cols = tl.arange(0, RANK_P2)
    hmask = rmask[:, :, None] & (cols < RANK)[None, None, :]
    h_rows = h_ptr + rows[:, :, None].to(tl.int64) * RANK + cols[None, None, :]
    h = tl.zeros((BLOCK_D, G_P2, RANK_P2), dtype=tl.float32)
    for _ in tl.static_range(SPLITS):  # the projection's partial sums, in a fixed order
        h += tl.load(h_rows, mask=hmask, other=0.0)
        h_rows += P * RANK  # (a pointer step: no product that could overflow)
    y_rows = y_ptr + rows[:, :, None].to(tl.int64) * stride_y + n[None, None, :]
    if ACCUMULATE:
        y = tl.load(y_rows, mask=m, other=0.0).to(tl.float32)
    else:
        y = tl.zeros((BLOCK_D, G_P2, BLOCK_N), dtype=tl.float32)
    if RANK % 4 == 0:
        for kc in tl.static_range(RANK // 4):
            j = n[None, :] * (RANK // 4) + kc
            z0, z1, z2, z3 = _normals(j, draw, param, gen, k0, k1, 0)
            y += (
                _column(h, cols, 4 * kc)[:, :, None] * z0[:, None, :]
                + _column(h, cols, 4 * kc + 1)[:, :, None] * z1[:, None, :]
            )
            y += (
                _column(h, cols, 4 * kc + 2)[:, :, None] * z2[:, None, :]
                + _column(h, cols, 4 * kc + 3)[:, :, None] * z3[:, None, :]
            )
    elif RANK == 1:
        j = n0 // 4 + tl.arange(0, BLOCK_N // 4)[None, :]
        z0, z1, z2, z3 = _normals(j, draw, param, gen, k0, k1, 0)
        y += _column(h, cols, 0)[:, :, None] * _interleave4(z0, z1, z2, z3)[:, None, :]
    else:
        j = n0 // 2 + tl.arange(0, BLOCK_N // 2)[None, :]
        z0, z1, z2, z3 = _normals(j, draw, param, gen, k0, k1, 0)
        y += (
            _column(h, cols, 0)[:, :, None] * _interleave2(z0, z2)[:, None, :]
            + _column(h, cols, 1)[:, :, None] * _interleave2(z1, z3)[:, None, :]
        )
    if HAS_BIAS:
        member = (rows // ROWS)[:, :, None].to(tl.int64)
        y += tl.load(bias_ptr + member * stride_bias + n[None, None, :], mask=m, other=0.0).to(
            tl.float32
        )
    tl.store(y_rows, y.to(y_ptr.dtype.element_ty), mask=m)


def _counters(key: Any, gen: Any, like: torch.Tensor) -> tuple[Any, ...]:
    if isinstance(gen, torch.Tensor) or isinstance(key, torch.Tensor):
        return key, gen, 0, 0, 0, True
    return like, like, int(key[0]), int(key[1]), int(gen), False


# Rows that share a draw (a unit) that one program handles at most; more rows per member read
# the filled noise buffer (their GEMM amortizes it) instead.
MAX_UNIT_ROWS = 16


def unit_rows(rows: int, paired: bool) -> int:
    """Consecutive rows that share a draw: a member's ``rows``, twice that for antithetic pairs
    (members ``2i, 2i + 1`` are adjacent in member-major order)."""
    return rows * (2 if paired else 1)


def launch_tiles(units: int, n: int, G: int, rank: int) -> dict[str, int]:
    """Tile sizes of the two kernels for ``units`` units of ``G`` rows and ``n`` inputs:
    8 units a program for units of one or two rows, about 16 rows for larger units (half that
    in the interpreter), at least one unit; the projection split
    over K so that a few programs run per SM. Units of one or two rows take longer tiles
    along K and N (measured on an H100 by benchmarks/onthefly_tiles.py: 2-12 % faster layers
    at ranks 1, 4 and 16 than 128-wide tiles, in every configuration)."""
    g_p2 = triton.next_power_of_2(G)
    block_d = max(1, (4 if _INTERPRET else 8) * min(2, G) // g_p2)
    if _INTERPRET:
        return dict(
            block_d=block_d,
            block_k=64,
            split_k=1,
            projection_warps=4,
            correction_block_d=block_d,
            block_n=64,
            correction_warps=4,
        )
    pair = G <= 2
    per_sm = 4 if pair else 2
    return dict(
        block_d=block_d,
        block_k=256 if pair else 128,
        split_k=max(1, min(16, triton.cdiv(132 * per_sm, triton.cdiv(units, block_d)))),
        projection_warps=8 if pair else 4,
        correction_block_d=block_d,
        block_n=256 if pair else 128,
        correction_warps=4,
    )


def linear_onthefly(
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
    rows: int = 1,
    write_first: bool = False,
) -> torch.Tensor:
    """``y[i] = x[i] W^T + bias[p] + coeff[p] (x[i] B_d) A_d^T`` for row ``i`` of member
    ``p = i // rows`` (draw ``d = draw[p]``).

    The shared GEMM runs first and the correction kernel adds into its output, or with
    ``write_first`` the kernel writes the correction and the biases and the GEMM adds into them
    (``y.addmm_``: cuBLAS reads ``y`` in its epilogue instead of a second pass over it).

    Args:
        x: ``(P * rows, n)``, member-major; weight ``(m, n)``; bias ``None``, ``(m,)`` or
            ``(P, m)``.
        draw, coeff: ``(P,)`` each member's draw and scale ``sigma * sign / sqrt(r)``.
        key, gen: the Philox key ``(k0, k1)`` and the generation, ints or device tensors.
        param_index: the parameter's index (the counter word ``c2``).
        paired: members ``2i, 2i + 1`` share a draw (antithetic pairs; ``P`` even).
        rows: input rows per member; ``unit_rows(rows, paired)`` at most ``MAX_UNIT_ROWS``.

    Returns:
        ``(P * rows, m)`` in ``x.dtype``.
    """
    M, n = x.shape
    m = weight.shape[0]
    P = draw.shape[0]
    G = unit_rows(rows, paired)
    if P * rows != M or G > MAX_UNIT_ROWS or (paired and P % 2):
        raise ValueError(
            f"Invalid rows: x {tuple(x.shape)} for {P} members of {rows} rows (paired={paired})"
        )
    if write_first:
        y = torch.empty(M, m, device=x.device, dtype=x.dtype)
        in_kernel = bias  # shared (m,) with row stride 0, or per member (P, m)
    else:
        shared = bias if bias is not None and bias.dim() == 1 else None
        y = torch.nn.functional.linear(x, weight, shared)
        in_kernel = bias if bias is not None and bias.dim() == 2 else None
    key_t, gen_t, k0, k1, g, on_device = _counters(key, gen, x)
    units = M // G
    g_p2 = triton.next_power_of_2(G)
    rank_p2 = triton.next_power_of_2(rank)
    tiles = launch_tiles(units, n, G, rank)
    block_d, block_k = tiles["block_d"], tiles["block_k"]
    split_k = min(tiles["split_k"], triton.cdiv(n, block_k))
    # Split over K, each split writes its partial sums (no atomics: the correction kernel adds
    # them in a fixed order, so the output is the same bits on every call).
    h = torch.empty(split_k, M, rank, device=x.device, dtype=torch.float32)
    if coeff.dtype != torch.float32 or not coeff.is_contiguous():
        coeff = coeff.to(torch.float32).contiguous()
    if draw.dtype != torch.int64 or not draw.is_contiguous():
        draw = draw.to(torch.int64).contiguous()
    xs = x if x.stride(-1) == 1 else x.contiguous()
    pair = G <= 2
    shape = dict(G=G) if pair else dict(G=G, G_P2=g_p2)
    (_projection_pair if pair else _projection)[(triton.cdiv(units, block_d), split_k)](
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
        M,
        n,
        rows,
        xs.stride(0),
        ON_DEVICE=on_device,
        RANK=rank,
        RANK_P2=rank_p2,
        **shape,
        BLOCK_D=block_d,
        BLOCK_K=block_k,
        SPLIT_K=split_k,
        num_warps=tiles["projection_warps"],
    )
    block_n, block_dc = tiles["block_n"], tiles["correction_block_d"]
    b = in_kernel.contiguous() if in_kernel is not None else y
    stride_b = b.stride(0) if in_kernel is not None and in_kernel.dim() == 2 else 0
    (_correction_pair if pair else _correction)[
        (triton.cdiv(units, block_dc), triton.cdiv(m, block_n))
    ](
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
        M,
        m,
        rows,
        y.stride(0),
        stride_b,
        HAS_BIAS=in_kernel is not None,
        ACCUMULATE=not write_first,
        ON_DEVICE=on_device,
        RANK=rank,
        RANK_P2=rank_p2,
        SPLITS=split_k,
        **shape,
        BLOCK_D=block_dc,
        BLOCK_N=block_n,
        num_warps=tiles["correction_warps"],
    )
    if write_first:
        y.addmm_(x, weight.T)
    return y
