"""Triton kernels computing the noise definition of :mod:`torcheggroll.noise` on the GPU.

Imported only where Triton is. Each Philox block's counter is computed from its position in a
region of :class:`~torcheggroll.noise_buffer.NoiseBuffer` (no per-block tables are read for
low-rank regions); the seed and the generation are scalars or device tensors (then nothing is
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


def philox_words(counters: torch.Tensor, k0: int, k1: int) -> torch.Tensor:
    """``(4, N)`` int64 Philox-4x32-10 words of the ``(4, N)`` int64 counters (testing aid)."""
    counters = counters.contiguous()
    n = counters.shape[1]
    out = torch.empty_like(counters)
    _philox_words[(triton.cdiv(n, 128),)](counters, out, n, k0, k1, BLOCK=128)
    return out
