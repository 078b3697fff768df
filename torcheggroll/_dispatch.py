"""A :class:`~torch.overrides.TorchFunctionMode` that routes chosen PyTorch functions to handlers.

A handler is called as ``handler(mode, *args, **kwargs)`` with the arguments PyTorch received,
and returns the result or ``NotImplemented`` to decline (the mode's :meth:`HandlerMode.decline`
then decides what runs instead). Arguments are bound to the handler's signature first: a call
whose arguments the handler does not know (a newer PyTorch may add some) declines instead of
raising a ``TypeError`` from inside the handler.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["HandlerMode", "binds", "is_batched"]

Handler = Callable[..., Any]


def is_batched(t: Any) -> bool:
    """Whether ``t`` is a tensor batched by :func:`torch.func.vmap` (a per-member value)."""
    return isinstance(t, torch.Tensor) and torch._C._functorch.is_batchedtensor(t)


@functools.cache
def _signature(handler: Handler) -> inspect.Signature:
    return inspect.signature(handler)


@functools.lru_cache(maxsize=4096)
def _binds(handler: Handler, positional: int, keywords: tuple[str, ...]) -> bool:
    params = [object()] * (positional + 1)  # the mode, then PyTorch's positional arguments
    try:
        _signature(handler).bind(*params, **dict.fromkeys(keywords))
    except TypeError:
        return False
    return True


def binds(handler: Handler, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether ``handler(mode, *args, **kwargs)`` matches the handler's signature (cached by the
    number of positional arguments and the keyword names)."""
    return _binds(handler, len(args), tuple(sorted(kwargs)))


class HandlerMode(TorchFunctionMode):
    """Calls ``HANDLERS[func]`` for the functions it lists, ``decline`` for the rest and for
    handlers that return ``NotImplemented``."""

    HANDLERS: ClassVar[dict[Any, Handler]] = {}

    def __torch_function__(
        self, func: Callable[..., Any], types: Any, args: Any = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        handler = self.HANDLERS.get(func)
        if handler is not None and binds(handler, args, kwargs):
            out = handler(self, *args, **kwargs)
            if out is not NotImplemented:
                return out
        return self.decline(func, args, kwargs)

    def decline(self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """What runs when no handler takes the call: PyTorch's own function."""
        return func(*args, **kwargs)
