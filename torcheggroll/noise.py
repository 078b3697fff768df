"""EGGROLL noise: a counter-based Gaussian, and the low-rank or dense draws made of it.

**The definition** (noise version 2). Every number is a function of integers only:

* the *key* is the 64-bit seed, ``(k0, k1) = (seed mod 2**32, (seed >> 32) mod 2**32)``;
* the *counter* of one Philox block is ``(c0, c1, c2, c3) = (j + 2**31 * stream, draw,
  param_index, generation)``, where ``stream`` is 0 for the factor ``A`` (or dense noise) and 1
  for ``B``, and ``j`` numbers the blocks of 4 consecutive entries of one draw of one stream;
* Philox-4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011) maps
  counter and key to four 32-bit words ``x0..x3``;
* each word becomes a uniform ``u = (2 * (x >> 9) + 1) / 2**24`` in (0, 1) (exact in float32),
  and Box-Muller turns ``(u0, u1)`` into ``sqrt(-2 ln u0) * (cos, sin)(2 pi u1)`` and
  ``(u2, u3)`` likewise: four N(0, 1) numbers, in float32, for entries ``4j .. 4j + 3``.

Entry ``e`` of a draw is entry ``e mod 4`` of block ``j = e // 4``. A low-rank draw of a matrix
``(m, n)`` is ``A`` ``(m, r)`` (stream 0, entries in row-major order) and ``B`` ``(n, r)``
(stream 1), with ``E = A B^T / sqrt(r)``; a dense draw is the parameter's entries in row-major
order (stream 0). Parameters of ``ndim > 2`` (conv kernels) are the matrix
``(shape[0], prod(shape[1:]))``. Draw ``k`` is shared by the antithetic members ``2k, 2k+1``.

Because counters never repeat across ``(draw, parameter, generation, stream, block)`` and
Philox is a bijection of the counter for a fixed key, no two blocks of one seed draw the same
words. Nothing here reads or advances a ``torch.Generator``: the noise is the same on every
device, for every shard of the population, and in every order of evaluation.

Three implementations compute this definition: the PyTorch functions in this module (any
device; the reference), a C kernel compiled at first use (``torcheggroll._cpu_noise``, what runs
on the CPU when a C compiler is present; the reference runs otherwise) and a Triton kernel
(``torcheggroll._triton_noise``, CUDA). They agree bitwise on the integer words; the float
transform (``log``, ``cos``, ``sin`` in float32) may differ by a few units in the last place
between math libraries (a measured bound is stated in the tests).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from . import _cpu_noise

__all__ = [
    "NOISE_VERSION",
    "ParamNoise",
    "block_normals",
    "compute_dtype",
    "draw_noise",
    "effective_rank",
    "matrix_shape",
    "member_pairs",
    "member_signs",
    "num_draws",
    "philox4x32",
    "seed_key",
]

NOISE_VERSION = 2
"""The version of the noise definition (version 1, torcheggroll 0.2, seeded a
``torch.Generator`` per parameter; its noise cannot be reproduced by this one)."""

_MASK32 = 0xFFFFFFFF
_M0, _M1 = 0xD2511F53, 0xCD9E8D57  # Philox-4x32 multipliers
_W0, _W1 = 0x9E3779B9, 0xBB67AE85  # Philox-4x32 key increments (golden ratio, sqrt(3) - 1)
ROUNDS = 10
STREAM_B = 1 << 31  # added to c0 for the factor B
TWO_PI = 6.2831853071795864769  # rounded to float32 where it is used

Word = torch.Tensor | int


def seed_key(seed: int) -> tuple[int, int]:
    """The Philox key ``(k0, k1)`` of a non-negative seed (taken modulo ``2**64``)."""
    s = int(seed) & ((1 << 64) - 1)
    return s & _MASK32, s >> 32


def _mulhilo(a: torch.Tensor, m: int, hi: torch.Tensor, tmp: torch.Tensor) -> None:
    """``hi = (a * m) >> 32`` and ``a = (a * m) mod 2**32``, in place, for ``a`` holding 32-bit
    values in int64 and a 32-bit constant ``m``.

    The constant is split into 16-bit halves so that no product leaves int64:
    ``a * m = t * 2**16 + (a * mlo mod 2**16)`` with ``t = a * mhi + ((a * mlo) >> 16)``.
    """
    torch.mul(a, m & 0xFFFF, out=tmp)  # a * mlo
    torch.bitwise_right_shift(tmp, 16, out=hi)
    hi.add_(a, alpha=m >> 16)  # t
    tmp.bitwise_and_(0xFFFF)
    torch.bitwise_and(hi, 0xFFFF, out=a).bitwise_left_shift_(16).bitwise_or_(tmp)  # low word
    hi.bitwise_right_shift_(16)


def philox4x32(
    c0: Word, c1: Word, c2: Word, c3: Word, k0: Word, k1: Word, rounds: int = ROUNDS
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox-4x32 (10 rounds) of the counter ``(c0, c1, c2, c3)`` under the key ``(k0, k1)``.

    Every argument is a 32-bit value held in an int64 tensor (or a Python int; at least one
    counter word must be a tensor); tensors broadcast. Returns the four output words as int64
    tensors of values in ``[0, 2**32)``. A round is
    ``(c0, c1, c2, c3) <- (hi(M1 c2) ^ c1 ^ k0, lo(M1 c2), hi(M0 c0) ^ c3 ^ k1, lo(M0 c0))``
    followed by ``k0 += W0, k1 += W1`` (mod ``2**32``); it is written with in-place operations
    on four buffers, which more than halves its time on the CPU.
    """
    shape = torch.broadcast_shapes(*(torch.as_tensor(c).shape for c in (c0, c1, c2, c3)))
    like = next(c for c in (c0, c1, c2, c3) if isinstance(c, torch.Tensor))
    x = [
        torch.as_tensor(c, dtype=torch.int64, device=like.device).expand(shape).clone()
        for c in (c0, c1, c2, c3)
    ]
    hi0, hi1, tmp = (torch.empty(shape, dtype=torch.int64, device=like.device) for _ in range(3))
    for _ in range(rounds):
        _mulhilo(x[0], _M0, hi0, tmp)  # x0 <- lo(M0 c0)
        _mulhilo(x[2], _M1, hi1, tmp)  # x2 <- lo(M1 c2)
        hi1.bitwise_xor_(x[1]).bitwise_xor_(k0)  # new c0
        hi0.bitwise_xor_(x[3]).bitwise_xor_(k1)  # new c2
        # (c0, c1, c2, c3) <- (hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0); the old c1 and c3
        # become the next round's scratch for the high words.
        x, hi0, hi1 = [hi1, x[2], hi0, x[0]], x[1], x[3]
        k0 = (k0 + _W0) & _MASK32
        k1 = (k1 + _W1) & _MASK32
    return x[0], x[1], x[2], x[3]


