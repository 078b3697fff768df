"""The population handed to an :class:`~torcheggroll.EggrollOptimizer` closure."""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from .noise import ParamNoise, compute_dtype, member_pairs, member_signs

__all__ = ["PerturbedParam", "Population"]

ForwardPath = Literal["auto", "lowrank", "materialized"]


@dataclass(frozen=True)
class PerturbedParam:
    """One owned parameter of a generation: the centre, its index among the optimizer's
    parameters, its group's sigma, its noise and the index of its param group."""

    param: torch.Tensor
    index: int
    sigma: float
    noise: ParamNoise
    group: int = 0


def _member_table(kind: str, members: torch.Tensor, antithetic: bool, dtype: torch.dtype) -> torch.Tensor:
    if kind == "signs":
        return member_signs(members, antithetic, dtype)
    return member_pairs(members, antithetic)


@functools.lru_cache(maxsize=128)
def _range_table(
    kind: str, start: int, stop: int, antithetic: bool, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    # Signs and draw indices of the members start..stop-1, made once per process: every layer of
    # every forward asks for them, and the few tiny kernels that make them add up to a noticeable
    # share of a small forward's host time. Never handed out without a copy.
    return _member_table(kind, torch.arange(start, stop, device=device), antithetic, dtype)


class Population:
    """This generation's members, as seen by a closure.

    Member ``i`` (a global index in ``[0, pop_size)``) has parameters
    ``theta + sigma * sign_i * E_{pair_i}`` for every parameter the optimizer owns, with
    ``pair_i = i // 2`` and ``sign_i = (-1) ** i`` under antithetic sampling. Only the local
    members (all of them in a single process; this rank's share under torch.distributed) are
    evaluated here; ``len(population)`` is their number and :attr:`members` their global indices.

    Attributes:
        pop_size: the global population size ``N``.
        members: ``(size,)`` int64 global indices of the local members, ascending.
        seed, generation: the integers the noise is a function of.
        antithetic: whether members come in mirrored pairs.
    """

    def __init__(
        self,
        params: list[PerturbedParam],
        *,
        pop_size: int,
        members: torch.Tensor,
        seed: int,
        generation: int,
        antithetic: bool,
    ) -> None:
        self.pop_size = pop_size
        self.members = members
        self.seed = seed
        self.generation = generation
        self.antithetic = antithetic
        self._params = params
        self._by_id = {id(p.param): p for p in params}
        self._on_device: dict[torch.device, torch.Tensor] = {}
        self.last_fallbacks: list[str] = []
        self._cache: dict[tuple[str, int, int], Any] = {}
        self._tables: dict[tuple[str, torch.device, torch.dtype], torch.Tensor] = {}
        n = len(members)
        contiguous = n > 0 and members.device.type == "cpu" and bool(
            torch.equal(members, torch.arange(int(members[0]), int(members[0]) + n, dtype=members.dtype))
        )
        self._range = (int(members[0]), int(members[0]) + n) if contiguous else None

    def _members_on(self, device: torch.device | None) -> torch.Tensor:
        # Member indices are made on each device once (arange, no host-to-device copy: a copy
        # from pageable memory would make the host wait for the device).
        if device is None or device == self.members.device:
            return self.members
        if device not in self._on_device:
            n = len(self.members)
            start = int(self.members[0]) if n else 0
            if n and int(self.members[-1]) == start + n - 1:
                self._on_device[device] = torch.arange(start, start + n, device=device)
            else:
                self._on_device[device] = self.members.to(device)
        return self._on_device[device]

    # ------------------------------------------------------------------ inspection
    def __len__(self) -> int:
        return int(self.members.numel())

    @property
    def size(self) -> int:
        """Number of local members (``len(self)``)."""
        return len(self)

    def __repr__(self) -> str:
        return (
            f"Population(size={self.size}, pop_size={self.pop_size}, seed={self.seed}, "
            f"generation={self.generation}, antithetic={self.antithetic}, params={len(self._params)})"
        )

    def __iter__(self) -> Iterator[int]:
        return iter(self.members.tolist())

    @property
    def params(self) -> list[PerturbedParam]:
        """The owned parameters with their sigma and noise, in optimizer order."""
        return list(self._params)

    def owns(self, tensor: torch.Tensor) -> bool:
        """Whether the optimizer perturbs this tensor."""
        return id(tensor) in self._by_id

    def entry(self, param: torch.Tensor) -> PerturbedParam:
        """The optimizer's record of ``param`` (its index, group sigma and noise); KeyError if
        the optimizer does not own it."""
        try:
            return self._by_id[id(param)]
        except KeyError:
            raise KeyError("this tensor is not a parameter of the optimizer") from None

    def noise(self, param: torch.Tensor) -> ParamNoise:
        """The unit-variance noise of ``param`` for every draw of the generation (all pairs)."""
        return self.entry(param).noise

    def _table(self, kind: str, device: torch.device | None, dtype: torch.dtype) -> torch.Tensor:
        """The members' signs or draw indices on ``device``: shared, not to be modified."""
        dev = self.members.device if device is None else torch.device(device)
        if self._range is not None:
            return _range_table(kind, *self._range, self.antithetic, dev, dtype)
        key = (kind, dev, dtype)
        if key not in self._tables:
            self._tables[key] = _member_table(kind, self._members_on(dev), self.antithetic, dtype)
        return self._tables[key]

    def signs(self, device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``(size,)`` the sign ``+1``/``-1`` of each local member's perturbation."""
        return self._table("signs", device, dtype).clone()

    def pairs(self, device: torch.device | None = None) -> torch.Tensor:
        """``(size,)`` the noise draw each local member uses."""
        return self._table("pairs", device, torch.int64).clone()

    def coefficients(self, param: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        """``(size,)`` ``scale * sigma * sign_i`` of each local member for ``param``, in the
        noise dtype."""
        e = self.entry(param)
        ref = e.noise.a if e.noise.a is not None else e.noise.dense
        assert ref is not None
        return self._table("signs", ref.device, ref.dtype) * (e.sigma * scale)

    def local_noise(self, param: torch.Tensor) -> ParamNoise:
        """The noise draw of each local member, in member order (a gather of :meth:`noise`)."""
        e = self.entry(param)
        ref = e.noise.a if e.noise.a is not None else e.noise.dense
        assert ref is not None
        return e.noise.select(self._table("pairs", ref.device, torch.int64))

    # ------------------------------------------------------------------ materialized path
    def perturbation(self, param: torch.Tensor) -> torch.Tensor:
        """``(size, *param.shape)`` the perturbation ``sigma * sign_i * E_i`` of each local member.

        Materialized: this builds one full tensor per member (the reference path).
        """
        return self.local_noise(param).materialize(self.coefficients(param))

    def _cached(self, kind: str, param: torch.Tensor, build: Any) -> Any:
        # Per-generation cache for closures that call forward many times (an RL rollout, a
        # chunked sequence). The key includes the tensor's version counter, so an in-place
        # change of the centre invalidates it.
        key = (kind, id(param), param._version)
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    def perturbed(self, param: torch.Tensor) -> torch.Tensor:
        """``(size, *param.shape)`` each local member's value of ``param``, in ``param.dtype``."""

        def build() -> torch.Tensor:
            centre = param.detach().to(compute_dtype(param.dtype))
            return (centre.unsqueeze(0) + self.perturbation(param)).to(param.dtype)

        return self._cached("perturbed", param, build)

    def lowrank_factors(self, param: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each local member's factors of a low-rank ``param`` in its dtype: ``a`` of shape
        ``(size, m, r)`` already scaled by ``sigma * sign / sqrt(r)``, and ``b`` ``(size, n, r)``,
        so that member ``j``'s weight is ``param + (a[j] @ b[j].T).reshape(param.shape)``."""

        def build() -> tuple[torch.Tensor, torch.Tensor]:
            noise = self.local_noise(param)
            if noise.a is None or noise.b is None:
                raise ValueError("lowrank_factors needs a parameter with low-rank noise")
            coeff = self.coefficients(param, noise.factor_scale)
            return (noise.a * coeff.view(-1, 1, 1)).to(param.dtype), noise.b.to(param.dtype)

        return self._cached("factors", param, build)

    def member_value(
        self, param: torch.Tensor, position: int, centre: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The value of ``param`` for the local member at ``position`` (``0 <= position < size``).

        The perturbation is added to ``centre`` (same shape as ``param``), by default the
        parameter's current value.
        """
        e = self.entry(param)
        ref = e.noise.a if e.noise.a is not None else e.noise.dense
        assert ref is not None
        member = self._members_on(ref.device)[position : position + 1]
        noise = e.noise.select(member_pairs(member, self.antithetic))
        coeff = e.sigma * member_signs(member, self.antithetic, ref.dtype)
        base = (param if centre is None else centre).detach().to(compute_dtype(param.dtype))
        return (base + noise.materialize(coeff)[0]).to(param.dtype)

    def stacked(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """Each local member's parameters and buffers of ``module``: name -> ``(size, *shape)``.

        Owned parameters carry their member's perturbation; everything else is broadcast with
        ``expand`` (a view, not a copy). The tensors are cached for the generation: treat them
        as read-only. The result is ready for
        ``torch.func.vmap(torch.func.functional_call(module, ...))``.
        """
        out: dict[str, torch.Tensor] = {}
        for name, t in _named_tensors(module):
            if self.owns(t):
                out[name] = self.perturbed(t)
            else:
                out[name] = t.detach().unsqueeze(0).expand(self.size, *t.shape)
        return out

    def forward(
        self,
        module: nn.Module,
        *args: Any,
        per_member: bool = False,
        path: ForwardPath = "auto",
        randomness: Literal["different", "same", "error"] = "different",
        **kwargs: Any,
    ) -> Any:
        """Evaluate ``module`` for every local member; outputs get a leading ``(size,)`` dimension.

        Args:
            module: the model whose parameters (some or all) the optimizer owns.
            *args, **kwargs: the module's inputs. By default the same inputs go to every member
                (broadcast). With ``per_member=True`` every tensor in them has a leading
                ``(size,)`` dimension and member ``j`` gets slice ``j``.
            path: ``"auto"`` (default) evaluates supported layers (``nn.Linear``,
                ``nn.Embedding``, ``nn.Conv1d``/``nn.Conv2d``, ...) with the low-rank population
                forward and falls back to materialized per-member weights elsewhere;
                ``"lowrank"`` does the same but raises if some owned matrix would need the
                fallback; ``"materialized"`` always builds per-member weights (the reference).
            randomness: passed to :func:`torch.func.vmap` (dropout and other random ops).
        """
        if path not in ("auto", "lowrank", "materialized"):
            raise ValueError(f"Invalid path: {path!r} (expected 'auto', 'lowrank' or 'materialized')")
        if per_member:
            _check_per_member(self.size, args, kwargs)
        if path == "materialized":
            return _materialized_forward(self, module, args, kwargs, per_member, randomness)
        from .lowrank import lowrank_forward

        return lowrank_forward(
            self, module, args, kwargs, per_member=per_member, strict=(path == "lowrank"), randomness=randomness
        )


def _named_tensors(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    yield from module.named_parameters(remove_duplicate=False)
    yield from module.named_buffers(remove_duplicate=False)


def scratch_buffers(module: nn.Module, size: int) -> dict[str, torch.Tensor]:
    """Per-member copies ``(size, *shape)`` of the buffers that modules update in place.

    Batch norm in training mode updates its running statistics in place; under vmap each member
    gets a throwaway copy, so every member normalizes with its own batch statistics and the
    model's running statistics are left unchanged by a population forward.
    """
    out: dict[str, torch.Tensor] = {}
    for prefix, mod in module.named_modules(remove_duplicate=False):
        if isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.training and mod.track_running_stats:
            for name, buf in mod.named_buffers(recurse=False):
                if buf is not None:
                    key = f"{prefix}.{name}" if prefix else name
                    out[key] = buf.detach().unsqueeze(0).repeat(size, *([1] * buf.dim()))
    return out


def _check_per_member(size: int, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> None:
    leaves = torch.utils._pytree.tree_leaves((args, dict(kwargs)))
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor) and (leaf.dim() == 0 or leaf.shape[0] != size):
            raise ValueError(
                f"Invalid per-member input: expected a leading dimension of {size} (the local "
                f"population), got shape {tuple(leaf.shape)}"
            )


def _materialized_forward(
    population: Population,
    module: nn.Module,
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any],
    per_member: bool,
    randomness: str,
) -> Any:
    stacked = {**population.stacked(module), **scratch_buffers(module, population.size)}

    def call(params: dict[str, torch.Tensor], a: tuple[Any, ...], kw: dict[str, Any]) -> Any:
        return torch.func.functional_call(module, params, a, kw, tie_weights=False)

    return vmap_members(call, randomness, (stacked,), (args, dict(kwargs)), per_member)


_TENSOR = object()


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
    m_leaves, m_spec = torch.utils._pytree.tree_flatten(members)
    d_leaves, d_spec = torch.utils._pytree.tree_flatten(data)
    m_at = [i for i, x in enumerate(m_leaves) if isinstance(x, torch.Tensor)]
    d_at = [i for i, x in enumerate(d_leaves) if isinstance(x, torch.Tensor)]
    spec: list[Any] = []

    def flat_fn(*tensors: torch.Tensor) -> list[torch.Tensor]:
        ms, ds = list(m_leaves), list(d_leaves)
        for i, t in zip(m_at, tensors, strict=False):
            ms[i] = t
        for i, t in zip(d_at, tensors[len(m_at):], strict=True):
            ds[i] = t
        out = fn(*torch.utils._pytree.tree_unflatten(ms, m_spec), *torch.utils._pytree.tree_unflatten(ds, d_spec))
        leaves, tree = torch.utils._pytree.tree_flatten(out)
        spec[:] = [tree, [_TENSOR if isinstance(x, torch.Tensor) else x for x in leaves]]
        return [x for x in leaves if isinstance(x, torch.Tensor)]

    in_dims = (0,) * len(m_at) + (0 if per_member else None,) * len(d_at)
    inputs = [m_leaves[i] for i in m_at] + [d_leaves[i] for i in d_at]
    flat = iter(torch.func.vmap(flat_fn, in_dims=in_dims, randomness=randomness)(*inputs))
    tree, others = spec
    leaves = [next(flat) if x is _TENSOR else x for x in others]
    return torch.utils._pytree.tree_unflatten(leaves, tree)
