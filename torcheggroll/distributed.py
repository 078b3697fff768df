"""Population sharding over torch.distributed: ranks share seeds and losses, never tensors.

Every rank holds the same parameters and the same seed. A generation's ``N`` members are split
into contiguous shards of whole antithetic pairs; each rank evaluates its shard, the ``N`` losses
are all-gathered, and every rank regenerates the same noise and applies the same update, so
parameters stay identical without any parameter or gradient traffic (docs/algorithm.md, section 9).

A step costs two small collectives: a fixed-size header in which every rank reports whether it
evaluated its shard and which seed, generation, population and group settings it used, then
the losses. The
header lets every rank raise the same error when one rank failed or disagrees, instead of the
healthy ranks blocking in the loss collective until the process group times out.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from .population import Population

__all__ = [
    "RankError",
    "RankValueError",
    "agree_on_seed",
    "broadcast_parameters",
    "gather_losses",
    "params_fingerprint",
    "resolve_group",
    "settings_fingerprint",
    "shard_bounds",
    "world_info",
]

_MASK64 = (1 << 64) - 1
_LOSS_DTYPES = (torch.float32, torch.float64)  # header codes 1 and 2; 0 is "no local members"

# Header slots (int64): what every rank tells the others before the losses are exchanged.
_STATUS, _COUNT, _DTYPE, _SEED, _GENERATION, _POP, _ANTITHETIC, _FP_SET, _FP_LO, _FP_HI = range(10)
_SETTINGS = 10
_HEADER = 11
_OK, _RAISED, _BAD_COUNT = 0, 1, 2


class RankError(RuntimeError):
    """Raised on every rank when some rank failed to evaluate its members, or when the ranks
    disagree on the seed, the generation, the population or the parameters.

    Attributes:
        ranks: the offending ranks (in the process group).
    """

    def __init__(self, message: str, ranks: Sequence[int]) -> None:
        super().__init__(message)
        self.ranks = list(ranks)


class RankValueError(RankError, ValueError):
    """A :class:`RankError` whose cause is invalid losses (a wrong count or a ``ValueError``
    raised by a closure): it is a ``ValueError`` on every rank, as in a single process."""


def resolve_group(process_group: Any) -> Any:
    """The process group to shard over: the given one, else WORLD when torch.distributed is
    initialized, else ``None`` (a single process). ``False`` opts out: every process evaluates
    the whole population on its own (for programs that use torch.distributed for other work)."""
    if process_group is False:
        return None
    if process_group is not None:
        # dist.new_group gives a process outside the group GroupMember.NON_GROUP_MEMBER.
        outside = dist.is_available() and process_group is dist.GroupMember.NON_GROUP_MEMBER
        if not outside and not (
            dist.is_available() and isinstance(process_group, dist.ProcessGroup)
        ):
            raise TypeError(
                f"Invalid process_group: {process_group!r} (expected a "
                "torch.distributed.ProcessGroup, None or False)"
            )
        if outside or dist.get_rank(process_group) < 0:
            raise ValueError(
                f"Invalid process_group: {process_group!r} (this process, global rank "
                f"{dist.get_rank()}, is not a member)"
            )
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


def settings_fingerprint(groups: Sequence[dict[str, Any]]) -> int:
    """A 64-bit fingerprint of the param groups' settings that change the noise or the update
    (``lr``, ``sigma``, ``rank``, ``shaping``, ``maximize``, ``weight_decay``,
    ``sigma_scaling``), the same in every process for the same settings. A tensor ``lr`` on an
    accelerator counts by its presence only (reading it would wait for the device)."""
    parts = []
    for g in groups:
        lr = g["lr"]
        if isinstance(lr, torch.Tensor):
            lr = float(lr) if lr.device.type == "cpu" else "device tensor"
        keys = ("sigma", "rank", "shaping", "maximize", "weight_decay", "sigma_scaling")
        parts.append((lr, *(g.get(k) for k in keys)))
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def params_fingerprint(tensors: Iterable[torch.Tensor]) -> tuple[int, int]:
    """Two integers that differ, with overwhelming probability, between different parameters.

    Computed from the bit patterns with integer sums, which are exact and do not depend on the
    reduction order, so identical tensors give identical fingerprints on any device. It detects
    replicas initialized differently; it is not a cryptographic hash.
    """
    lows: list[torch.Tensor] = []
    highs: list[torch.Tensor] = []
    for t in tensors:
        t = t.detach()
        if t.numel() == 0:
            continue
        bits = t.contiguous().view(_int_view_dtype(t.element_size())).reshape(-1).to(torch.int64)
        # Low 24 bits (mantissa) and top 16 bits (sign, exponent): sums of at most 2**34
        # elements stay below 2**58 and 2**49, so nothing overflows int64.
        lows.append((bits & 0xFFFFFF).sum())
        highs.append((bits >> max(0, 8 * t.element_size() - 16)).sum())
    lo, hi = 0, 0
    if lows:
        for i, (a, b) in enumerate(
            zip(torch.stack(lows).tolist(), torch.stack(highs).tolist(), strict=True)
        ):
            # Weighting by position makes swapped tensors differ too.
            lo = (lo + (i + 1) * (a + 1)) % (1 << 62)
            hi = (hi + (i + 1) * (b + 1)) % (1 << 62)
    return lo, hi


def _int_view_dtype(itemsize: int) -> torch.dtype:
    return {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[itemsize]


def _collective_device(group: Any, like: torch.device | None = None) -> torch.device:
    """Where tensors for a collective of ``group`` must live (CUDA for NCCL, else the CPU)."""
    if dist.get_backend(group) == "nccl":
        if like is not None and like.type == "cuda":
            return like
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_losses(
    local: torch.Tensor | None,
    population: Population,
    group: Any,
    *,
    error: BaseException | None = None,
    check_params: bool = False,
    checked: bool = True,
    settings: int = 0,
) -> torch.Tensor:
    """All ranks' losses as one ``(pop_size,)`` tensor, identical on every rank.

    Args:
        local: ``(len(population),)`` this rank's losses, in member order (float32 or float64);
            ``None`` when ``error`` is given.
        population: this rank's population (its members, seed, generation and sizes).
        group: the process group, or ``None`` for a single process (``local`` is returned).
        error: the exception this rank's closure raised; the other ranks are told, and every
            rank raises a :class:`RankError` naming it (``error`` is its ``__cause__`` here).
        check_params: also check that every rank holds the same parameters (one pass over
            them; the optimizer does it at its first step).
        checked: exchange the header first (the checks above, and errors raised on every
            rank). Its values are read on the host, which waits for the device; ``False``
            (capturable steps) exchanges the losses alone, read nowhere on the host.
        settings: a fingerprint of the settings every rank must share (the optimizer's
            :func:`settings_fingerprint` of its param groups), checked with the header.

    Returns:
        The losses of all members, bit-identical to what each rank computed, in the widest
        dtype any rank returned, on ``local``'s device.

    Raises:
        RankValueError: on every rank, when some rank returned a wrong number of losses or its
            closure raised a ``ValueError``.
        RankError: on every rank, when some rank's closure raised anything else, or the ranks
            disagree on the seed, generation, population size or parameters.
    """
    if group is None:
        if error is not None:
            raise error
        assert local is not None
        return local
    rank, world = world_info(group)
    bounds = [
        shard_bounds(population.pop_size, population.antithetic, r, world) for r in range(world)
    ]
    start, stop = bounds[rank]
    device = _collective_device(group, local.device if local is not None else None)
    if not checked and error is None and local is not None:
        return _losses_only(local, bounds, rank, device, group)

    header = torch.zeros(_HEADER, dtype=torch.int64)
    header[_SEED] = _as_int64(population.seed)
    header[_GENERATION] = population.generation
    header[_POP] = population.pop_size
    header[_ANTITHETIC] = int(population.antithetic)
    header[_SETTINGS] = _as_int64(settings)
    if error is not None:
        header[_STATUS] = _RAISED
    else:
        assert local is not None
        header[_COUNT] = local.numel()
        if local.dim() != 1 or local.numel() != stop - start:
            header[_STATUS] = _BAD_COUNT
        elif local.numel():
            header[_DTYPE] = _dtype_code(local.dtype)
    if check_params:
        lo, hi = params_fingerprint(e.param for e in population.params)
        header[_FP_SET], header[_FP_LO], header[_FP_HI] = 1, lo, hi
    headers = _all_gather(header.to(device), world, group).cpu().view(world, _HEADER)

    failed = [r for r in range(world) if int(headers[r, _STATUS]) != _OK]
    if failed:
        _raise_failures(headers, failed, bounds, population.pop_size, error, group, rank)
    _check_agreement(headers)

    width = max(b - a for a, b in bounds)
    row = torch.zeros(width, dtype=torch.float64, device=device)
    if local is not None and local.numel():
        row[: local.numel()] = local.detach().to(device, torch.float64)
    # The bits travel as int64 so every loss (and -0.0) arrives exactly as it left.
    rows = _all_gather(row.view(torch.int64), world, group).view(torch.float64).view(world, width)
    losses = torch.cat([rows[r, : b - a] for r, (a, b) in enumerate(bounds)])
    codes = [int(c) for c in headers[:, _DTYPE].tolist() if int(c)]
    dtype = _LOSS_DTYPES[max(codes) - 1]
    out_device = local.device if local is not None else device
    return losses.to(out_device, dtype)


def _losses_only(
    local: torch.Tensor, bounds: list[tuple[int, int]], rank: int, device: torch.device, group: Any
) -> torch.Tensor:
    """The losses of every rank, gathered with one collective and nothing read on the host
    (every rank must have returned its shard's count in the same dtype)."""
    world = len(bounds)
    width = max(b - a for a, b in bounds)
    row = torch.zeros(width, dtype=torch.float64, device=device)
    row[: local.numel()] = local.detach().reshape(-1).to(device, torch.float64)
    rows = _all_gather(row.view(torch.int64), world, group).view(torch.float64).view(world, width)
    losses = torch.cat([rows[r, : b - a] for r, (a, b) in enumerate(bounds)])
    return losses.to(local.device, local.dtype)


def _all_gather(t: torch.Tensor, world: int, group: Any) -> torch.Tensor:
    out = torch.empty(world * t.numel(), dtype=t.dtype, device=t.device)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, t, group=group)
    return out


