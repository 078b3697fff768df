"""Argument checks of the optimizer: every bad input is refused with a ``ValueError`` or
``TypeError`` that names the argument, its value and what was expected, before any state
changes."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

import torch

from .scaling import SIGMA_SCALINGS
from .shaping import SHAPINGS

__all__ = [
    "as_losses",
    "as_scalar_loss",
    "check_group",
    "check_hyper",
    "check_population",
    "closure_name",
    "invalid",
    "number",
    "takes_population",
]

Closure = Callable[..., Any]


def number(value: Any) -> bool:
    """A real Python number (``bool`` is not one here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def invalid(name: str, value: Any, expected: str) -> ValueError:
    return ValueError(
        f"Invalid {name}: {value!r} (expected {expected}, got {type(value).__name__})"
    )


def check_hyper(
    *,
    lr: Any,
    sigma: Any,
    rank: Any,
    weight_decay: Any,
    shaping: Any,
    maximize: Any = False,
    read_device_tensors: bool = True,
) -> None:
    """Check one group's settings. A tensor ``lr`` on an accelerator is read only when
    ``read_device_tensors`` (reading it waits for the device; steps do not)."""
    lr_value: Any = lr
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1:
            raise ValueError(
                f"Invalid lr: a tensor lr must have one element, got shape {tuple(lr.shape)}"
            )
        lr_value = float(lr) if read_device_tensors or lr.device.type == "cpu" else 0.0
    if not number(lr_value) or not lr_value >= 0.0 or not math.isfinite(lr_value):
        raise invalid("learning rate", lr, "a finite float >= 0")
    if not number(sigma) or not sigma > 0.0 or not math.isfinite(sigma):
        raise invalid("sigma", sigma, "a finite float > 0")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 0:
        raise invalid("rank", rank, "an int >= 0")
    if not number(weight_decay) or not weight_decay >= 0.0 or not math.isfinite(weight_decay):
        raise invalid("weight_decay value", weight_decay, "a finite float >= 0")
    if not isinstance(shaping, str) or shaping not in SHAPINGS:
        raise ValueError(f"Invalid shaping: {shaping!r} (expected one of {sorted(SHAPINGS)})")
    if not isinstance(maximize, bool):
        raise invalid("maximize", maximize, "a bool")


def check_group(group: dict[str, Any], read_device_tensors: bool = True) -> None:
    """Check a (complete) param group's per-group settings."""
    scaling = group.get("sigma_scaling", "none")
    if not isinstance(scaling, str) or scaling not in SIGMA_SCALINGS:
        raise ValueError(
            f"Invalid sigma_scaling: {scaling!r} (expected one of {list(SIGMA_SCALINGS)})"
        )
    check_hyper(
        lr=group["lr"],
        sigma=group["sigma"],
        rank=group["rank"],
        weight_decay=group["weight_decay"],
        shaping=group["shaping"],
        maximize=group["maximize"],
        read_device_tensors=read_device_tensors,
    )


def check_population(pop_size: Any, antithetic: Any) -> None:
    if not isinstance(pop_size, int) or isinstance(pop_size, bool) or pop_size < 2:
        raise invalid("pop_size", pop_size, "an int >= 2")
    if not isinstance(antithetic, bool):
        raise invalid("antithetic", antithetic, "a bool")
    if antithetic and pop_size % 2:
        raise ValueError(f"Invalid pop_size: {pop_size} (must be even with antithetic=True)")


def takes_population(closure: Closure) -> bool:
    """Whether the closure takes the population (one required positional parameter)."""
    try:
        sig = inspect.signature(closure)
    except (TypeError, ValueError):
        return True
    required = [
        p
        for p in sig.parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
    ]
    if len(required) > 1:
        raise TypeError(
            f"Invalid closure: {closure!r} takes {len(required)} required arguments "
            "(expected 0, or 1 for the population)"
        )
    return len(required) == 1 or any(p.kind is p.VAR_POSITIONAL for p in sig.parameters.values())


def closure_name(closure: Closure) -> str:
    name = getattr(closure, "__qualname__", None) or type(closure).__name__
    return f"the closure {name!r}"


def as_losses(value: Any, size: int, closure: Closure | str) -> torch.Tensor:
    what = closure if isinstance(closure, str) else f"{closure_name(closure)} (population form)"
    if value is None:
        raise ValueError(
            f"Invalid losses: {what} returned None; it must return a 1-D tensor of {size} "
            "losses, one per member (e.g. `return loss_fn(population.forward(model, x), y)`)"
        )
    try:
        losses = value if isinstance(value, torch.Tensor) else torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(
            f"Invalid losses: {what} returned a {type(value).__name__}; it must return a 1-D "
            f"tensor of {size} losses, one per member"
        ) from None
    if losses.dim() != 1 or losses.shape[0] != size:
        raise ValueError(
            f"Invalid losses: {what} must return a 1-D tensor of {size} losses (one per member), "
            f"got shape {tuple(losses.shape)}"
        )
    if not (
        losses.is_floating_point()
        or losses.dtype in (torch.int32, torch.int64, torch.int16, torch.int8, torch.uint8)
    ):
        raise ValueError(f"Invalid losses: expected real numbers, got dtype {losses.dtype}")
    return losses.detach().to(torch.promote_types(losses.dtype, torch.float32))


def as_scalar_loss(value: Any, position: int, closure: Closure) -> torch.Tensor:
    what = f"{closure_name(closure)} (zero-argument form)"
    if value is None:
        raise ValueError(
            f"Invalid loss: {what} returned None for member {position}; it must return the "
            "loss of the model as it is now (a scalar tensor or a float)"
        )
    try:
        loss = value if isinstance(value, torch.Tensor) else torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(
            f"Invalid loss: {what} returned a {type(value).__name__} for member {position}; it "
            "must return a scalar tensor or a float"
        ) from None
    if loss.numel() != 1:
        raise ValueError(
            f"Invalid loss: {what} must return a scalar loss, got shape {tuple(loss.shape)} "
            f"for member {position}"
        )
    return loss.detach().reshape(())
