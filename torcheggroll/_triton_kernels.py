"""Triton kernels behind :mod:`torcheggroll.fused_linear` (imported only where Triton is).

Layouts (all row-major, last dimension contiguous):
    x (M, K) with M = P * ROWS, rows of member p at [p * ROWS, (p + 1) * ROWS)
    w (N, K) the shared matrix, y = x w^T is (M, N)
    a (D, N, RANK), b (D, K, RANK): the generation's noise draws (any float dtype; antithetic
        members share a draw), draw (P,) int64: member p's draw, coeff (P,) float32: member p's
        scale sigma * sign / sqrt(RANK)
    h (M, RANK) = coeff[p] * x_p b[draw[p]] per row
    bias (N,) shared or (P, N) per member

A tile of BLOCK_M rows meets at most MEMBERS consecutive members (a compile-time bound, see
:func:`members_per_tile`). Where MEMBERS * RANK_P2 is small (many rows per member), the tile's
factors form one block-diagonal matrix product: a member's factor columns are addressed as
``c = j * RANK_P2 + k`` for the j-th member of the tile and rank index k (RANK_P2 is RANK rounded
up to a power of two; the padding columns are masked to zero). Where it is large (few rows per
member, as in RL with one observation per member) that product would be mostly zeros and would
not fit in shared memory, so each row gathers its own member's factors instead, one rank index
at a time (``BLOCK_DIAG`` off).
"""

from __future__ import annotations

import os
from typing import Any

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# TORCHEGGROLL_AUTOTUNE=0 gives each kernel one configuration instead of timing them all for
# every new shape (minutes of compiling in a test suite of many small shapes).
_AUTOTUNE = os.environ.get("TORCHEGGROLL_AUTOTUNE", "1") != "0"


def _tuned(configs: list[triton.Config], untuned: int = 0) -> list[triton.Config]:
    """All ``configs``, or with autotuning off the one at ``untuned``: a configuration that fits
    in shared memory for every shape (the autotuner skips the ones that do not; a lone one must
    fit)."""
    return configs if _AUTOTUNE else configs[untuned : untuned + 1]