def _as_int64(value: int) -> int:
    """A non-negative Python int folded into the signed int64 range (the noise hashes ints
    modulo 2**64, so equal folds mean equal noise)."""
    v = int(value) & _MASK64
    return v - (1 << 64) if v >= 1 << 63 else v


def _dtype_code(dtype: torch.dtype) -> int:
    # Never raises (that would leave the other ranks waiting): anything but float64 is
    # returned as float32, which holds float16, bfloat16 and small integers exactly.
    return 2 if dtype == torch.float64 else 1


def _raise_failures(
    headers: torch.Tensor,
    failed: list[int],
    bounds: list[tuple[int, int]],
    pop_size: int,
    error: BaseException | None,
    group: Any,
    rank: int,
) -> None:
    """Every rank raises the same error describing every failed rank."""
    world = len(bounds)
    # Only failing ranks have something to say; this collective runs only on this (rare) path,
    # and every rank takes it because every rank saw the same headers.
    mine = (
        None if error is None else (type(error).__name__, str(error), isinstance(error, ValueError))
    )
    said: list[Any] = [None] * world
    dist.all_gather_object(said, mine, group=group)
    parts = []
    all_value_errors = True
    for r in failed:
        a, b = bounds[r]
        where = (
            f"rank {r} of {world} (members {a}..{b - 1} of {pop_size})"
            if b > a
            else (f"rank {r} of {world} (no members)")
        )
        if int(headers[r, _STATUS]) == _BAD_COUNT:
            parts.append(
                f"{where} returned {int(headers[r, _COUNT])} losses for its {b - a} members"
            )
        else:
            name, text, is_value = said[r] if said[r] is not None else ("Exception", "", False)
            all_value_errors = all_value_errors and is_value
            parts.append(f"{where} raised {name}: {text}")
    if all_value_errors:
        message = (
            f"Invalid losses: {'; '.join(parts)} (every rank must return one loss per local member)"
        )
        raise RankValueError(message, failed) from error
    raise RankError(f"Population evaluation failed: {'; '.join(parts)}", failed) from error


