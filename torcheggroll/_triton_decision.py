"""The step's decision in one Triton kernel: losses in, coefficients, ``ok`` and flags out.

:func:`torcheggroll._update.directions` makes the update's coefficients from the population's
losses with about 25 small PyTorch operations (the finite mask, the replacement of non-finite
losses, the shaping, the antithetic differences, the safety bound, the flags). On a GPU each is a
kernel of a microsecond or two, so together they cost as much as a large GEMM's tenth. Here one
program does all of it in four passes over the losses (they are a few kilobytes): the same
arithmetic in float64, in the same order where it matters (the shaped losses are made before
their differences), so that it agrees with the PyTorch path to float64 rounding.

Imported only where Triton is; used for ``zscore``, ``centered`` and ``raw`` shaping when every
group shares ``maximize`` and ``shaping`` (the other cases keep the PyTorch path).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = ["SHAPINGS", "decide"]

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_BLOCK = 128 if _INTERPRET else 1024
SHAPINGS = {"raw": 0, "centered": 1, "zscore": 2}
_ZSCORE_EPS = 1e-8  # as torcheggroll.shaping.zscore


@triton.jit
def _load(losses_ptr, i, N, MAXIMIZE: tl.constexpr):
    """Losses ``i`` as float64 (negated when maximizing), and where they are finite."""
    mask = i < N
    x = tl.load(losses_ptr + i, mask=mask, other=0.0).to(tl.float64)
    finite = ((x * 0.0) == 0.0) & mask
    if MAXIMIZE:
        x = -x
    return x, finite, mask


@triton.jit
def _shaped(x, finite, worst, mean, den, SHAPING: tl.constexpr):
    """The shaped values of losses ``x`` (non-finite ones replaced by ``worst``)."""
    clean = tl.where(finite, x, worst)
    if SHAPING == 0:
        return clean
    elif SHAPING == 1:
        return clean - mean
    else:
        return (clean - mean) / den


# The sizes and the limit are not specialized on: one compilation per shaping and flags.
@triton.jit(do_not_specialize=["N", "D", "G", "limit"])
def _decide(
    losses_ptr,
    scales_ptr,
    coeffs_ptr,
    ok_ptr,
    flags_ptr,
    N,
    D,
    G,
    limit,
    SHAPING: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    PAIRED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.arange(0, BLOCK)
    first = tl.load(losses_ptr).to(tl.float64)
    if MAXIMIZE:
        first = -first
    # Pass 1: how many losses are finite, the worst (largest) finite one, whether all are equal.
    count = tl.zeros((BLOCK,), dtype=tl.int64)
    worst = tl.full((BLOCK,), float("-inf"), dtype=tl.float64)
    differs = tl.zeros((BLOCK,), dtype=tl.int32)
    for start in range(0, N, BLOCK):
        x, finite, mask = _load(losses_ptr, start + offs, N, MAXIMIZE)
        count += finite.to(tl.int64)
        worst = tl.maximum(worst, tl.where(finite, x, float("-inf")))
        differs = tl.maximum(differs, ((x != first) & mask).to(tl.int32))
    finite_count = tl.sum(count, axis=0)
    # -inf when no loss is finite: the coefficients are then NaN, and withheld below.
    worst_x = tl.max(worst, axis=0)
    identical = (tl.max(differs, axis=0) == 0) & ((first * 0.0) == 0.0) & (N > 1)
    # Pass 2: the mean and (zscore) the unbiased standard deviation of the cleaned losses.
    total = tl.zeros((BLOCK,), dtype=tl.float64)
    for start in range(0, N, BLOCK):
        x, finite, mask = _load(losses_ptr, start + offs, N, MAXIMIZE)
        total += tl.where(mask, tl.where(finite, x, worst_x), 0.0)
    mean = tl.sum(total, axis=0) / N
    den = mean * 0.0 + 1.0
    if SHAPING == 2:
        squares = tl.zeros((BLOCK,), dtype=tl.float64)
        for start in range(0, N, BLOCK):
            x, finite, mask = _load(losses_ptr, start + offs, N, MAXIMIZE)
            d = tl.where(finite, x, worst_x) - mean
            squares += tl.where(mask, d * d, 0.0)
        std = tl.sqrt(tl.sum(squares, axis=0) / tl.maximum(N - 1, 1))
        den = tl.where((std > 1e-8) & (N > 1), std, 1.0)
    # Pass 3: the L1 norm of the coefficients c_k (shaped losses, or their pair differences).
    norms = tl.zeros((BLOCK,), dtype=tl.float64)
    for start in range(0, D, BLOCK):
        k = start + offs
        c = _coefficient(losses_ptr, k, N, D, worst_x, mean, den, SHAPING, MAXIMIZE, PAIRED)
        norms += tl.abs(c)
    norm = tl.sum(norms, axis=0)
    any_finite = finite_count > 0
    # A NaN norm fails the comparison too.
    ok = any_finite & (norm < limit)
    # Pass 4: every group's row, sigma_g / sqrt(N) * c_k, or zeros when the update is withheld.
    for start in range(0, D, BLOCK):
        k = start + offs
        c = _coefficient(losses_ptr, k, N, D, worst_x, mean, den, SHAPING, MAXIMIZE, PAIRED)
        for g in range(G):
            scale = tl.load(scales_ptr + g)
            tl.store(coeffs_ptr + g * D + k, tl.where(ok, c * scale, 0.0), mask=k < D)
    tl.store(ok_ptr, ok)
    tl.store(flags_ptr, N - finite_count)
    tl.store(flags_ptr + 1, identical.to(tl.int64))
    tl.store(flags_ptr + 2, (any_finite != ok).to(tl.int64))


@triton.jit
def _coefficient(
    losses_ptr,
    k,
    N,
    D,
    worst,
    mean,
    den,
    SHAPING: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    PAIRED: tl.constexpr,
):
    """``c_k``: ``s_2k - s_2k+1`` (antithetic pairs) or ``s_k``; 0 beyond ``D``."""
    valid = k < D
    if PAIRED:
        xe, fe, _ = _load(losses_ptr, 2 * k, N, MAXIMIZE)
        xo, fo, _ = _load(losses_ptr, 2 * k + 1, N, MAXIMIZE)
        c = _shaped(xe, fe, worst, mean, den, SHAPING) - _shaped(xo, fo, worst, mean, den, SHAPING)
    else:
        x, f, _ = _load(losses_ptr, k, N, MAXIMIZE)
        c = _shaped(x, f, worst, mean, den, SHAPING)
    return tl.where(valid, c, 0.0)


def decide(
    losses: torch.Tensor,
    scales: torch.Tensor,
    shaping: str,
    maximize: bool,
    antithetic: bool,
    limit: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The decision of :func:`torcheggroll._update.directions` for groups sharing ``shaping``
    and ``maximize``.

    Args:
        losses: ``(N,)`` floating-point losses, contiguous.
        scales: ``(G,)`` float64 ``sigma_g / sqrt(N)`` on the losses' device.
        limit: the update is applied only if ``sum_k |c_k| < limit`` (and some loss is finite).

    Returns:
        ``coeffs`` ``(G, D)`` float64 (zero unless applied), ``ok`` 0-d bool and ``flags``
        ``(3,)`` int64: non-finite losses, all losses equal, withheld although some was finite.
    """
    n = losses.numel()
    d = n // 2 if antithetic else n
    g = scales.numel()
    coeffs = torch.empty(g, d, dtype=torch.float64, device=losses.device)
    ok = torch.empty((), dtype=torch.bool, device=losses.device)
    flags = torch.empty(3, dtype=torch.int64, device=losses.device)
    _decide[(1,)](
        losses,
        scales,
        coeffs,
        ok,
        flags,
        n,
        d,
        g,
        limit,
        SHAPING=SHAPINGS[shaping],
        MAXIMIZE=maximize,
        PAIRED=antithetic,
        BLOCK=_BLOCK,
        num_warps=4,
    )
    return coeffs, ok, flags
