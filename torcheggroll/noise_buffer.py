"""One generation's noise for all of an optimizer's parameters, in one flat buffer.

Drawing each parameter's noise separately costs a few hundred small operations per parameter
and per generation; here every parameter's noise (of one device and dtype) lives in one buffer
that is refilled in place each generation, with a handful of calls: one Triton kernel per
*region* on CUDA, or the PyTorch reference of :mod:`torcheggroll.noise` elsewhere. The buffer is
allocated once, so the refill needs no allocation and no host work beyond launching it, and a
CUDA graph can capture it (the seed and the generation may be device tensors).

Layout. Parameters with low-rank noise are grouped into *buckets* of equal ``(m, n, rank)``; a
bucket of ``P`` parameters holds ``A`` as ``(P, draws, JA, 4)`` blocks and then ``B`` as
``(P, draws, JB, 4)``, where ``J = ceil(entries / 4)`` (each draw's entries padded to whole
Philox blocks). Parameters with dense noise share one region of ``(draws, sum_p J_p, 4)`` blocks,
draw-major, so that the update's weighted sum over draws is one matrix product for all of them.
The counters of a block (see :mod:`torcheggroll.noise`) follow from its position; the layout is
a matter of storage only and does not change any value.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from . import _cpu_noise
from ._triton_modules import fused_enabled, triton_module
from .noise import (
    STREAM_B,
    ParamNoise,
    _check_counters,
    block_normals,
    is_low_rank,
    matrix_shape,
    philox4x32,
    seed_key,
)

__all__ = ["Bucket", "NoiseBuffer", "NoiseEntry"]

_MASK32 = 0xFFFFFFFF
# The reference fills at most this many Philox blocks per call (bounds its int64 temporaries).
_CHUNK_BLOCKS = 1 << 18


@dataclass(frozen=True)
class NoiseEntry:
    """A parameter to draw noise for: its index (the counter word ``c2``), shape and rank
    (0 or a parameter of ``ndim < 2``: dense)."""

    index: int
    shape: torch.Size
    rank: int


@dataclass(frozen=True)
class _Region:
    """A run of Philox blocks in the buffer: ``(rows, draws, blocks)`` for a low-rank stream of
    a bucket (row ``p`` is the bucket's ``p``-th parameter), or ``(1, draws, blocks)`` for the
    dense region, whose block columns map to parameters through ``column_param``."""

    start: int  # first element (a multiple of 4)
    rows: int
    draws: int
    blocks: int
    stream: int
    params: torch.Tensor  # (rows,) int64 parameter indices (low rank), or (blocks,) (dense)
    column_block: torch.Tensor | None = None  # dense: (blocks,) block index within its parameter

    @property
    def size(self) -> int:
        return self.rows * self.draws * self.blocks * 4


@dataclass(frozen=True)
class Bucket:
    """Parameters of one ``(m, n, rank)`` with low-rank noise: ``a`` is ``(P, draws, m, rank)``
    and ``b`` ``(P, draws, n, rank)``, views of the buffer; ``entries`` their positions in the
    buffer's entry list."""

    entries: tuple[int, ...]
    rank: int
    a: torch.Tensor
    b: torch.Tensor


class NoiseBuffer:
    """The noise of ``entries`` for ``draws`` draws, refilled in place for each generation.

    Args:
        entries: the parameters (their index, shape and rank).
        draws: draws per parameter (antithetic pairs).
        device, dtype: where the buffer lives and its floating dtype (values are float32 numbers).

    Attributes:
        noise: one :class:`~torcheggroll.noise.ParamNoise` per entry, views of the buffer (their
            values change when the buffer is refilled).
        buckets: the low-rank entries grouped by ``(m, n, rank)``.
        dense: ``(draws, T)`` the dense region (``T`` the padded total of the dense entries'
            sizes), or None; ``dense_columns[i]`` is entry ``i``'s ``(offset, numel)`` in it.
    """

    def __init__(
        self, entries: Sequence[NoiseEntry], draws: int, device: torch.device, dtype: torch.dtype
    ) -> None:
        self.entries = list(entries)
        self.draws = draws
        self.device = torch.device(device)
        self.dtype = dtype
        for e in self.entries:
            _check_counters(0, e.index)
        self._regions: list[_Region] = []
        self._noise: list[ParamNoise | None] = [None] * len(self.entries)
        self.dense_columns: dict[int, tuple[int, int]] = {}
        self.filled_for: tuple[int, int] | None = None  # (seed, generation) of the contents
        self._block_counters: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        size = self._lay_out()
        self.buffer = torch.zeros(size, dtype=dtype, device=self.device)
        self._make_views()
        self.noise: list[ParamNoise] = [n for n in self._noise if n is not None]
        assert len(self.noise) == len(self.entries)

    # ------------------------------------------------------------------ layout
    def _lay_out(self) -> int:
        groups: dict[tuple[int, int, int], list[int]] = {}
        dense: list[int] = []
        for i, e in enumerate(self.entries):
            if is_low_rank(e.shape, e.rank):
                groups.setdefault((*matrix_shape(e.shape), e.rank), []).append(i)
            else:
                dense.append(i)
        offset = 0
        self._bucket_specs: list[tuple[tuple[int, ...], int, int, int, int, int]] = []
        for (m, n, r), members in groups.items():
            params = torch.tensor(
                [self.entries[i].index for i in members], dtype=torch.int64, device=self.device
            )
            starts = []
            for stream, entries in ((0, m * r), (1, n * r)):
                region = _Region(offset, len(members), self.draws, -(-entries // 4), stream, params)
                self._regions.append(region)
                starts.append(offset)
                offset += region.size
            self._bucket_specs.append((tuple(members), r, m, n, starts[0], starts[1]))
        if dense:
            owners: list[int] = []
            local: list[int] = []
            column = 0
            for i in dense:
                numel = self.entries[i].shape.numel()
                blocks = -(-numel // 4)
                owners += [self.entries[i].index] * blocks
                local += list(range(blocks))
                self.dense_columns[i] = (4 * column, numel)
                column += blocks
            self._dense_start = offset
            self._dense_width = 4 * column
            region = _Region(
                offset,
                1,
                self.draws,
                column,
                0,
                torch.tensor(owners, dtype=torch.int64, device=self.device),
                torch.tensor(local, dtype=torch.int64, device=self.device),
            )
            self._regions.append(region)
            offset += region.size
        return offset

    def _make_views(self) -> None:
        buf, d = self.buffer, self.draws
        self.buckets: list[Bucket] = []
        for members, r, m, n, a_start, b_start in self._bucket_specs:
            pa, pb = 4 * -(-m * r // 4), 4 * -(-n * r // 4)  # padded entries per draw
            p = len(members)
            a = buf.as_strided((p, d, m, r), (d * pa, pa, r, 1), a_start)
            b = buf.as_strided((p, d, n, r), (d * pb, pb, r, 1), b_start)
            self.buckets.append(Bucket(members, r, a, b))
            for row, i in enumerate(members):
                shape = self.entries[i].shape
                self._noise[i] = ParamNoise(shape, r, a=a[row], b=b[row])
        self.dense = None
        if self.dense_columns:
            self.dense = buf.as_strided(
                (d, self._dense_width), (self._dense_width, 1), self._dense_start
            )
            for i, (col, numel) in self.dense_columns.items():
                shape = self.entries[i].shape
                view = (
                    self.dense[:, col : col + numel].reshape(d, *shape)
                    if numel
                    else self.dense[:, :0].reshape(d, *shape)
                )
                self._noise[i] = ParamNoise(shape, 0, dense=view)

    # ------------------------------------------------------------------ filling
    def fill(self, seed: int | torch.Tensor, generation: int | torch.Tensor) -> None:
        """Refill the buffer with the noise of ``(seed, generation)``.

        ``seed`` and ``generation`` are Python ints, or tensors on the buffer's device (``seed``
        as the int64 pair ``(k0, k1)`` of :func:`~torcheggroll.noise.seed_key`, ``generation``
        0-d int64 below ``2**32``), in which case nothing is read on the host and the call can
        be captured in a CUDA graph.
        """
        if isinstance(generation, int):
            _check_counters(generation, 0)
        key: Any = seed_key(seed) if isinstance(seed, int) else seed
        gen: Any = generation & _MASK32 if isinstance(generation, int) else generation
        on_gpu = self.device.type == "cuda" and fused_enabled()
        kernels = triton_module("_triton_noise") if on_gpu else None
        cpu = _cpu_noise.load() if self.device.type == "cpu" else None
        if kernels is not None:
            for region in self._regions:
                kernels.fill_region(self.buffer, region, key, gen)
        elif cpu is not None:
            self._fill_cpu(cpu, (int(key[0]), int(key[1])), int(gen))
        elif self.buffer.numel() <= 4 * _CHUNK_BLOCKS:
            # Small buffers: one call for all regions (each call costs a few hundred operations).
            c0, c1, c2 = self._counters()
            words = philox4x32(c0, c1, c2, gen, key[0], key[1])
            if self.buffer.dtype == torch.float32:
                block_normals(words, out=self.buffer.view(-1, 4))
            else:
                self.buffer.view(-1, 4).copy_(block_normals(words))
        else:
            for region in self._regions:
                self._fill_reference(region, key, gen)
        self.filled_for = (
            (int(seed), int(generation))
            if isinstance(seed, int) and isinstance(generation, int)
            else None
        )

    def ensure(self, seed: int, generation: int) -> None:
        """Fill the buffer for ``(seed, generation)`` unless it holds that noise already."""
        if self.filled_for != (seed, generation):
            self.fill(seed, generation)

    def _counters(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The counter words ``c0, c1, c2`` of every block in buffer order (cached)."""
        if self._block_counters is None:
            parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
            for r in self._regions:
                k = torch.arange(r.draws, device=self.device).view(1, -1, 1)
                if r.column_block is None:
                    j = (
                        torch.arange(r.blocks, device=self.device).view(1, 1, -1)
                        + r.stream * STREAM_B
                    )
                    p = r.params.view(-1, 1, 1)
                else:
                    j, p = r.column_block.view(1, 1, -1), r.params.view(1, 1, -1)
                shape = (r.rows, r.draws, r.blocks)
                c0, c1, c2 = (t.expand(shape).reshape(-1) for t in (j, k, p))
                parts.append((c0, c1, c2))
            self._block_counters = (
                torch.cat([c[0] for c in parts]),
                torch.cat([c[1] for c in parts]),
                torch.cat([c[2] for c in parts]),
            )
        assert self._block_counters is not None
        return self._block_counters

    def _fill_cpu(self, cpu: Any, key: tuple[int, int], gen: int) -> None:
        """Every region with the compiled CPU kernel (float32; other dtypes through a copy)."""
        f32 = self.buffer.dtype == torch.float32
        target = self.buffer if f32 else torch.empty(self.buffer.shape, dtype=torch.float32)
        for r in self._regions:
            out = target[r.start : r.start + r.size]
            if r.column_block is None:
                cpu.fill_grid(out, r.draws, r.blocks, r.stream * STREAM_B, r.params, gen, key)
            else:
                cpu.fill_columns(out, r.draws, r.column_block, r.params, gen, key)
        if not f32:
            self.buffer.copy_(target)

    def _fill_reference(self, region: _Region, key: Any, gen: Any) -> None:
        dev = self.device
        out = self.buffer[region.start : region.start + region.size].view(
            region.rows, region.draws, region.blocks, 4
        )
        k = torch.arange(region.draws, device=dev, dtype=torch.int64).view(1, -1, 1)
        if region.column_block is None:
            rows_per_chunk = max(1, _CHUNK_BLOCKS // max(1, region.draws * region.blocks))
            j = torch.arange(region.blocks, device=dev, dtype=torch.int64).view(1, 1, -1)
            params = region.params
            for r0 in range(0, region.rows, rows_per_chunk):
                p = params[r0 : r0 + rows_per_chunk].view(-1, 1, 1)
                words = philox4x32(j + region.stream * STREAM_B, k, p, gen, key[0], key[1])
                out[r0 : r0 + rows_per_chunk].copy_(block_normals(words))
        else:
            cols_per_chunk = max(1, _CHUNK_BLOCKS // max(1, region.draws))
            params, local = region.params, region.column_block
            for c0 in range(0, region.blocks, cols_per_chunk):
                sl = slice(c0, c0 + cols_per_chunk)
                words = philox4x32(
                    local[sl].view(1, 1, -1), k, params[sl].view(1, 1, -1), gen, key[0], key[1]
                )
                out[:, :, sl].copy_(block_normals(words))