def _check_agreement(headers: torch.Tensor) -> None:
    names = {
        _SEED: "seed",
        _GENERATION: "generation",
        _POP: "pop_size",
        _ANTITHETIC: "antithetic",
        _SETTINGS: "the param groups' settings (lr, sigma, rank, shaping, maximize, "
        "weight_decay, sigma_scaling; fingerprints)",
    }
    for slot, name in names.items():
        values = headers[:, slot].tolist()
        if len(set(values)) > 1:
            listing = ", ".join(f"rank {r}: {v}" for r, v in enumerate(values))
            raise RankError(
                f"Ranks disagree on {name} ({listing}): every rank must build the optimizer with "
                "the same settings and load the same checkpoint",
                [r for r, v in enumerate(values) if v != values[0]],
            )
    checked = [r for r in range(headers.shape[0]) if int(headers[r, _FP_SET])]
    prints = {r: (int(headers[r, _FP_LO]), int(headers[r, _FP_HI])) for r in checked}
    if len(set(prints.values())) > 1:
        ref = prints[checked[0]]
        raise RankError(
            "Ranks hold different parameters (fingerprints differ on ranks "
            f"{[r for r in checked if prints[r] != ref]} from rank {checked[0]}): initialize the "
            "model identically on every rank (same torch.manual_seed before building it, or "
            "torcheggroll.distributed.broadcast_parameters) and load the same checkpoint",
            [r for r in checked if prints[r] != ref],
        )


def agree_on_seed(seed: int, group: Any) -> int:
    """``seed`` as chosen by rank 0 of ``group`` (unchanged for a single process)."""
    if group is None:
        return seed
    value = torch.tensor([_as_int64(seed)], dtype=torch.int64, device=_collective_device(group))
    dist.broadcast(value, src=dist.get_global_rank(group, 0), group=group)
    return int(value.item()) & _MASK64


def broadcast_parameters(tensors: Iterable[torch.Tensor], group: Any = None, src: int = 0) -> None:
    """Copy rank ``src``'s values of ``tensors`` (e.g. ``model.state_dict().values()``) into every
    rank, in place: one way to start all replicas from the same initialization.

    Args:
        tensors: the same tensors, in the same order, on every rank.
        group: the process group (default: the world group).
        src: the rank, in ``group``, whose values are kept.
    """
    group = resolve_group(group)
    if group is None:
        return
    root = dist.get_global_rank(group, src)
    with torch.no_grad():
        for t in tensors:
            device = _collective_device(group, t.device)
            buf = t.detach().to(device).contiguous()
            dist.broadcast(buf, src=root, group=group)
            if buf.data_ptr() != t.data_ptr():
                t.copy_(buf)
