"""Counter-based EGGROLL noise.

The noise of one parameter in one generation is a pure function of the integers
``(seed, generation, param_index)``, the number of draws and the device type (CPU and CUDA
generators differ): it is produced by a private ``torch.Generator`` seeded from a hash of those
integers (:func:`noise_seed`), so it never reads or advances the
global RNG and does not depend on which process or shard asks for it. Draw ``k`` is shared by
the antithetic pair of members ``(2k, 2k + 1)``.

A parameter with ``ndim >= 2`` and ``rank > 0`` is viewed as the matrix
``(m, n) = (shape[0], prod(shape[1:]))`` and perturbed by ``E_k = A_k @ B_k.T / sqrt(rank)``
with ``A_k`` of shape ``(m, rank)`` and ``B_k`` of shape ``(n, rank)``, entries iid N(0, 1), so every
entry of ``E_k`` has unit variance for any rank. Other parameters get dense N(0, 1) noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = [
    "ParamNoise",
    "compute_dtype",
    "derive_seed",
    "draw_noise",
    "matrix_shape",
    "member_pairs",
    "member_signs",
    "noise_seed",
    "num_draws",
]

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def derive_seed(*keys: int) -> int:
    """Hash a tuple of non-negative integers into a 63-bit generator seed."""
    h = 0x243F6A8885A308D3
    for k in keys:
        h = _splitmix64(h ^ (int(k) & _MASK64))
    return h >> 1


_GOLDEN32 = 0x9E3779B9  # odd, so ``i -> i * _GOLDEN32 mod 2**32`` is a bijection


def noise_seed(seed: int, generation: int, param_index: int) -> int:
    """The 63-bit generator seed of one parameter's noise in one generation.

    The CPU generator (mt19937) only uses the low 32 bits of its seed, so a plain 64-bit hash
    would give two parameters of one generation the same stream with probability about
    ``P**2 / 2**33`` for ``P`` parameters. Here the low 32 bits are
    ``hash(seed, generation) + param_index * odd`` (mod ``2**32``): distinct for every parameter
    of a generation, on every device. The high 31 bits (used by CUDA's Philox) are a hash of all
    three integers.
    """
    low = (derive_seed(seed, generation) + param_index * _GOLDEN32) & 0xFFFFFFFF
    high = derive_seed(seed, generation, param_index) >> 32
    return (high << 32) | low


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
        """``1 / sqrt(rank)``: the factor that makes ``A B^T`` unit-variance."""
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

    def weighted_sum(self, coeffs: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
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
        a = (self.a * (coeffs * self.factor_scale).view(-1, 1, 1)).permute(1, 0, 2).reshape(m, d * r)
        b = self.b.permute(1, 0, 2).reshape(n, d * r)
        if out_dtype is not None:
            a, b = a.to(out_dtype), b.to(out_dtype)
        return (a @ b.T).reshape(self.shape)


def matrix_shape(shape: torch.Size | tuple[int, ...]) -> tuple[int, int]:
    """The ``(m, n)`` matrix view of a parameter of ``ndim >= 2``."""
    return int(shape[0]), int(math.prod(shape[1:]))


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
    """Draw the noise of one parameter for one generation.

    Args:
        shape: the parameter's shape.
        rank: low-rank factor count; ``0`` (or a parameter of ``ndim < 2``) gives dense noise.
        draws: number of independent draws (antithetic pairs).
        seed, generation, param_index: the integers the noise is a pure function of.
        device, dtype: where and in which floating dtype the noise is created.

    Returns:
        A :class:`ParamNoise` with factors ``(draws, m, rank)`` and ``(draws, n, rank)``, or dense
        noise ``(draws, *shape)``.
    """
    shape = torch.Size(shape)
    gen = torch.Generator(device=device)
    gen.manual_seed(noise_seed(seed, generation, param_index))
    if rank > 0 and len(shape) >= 2:
        m, n = matrix_shape(shape)
        a = torch.randn((draws, m, rank), generator=gen, device=device, dtype=dtype)
        b = torch.randn((draws, n, rank), generator=gen, device=device, dtype=dtype)
        return ParamNoise(shape, rank, a=a, b=b)
    dense = torch.randn((draws, *shape), generator=gen, device=device, dtype=dtype)
    return ParamNoise(shape, 0, dense=dense)