def members_per_tile(block_m: int, rows: int, rank_p2: int) -> int:
    """A power-of-two bound on the members among ``block_m`` consecutive rows of a tile that
    starts at a multiple of ``block_m``, widened so the factor block is at least 16 columns
    (the smallest ``tl.dot``)."""
    if block_m % rows == 0:
        members = block_m // rows
    elif rows % block_m == 0:
        members = 1
    else:
        members = -(-(block_m - 1) // rows) + 1
    members = triton.next_power_of_2(members)
    while members * rank_p2 < 16:
        members *= 2
    return members


# The widest block-diagonal factor block (MEMBERS * RANK_P2 columns) a tile multiplies; wider
# ones switch to the row-wise gather. At 128 columns, h (128 x 128) and the A slab (128 x 256)
# next to a 3-stage 128 x 256 x 64 pipeline need 245 KB of shared memory, over an H100's 227 KB.
MAX_BLOCK_DIAG_COLUMNS = 64


def block_diagonal(block_m: int, rows: int, rank_p2: int) -> bool:
    """Whether a tile of ``block_m`` rows takes its factors as one block-diagonal product."""
    return members_per_tile(block_m, rows, rank_p2) * rank_p2 <= MAX_BLOCK_DIAG_COLUMNS


def _heuristics() -> dict[str, Any]:
    def diag(a: dict[str, Any]) -> bool:
        return block_diagonal(a["BLOCK_M"], a["ROWS"], a["RANK_P2"])

    return {
        "BLOCK_DIAG": diag,
        # Unused by the row-wise gather; 1 there keeps its (uncompiled) block shapes small.
        "MEMBERS": lambda a: (
            members_per_tile(a["BLOCK_M"], a["ROWS"], a["RANK_P2"]) if diag(a) else 1
        ),
        "EVEN_K": lambda a: a["K"] % a["BLOCK_K"] == 0,
    }


def _epilogue_heuristics() -> dict[str, Any]:
    h = _heuristics()
    return {"BLOCK_DIAG": h["BLOCK_DIAG"], "MEMBERS": h["MEMBERS"]}


# ---------------------------------------------------------------------------- shared pieces
@triton.jit
def _tile_of(tile, num_m, num_n, GROUP_M: tl.constexpr):
    """Grouped ordering: GROUP_M row-tiles share their column tiles of w while they are in L2."""
    per_group = GROUP_M * num_n
    group = tile // per_group
    first_m = group * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (tile % per_group) % size_m
    pid_n = (tile % per_group) // size_m
    return pid_m, pid_n


@triton.jit
def _epilogue(
    acc,
    pid_m,
    offs_m,
    offs_n,
    h_ptr,
    a_ptr,
    draw_ptr,
    bias_ptr,
    M,
    N,
    P,
    ROWS,
    stride_bias,
    HAS_BIAS: tl.constexpr,
    RANK: tl.constexpr,
    RANK_P2: tl.constexpr,
    MEMBERS: tl.constexpr,
    BLOCK_DIAG: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """acc (BLOCK_M, BLOCK_N) += each row's h @ its member's A slab^T (+ each row's bias)."""
    row_member = offs_m // ROWS
    if BLOCK_DIAG:
        c = tl.arange(0, MEMBERS * RANK_P2)
        member = (pid_m * BLOCK_M) // ROWS + c // RANK_P2
        k = c % RANK_P2
        h_mask = (
            (row_member[:, None] == member[None, :]) & (k < RANK)[None, :] & (offs_m < M)[:, None]
        )
        h = tl.load(
            h_ptr + offs_m[:, None].to(tl.int64) * RANK + k[None, :], mask=h_mask, other=0.0
        )
        acc = _correction_block_diag(
            acc, h, pid_m, offs_n, a_ptr, draw_ptr, N, P, ROWS, RANK, RANK_P2, MEMBERS, BLOCK_M
        )
    else:
        row_ok = offs_m < M
        draw = tl.load(draw_ptr + row_member, mask=row_ok, other=0)
        a_rows = a_ptr + draw[:, None].to(tl.int64) * N * RANK + offs_n[None, :] * RANK
        a_mask = row_ok[:, None] & (offs_n < N)[None, :]
        for k in tl.static_range(RANK):
            hk = tl.load(h_ptr + offs_m.to(tl.int64) * RANK + k, mask=row_ok, other=0.0)
            ak = tl.load(a_rows + k, mask=a_mask, other=0.0)
            acc += hk.to(tl.float32)[:, None] * ak.to(tl.float32)
    if HAS_BIAS:
        acc = _add_bias(acc, offs_m, offs_n, bias_ptr, M, N, ROWS, stride_bias)
    return acc


@triton.jit
def _correction_block_diag(
    acc,
    h,
    pid_m,
    offs_n,
    a_ptr,
    draw_ptr,
    N,
    P,
    ROWS,
    RANK: tl.constexpr,
    RANK_P2: tl.constexpr,
    MEMBERS: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """acc (BLOCK_M, BLOCK_N) += h @ the tile's members' A slabs^T, side by side: ``h`` is
    (BLOCK_M, MEMBERS * RANK_P2) with each row's values in its own member's columns (zeros
    elsewhere), as :func:`_projection_block_diag_wide` makes it."""
    c = tl.arange(0, MEMBERS * RANK_P2)
    member = (pid_m * BLOCK_M) // ROWS + c // RANK_P2
    k = c % RANK_P2
    col_ok = (member < P) & (k < RANK)
    draw = tl.load(draw_ptr + member, mask=col_ok, other=0)
    a_off = draw[:, None].to(tl.int64) * N * RANK + offs_n[None, :] * RANK + k[:, None]
    a = tl.load(a_ptr + a_off, mask=col_ok[:, None] & (offs_n < N)[None, :], other=0.0)
    return tl.dot(h, a.to(h.dtype), acc)


@triton.jit
def _add_bias(acc, offs_m, offs_n, bias_ptr, M, N, ROWS, stride_bias):
    """acc + each row's bias: ``bias_ptr`` (N,) with ``stride_bias`` 0, or (P, N)."""
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    bias = tl.load(
        bias_ptr + (offs_m // ROWS)[:, None].to(tl.int64) * stride_bias + offs_n[None, :],
        mask=mask,
        other=0.0,
    )
    return acc + bias.to(tl.float32)


# ---------------------------------------------------------------------------- h = x_p b_p
def _projection_configs() -> list[triton.Config]:
    if _INTERPRET:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_K": 32}, num_warps=4, num_stages=1)]
    return _tuned(
        [
            triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_warps=w, num_stages=s)
            for bm in (16, 32)
            for bk in (128, 256)
            for w, s in ((4, 3),)
        ]
    )


@triton.autotune(configs=_projection_configs(), key=["M", "K", "ROWS", "RANK", "SPLIT_K"])
@triton.heuristics(_heuristics())
@triton.jit
def _projection_kernel(
    x_ptr,
    b_ptr,
    draw_ptr,
    coeff_ptr,
    h_ptr,
    M,
    K,
    P,
    ROWS,
    stride_xm,
    RANK: tl.constexpr,
    RANK_P2: tl.constexpr,
    MEMBERS: tl.constexpr,
    BLOCK_DIAG: tl.constexpr,
    EVEN_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    # Split s of SPLIT_K takes a run of whole BLOCK_K tiles of K and writes its partial sums to
    # h[s] (the caller adds them); some trailing splits may get no tile and write zeros.
    per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
    k_start = tl.program_id(1) * per_split
    k_stop = tl.minimum(K, k_start + per_split)
    if BLOCK_DIAG:
        h = _projection_block_diag_wide(
            x_ptr,
            b_ptr,
            draw_ptr,
            pid,
            offs_m,
            M,
            K,
            k_start,
            k_stop,
            P,
            ROWS,
            stride_xm,
            RANK,
            RANK_P2,
            MEMBERS,
            EVEN_K,
            BLOCK_M,
            BLOCK_K,
        )
        # Each row has values in its own member's columns only: fold them to (BLOCK_M, RANK_P2).
        h = tl.sum(tl.reshape(h, (BLOCK_M, MEMBERS, RANK_P2)), axis=1)
    else:
        h = _projection_rowwise(
            x_ptr,
            b_ptr,
            draw_ptr,
            offs_m,
            M,
            K,
            k_start,
            k_stop,
            ROWS,
            stride_xm,
            RANK,
            RANK_P2,
            BLOCK_M,
            BLOCK_K,
        )
    h *= tl.load(coeff_ptr + offs_m // ROWS, mask=offs_m < M, other=0.0)[:, None]
    kk = tl.arange(0, RANK_P2)
    out = h_ptr + tl.program_id(1).to(tl.int64) * M * RANK
    out += offs_m[:, None].to(tl.int64) * RANK + kk[None, :]
    tl.store(out, h.to(h_ptr.dtype.element_ty), mask=(offs_m < M)[:, None] & (kk < RANK)[None, :])


@triton.jit
def _projection_block_diag_wide(
    x_ptr,
    b_ptr,
    draw_ptr,
    pid,
    offs_m,
    M,
    K,
    k_start,
    k_stop,
    P,
    ROWS,
    stride_xm,
    RANK: tl.constexpr,
    RANK_P2: tl.constexpr,
    MEMBERS: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """(BLOCK_M, MEMBERS * RANK_P2) x_row b[draw] over ``k_start <= k < k_stop`` (``k_start`` a
    multiple of BLOCK_K): one product against the tile's members' factors side by side, of which
    each row keeps its own member's columns (the others are zero)."""
    c = tl.arange(0, MEMBERS * RANK_P2)
    member = (pid * BLOCK_M) // ROWS + c // RANK_P2
    k = c % RANK_P2
    col_ok = (member < P) & (k < RANK)
    draw = tl.load(draw_ptr + member, mask=col_ok, other=0)
    offs_k = k_start + tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :]
    b_ptrs = b_ptr + draw[None, :].to(tl.int64) * K * RANK + offs_k[:, None] * RANK + k[None, :]
    acc = tl.zeros((BLOCK_M, MEMBERS * RANK_P2), dtype=tl.float32)
    for k0 in range(k_start, k_stop, BLOCK_K):
        if EVEN_K:
            xt = tl.load(x_ptrs, mask=(offs_m < M)[:, None], other=0.0)
            bt = tl.load(b_ptrs, mask=col_ok[None, :], other=0.0)
        else:
            k_ok = offs_k < K - k0 + k_start
            xt = tl.load(x_ptrs, mask=(offs_m < M)[:, None] & k_ok[None, :], other=0.0)
            bt = tl.load(b_ptrs, mask=col_ok[None, :] & k_ok[:, None], other=0.0)
        acc = tl.dot(xt, bt.to(xt.dtype), acc)
        x_ptrs += BLOCK_K
        b_ptrs += BLOCK_K * RANK
    own = (offs_m // ROWS)[:, None] == member[None, :]
    return tl.where(own, acc, 0.0)


@triton.jit
def _projection_rowwise(
    x_ptr,
    b_ptr,
    draw_ptr,
    offs_m,
    M,
    K,
    k_start,
    k_stop,
    ROWS,
    stride_xm,
    RANK: tl.constexpr,
    RANK_P2: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """(BLOCK_M, RANK_P2) x_row b[draw] over ``k_start <= k < k_stop``: each row against its
    own member's factor, one rank index at a time."""
    row_ok = offs_m < M
    draw = tl.load(draw_ptr + offs_m // ROWS, mask=row_ok, other=0)
    offs_k = k_start + tl.arange(0, BLOCK_K)
    kk = tl.arange(0, RANK_P2)
    x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :]
    b_ptrs = b_ptr + draw[:, None].to(tl.int64) * K * RANK + offs_k[None, :] * RANK
    h = tl.zeros((BLOCK_M, RANK_P2), dtype=tl.float32)
    for k0 in range(k_start, k_stop, BLOCK_K):
        mask = row_ok[:, None] & (offs_k < K - k0 + k_start)[None, :]
        xt = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
        for k in tl.static_range(RANK):
            bk = tl.load(b_ptrs + k, mask=mask, other=0.0).to(tl.float32)
            h += tl.where(kk[None, :] == k, tl.sum(xt * bk, axis=1)[:, None], 0.0)
        x_ptrs += BLOCK_K
        b_ptrs += BLOCK_K * RANK
    return h


def projection_splits(M: int, K: int, device: torch.device) -> int:
    """How many parts of K the projection of ``M`` rows is split into: enough programs for
    about four per SM at 32 rows each (a 4096-row layer makes only 128 otherwise, too few to
    stream ``x`` at the memory's speed), at most one per 256 columns; 1 off CUDA."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(K, 256), triton.cdiv(4 * sms, triton.cdiv(M, 32))))


def member_projection(
    x: torch.Tensor,
    b: torch.Tensor,
    draw: torch.Tensor,
    coeff: torch.Tensor,
    h: torch.Tensor,
    rows: int,
    splits: int = 1,
) -> None:
    """Write ``h[p * rows + i] = coeff[p] * x[p * rows + i] @ b[draw[p]]``; ``x`` (M, K),
    ``b`` (D, K, r), ``draw`` and ``coeff`` (P,). ``splits > 1``: K in that many parts, each
    written to its own float32 partial sums, which are then added in a fixed order (no
    atomics: the result does not depend on scheduling)."""
    M, K = x.shape
    P = draw.shape[0]
    r = b.shape[-1]

    def grid(meta: dict[str, Any]) -> tuple[int, int]:
        return (triton.cdiv(M, meta["BLOCK_M"]), splits)

    out = h if splits == 1 else torch.empty(splits, M, r, device=h.device, dtype=torch.float32)
    _projection_kernel[grid](
        x,
        b,
        draw,
        coeff,
        out,
        M,
        K,
        P,
        rows,
        x.stride(0),
        RANK=r,
        RANK_P2=triton.next_power_of_2(r),
        SPLIT_K=splits,
    )
    if splits > 1:
        h.copy_(out.sum(0))


# ---------------------------------------------------------------------------- y = x w^T + ...
def _linear_configs() -> list[triton.Config]:
    if _INTERPRET:
        return [
            triton.Config(
                {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2},
                num_warps=4,
                num_stages=1,
            )
        ]
    shapes = [
        (128, 256, 64, 3, 8),
        (128, 256, 64, 4, 8),
        (256, 128, 64, 3, 8),
        (128, 128, 64, 4, 4),
        (128, 128, 64, 4, 8),
        (64, 256, 64, 4, 4),
        (128, 128, 128, 3, 8),
        (64, 128, 64, 4, 4),
    ]
    # 128 x 256 tiles with the row-wise gather need more shared memory than an H100 has (the
    # gathered A tile is converted to the accumulator's layout through it): 128 x 128 untuned.
    return _tuned(
        [
            triton.Config(
                {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                num_warps=w,
                num_stages=s,
            )
            for bm, bn, bk, s, w in shapes
        ],
        untuned=3,
    )


@triton.autotune(configs=_linear_configs(), key=["M", "N", "K", "ROWS", "RANK", "HAS_BIAS"])
@triton.heuristics(_heuristics())
@triton.jit
def _linear_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    h_ptr,
    a_ptr,
    draw_ptr,
    y_ptr,
    M,
    N,
    K,
    P,
    ROWS,
    stride_xm,
    stride_wn,
    stride_ym,
    stride_bias,
    HAS_BIAS: tl.constexpr,
    RANK: tl.constexpr,
    RANK_P2: tl.constexpr,
    MEMBERS: tl.constexpr,
    BLOCK_DIAG: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _tile_of(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Out-of-range rows/columns read a valid row (wrapped) and are never stored.
    xm = tl.max_contiguous(tl.multiple_of(offs_m % M, BLOCK_M), BLOCK_M)
    wn = tl.max_contiguous(tl.multiple_of(offs_n % N, BLOCK_N), BLOCK_N)
    x_ptrs = x_ptr + xm[:, None].to(tl.int64) * stride_xm + offs_k[None, :]
    w_ptrs = w_ptr + wn[None, :].to(tl.int64) * stride_wn + offs_k[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            xt = tl.load(x_ptrs)
            wt = tl.load(w_ptrs)
        else:
            k_ok = offs_k < K - k0
            xt = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
            wt = tl.load(w_ptrs, mask=k_ok[:, None], other=0.0)
        acc = tl.dot(xt, wt, acc)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    acc = _epilogue(
        acc,
        pid_m,
        offs_m,
        offs_n,
        h_ptr,
        a_ptr,
        draw_ptr,
        bias_ptr,
        M,
        N,
        P,
        ROWS,
        stride_bias,
        HAS_BIAS,
        RANK,
        RANK_P2,
        MEMBERS,
        BLOCK_DIAG,
        BLOCK_M,
    )
    y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
    tl.store(
        y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=(offs_m < M)[:, None] & (offs_n < N)[None, :]
    )


def lowrank_linear(
    x: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None,
    h: torch.Tensor,
    a: torch.Tensor,
    draw: torch.Tensor,
    y: torch.Tensor,
    rows: int,
) -> None:
    """Write ``y = x w^T + bias[p] + h a[draw[p]]^T`` (row-wise member ``p = row // rows``)."""
    M, K = x.shape
    N = w.shape[0]
    P, r = draw.shape[0], a.shape[-1]

    def grid(meta: dict[str, Any]) -> tuple[int]:
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    stride_bias = 0 if bias is None or bias.dim() == 1 else bias.stride(0)
    _linear_kernel[grid](
        x,
        w,
        y if bias is None else bias,
        h,
        a,
        draw,
        y,
        M,
        N,
        K,
        P,
        rows,
        x.stride(0),
        w.stride(0),
        y.stride(0),
        stride_bias,
        HAS_BIAS=bias is not None,
        RANK=r,
        RANK_P2=triton.next_power_of_2(r),
    )


# ---------------------------------------------------------------------------- TMA, persistent
def _tma_configs() -> list[triton.Config]:
    def set_blocks(nargs: dict[str, Any]) -> None:
        nargs["x_desc"].block_shape = [nargs["BLOCK_M"], nargs["BLOCK_K"]]
        nargs["w_desc"].block_shape = [nargs["BLOCK_N"], nargs["BLOCK_K"]]

    shapes = [
        (128, 256, 64, 3, 8, True),
        (128, 256, 64, 4, 8, True),
        (128, 256, 64, 3, 8, False),
        (128, 128, 64, 4, 8, True),
        (64, 128, 64, 4, 4, True),
    ]
    return _tuned(
        [
            triton.Config(
                {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "FLATTEN": fl},
                num_warps=w,
                num_stages=s,
                pre_hook=set_blocks,
            )
            for bm, bn, bk, s, w, fl in shapes
        ],
        untuned=3,
    )


@triton.autotune(configs=_tma_configs(), key=["M", "N", "K", "ROWS", "RANK", "HAS_BIAS"])
@triton.heuristics(_epilogue_heuristics())
@triton.jit
def _linear_tma_kernel(
    x_desc,
    w_desc,
    bias_ptr,
    h_ptr,
    a_ptr,
    draw_ptr,
    y_ptr,
    M,
    N,
    K,
    P,
    ROWS,
    stride_ym,
    stride_bias,
    HAS_BIAS: tl.constexpr,
    RANK: tl.constexpr,
    RANK_P2: tl.constexpr,
    MEMBERS: tl.constexpr,
    BLOCK_DIAG: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    FLATTEN: tl.constexpr,
    NUM_SMS: tl.constexpr,
):
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    for tile in tl.range(tl.program_id(0), num_m * num_n, NUM_SMS, flatten=FLATTEN):
        pid_m, pid_n = _tile_of(tile, num_m, num_n, GROUP_M)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for ki in range(k_tiles):
            xt = x_desc.load([pid_m * BLOCK_M, ki * BLOCK_K])
            wt = w_desc.load([pid_n * BLOCK_N, ki * BLOCK_K])
            acc = tl.dot(xt, wt.T, acc)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = _epilogue(
            acc,
            pid_m,
            offs_m,
            offs_n,
            h_ptr,
            a_ptr,
            draw_ptr,
            bias_ptr,
            M,
            N,
            P,
            ROWS,
            stride_bias,
            HAS_BIAS,
            RANK,
            RANK_P2,
            MEMBERS,
            BLOCK_DIAG,
            BLOCK_M,
        )
        y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
        tl.store(
            y_ptrs,
            acc.to(y_ptr.dtype.element_ty),
            mask=(offs_m < M)[:, None] & (offs_n < N)[None, :],
        )


def lowrank_linear_tma(
    x: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None,
    h: torch.Tensor,
    a: torch.Tensor,
    draw: torch.Tensor,
    y: torch.Tensor,
    rows: int,
) -> None:
    """:func:`lowrank_linear` with tensor-memory-accelerator loads and a persistent grid (sm90+)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    M, K = x.shape
    N = w.shape[0]
    P, r = draw.shape[0], a.shape[-1]
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    x_desc = TensorDescriptor.from_tensor(x, [16, 16])  # block shapes set per config
    w_desc = TensorDescriptor.from_tensor(w, [16, 16])

    def grid(meta: dict[str, Any]) -> tuple[int]:
        return (min(sms, triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"])),)

    stride_bias = 0 if bias is None or bias.dim() == 1 else bias.stride(0)
    _linear_tma_kernel[grid](
        x_desc,
        w_desc,
        y if bias is None else bias,
        h,
        a,
        draw,
        y,
        M,
        N,
        K,
        P,
        rows,
        y.stride(0),
        stride_bias,
        HAS_BIAS=bias is not None,
        RANK=r,
        RANK_P2=triton.next_power_of_2(r),
        NUM_SMS=sms,
    )


# ---------------------------------------------------------------------------- y += h a^T in place
def _add_configs() -> list[triton.Config]:
    if _INTERPRET:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4)]
    return _tuned(
        [
            triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w)
            for bm, bn, w in (
                (64, 128, 4),
                (128, 128, 8),
                (64, 256, 8),
                (128, 256, 8),
                (32, 256, 4),
            )
        ]
    )


@triton.autotune(
    configs=_add_configs(),
    key=["M", "N", "ROWS", "RANK", "HAS_BIAS", "ACCUMULATE"],
    restore_value=["y_ptr"],
)
@triton.heuristics(_epilogue_heuristics())
@triton.jit
def _correction_add_kernel(
    y_ptr,
    bias_ptr,
    h_ptr,
    a_ptr,
    draw_ptr,
    M,
    N,
    P,
    ROWS,
    stride_ym,
    stride_bias,
    HAS_BIAS: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    RANK: tl.constexpr,
    RANK_P2: tl.constexpr,
    MEMBERS: tl.constexpr,
    BLOCK_DIAG: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    if ACCUMULATE:
        acc = tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = _epilogue(
        acc,
        pid_m,
        offs_m,
        offs_n,
        h_ptr,
        a_ptr,
        draw_ptr,
        bias_ptr,
        M,
        N,
        P,
        ROWS,
        stride_bias,
        HAS_BIAS,
        RANK,
        RANK_P2,
        MEMBERS,
        BLOCK_DIAG,
        BLOCK_M,
    )
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)


def correction_add(
    y: torch.Tensor,
    bias: torch.Tensor | None,
    h: torch.Tensor,
    a: torch.Tensor,
    draw: torch.Tensor,
    rows: int,
    accumulate: bool = True,
) -> None:
    """In place ``y += bias[p] + h a[draw[p]]^T`` (row-wise member ``p = row // rows``);
    ``y`` ``(M, N)``. ``accumulate=False``: ``y = bias[p] + h a[draw[p]]^T`` (``y`` not read)."""
    M, N = y.shape
    P, r = draw.shape[0], a.shape[-1]

    def grid(meta: dict[str, Any]) -> tuple[int, int]:
        return (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]))

    stride_bias = 0 if bias is None or bias.dim() == 1 else bias.stride(0)
    _correction_add_kernel[grid](
        y,
        y if bias is None else bias,
        h,
        a,
        draw,
        M,
        N,
        P,
        rows,
        y.stride(0),
        stride_bias,
        HAS_BIAS=bias is not None,
        ACCUMULATE=accumulate,
        RANK=r,
        RANK_P2=triton.next_power_of_2(r),
    )


# ---------------------------------------------------------------------------- y = h a^T, h = x b
# The projection and the correction in one pass over a block of rows: a program reads its rows
# of x once (making h in registers) and writes those rows of y, so h never goes to global memory
# and one launch replaces two. Block-diagonal tiles only (many rows per member).
def _one_pass_configs() -> list[triton.Config]:
    if _INTERPRET:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_K": 32, "BLOCK_N": 32}, num_warps=4)]
    return _tuned(
        [
            triton.Config({"BLOCK_M": bm, "BLOCK_K": bk, "BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bm, bk, bn, w, s in (
                (16, 256, 256, 4, 3),
                (32, 256, 256, 8, 3),
                (16, 128, 128, 4, 4),
                (32, 128, 256, 4, 3),
                (64, 128, 128, 8, 3),
            )
        ]
    )


ONE_PASS_MAX_BLOCK_M = 64


@triton.autotune(configs=_one_pass_configs(), key=["M", "N", "K", "ROWS", "RANK", "HAS_BIAS"])
@triton.heuristics(_heuristics())
@triton.jit
def _one_pass_kernel(
    x_ptr,
    b_ptr,
    a_ptr,
    draw_ptr,
    coeff_ptr,
    bias_ptr,
    y_ptr,
    M,
    N,
    K,
    P,
    ROWS,
    stride_xm,
    stride_ym,
    stride_bias,
    HAS_BIAS: tl.constexpr,
    RANK: tl.constexpr,
    RANK_P2: tl.constexpr,
    MEMBERS: tl.constexpr,
    BLOCK_DIAG: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    tl.static_assert(BLOCK_DIAG, "the one-pass kernel takes block-diagonal tiles only")
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    h = _projection_block_diag_wide(
        x_ptr,
        b_ptr,
        draw_ptr,
        pid,
        offs_m,
        M,
        K,
        0,
        K,
        P,
        ROWS,
        stride_xm,
        RANK,
        RANK_P2,
        MEMBERS,
        EVEN_K,
        BLOCK_M,
        BLOCK_K,
    )
    h *= tl.load(coeff_ptr + offs_m // ROWS, mask=offs_m < M, other=0.0)[:, None]
    # Rounded as the two-kernel path rounds h when it stores it.
    h = h.to(x_ptr.dtype.element_ty)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc = _correction_block_diag(
            acc, h, pid, offs_n, a_ptr, draw_ptr, N, P, ROWS, RANK, RANK_P2, MEMBERS, BLOCK_M
        )
        if HAS_BIAS:
            acc = _add_bias(acc, offs_m, offs_n, bias_ptr, M, N, ROWS, stride_bias)
        y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
        mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)


def one_pass_applies(rows: int, rank: int) -> bool:
    """Whether :func:`projection_correction` takes ``rows`` rows per member at ``rank``: every
    tile it may use is block-diagonal."""
    return block_diagonal(ONE_PASS_MAX_BLOCK_M, rows, triton.next_power_of_2(rank))


def projection_correction(
    x: torch.Tensor,
    b: torch.Tensor,
    a: torch.Tensor,
    draw: torch.Tensor,
    coeff: torch.Tensor,
    bias: torch.Tensor | None,
    y: torch.Tensor,
    rows: int,
) -> None:
    """Write ``y = bias[p] + h a[draw[p]]^T`` with ``h = coeff[p] * x b[draw[p]]`` (row-wise
    member ``p = row // rows``) in one pass: ``x`` (M, K), ``b`` (D, K, r), ``a`` (D, N, r),
    ``draw`` (P,) int64, ``coeff`` (P,) float32, ``y`` (M, N); needs
    :func:`one_pass_applies`."""
    M, K = x.shape
    N = y.shape[1]
    P, r = draw.shape[0], a.shape[-1]
    if not one_pass_applies(rows, r):
        raise ValueError(f"Invalid rows for the one-pass kernel at rank {r}: {rows}")
    stride_bias = 0 if bias is None or bias.dim() == 1 else bias.stride(0)
    _one_pass_kernel[(lambda meta: (triton.cdiv(M, meta["BLOCK_M"]),))](
        x,
        b,
        a,
        draw,
        coeff,
        y if bias is None else bias,
        y,
        M,
        N,
        K,
        P,
        rows,
        x.stride(0),
        y.stride(0),
        stride_bias,
        HAS_BIAS=bias is not None,
        RANK=r,
        RANK_P2=triton.next_power_of_2(r),
    )
