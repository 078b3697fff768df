"""The population handed to an :class:`~torcheggroll.EggrollOptimizer` closure."""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from . import lowrank, materialized
from .noise import ParamNoise, compute_dtype, member_pairs, member_signs
from .rows import Rows

__all__ = ["NoiseBatch", "PerturbedParam", "Population"]

ForwardPath = Literal["auto", "lowrank", "materialized", "rows"]


@dataclass(frozen=True)
class PerturbedParam:
    """One owned parameter of a generation: the centre, its index among the optimizer's
    parameters, its group's sigma, its noise and the index of its param group."""

    param: torch.Tensor
    index: int
    sigma: float
    noise: ParamNoise
    group: int = 0


@dataclass(frozen=True)
class NoiseBatch:
    """Where a parameter's noise lives among noise that is gathered and scaled for all members
    at once (one gather per buffer region instead of one per parameter; the values are the
    same as the parameter's own gather).

    Dense noise: ``source`` is the region ``(draws, T)`` of every dense parameter of a buffer,
    ``scale`` ``(T,)`` each column's sigma, the parameter's entries at columns
    ``[slot, slot + numel)``. Low-rank noise: ``source`` and ``other`` are a bucket's
    ``(K, draws, m, r)`` and ``(K, draws, n, r)`` draws, ``scale`` ``(K, 1, 1, 1)`` each
    parameter's ``sigma / sqrt(r)``, the parameter being row ``slot``."""

    source: torch.Tensor
    scale: torch.Tensor
    slot: int
    other: torch.Tensor | None = None


