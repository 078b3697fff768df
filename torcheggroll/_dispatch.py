"""A :class:`~torch.overrides.TorchFunctionMode` that routes chosen PyTorch functions to handlers.

A handler is called as ``handler(mode, *args, **kwargs)`` with the arguments PyTorch received,
and returns the result or ``NotImplemented`` to decline (the mode's :meth:`HandlerMode.decline`
then decides what runs instead). Arguments are bound to the handler's signature first: a call
whose arguments the handler does not know (a newer PyTorch may add some) declines instead of
raising a ``TypeError`` from inside the handler.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["HandlerMode", "binds", "is_batched", "register"]

Handler = Callable[..., Any]


def is_batched(t: Any) -> bool:
    """Whether ``t`` is a tensor batched by :func:`torch.func.vmap` (a per-member value)."""
    return isinstance(t, torch.Tensor) and torch._C._functorch.is_batchedtensor(t)


@dataclass(frozen=True)
class _Accepts:
    """What a handler's signature accepts after the mode: at most ``positional`` positional
    arguments (any number with ``*args``) and the keywords ``names`` (any with ``**kwargs``)."""

    positional: int
    names: frozenset[str]
    any_positional: bool
    any_keyword: bool

    @classmethod
    def of(cls, handler: Handler) -> _Accepts:
        params = list(inspect.signature(handler).parameters.values())[1:]  # after the mode
        kinds = inspect.Parameter
        return cls(
            positional=sum(
                p.kind in (kinds.POSITIONAL_ONLY, kinds.POSITIONAL_OR_KEYWORD) for p in params
            ),
            names=frozenset(
                p.name
                for p in params
                if p.kind in (kinds.POSITIONAL_OR_KEYWORD, kinds.KEYWORD_ONLY)
            ),
            any_positional=any(p.kind is kinds.VAR_POSITIONAL for p in params),
            any_keyword=any(p.kind is kinds.VAR_KEYWORD for p in params),
        )


_ACCEPTS: dict[Handler, _Accepts] = {}


def binds(handler: Handler, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether ``handler(mode, *args, **kwargs)`` fits the handler's signature: no more
    positional arguments than it takes and no keyword it lacks. (Signatures are read once, when
    a mode class lists its handlers, so that this check is cheap and traceable by
    ``torch.compile``.)"""
    accepts = _ACCEPTS.get(handler)
    if accepts is None:
        accepts = _ACCEPTS[handler] = _Accepts.of(handler)
    if len(args) > accepts.positional and not accepts.any_positional:
        return False
    return accepts.any_keyword or all(k in accepts.names for k in kwargs)


def register(handlers: dict[Any, Handler]) -> dict[Any, Handler]:
    """Read the signatures of ``handlers`` now (see :func:`binds`); returns ``handlers``."""
    for handler in handlers.values():
        _ACCEPTS.setdefault(handler, _Accepts.of(handler))
    return handlers


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

    def decline(
        self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        """What runs when no handler takes the call: PyTorch's own function."""
        return func(*args, **kwargs)
