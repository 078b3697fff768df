"""Triton kernels computing the noise definition of :mod:`torcheggroll.noise` on the GPU.

Imported only where Triton is. Each Philox block's counter is computed from its position in a
region of :class:`~torcheggroll.noise_buffer.NoiseBuffer` (no per-block tables are read for
low-rank regions), or, for the update's operands (:func:`factor_operand`), from its entry and
draw; the seed and the generation are scalars or device tensors (then nothing is
read on the host, and the launch can be captured in a CUDA graph). The Philox rounds are
Triton's own ``tl.random.philox_impl`` (Philox-4x32-10, the same function as the PyTorch
reference, bit for bit); the float transform repeats :func:`torcheggroll.noise.block_normals`.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_BLOCK = 64 if _INTERPRET else 512
_STREAM_B = 1 << 31


@triton.jit
def _key_and_generation(key_ptr, k0, k1, gen_ptr, gen, ON_DEVICE: tl.constexpr):
    if ON_DEVICE:
        k0 = tl.load(key_ptr).to(tl.uint32)
        k1 = tl.load(key_ptr + 1).to(tl.uint32)
        gen = tl.load(gen_ptr).to(tl.uint32)
    else:
        k0 = k0.to(tl.uint32)
        k1 = k1.to(tl.uint32)
        gen = gen.to(tl.uint32)
    return k0, k1, gen


@triton.jit
def _uniform(x):
    return ((x >> 9) * 2 + 1).to(tl.float32) * 5.9604644775390625e-08  # 2**-24


if _INTERPRET:

    @triton.jit
    def _log(x):
        return tl.log(x)

    @triton.jit
    def _cos(x):
        return tl.cos(x)

    @triton.jit
    def _sin(x):
        return tl.sin(x)

else:
    from triton.language.extra.cuda import libdevice

    # The hardware's approximate log, sin and cos (MUFU): for arguments in (0, 2 pi) and (0, 1]
    # they are within about 2**-21 of the correctly rounded values, far inside the stated
    # tolerance of the float transform, and several times cheaper than the exact ones, whose
    # argument reduction dominated the kernels' time.
    @triton.jit
    def _log(x):
        return libdevice.fast_logf(x)

    @triton.jit
    def _cos(x):
        return libdevice.fast_cosf(x)

    @triton.jit
    def _sin(x):
        return libdevice.fast_sinf(x)


@triton.jit
def block_normals(x0, x1, x2, x3):
    """The four normals of Philox words (as :func:`torcheggroll.noise.block_normals`)."""
    u0 = _uniform(x0)
    u1 = _uniform(x1)
    u2 = _uniform(x2)
    u3 = _uniform(x3)
    r01 = tl.sqrt(_log(u0) * -2.0)
    r23 = tl.sqrt(_log(u2) * -2.0)
    t01 = u1 * 6.2831853071795864769
    t23 = u3 * 6.2831853071795864769
    return r01 * _cos(t01), r01 * _sin(t01), r23 * _cos(t23), r23 * _sin(t23)


@triton.jit
def _store_blocks(out_ptr, b, mask, z0, z1, z2, z3):
    """Write the four normals of blocks ``b`` to ``out[4 b .. 4 b + 3]``."""
    z = tl.reshape(tl.join(tl.join(z0, z2), tl.join(z1, z3)), (z0.shape[0] * 4,))
    offs = tl.reshape(
        tl.join(tl.join(4 * b, 4 * b + 2), tl.join(4 * b + 1, 4 * b + 3)), (z0.shape[0] * 4,)
    )
    m = tl.reshape(tl.join(tl.join(mask, mask), tl.join(mask, mask)), (z0.shape[0] * 4,))
    tl.store(out_ptr + offs, z.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit(do_not_specialize=["k0", "k1", "gen"])
def _fill_lowrank(
    out_ptr,
    params_ptr,
    key_ptr,
    gen_ptr,
    k0,
    k1,
    gen,
    ROWS,
    DRAWS,
    BLOCKS,
    STREAM_OFFSET,
    ON_DEVICE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Blocks ``(row, draw, j)`` of a low-rank stream: counter ``(j + stream, draw, params[row],
    generation)``."""
    k0, k1, gen = _key_and_generation(key_ptr, k0, k1, gen_ptr, gen, ON_DEVICE)
    b = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = b < ROWS * DRAWS * BLOCKS
    j = b % BLOCKS
    t = b // BLOCKS
    draw = t % DRAWS
    row = t // DRAWS
    p = tl.load(params_ptr + row, mask=mask, other=0)
    c0 = (j + STREAM_OFFSET).to(tl.uint32)
    c1 = draw.to(tl.uint32)
    c2 = p.to(tl.uint32)
    c3 = tl.zeros_like(c0) + gen
    x0, x1, x2, x3 = tl.random.philox_impl(c0, c1, c2, c3, k0, k1, 10)
    z0, z1, z2, z3 = block_normals(x0, x1, x2, x3)
    _store_blocks(out_ptr, b, mask, z0, z1, z2, z3)


