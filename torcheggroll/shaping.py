"""Fitness shaping: turn raw per-member losses into the weights of the ES update.

Every function maps a 1-D tensor of ``N`` finite losses (lower is better) to ``N`` shaped
values ``s_i``; the update then moves the parameters along ``-sum_i s_i E_i``.
"""

from __future__ import annotations

import warnings

import torch

__all__ = [
    "SHAPINGS",
    "IdenticalLossesWarning",
    "NonFiniteLossWarning",
    "centered",
    "centered_rank",
    "mask_nonfinite",
    "raw",
    "replace_nonfinite",
    "shape_losses",
    "warn_identical",
    "warn_nonfinite",
    "zscore",
]

_ZSCORE_EPS = 1e-8


class NonFiniteLossWarning(RuntimeWarning):
    """Some population members returned NaN or infinite losses."""


class IdenticalLossesWarning(RuntimeWarning):
    """Every population member returned the same loss: the step learns nothing.

    Usually the closure ignores the population (it calls ``model(x)`` instead of
    ``population.forward(model, x)``, or returns one loss for all members).
    """


def zscore(losses: torch.Tensor) -> torch.Tensor:
    """``(l - mean) / std`` with the unbiased std; only mean-centred when ``std <= 1e-8``.

    This is the original torcheggroll's normalization (docs/algorithm.md, section 4).
    """
    if losses.numel() < 2:
        return losses - losses.mean()
    std, mean = torch.std_mean(losses, correction=1)  # one reduction for both
    return (losses - mean) / torch.where(std > _ZSCORE_EPS, std, 1.0)


def centered_rank(losses: torch.Tensor) -> torch.Tensor:
    """Ranks mapped linearly onto ``[-0.5, 0.5]`` (OpenAI ES); tied losses share their mean rank.

    Robust to outliers: only the order of the losses matters. Ties get the average of the ranks
    they span, so equal losses get equal weights (a flat loss gives a zero update rather than a
    random walk driven by member indices). No host sync: ranks come from a sort and two binary
    searches.
    """
    n = losses.numel()
    if n < 2:
        return torch.zeros_like(losses)
    ordered = torch.sort(losses).values
    below = torch.searchsorted(ordered, losses, right=False)  # losses strictly smaller
    through = torch.searchsorted(ordered, losses, right=True)  # losses smaller or equal
    ranks = (below + through - 1).to(losses.dtype) / 2  # mean of the ranks below..through-1
    return ranks / (n - 1) - 0.5


def centered(losses: torch.Tensor) -> torch.Tensor:
    """``l - mean(l)``: the original torcheggroll's shaping with ``normalize_fitness=False``."""
    return losses - losses.mean()


def raw(losses: torch.Tensor) -> torch.Tensor:
    """The losses unchanged: with this the update is an unbiased smoothed-gradient estimate."""
    return losses.clone()


SHAPINGS = {"zscore": zscore, "centered_rank": centered_rank, "centered": centered, "raw": raw}


def mask_nonfinite(
    losses: torch.Tensor, finite: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace NaN and ±inf losses by the worst (largest) finite loss, without a host sync.

    Returns the cleaned losses and a 0-d int64 tensor counting the replaced ones. When no loss
    is finite the cleaned losses are meaningless (the caller must skip the update). ``finite``:
    ``torch.isfinite(losses)`` if the caller has it already.
    """
    if finite is None:
        finite = torch.isfinite(losses)
    return replace_nonfinite(losses, finite), (~finite).sum()


def replace_nonfinite(losses: torch.Tensor, finite: torch.Tensor) -> torch.Tensor:
    """``losses`` with the entries where ``finite`` is False replaced by the largest finite one
    (the cleaned losses of :func:`mask_nonfinite`, without the count)."""
    lowest = torch.finfo(losses.dtype).min if losses.is_floating_point() else 0
    worst = torch.where(finite, losses, lowest).max()
    return torch.where(finite, losses, worst)


def shape_losses(losses: torch.Tensor, shaping: str) -> torch.Tensor:
    """Apply the named shaping (a key of :data:`SHAPINGS`) to finite losses ``(N,)``."""
    try:
        fn = SHAPINGS[shaping]
    except KeyError:
        raise ValueError(
            f"Invalid shaping: {shaping!r} (expected one of {sorted(SHAPINGS)})"
        ) from None
    return fn(losses)


def warn_nonfinite(count: int, total: int) -> None:
    warnings.warn(
        f"{count} of {total} population members returned a non-finite loss; they were treated as "
        "the worst member"
        + (" (no finite loss: the update was skipped)" if count == total else ""),
        NonFiniteLossWarning,
        stacklevel=3,
    )


def warn_identical(total: int) -> None:
    warnings.warn(
        f"all {total} population members returned the same loss, so this step learns nothing: "
        "does the closure evaluate the population (population.forward(model, x), one loss per "
        "member) rather than the model itself (model(x))?",
        IdenticalLossesWarning,
        stacklevel=3,
    )
