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
    "GLOBAL_KEYS",
    "GROUP_DEFAULTS",
    "as_losses",
    "as_scalar_loss",
    "check_group",
    "check_groups",
    "check_hyper",
    "check_population",
    "check_state_dict",
    "closure_name",
    "invalid",
    "loss_dtype",
    "number",
    "takes_population",
]

Closure = Callable[..., Any]
# The largest learning rate or weight decay: steps multiply float32 (and bfloat16) tensors by it.
_LARGEST = torch.finfo(torch.float32).max


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
        if not lr.is_floating_point():
            raise ValueError(f"Invalid learning rate: {lr!r} (expected a floating-point tensor)")
        lr_value = float(lr) if read_device_tensors or lr.device.type == "cpu" else 0.0
    if not number(lr_value) or not lr_value >= 0.0 or not math.isfinite(lr_value):
        raise invalid("learning rate", lr, "a finite float >= 0")
    _check_largest("learning rate", lr_value)
    if not number(sigma) or not sigma > 0.0 or not math.isfinite(sigma):
        raise invalid("sigma", sigma, "a finite float > 0")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 0:
        raise invalid("rank", rank, "an int >= 0")
    if not number(weight_decay) or not weight_decay >= 0.0 or not math.isfinite(weight_decay):
        raise invalid("weight_decay value", weight_decay, "a finite float >= 0")
    _check_largest("weight_decay value", weight_decay)
    if not isinstance(shaping, str) or shaping not in SHAPINGS:
        raise ValueError(f"Invalid shaping: {shaping!r} (expected one of {sorted(SHAPINGS)})")
    if not isinstance(maximize, bool):
        raise invalid("maximize", maximize, "a bool")


def _check_largest(name: str, value: float) -> None:
    if value > _LARGEST:
        raise ValueError(
            f"Invalid {name}: {value!r} (larger than {_LARGEST:.4g}, the largest float32: steps "
            "multiply float32 tensors by it)"
        )


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


# Settings every param group of one optimizer shares.
GLOBAL_KEYS = ("pop_size", "antithetic", "capturable")


def check_groups(groups: list[dict[str, Any]], read_device_tensors: bool = True) -> None:
    """Check complete param groups as the constructor checks its arguments: each group's
    settings, its population and ``capturable``, and that the groups share :data:`GLOBAL_KEYS`.
    A tensor ``lr`` on an accelerator is read only when ``read_device_tensors``."""
    for group in groups:
        check_group(group, read_device_tensors=read_device_tensors)
        check_population(group["pop_size"], group["antithetic"])
        if not isinstance(group["capturable"], bool):
            raise invalid("capturable", group["capturable"], "a bool")
    for key in GLOBAL_KEYS:
        odd = [group[key] for group in groups if group[key] != groups[0][key]]
        if odd:
            raise ValueError(
                f"Invalid {key}: {odd[0]!r} (param groups must share {key}; group 0 has "
                f"{groups[0][key]!r})"
            )


def check_population(pop_size: Any, antithetic: Any) -> None:
    if not isinstance(pop_size, int) or isinstance(pop_size, bool) or pop_size < 2:
        raise invalid("pop_size", pop_size, "an int >= 2")
    if not isinstance(antithetic, bool):
        raise invalid("antithetic", antithetic, "a bool")
    if antithetic and pop_size % 2:
        raise ValueError(f"Invalid pop_size: {pop_size} (must be even with antithetic=True)")


# The settings torcheggroll 0.1 did not save, and the values it used (see
# ``EggrollOptimizer.__setstate__``).
GROUP_DEFAULTS: dict[str, Any] = {
    "shaping": "zscore",
    "weight_decay": 0.0,
    "maximize": False,
    "antithetic": True,
    "capturable": False,
    "sigma_scaling": "none",
}


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def check_state_dict(state_dict: Any, noise_version: int) -> None:
    """Check an ``EggrollOptimizer`` state dict before it is loaded: every group's settings (as
    the constructor checks them), the groups' shared settings, and the optimizer-wide state (the
    seed, the generation and the noise version: Python ints, in the state of the first
    parameter). Raises ``ValueError`` naming what is wrong."""
    if not isinstance(state_dict, dict) or not isinstance(state_dict.get("param_groups"), list):
        raise ValueError(
            f"Invalid state_dict: expected a dict with 'state' and 'param_groups', got "
            f"{type(state_dict).__name__}"
        )
    groups = state_dict["param_groups"]
    for i, saved in enumerate(groups):
        if not isinstance(saved, dict):
            raise ValueError(f"Invalid state_dict: param group {i} is a {type(saved).__name__}")
        missing = [k for k in ("lr", "sigma", "rank", "pop_size", "params") if k not in saved]
        if missing:
            raise ValueError(
                f"Invalid state_dict: param group {i} has no {', '.join(map(repr, missing))} "
                "(not written by EggrollOptimizer?)"
            )
    check_groups([{**GROUP_DEFAULTS, **saved} for saved in groups])
    ids = [i for g in groups for i in g["params"]]
    states = state_dict.get("state", {})
    if not isinstance(states, dict):
        raise ValueError(f"Invalid state_dict: 'state' is a {type(states).__name__}")
    first_state = states.get(ids[0]) if ids else None
    if not isinstance(first_state, dict) or "seed" not in first_state:
        raise ValueError(
            "Invalid state_dict: the state of the first parameter holds no seed and generation "
            "(not written by EggrollOptimizer?)"
        )
    version = first_state.get("noise_version", 1)  # torcheggroll < 0.3 did not write one
    if not _count(version):
        raise ValueError(f"Invalid state_dict: noise_version {version!r} (expected an int)")
    if version != noise_version:
        raise ValueError(
            f"Invalid state_dict: written with noise version {version} (torcheggroll "
            f"< 0.3), this version draws noise version {noise_version}; resuming would continue "
            "with different noise. Start a new run from the saved parameters (and a fresh "
            "optimizer), or load it with the torcheggroll release that wrote it"
        )
    for key in ("seed", "generation"):
        if not _count(first_state.get(key)):
            raise ValueError(
                f"Invalid state_dict: {key} {first_state.get(key)!r} (expected an int >= 0)"
            )


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
    _check_real(losses, "losses")
    return losses.detach().to(loss_dtype(losses))


_INTEGER_LOSSES = (torch.int32, torch.int64, torch.int16, torch.int8, torch.uint8)


def _check_real(losses: torch.Tensor, name: str) -> None:
    if not (losses.is_floating_point() or losses.dtype in _INTEGER_LOSSES):
        raise ValueError(f"Invalid {name}: expected real numbers, got dtype {losses.dtype}")
    if losses.layout != torch.strided or losses.device.type == "meta":
        raise ValueError(
            f"Invalid {name}: expected a dense tensor with values, got layout {losses.layout} "
            f"on {losses.device}"
        )


def loss_dtype(losses: torch.Tensor) -> torch.dtype:
    """float64 losses stay float64, every other real dtype becomes float32."""
    return torch.float64 if losses.dtype == torch.float64 else torch.float32


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
    _check_real(loss, "loss")
    # A copy: the loss may be a view of a parameter, which is restored after the last member.
    return loss.detach().reshape(()).clone()
