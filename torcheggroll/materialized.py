"""The materialized population forward: every member's full parameters, under ``torch.func.vmap``.

This is the reference path: member ``j`` runs the module with ``theta + sigma * sign_j * E_j``
built in full (``(size, *shape)`` per owned parameter), through
:func:`torch.func.functional_call` vmapped over members. It is slow and memory-hungry for
large matrices, and obviously right, so the low-rank forward is tested against it.

Nothing here knows the optimizer: a population is anything with ``size``, ``owns(tensor)`` and
``perturbed(tensor)`` (see :class:`~torcheggroll.Population`).
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import _pytree as pytree

from ._dispatch import HandlerMode, is_batched, register
from ._recurrent import RECURRENT_FUNCTIONS

__all__ = [
    "MaterializedMode",
    "materialized_forward",
    "named_tensors",
    "recurrent_handlers",
    "scratch_buffers",
    "stacked",
    "vmap_members",
]


class _Population(Protocol):
    @property
    def size(self) -> int: ...

    def owns(self, tensor: torch.Tensor) -> bool: ...

    def perturbed(self, param: torch.Tensor) -> torch.Tensor: ...


def named_tensors(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Every parameter and buffer of ``module`` with its name, tied ones under each name."""
    yield from module.named_parameters(remove_duplicate=False)
    yield from module.named_buffers(remove_duplicate=False)


def stacked(population: _Population, module: nn.Module) -> dict[str, torch.Tensor]:
    """Each local member's parameters and buffers of ``module``: name -> ``(size, *shape)``.

    Owned parameters carry their member's perturbation; everything else is broadcast with
    ``expand`` (a view, not a copy).
    """
    out: dict[str, torch.Tensor] = {}
    for name, t in named_tensors(module):
        if population.owns(t):
            out[name] = population.perturbed(t)
        else:
            out[name] = t.detach().unsqueeze(0).expand(population.size, *t.shape)
    return out


def scratch_buffers(module: nn.Module, size: int) -> dict[str, torch.Tensor]:
    """Per-member copies ``(size, *shape)`` of the buffers that modules update in place.

    Batch norm in training mode updates its running statistics in place; under vmap each member
    gets a throwaway copy, so every member normalizes with its own batch statistics and the
    model's running statistics are left unchanged by a population forward.
    """
    out: dict[str, torch.Tensor] = {}
    for prefix, mod in module.named_modules(remove_duplicate=False):
        if (
            isinstance(mod, nn.modules.batchnorm._BatchNorm)
            and mod.training
            and mod.track_running_stats
        ):
            for name, buf in mod.named_buffers(recurse=False):
                if buf is not None:
                    key = f"{prefix}.{name}" if prefix else name
                    out[key] = buf.detach().unsqueeze(0).repeat(size, *([1] * buf.dim()))
    return out


# ---------------------------------------------------------------------------- the mode
def _recurrent_handler(run: Callable[..., Any], listed: bool) -> Callable[..., Any]:
    """A handler evaluating a recurrent function with ``mode.linear`` when ``mode`` claims its
    weights (``args[2]`` a list for the layers, ``args[2:4]`` for the cells)."""

    def handler(mode: Any, *args: Any, **kwargs: Any) -> Any:
        weights = args[2] if listed else args[2:4]
        if not isinstance(weights, (list, tuple)) or not any(mode.claims(w) for w in weights):
            return NotImplemented
        return run(mode.linear, *args, **kwargs)

    # Bind calls against the equations' own signature (their ``lin`` takes the mode's place).
    handler.__signature__ = inspect.signature(run)  # type: ignore[attr-defined]
    return handler


def _h_data_ptr(mode: Any, t: torch.Tensor) -> Any:
    """``Tensor.data_ptr`` of a per-member (batched) tensor, which has no single storage: a
    stand-in that is unique while it lives (RNN modules only compare pointers, to decide whether
    to re-pack their weights for cuDNN)."""
    return id(t) if is_batched(t) else NotImplemented


def _h_skip_flatten(mode: Any, weights: Any, *args: Any, **kwargs: Any) -> Any:
    """``torch._cudnn_rnn_flatten_weight`` (``nn.RNNBase.flatten_parameters``): a memory-layout
    optimisation whose result is discarded; skipped when per-member weights take part."""
    if isinstance(weights, (list, tuple)) and any(mode.claims(w) for w in weights):
        return None
    return NotImplemented


def recurrent_handlers() -> dict[Any, Callable[..., Any]]:
    """The handlers both population forwards use for recurrent layers and their helpers."""
    handlers: dict[Any, Callable[..., Any]] = {
        fn: _recurrent_handler(run, listed) for fn, (run, listed) in RECURRENT_FUNCTIONS.items()
    }
    handlers[torch._cudnn_rnn_flatten_weight] = _h_skip_flatten
    handlers[torch.Tensor.data_ptr] = _h_data_ptr
    return handlers


