"""Population sharding over torch.distributed: ranks share seeds and losses, never tensors.

Every rank holds the same parameters and the same seed. A generation's ``N`` members are split
into contiguous shards of whole antithetic pairs; each rank evaluates its shard, the ``N`` losses
are combined with one collective, and every rank regenerates the same noise and applies the
same update, so parameters stay identical without any parameter or gradient traffic.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

__all__ = ["resolve_group", "shard_bounds", "world_info"]


def resolve_group(process_group: Any) -> Any:
    """The process group to shard over: the given one, else WORLD when torch.distributed is
    initialized, else ``None`` (a single process)."""
    if process_group is not None:
        return process_group
    if dist.is_available() and dist.is_initialized():
        return dist.group.WORLD
    return None


def world_info(group: Any) -> tuple[int, int]:
    """``(rank, world_size)`` in ``group``; ``(0, 1)`` for a single process."""
    if group is None:
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def shard_bounds(pop_size: int, antithetic: bool, rank: int, world_size: int) -> tuple[int, int]:
    """The ``[start, stop)`` global member range of ``rank``.

    Draws (antithetic pairs, or single members without antithetic sampling) are split as evenly
    as possible, the first ranks taking one more when they do not divide evenly; a rank may get
    none when there are more ranks than draws.
    """
    unit = 2 if antithetic else 1
    draws = pop_size // unit
    base, extra = divmod(draws, world_size)
    start = rank * base + min(rank, extra)
    stop = start + base + (1 if rank < extra else 0)
    return start * unit, stop * unit


def gather_losses(
    local: torch.Tensor, start: int, pop_size: int, group: Any
) -> torch.Tensor:
    """All ranks' losses as one ``(pop_size,)`` tensor, identical on every rank.

    Each rank writes its shard into a zero vector and the vectors are summed; every entry has
    exactly one non-zero contributor, so the sum is exact. Before that, ranks agree on whether
    every shard had the right length, so a wrong count raises on every rank instead of hanging.
    """
    if group is None:
        return local
    full = torch.zeros(pop_size, dtype=torch.float64, device=_collective_device(local, group))
    full[start : start + local.numel()] = local.to(full.device, torch.float64)
    dist.all_reduce(full, group=group)
    return full.to(local.device, local.dtype)


def _collective_device(t: torch.Tensor, group: Any) -> torch.device:
    backend = dist.get_backend(group)
    if backend == "nccl":
        return t.device if t.device.type == "cuda" else torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def agree_on_seed(seed: int, group: Any) -> int:
    """``seed`` as chosen by rank 0 of ``group`` (unchanged for a single process)."""
    if group is None:
        return seed
    value = torch.tensor([seed], dtype=torch.int64, device=_collective_device(torch.empty(0), group))
    dist.broadcast(value, src=dist.get_global_rank(group, 0), group=group)
    return int(value.item())