@triton.jit(do_not_specialize=["k0", "k1", "gen"])
def _fill_dense(
    out_ptr,
    params_ptr,
    local_ptr,
    key_ptr,
    gen_ptr,
    k0,
    k1,
    gen,
    DRAWS,
    BLOCKS,
    ON_DEVICE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Blocks ``(draw, column)`` of the dense region: counter ``(local[column], draw,
    params[column], generation)``."""
    k0, k1, gen = _key_and_generation(key_ptr, k0, k1, gen_ptr, gen, ON_DEVICE)
    b = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = b < DRAWS * BLOCKS
    col = b % BLOCKS
    draw = b // BLOCKS
    p = tl.load(params_ptr + col, mask=mask, other=0)
    j = tl.load(local_ptr + col, mask=mask, other=0)
    c0 = j.to(tl.uint32)
    c1 = draw.to(tl.uint32)
    c2 = p.to(tl.uint32)
    c3 = tl.zeros_like(c0) + gen
    x0, x1, x2, x3 = tl.random.philox_impl(c0, c1, c2, c3, k0, k1, 10)
    z0, z1, z2, z3 = block_normals(x0, x1, x2, x3)
    _store_blocks(out_ptr, b, mask, z0, z1, z2, z3)


@triton.jit(do_not_specialize=["k0", "k1", "gen", "param"])
def _factor_operand(
    out_ptr,
    coef_ptr,
    key_ptr,
    gen_ptr,
    k0,
    k1,
    gen,
    param,
    ENTRIES,
    DRAWS,
    STREAM_OFFSET,
    stride_e,
    stride_d,
    HAS_COEF: tl.constexpr,
    ENTRY_FAST: tl.constexpr,
    ON_DEVICE: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """``out[e, d] = coef[d] * (entry e of draw d of one parameter's stream)`` for a tile of
    Philox blocks ``j`` (entries ``4 j .. 4 j + 3``) and draws ``d``; with ``ENTRY_FAST`` the
    tile is ``(draws, entries)`` (``stride_e == 1``), else ``(blocks, draws)``, so that
    neighbouring threads write neighbouring addresses."""
    k0, k1, gen = _key_and_generation(key_ptr, k0, k1, gen_ptr, gen, ON_DEVICE)
    param = param.to(tl.uint32)
    j = tl.program_id(0) * BLOCK_J + tl.arange(0, BLOCK_J)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    if ENTRY_FAST:
        jj = j[None, :]
        dd = d[:, None]
    else:
        jj = j[:, None]
        dd = d[None, :]
    c0 = (jj + STREAM_OFFSET).to(tl.uint32) + tl.zeros_like(dd).to(tl.uint32)
    c1 = dd.to(tl.uint32) + tl.zeros_like(c0)
    c2 = tl.zeros_like(c0) + param
    c3 = tl.zeros_like(c0) + gen
    x0, x1, x2, x3 = tl.random.philox_impl(c0, c1, c2, c3, k0, k1, 10)
    z0, z1, z2, z3 = block_normals(x0, x1, x2, x3)
    if HAS_COEF:
        c = tl.load(coef_ptr + dd, mask=dd < DRAWS, other=0.0)
        z0, z1, z2, z3 = z0 * c, z1 * c, z2 * c, z3 * c
    dty = out_ptr.dtype.element_ty
    if ENTRY_FAST:  # (BLOCK_D, 4 BLOCK_J), entries 4 j0 .. contiguous along the rows
        z = tl.reshape(tl.join(tl.join(z0, z2), tl.join(z1, z3)), (BLOCK_D, 4 * BLOCK_J))
        e = tl.program_id(0) * 4 * BLOCK_J + tl.arange(0, 4 * BLOCK_J)[None, :]
        mask = (e < ENTRIES) & (dd < DRAWS)
        tl.store(out_ptr + e.to(tl.int64) + dd.to(tl.int64) * stride_d, z.to(dty), mask=mask)
    else:
        base = out_ptr + (4 * jj).to(tl.int64) * stride_e + dd.to(tl.int64) * stride_d
        ok = dd < DRAWS
        tl.store(base, z0.to(dty), mask=ok & (4 * jj < ENTRIES))
        tl.store(base + stride_e, z1.to(dty), mask=ok & (4 * jj + 1 < ENTRIES))
        tl.store(base + 2 * stride_e, z2.to(dty), mask=ok & (4 * jj + 2 < ENTRIES))
        tl.store(base + 3 * stride_e, z3.to(dty), mask=ok & (4 * jj + 3 < ENTRIES))


@triton.jit(do_not_specialize=["k0", "k1"])
def _philox_words(c_ptr, out_ptr, N, k0, k1, BLOCK: tl.constexpr):
    """The raw words of counters ``c`` ``(4, N)`` (a test of the integer stream)."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = i < N
    c0 = tl.load(c_ptr + i, mask=mask, other=0).to(tl.uint32)
    c1 = tl.load(c_ptr + N + i, mask=mask, other=0).to(tl.uint32)
    c2 = tl.load(c_ptr + 2 * N + i, mask=mask, other=0).to(tl.uint32)
    c3 = tl.load(c_ptr + 3 * N + i, mask=mask, other=0).to(tl.uint32)
    x0, x1, x2, x3 = tl.random.philox_impl(c0, c1, c2, c3, k0.to(tl.uint32), k1.to(tl.uint32), 10)
    tl.store(out_ptr + i, x0.to(tl.int64), mask=mask)
    tl.store(out_ptr + N + i, x1.to(tl.int64), mask=mask)
    tl.store(out_ptr + 2 * N + i, x2.to(tl.int64), mask=mask)
    tl.store(out_ptr + 3 * N + i, x3.to(tl.int64), mask=mask)


def _scalars(key: Any, gen: Any, like: torch.Tensor) -> tuple[Any, ...]:
    """Kernel arguments for the key and generation: pointers to device tensors (``key`` an
    int64 tensor ``(k0, k1)``, ``gen`` a 0-d int64 tensor) or Python scalars."""
    if isinstance(gen, torch.Tensor) or isinstance(key, torch.Tensor):
        return key, gen, 0, 0, 0, True
    return like, like, int(key[0]), int(key[1]), int(gen), False


def fill_region(buffer: torch.Tensor, region: Any, key: Any, gen: Any) -> None:
    """Fill one region of a :class:`~torcheggroll.noise_buffer.NoiseBuffer`."""
    out = buffer[region.start : region.start + region.size]
    key_t, gen_t, k0, k1, g, on_device = _scalars(key, gen, buffer)
    if region.column_block is None:
        total = region.rows * region.draws * region.blocks
        grid = (triton.cdiv(total, _BLOCK),)
        _fill_lowrank[grid](
            out,
            region.params,
            key_t,
            gen_t,
            k0,
            k1,
            g,
            region.rows,
            region.draws,
            region.blocks,
            region.stream * _STREAM_B,
            ON_DEVICE=on_device,
            BLOCK=_BLOCK,
        )
    else:
        total = region.draws * region.blocks
        grid = (triton.cdiv(total, _BLOCK),)
        _fill_dense[grid](
            out,
            region.params,
            region.column_block,
            key_t,
            gen_t,
            k0,
            k1,
            g,
            region.draws,
            region.blocks,
            ON_DEVICE=on_device,
            BLOCK=_BLOCK,
        )


def factor_operand(
    out: torch.Tensor,
    coef: torch.Tensor | None,
    key: Any,
    gen: Any,
    param_index: int,
    stream: int,
) -> None:
    """Write one parameter's factor of every draw into ``out`` ``(entries, draws)`` (any
    strides): ``out[e, d]`` is entry ``e`` of stream ``stream`` (0: ``A``, 1: ``B``; entry
    ``i * r + q`` is row ``i``, column ``q``) of draw ``d``, times ``coef[d]`` ``(draws,)``
    (the noise buffer's dtype, on ``out``'s device) when given, rounded to ``out.dtype``; the
    update's operands made without a noise buffer."""
    entries, draws = out.shape
    if coef is not None:
        if coef.shape != (draws,) or coef.device != out.device:
            raise ValueError(
                f"Invalid coef: shape {tuple(coef.shape)} on {coef.device}, expected "
                f"({draws},) on {out.device}"
            )
        coef = coef.contiguous()
    key_t, gen_t, k0, k1, g, on_device = _scalars(key, gen, out)
    entry_fast = out.stride(0) == 1
    block_j, block_d = (16, 32) if entry_fast else (32, 16)
    if _INTERPRET:
        block_j, block_d = 4, 8
    grid = (triton.cdiv(triton.cdiv(entries, 4), block_j), triton.cdiv(draws, block_d))
    _factor_operand[grid](
        out,
        out if coef is None else coef,
        key_t,
        gen_t,
        k0,
        k1,
        g,
        param_index,
        entries,
        draws,
        stream * _STREAM_B,
        out.stride(0),
        out.stride(1),
        HAS_COEF=coef is not None,
        ENTRY_FAST=entry_fast,
        ON_DEVICE=on_device,
        BLOCK_J=block_j,
        BLOCK_D=block_d,
    )


def philox_words(counters: torch.Tensor, k0: int, k1: int) -> torch.Tensor:
    """``(4, N)`` int64 Philox-4x32-10 words of the ``(4, N)`` int64 counters (testing aid)."""
    counters = counters.contiguous()
    n = counters.shape[1]
    out = torch.empty_like(counters)
    _philox_words[(triton.cdiv(n, 128),)](counters, out, n, k0, k1, BLOCK=128)
    return out