class MaterializedMode(HandlerMode):
    """Runs recurrent layers as cell equations when their weights are per-member (batched), so
    that vmap can evaluate them (their fused kernels have no batching rule)."""

    HANDLERS = register(recurrent_handlers())

    def claims(self, t: Any) -> bool:
        """Whether ``t`` is a per-member value that PyTorch's fused kernels cannot take."""
        return is_batched(t)

    def linear(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, w, b)


# ---------------------------------------------------------------------------- vmap
_TENSOR = object()
_RECURRENT_MODULES = (nn.RNNBase, nn.RNNCellBase)


def vmap_members(
    fn: Any, randomness: str, members: tuple[Any, ...], data: tuple[Any, ...], per_member: bool
) -> Any:
    """``torch.func.vmap(fn)(*members, *data)`` over the population: every tensor in ``members``
    is batched along dim 0, those in ``data`` too if ``per_member`` (else shared). Outputs may
    have non-tensor leaves (``None``, ints ...), which are returned as they are.

    The argument trees are flattened here, once, and vmap sees a flat tuple of tensors: vmap's
    own handling of nested inputs and ``in_dims`` costs more host time than a small layer's GPU
    work.
    """
    m_leaves, m_spec = pytree.tree_flatten(members)
    d_leaves, d_spec = pytree.tree_flatten(data)
    m_at = [i for i, x in enumerate(m_leaves) if isinstance(x, torch.Tensor)]
    d_at = [i for i, x in enumerate(d_leaves) if isinstance(x, torch.Tensor)]
    spec: list[Any] = []

    def flat_fn(*tensors: torch.Tensor) -> list[torch.Tensor]:
        ms, ds = list(m_leaves), list(d_leaves)
        for i, t in zip(m_at, tensors, strict=False):
            ms[i] = t
        for i, t in zip(d_at, tensors[len(m_at) :], strict=True):
            ds[i] = t
        out = fn(*pytree.tree_unflatten(ms, m_spec), *pytree.tree_unflatten(ds, d_spec))
        leaves, tree = pytree.tree_flatten(out)
        spec[:] = [tree, [_TENSOR if isinstance(x, torch.Tensor) else x for x in leaves]]
        return [x for x in leaves if isinstance(x, torch.Tensor)]

    in_dims = (0,) * len(m_at) + (0 if per_member else None,) * len(d_at)
    inputs = [m_leaves[i] for i in m_at] + [d_leaves[i] for i in d_at]
    # (A failure of vmap itself gets its hint, path="rows", in Population.forward.)
    flat = iter(torch.func.vmap(flat_fn, in_dims=in_dims, randomness=randomness)(*inputs))
    tree, others = spec
    leaves = [next(flat) if x is _TENSOR else _no_escapes(x) for x in others]
    return pytree.tree_unflatten(leaves, tree)


def _no_escapes(value: Any) -> Any:
    """``value`` unless it holds tensors of the vmap that has ended (a KV cache object built
    inside the forward): those cannot be used, so it is dropped with a warning."""
    if not any(is_batched(t) for t in _tensors_in(value)):
        return value
    warnings.warn(
        f"the population forward dropped an output of type {type(value).__name__}: it holds "
        "per-member tensors of the vmapped forward, which cannot leave it. A KV cache: pass "
        "use_cache=False to the model, or decode with population.rows(model) (the population as "
        "rows of one batch), where caches work. Another object (a dataclass): return tensors in "
        "tuples, lists or dicts, or register its class with torch.utils._pytree",
        UserWarning,
        stacklevel=4,
    )
    return None


def _tensors_in(obj: Any, depth: int = 4) -> Iterator[torch.Tensor]:
    """Tensors inside an object's attributes, lists, tuples and dicts (a few levels deep)."""
    if isinstance(obj, torch.Tensor):
        yield obj
        return
    if depth == 0 or isinstance(obj, (str, bytes, int, float, bool, type(None))):
        return
    items: Any = ()
    if isinstance(obj, dict):
        items = obj.values()
    elif isinstance(obj, (list, tuple)):
        items = obj
    elif hasattr(obj, "__dict__"):
        items = vars(obj).values()
    for item in items:
        yield from _tensors_in(item, depth - 1)


def materialized_forward(
    population: _Population,
    module: nn.Module,
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any],
    per_member: bool,
    randomness: str,
) -> Any:
    """Evaluate ``module`` for every member with its full per-member parameters (the reference
    path); outputs get a leading ``(size,)`` dimension."""
    params = {**stacked(population, module), **scratch_buffers(module, population.size)}
    # Only where needed: any active torch-function mode turns off PyTorch's fast paths (e.g.
    # nn.MultiheadAttention's), whose results this reference must reproduce.
    recurrent = any(isinstance(m, _RECURRENT_MODULES) for m in module.modules())

    def call(p: dict[str, torch.Tensor], a: tuple[Any, ...], kw: dict[str, Any]) -> Any:
        if not recurrent:
            return torch.func.functional_call(module, p, a, kw, tie_weights=False)
        with MaterializedMode():
            return torch.func.functional_call(module, p, a, kw, tie_weights=False)

    return vmap_members(call, randomness, (params,), (args, dict(kwargs)), per_member)