def _uniform(x: torch.Tensor) -> torch.Tensor:
    """``(2 * (x >> 9) + 1) / 2**24`` in float32: one of 2**23 evenly spaced values in (0, 1)."""
    return ((x >> 9) * 2 + 1).to(torch.float32).mul_(2.0**-24)


def block_normals(words: Sequence[torch.Tensor], out: torch.Tensor | None = None) -> torch.Tensor:
    """The four normals of Philox blocks: ``(..., 4)`` float32 from the words ``x0..x3``
    (written into ``out``, of that shape, when given).

    ``(x0, x1)`` give ``r cos t`` and ``r sin t`` with ``r = sqrt(-2 ln u0)``, ``t = 2 pi u1``;
    ``(x2, x3)`` the next two.
    """
    if out is None:
        out = torch.empty(*words[0].shape, 4, dtype=torch.float32, device=words[0].device)
    for i in (0, 2):
        r = _uniform(words[i]).log_().mul_(-2.0).sqrt_()
        t = _uniform(words[i + 1]).mul_(TWO_PI)
        torch.mul(r, torch.cos(t), out=out[..., i])
        torch.mul(r, t.sin_(), out=out[..., i + 1])
    return out


def _stream(
    entries: int,
    draws: int,
    stream: int,
    param_index: int,
    generation: int,
    key: tuple[int, int],
    device: torch.device | str,
    reference: bool = False,
) -> torch.Tensor:
    """``(draws, entries)`` float32 normals of one stream of one parameter: the compiled kernel
    on the CPU when it is available (see :mod:`torcheggroll._cpu_noise`), else (or with
    ``reference``) the PyTorch operations of this module."""
    blocks = -(-entries // 4)
    if torch.device(device).type == "cpu" and not reference:
        kernel = _cpu_noise.load()
        if kernel is not None:
            out = torch.empty(draws, blocks * 4, dtype=torch.float32)
            params = torch.tensor([param_index & _MASK32], dtype=torch.int64)
            kernel.fill_grid(
                out, draws, blocks, stream * STREAM_B, params, generation & _MASK32, key
            )
            return out[:, :entries]
    j = torch.arange(blocks, device=device, dtype=torch.int64).view(1, blocks) + stream * STREAM_B
    k = torch.arange(draws, device=device, dtype=torch.int64).view(draws, 1)
    words = philox4x32(j, k, param_index & _MASK32, generation & _MASK32, *key)
    return block_normals(words).reshape(draws, blocks * 4)[:, :entries]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype noise and updates are computed in: float64 stays, anything else is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def num_draws(pop_size: int, antithetic: bool) -> int:
    """Number of independent noise draws for a population (one per antithetic pair)."""
    return pop_size // 2 if antithetic else pop_size


def member_pairs(members: torch.Tensor, antithetic: bool) -> torch.Tensor:
    """Index of the noise draw each member uses: ``i // 2`` with antithetic pairs, else ``i``."""
    return members // 2 if antithetic else members


def member_signs(members: torch.Tensor, antithetic: bool, dtype: torch.dtype) -> torch.Tensor:
    """``+1`` for even members and ``-1`` for odd ones with antithetic pairs, else all ``+1``."""
    if not antithetic:
        return torch.ones(members.shape, dtype=dtype, device=members.device)
    return (1 - 2 * (members % 2)).to(dtype)


def matrix_shape(shape: torch.Size | tuple[int, ...]) -> tuple[int, int]:
    """The ``(m, n)`` matrix view of a parameter of ``ndim >= 2``."""
    return int(shape[0]), int(math.prod(shape[1:]))


def is_low_rank(shape: torch.Size | tuple[int, ...], rank: int) -> bool:
    """Whether noise of this rank for a parameter of this shape is drawn as factors."""
    return rank > 0 and len(shape) >= 2


def effective_rank(shape: torch.Size | tuple[int, ...], rank: int) -> int:
    """The rank the optimizer draws a parameter's noise at: ``rank`` for a matrix view whose
    sides both exceed it, else 0 (dense). A side ``<= rank`` (a class token ``(1, 1, D)``, a
    position table ``(1, T, D)``, a narrow layer) makes the factors no smaller than the tensor,
    and dense noise of such a tensor is used by every operation as it is."""
    if not is_low_rank(shape, rank):
        return 0
    return rank if min(matrix_shape(shape)) > rank else 0


@dataclass(frozen=True)
class ParamNoise:
    """The noise of one parameter for one generation.

    Low rank: ``a`` is ``(draws, m, rank)``, ``b`` is ``(draws, n, rank)`` and ``dense`` is None.
    Dense: ``dense`` is ``(draws, *shape)`` and ``a``, ``b`` are None.
    Every draw has unit-variance entries; multiply by ``sigma`` (and the member's sign) to perturb.
    """

    shape: torch.Size
    rank: int
    a: torch.Tensor | None = None
    b: torch.Tensor | None = None
    dense: torch.Tensor | None = None

    @property
    def is_low_rank(self) -> bool:
        return self.dense is None

    @property
    def num_draws(self) -> int:
        t = self.a if self.dense is None else self.dense
        assert t is not None
        return t.shape[0]

    @property
    def factor_scale(self) -> float:
        """``1 / sqrt(rank)``: the factor that makes ``A B^T`` unit-variance (low-rank noise)."""
        if self.dense is not None:
            raise ValueError("Invalid noise: dense noise has no factors (factor_scale)")
        return 1.0 / math.sqrt(self.rank)

    def select(self, draws: torch.Tensor) -> ParamNoise:
        """The noise of the given draw indices, in that order (a gather along dim 0)."""
        if self.dense is not None:
            return ParamNoise(self.shape, self.rank, dense=self.dense.index_select(0, draws))
        assert self.a is not None and self.b is not None
        return ParamNoise(
            self.shape, self.rank, a=self.a.index_select(0, draws), b=self.b.index_select(0, draws)
        )

    def materialize(self, coeffs: torch.Tensor | None = None) -> torch.Tensor:
        """Full noise tensors ``(draws, *shape)``, each draw scaled by ``coeffs`` (``(draws,)``).

        This is the reference (slow) path: it builds one full tensor per draw.
        """
        if self.dense is not None:
            out = self.dense
            if coeffs is not None:
                out = out * coeffs.view(-1, *([1] * (out.dim() - 1)))
            return out
        assert self.a is not None and self.b is not None
        a = self.a if coeffs is None else self.a * coeffs.view(-1, 1, 1)
        e = torch.bmm(a, self.b.transpose(1, 2)) * self.factor_scale
        return e.reshape(-1, *self.shape)

    def weighted_sum(
        self, coeffs: torch.Tensor, out_dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """``sum_k coeffs[k] * E_k`` with the shape of the parameter.

        For low-rank noise this is computed in factored form,
        ``(A * c) reshaped to (m, draws * r) @ B reshaped to (draws * r, n)``: it never builds
        ``draws`` full matrices. ``coeffs`` is ``(draws,)`` in the noise dtype. With
        ``out_dtype`` (a parameter's bf16 or fp16) the factors are rounded to it first and the
        GEMM runs in that dtype (with float32 accumulation on GPUs) instead of float32.
        """
        if self.dense is not None:
            out = torch.tensordot(coeffs, self.dense, dims=1)
            return out if out_dtype is None else out.to(out_dtype)
        assert self.a is not None and self.b is not None
        d, m, r = self.a.shape
        n = self.b.shape[1]
        a = (
            (self.a * (coeffs * self.factor_scale).view(-1, 1, 1))
            .permute(1, 0, 2)
            .reshape(m, d * r)
        )
        b = self.b.permute(1, 0, 2).reshape(n, d * r)
        if out_dtype is not None:
            a, b = a.to(out_dtype), b.to(out_dtype)
        return (a @ b.T).reshape(self.shape)


def draw_noise(
    shape: torch.Size | tuple[int, ...],
    rank: int,
    draws: int,
    *,
    seed: int,
    generation: int,
    param_index: int,
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
) -> ParamNoise:
    """Draw the noise of one parameter for one generation (the module's definition, computed
    with PyTorch operations on ``device``).

    Args:
        shape: the parameter's shape.
        rank: low-rank factor count; ``0`` (or a parameter of ``ndim < 2``) gives dense noise.
        draws: number of independent draws (antithetic pairs); draw ``k`` is counter ``k``.
        seed: the noise seed (taken modulo ``2**64``).
        generation: the generation (below ``2**32``).
        param_index: the parameter's index (below ``2**32``).
        device: where the noise is returned.
        dtype: the floating dtype it is returned in (it is computed in float32).

    Returns:
        A :class:`ParamNoise` with factors ``(draws, m, rank)`` and ``(draws, n, rank)``, or dense
        noise ``(draws, *shape)``.

    ``rank`` is used as given. The optimizer gives a matrix with a side no larger than its
    group's rank dense noise: ``draw_noise(shape, effective_rank(shape, rank), ...)`` draws what
    it draws.
    """
    for name, value in (
        ("rank", rank),
        ("draws", draws),
        ("seed", seed),
        ("generation", generation),
        ("param_index", param_index),
    ):
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"Invalid {name}: {value!r} (expected an int)")
    if rank < 0 or draws < 0:
        raise ValueError(f"Invalid {'rank' if rank < 0 else 'draws'}: expected an int >= 0")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"Invalid dtype: {dtype!r} (noise needs a floating-point dtype)")
    shape = torch.Size(shape)
    _check_counters(generation, param_index)
    key = seed_key(seed)
    if is_low_rank(shape, rank):
        m, n = matrix_shape(shape)
        a = _stream(m * rank, draws, 0, param_index, generation, key, device)
        b = _stream(n * rank, draws, 1, param_index, generation, key, device)
        return ParamNoise(
            shape,
            rank,
            a=a.reshape(draws, m, rank).to(dtype),
            b=b.reshape(draws, n, rank).to(dtype),
        )
    dense = _stream(shape.numel(), draws, 0, param_index, generation, key, device)
    return ParamNoise(shape, 0, dense=dense.reshape(draws, *shape).to(dtype))


def _check_counters(generation: int, param_index: int) -> None:
    if not 0 <= generation <= _MASK32:
        raise ValueError(
            f"Invalid generation: {generation} (the noise counts generations in 32 bits)"
        )
    if not 0 <= param_index <= _MASK32:
        raise ValueError(f"Invalid param_index: {param_index} (expected 0 <= index < 2**32)")