def _member_table(
    kind: str, members: torch.Tensor, antithetic: bool, dtype: torch.dtype
) -> torch.Tensor:
    if kind == "signs":
        return member_signs(members, antithetic, dtype)
    return member_pairs(members, antithetic)


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
        generation: int | torch.Tensor,
        antithetic: bool,
        fill: Callable[[], None] | None = None,
        tables: dict[Any, torch.Tensor] | None = None,
        counters: tuple[Any, Any] | None = None,
        batches: Mapping[int, NoiseBatch] | None = None,
    ) -> None:
        self.pop_size = pop_size
        self._batches = batches or {}
        self._fill = fill
        self._filled = False
        self._device_counters = isinstance(generation, torch.Tensor)
        self._counters = counters
        self.members = members
        self.seed = seed
        self.generation = generation
        self.antithetic = antithetic
        self._params = params
        self._by_id = {id(p.param): p for p in params}
        self._on_device: dict[torch.device, torch.Tensor] = {}
        self.last_fallbacks: list[str] = []
        self._cache: dict[tuple[str, int], Any] = {}
        # Member signs and draw indices by (kind, device, dtype, members): every layer of every
        # forward asks for them; the optimizer passes a dict that outlives the generation.
        self._tables: dict[Any, torch.Tensor] = {} if tables is None else tables
        n = len(members)
        contiguous = (
            n > 0
            and members.device.type == "cpu"
            and bool(
                torch.equal(
                    members, torch.arange(int(members[0]), int(members[0]) + n, dtype=members.dtype)
                )
            )
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
            f"generation={self.generation}, antithetic={self.antithetic}, "
            f"params={len(self._params)})"
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
        """The unit-variance noise of ``param`` for every draw of the generation (all pairs).

        The tensors are views of the optimizer's noise buffers, valid until another generation
        is drawn (this population refills them when asked again)."""
        entry = self.entry(param)
        self.fill_noise()
        return entry.noise

    def fill_noise(self) -> None:
        """Make the optimizer's noise buffers hold this generation's noise.

        With Python-int counters the optimizer filled them when it made the population, and
        this refills them only if another generation has been drawn since (a host-side check,
        skipped inside ``torch.compile``, which would otherwise specialize on the generation).
        With device counters (``capturable``) they are filled on first use, once: a forward
        whose kernels make the factors where they use them never needs them.
        """
        if self._fill is None or self._filled:
            return
        if not self._device_counters:
            if not torch.compiler.is_compiling():
                self._fill()
            return
        self._fill()
        self._filled = True

    def _keep_generation(self, generation: torch.Tensor, fill: Callable[[], None]) -> None:
        """Keep this generation's noise available after the optimizer's device generation moves
        on: ``generation`` is a copy of it and ``fill`` fills the buffers for that copy (for a
        step that never filled them: its kernels drew the noise they used)."""
        if self._counters is not None:
            self._counters = (self._counters[0], generation)
        self.generation = generation
        self._fill = fill

    def capture_key(self) -> tuple[Any, ...] | None:
        """What a CUDA graph captured with this population depends on, for populations whose
        noise counters are device tensors (``capturable``), else None: equal keys mean a graph
        captured with one replays the other's generation (the counters are read at replay)."""
        if not self._device_counters or self._counters is None:
            return None
        return (
            tuple(id(c) for c in self._counters),
            self._range or tuple(self.members.tolist()),
            self.antithetic,
            self.pop_size,
            tuple((id(p.param), p.sigma, id(p.noise.a), id(p.noise.dense)) for p in self._params),
        )

    def fresh(self) -> Population:
        """The same members and noise counters, with nothing computed yet: for a capture, in
        which the per-generation values (scaled factors, perturbed vectors, the noise fill)
        must be computed inside the graph rather than read from an earlier call's cache."""
        return Population(
            self._params,
            pop_size=self.pop_size,
            members=self.members,
            seed=self.seed,
            generation=self.generation,
            antithetic=self.antithetic,
            fill=self._fill,
            tables=self._tables,
            counters=self._counters,
            batches=self._batches,
        )

    @property
    def counters(self) -> tuple[Any, Any] | None:
        """``(key, generation)`` of this population's noise (ints, or device tensors under
        ``capturable``); None for a population not made by an optimizer."""
        return self._counters

    def noise_source(self, param: torch.Tensor) -> tuple[Any, Any, int] | None:
        """``(key, generation, index)``: what the noise of ``param`` is a function of (ints, or
        device tensors under ``capturable``), for kernels that draw it where they use it; None
        for a population not made by an optimizer."""
        if self._counters is None:
            return None
        return (*self._counters, self.entry(param).index)

    def member_table(
        self, kind: Literal["signs", "pairs"], device: torch.device | None, dtype: torch.dtype
    ) -> torch.Tensor:
        """``(size,)`` the members' signs or draw indices on ``device``, shared by every caller
        in this process: read it, never modify it (:meth:`signs` and :meth:`pairs` copy it)."""
        dev = self.members.device if device is None else torch.device(device)
        key = (kind, dev, dtype, self._range or id(self.members), self.antithetic)
        if key not in self._tables:
            self._tables[key] = _member_table(kind, self._members_on(dev), self.antithetic, dtype)
        return self._tables[key]

    def signs(
        self, device: torch.device | None = None, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """``(size,)`` the sign ``+1``/``-1`` of each local member's perturbation."""
        return self.member_table("signs", device, dtype).clone()

    def pairs(self, device: torch.device | None = None) -> torch.Tensor:
        """``(size,)`` the noise draw each local member uses."""
        return self.member_table("pairs", device, torch.int64).clone()

    def coefficients(self, param: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        """``(size,)`` ``scale * sigma * sign_i`` of each local member for ``param``, in the
        noise dtype."""
        e = self.entry(param)
        ref = e.noise.a if e.noise.a is not None else e.noise.dense  # its device and dtype only
        assert ref is not None
        return self.member_table("signs", ref.device, ref.dtype) * (e.sigma * scale)

    def local_noise(self, param: torch.Tensor) -> ParamNoise:
        """The noise draw of each local member, in member order (a gather of :meth:`noise`)."""
        noise = self.noise(param)
        ref = noise.a if noise.a is not None else noise.dense
        assert ref is not None
        return noise.select(self.member_table("pairs", ref.device, torch.int64))

    # ------------------------------------------------------------------ materialized path
    def perturbation(self, param: torch.Tensor) -> torch.Tensor:
        """``(size, *param.shape)`` the perturbation ``sigma * sign_i * E_i`` of each local member.

        Materialized: this builds one full tensor per member (the reference path).
        """
        batch = self._batches.get(id(param))
        if batch is None or batch.other is not None:  # materialized low-rank noise: per parameter
            return self.local_noise(param).materialize(self.coefficients(param))
        region = self._dense_region(batch)
        numel = param.numel()
        return region[:, batch.slot : batch.slot + numel].reshape(self.size, *param.shape)

    def _dense_region(self, batch: NoiseBatch) -> torch.Tensor:
        """``(size, T)`` the perturbations of a whole dense region: noise * (sign * sigma of the
        column), made once for the generation."""
        region: torch.Tensor = self._gathered(
            batch, functools.partial(self._scaled, batch.source, 0, batch.scale[None])
        )
        return region

    def _gathered(self, batch: NoiseBatch, build: Callable[[], Any]) -> Any:
        key = ("batch", id(batch.source))
        if key not in self._cache:
            self.fill_noise()
            self._cache[key] = build()
        return self._cache[key]

    def _scaled(self, draws: torch.Tensor, dim: int, scale: torch.Tensor) -> torch.Tensor:
        """``draws`` gathered along ``dim`` for the local members, times ``sign * scale``."""
        signs = self.member_table("signs", draws.device, draws.dtype)
        picked = draws.index_select(dim, self.member_table("pairs", draws.device, torch.int64))
        return picked * (signs.view(-1, *([1] * (draws.dim() - dim - 1))) * scale)

    def _cached(self, kind: str, param: torch.Tensor, build: Any) -> Any:
        # Per-generation cache for closures that call forward many times (an RL rollout, a
        # chunked sequence). Only values that do not depend on the parameter's current value
        # (the noise, scaled) are cached: a parameter changed in any way, through ``.data``
        # included, is always read afresh.
        key = (kind, id(param))
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    def perturbed(self, param: torch.Tensor) -> torch.Tensor:
        """``(size, *param.shape)`` each local member's value of ``param``, in ``param.dtype``:
        the parameter's current value plus the member's perturbation."""
        delta = self._cached("perturbation", param, lambda: self.perturbation(param))
        centre = param.detach().to(compute_dtype(param.dtype))
        return (centre.unsqueeze(0) + delta).to(param.dtype)

    def perturbed_many(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """``[perturbed(p) for p in params]`` (the same values), with the dense parameters of one
        noise region done together: their centres read in one ``cat`` and added to the region's
        perturbations in one ``index_add``, instead of a few operations per parameter."""
        out: dict[int, torch.Tensor] = {}
        regions: dict[int, list[torch.Tensor]] = {}
        for p in params:
            batch = self._batches.get(id(p))
            if batch is not None and batch.other is None:
                regions.setdefault(id(batch.source), []).append(p)
            else:
                out[id(p)] = self.perturbed(p)
        for ps in regions.values():
            if len(ps) == 1:
                out[id(ps[0])] = self.perturbed(ps[0])
                continue
            batch = self._batches[id(ps[0])]
            delta = self._dense_region(batch)
            spans = tuple((self._batches[id(p)].slot, p.numel()) for p in ps)
            key = ("columns", id(batch.source), spans)
            if key not in self._tables:
                self._tables[key] = torch.tensor(
                    [c for start, n in spans for c in range(start, start + n)],
                    dtype=torch.int64,
                    device=delta.device,
                )
            centres = torch.cat([p.detach().reshape(-1) for p in ps]).to(delta.dtype)
            values = delta.index_add(1, self._tables[key], centres.expand(self.size, -1))
            values = values.to(ps[0].dtype)
            for p, (start, n) in zip(ps, spans, strict=True):
                out[id(p)] = values[:, start : start + n].reshape(self.size, *p.shape)
        return [out[id(p)] for p in params]

    def lowrank_factors(self, param: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each local member's factors of a low-rank ``param`` in its dtype: ``a`` of shape
        ``(size, m, r)`` already scaled by ``sigma * sign / sqrt(r)``, and ``b`` ``(size, n, r)``,
        so that member ``j``'s weight is ``param + (a[j] @ b[j].T).reshape(param.shape)``.
        Cached for the generation: treat them as read-only."""

        batch = self._batches.get(id(param))
        if batch is not None and batch.other is not None:
            other = batch.other

            def gather() -> tuple[torch.Tensor, torch.Tensor]:
                pairs = self.member_table("pairs", other.device, torch.int64)
                a = self._scaled(batch.source, 1, batch.scale).to(param.dtype)
                return a, other.index_select(1, pairs).to(param.dtype)

            a, b = self._gathered(batch, gather)
            return a[batch.slot], b[batch.slot]

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
        if not isinstance(position, int) or isinstance(position, bool):
            raise ValueError(f"Invalid position: {position!r} (expected an int)")
        if not 0 <= position < self.size:
            raise ValueError(f"Invalid position: {position} (expected 0 <= position < {self.size})")
        if centre is not None and (
            tuple(centre.shape) != tuple(param.shape) or not centre.is_floating_point()
        ):
            raise ValueError(
                f"Invalid centre: shape {tuple(centre.shape)} and dtype {centre.dtype} (expected "
                f"the parameter's shape {tuple(param.shape)} and a floating dtype)"
            )
        e, all_noise = self.entry(param), self.noise(param)
        ref = all_noise.a if all_noise.a is not None else all_noise.dense
        assert ref is not None
        member = self._members_on(ref.device)[position : position + 1]
        noise = all_noise.select(member_pairs(member, self.antithetic))
        coeff = e.sigma * member_signs(member, self.antithetic, ref.dtype)
        base = (param if centre is None else centre).detach().to(compute_dtype(param.dtype))
        return (base + noise.materialize(coeff)[0]).to(param.dtype)

    def rows(self, module: nn.Module, batch: int | None = None, watch: str = "all") -> Rows:
        """The population as rows of one batch of ``module``, to use as a context manager: inside
        it, ``module`` runs as it is (no vmap) on member-major batches ``(P * B, ...)`` - member
        ``p`` owns rows ``[p * B, (p + 1) * B)`` - and every use of an owned parameter is
        corrected row by row (see :mod:`torcheggroll.rows`). Data-dependent control flow,
        attention masks, KV caches and sampling work, so a whole population decodes with one
        batched ``generate``::

            with population.rows(model) as rows:
                out = model.generate(rows.repeat(prompt_ids), attention_mask=rows.repeat(mask),
                                     max_new_tokens=32)
            tokens = rows.split(out)  # (P, B, T)

        Args:
            module: the model whose parameters (some or all) the optimizer owns.
            batch: rows per member ``B``, if known (else from :meth:`Rows.repeat`,
                :meth:`Rows.flatten` or the first batch the model sees).
            watch: ``"all"`` (default: a torch-function mode sees every operation) or
                ``"owned"`` (only operations that take an owned tensor are seen, through a
                tensor subclass the owned tensors wear: much less host time per call, for models
                without batch statistics outside batch-norm modules; see
                :class:`~torcheggroll.rows.Rows`).
        """
        self._check_module(module)
        if batch is not None and (
            not isinstance(batch, int) or isinstance(batch, bool) or batch < 1
        ):
            raise ValueError(f"Invalid batch: {batch!r} (expected an int >= 1 or None)")
        return Rows(self, module, batch, watch)

    def _check_module(self, module: Any) -> None:
        """Refuse a module none of whose parameters or buffers this population perturbs (a copy
        of the model: every member would evaluate the same, unperturbed weights). Checked once
        per module and population."""
        if not isinstance(module, nn.Module):
            raise TypeError(f"Invalid module: expected an nn.Module, got {type(module).__name__}")
        checked = self.__dict__.setdefault("_checked_modules", set())
        if id(module) in checked or not self.params:
            return  # with nothing perturbed at all, the optimizer has warned already
        tensors = itertools.chain(module.parameters(), module.buffers())
        if not any(self.owns(t) for t in tensors):  # stops at the first owned tensor
            raise ValueError(
                f"Invalid module: no parameter or buffer of this {type(module).__name__} is "
                "perturbed by the population (a copy of the model? the optimizer must be built "
                "from the parameters of the module that is evaluated)"
            )
        checked.add(id(module))

    def stacked(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """Each local member's parameters and buffers of ``module``: name -> ``(size, *shape)``.

        Owned parameters carry their member's perturbation; everything else is broadcast with
        ``expand`` (a view, not a copy), so treat the tensors as read-only. The result is ready
        for ``torch.func.vmap(torch.func.functional_call(module, ...))``.
        """
        self._check_module(module)
        return materialized.stacked(self, module)

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
            *args: the module's positional inputs. By default the same inputs go to every
                member (broadcast). With ``per_member=True`` every tensor in them has a leading
                ``(size,)`` dimension and member ``j`` gets slice ``j``.
            **kwargs: the module's keyword inputs, treated like ``args``.
            path: ``"auto"`` (default) evaluates supported layers (``nn.Linear``,
                ``nn.Embedding``, ``nn.Conv1d``/``nn.Conv2d``, ...) with the low-rank population
                forward and falls back to materialized per-member weights elsewhere;
                ``"lowrank"`` does the same but raises if some owned matrix would need the
                fallback; ``"materialized"`` always builds per-member weights (the reference).
            randomness: passed to :func:`torch.func.vmap` (dropout and other random ops).

        :attr:`last_fallbacks` lists the owned matrices this call had to materialize (empty
        after a materialized forward, and after a call that raised).
        """
        if path not in ("auto", "lowrank", "materialized", "rows"):
            raise ValueError(
                f"Invalid path: {path!r} (expected 'auto', 'lowrank', 'materialized' or 'rows')"
            )
        if randomness not in ("different", "same", "error"):
            raise ValueError(
                f"Invalid randomness: {randomness!r} (expected 'different', 'same' or 'error')"
            )
        self._check_module(module)
        self.last_fallbacks = []
        if per_member:
            _check_per_member(self.size, args, kwargs)
        if path == "rows":
            rows = self.rows(module)
            inputs = rows.flatten((args, kwargs)) if per_member else rows.repeat((args, kwargs))
            with rows:
                out = module(*inputs[0], **inputs[1])
            return rows.split(out)
        try:
            if path == "materialized":
                return materialized.materialized_forward(
                    self, module, args, kwargs, per_member, randomness
                )
            out, fallbacks = lowrank.lowrank_forward(
                self,
                module,
                args,
                kwargs,
                per_member=per_member,
                strict=(path == "lowrank"),
                randomness=randomness,
            )
        except RuntimeError as exc:
            if type(exc) is RuntimeError and any(m in str(exc) for m in _VMAP_LIMITS):
                raise RuntimeError(
                    f"{exc}\n(torcheggroll: the {path!r} population forward runs the model "
                    "under torch.func.vmap, which this model's code does not support; "
                    "path='rows' runs it as plain inference on one batch holding every "
                    "member's rows, see docs/huggingface.md)"
                ) from exc
            raise
        self.last_fallbacks = fallbacks
        return out


# What torch.func.vmap says about code it cannot batch (data-dependent control flow: attention
# masks built from per-member inputs, generate loops; custom autograd Functions; in-place writes
# into unbatched tensors; .item()).
_VMAP_LIMITS = (
    "vmap:",
    "functorch",
    "data-dependent control flow",
    "Batching rule not implemented",
)


def _check_per_member(size: int, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> None:
    leaves = torch.utils._pytree.tree_leaves((args, dict(kwargs)))
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor) and (leaf.dim() == 0 or leaf.shape[0] != size):
            raise ValueError(
                f"Invalid per-member input: expected a leading dimension of {size} (the local "
                f"population), got shape {tuple(leaf.shape)}"
            )
