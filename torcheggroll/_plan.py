"""What an optimizer's configuration fixes for every step: the perturbed parameters, their noise
buffers and the index tensors the update needs.

Building this costs Python work per parameter, so it is done once and reused while the
configuration (the parameters, their shapes, dtypes, devices, ``requires_grad``, the groups'
ranks, the population) stays the same; a step only refills the noise and runs tensor operations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .noise import compute_dtype, effective_rank, num_draws
from .noise_buffer import NoiseBuffer, NoiseEntry
from .scaling import sigma_scale

__all__ = ["Owned", "Plan", "signature"]


@dataclass(frozen=True)
class Owned:
    """A perturbed parameter: its index among the optimizer's parameters (the noise counter
    word ``c2``), its param group, and where its noise lives (buffer and entry)."""

    param: torch.Tensor
    index: int
    group: int
    buffer: int
    entry: int
    scale: float = 1.0  # the factor on the group's sigma (sigma_scaling)


def signature(param_groups: list[dict[str, Any]]) -> tuple[Any, ...]:
    """Everything a :class:`Plan` depends on, cheap to compare between steps."""
    parts: list[Any] = [param_groups[0]["pop_size"], param_groups[0]["antithetic"]]
    for group in param_groups:
        rank = int(group["rank"])
        scaling = group.get("sigma_scaling", "none")
        for p in group["params"]:
            parts.append((id(p), p.shape, p.dtype, p.device, p.requires_grad, rank, scaling))
        parts.append(None)  # group boundary
    return tuple(parts)


@dataclass(frozen=True)
class BucketUpdate:
    """The owned parameters (positions in :attr:`Plan.owned`) of one low-rank bucket of one
    buffer, and ``groups`` ``(P,)`` their param groups, on the buffer's device."""

    owned: tuple[int, ...]
    groups: torch.Tensor
    scales: torch.Tensor  # (P, 1) float64 factors on sigma


class Plan:
    """The perturbed parameters of an optimizer and their noise buffers (one per device and
    parameter dtype), for one configuration (see :func:`signature`)."""

    def __init__(self, param_groups: list[dict[str, Any]]) -> None:
        self.signature = signature(param_groups)
        self.pop_size = int(param_groups[0]["pop_size"])
        self.antithetic = bool(param_groups[0]["antithetic"])
        self.draws = num_draws(self.pop_size, self.antithetic)
        self.group_count = len(param_groups)
        by_buffer: dict[tuple[torch.device, torch.dtype], list[tuple[int, int, torch.Tensor]]] = {}
        index = -1
        for g, group in enumerate(param_groups):
            for p in group["params"]:
                index += 1  # frozen parameters keep their index: unfreezing one shifts no noise
                if p.requires_grad:
                    by_buffer.setdefault((p.device, p.dtype), []).append((index, g, p))
        self.buffers: list[NoiseBuffer] = []
        self.owned: list[Owned] = []
        ranks = [int(group["rank"]) for group in param_groups]
        for (device, dtype), params in by_buffer.items():
            entries = [
                NoiseEntry(i, p.shape, effective_rank(p.shape, ranks[g])) for i, g, p in params
            ]
            buffer = NoiseBuffer(entries, self.draws, device, compute_dtype(dtype))
            b = len(self.buffers)
            self.buffers.append(buffer)
            for e, (i, g, p) in enumerate(params):
                scaling = param_groups[g].get("sigma_scaling", "none")
                self.owned.append(Owned(p, i, g, b, e, sigma_scale(p.shape, scaling)))
        # Per buffer: owned positions by entry, the buckets' group indices, the dense entries.
        self.entry_owned: list[list[int]] = [[0] * len(b.entries) for b in self.buffers]
        for pos, o in enumerate(self.owned):
            self.entry_owned[o.buffer][o.entry] = pos
        self.member_tables: dict[Any, torch.Tensor] = {}  # see Population.member_table
        # Per buffer: (T,) float64 factors on sigma of the dense region's columns, or None.
        self.dense_scales: list[torch.Tensor | None] = []
        for b, buffer in enumerate(self.buffers):
            if buffer.dense is None:
                self.dense_scales.append(None)
                continue
            col = torch.ones(buffer.dense.shape[1], dtype=torch.float64)
            for e, (start, numel) in buffer.dense_columns.items():
                col[start : start + numel] = self.owned[self.entry_owned[b][e]].scale
            self.dense_scales.append(None if bool((col == 1).all()) else col.to(buffer.device))
        self.bucket_updates: list[list[BucketUpdate]] = []
        for b, buffer in enumerate(self.buffers):
            updates = []
            for bucket in buffer.buckets:
                owned = tuple(self.entry_owned[b][e] for e in bucket.entries)
                groups = torch.tensor(
                    [self.owned[o].group for o in owned], dtype=torch.int64, device=buffer.device
                )
                scales = torch.tensor(
                    [[self.owned[o].scale] for o in owned],
                    dtype=torch.float64,
                    device=buffer.device,
                )
                updates.append(BucketUpdate(owned, groups, scales))
            self.bucket_updates.append(updates)

    def fill(self, seed: Any, generation: Any) -> None:
        """Refill every buffer for ``(seed, generation)`` (ints: only where it holds other
        noise; tensors: always)."""
        for buffer in self.buffers:
            if isinstance(seed, int) and isinstance(generation, int):
                buffer.ensure(seed, generation)
            else:
                buffer.fill(seed, generation)
