"""The population as rows of one batch: every member's inputs stacked member-major, the model run
as it is (no ``vmap``), each use of an owned parameter corrected row by row.

Member ``p`` of ``P`` owns rows ``[p * B, (p + 1) * B)`` of every batch (dimension 0) the model
sees. Inside :meth:`Population.rows <torcheggroll.Population.rows>` a torch-function mode watches
the optimizer's parameters (or, with ``watch="owned"``, a tensor subclass worn by the owned
tensors themselves, which costs the host less; see :class:`Rows`):

* a low-rank matrix ``W`` (``nn.Linear``'s ``F.linear``, ``torch.addmm``/``matmul`` with ``W`` as
  the right operand as in GPT-2's ``Conv1D``, ``F.embedding``, ``F.conv*``) is used as it is by
  one shared operation over all rows, and member ``p``'s rows get the rank-r correction from its
  factors (:mod:`torcheggroll._ops`, the code the ``vmap`` forward uses too; the fused CUDA
  kernels for bfloat16/float16 linear layers) - the structure of multi-LoRA serving;
* a tensor with dense noise (bias, norm weight, class token, position table) enters the
  operation with one value per member, broadcast over that member's rows (``F.linear``'s and
  ``addmm``'s bias, ``F.layer_norm``, ``F.rms_norm``, ``F.group_norm``, ``F.batch_norm``,
  ``mul``/``add``/``sub``/``div``, ``expand``); an elementwise result that does not involve the
  rows (``1 + weight``) is tracked as a derived per-member tensor.

Batch norm in training mode normalizes each member's rows with their own statistics and leaves
the running statistics alone, as the ``vmap`` forward does. Any other use of an owned parameter
raises :class:`RowsAttributionError` naming the parameter and the operation: never a silently
wrong answer. Because nothing is vmapped, data-dependent control flow, attention masks, KV
caches and sampling (Hugging Face ``generate``) work as in plain inference.
"""

from __future__ import annotations

import functools
import operator
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import _pytree as pytree

from . import _ops
from ._dispatch import HandlerMode, register
from .fused_linear import OnTheFly, fused_available, population_linear
from .lowrank import _METADATA, LowRankFallbackError

__all__ = ["Rows", "RowsAttributionError"]


class RowsAttributionError(LowRankFallbackError):
    """An owned parameter is used in a way the rows forward cannot attribute to members' rows."""


@dataclass
class _Owned:
    """An owned tensor as the rows forward sees it: low rank (per-member factors ``a``
    ``(P, m, r)`` scaled, ``b`` ``(P, n, r)``) or dense (per-member values ``(P, *shape)``)."""

    name: str
    tensor: torch.Tensor
    low_rank: bool
    get_factors: Callable[[], tuple[torch.Tensor, torch.Tensor]] | None = None
    get_values: Callable[[], torch.Tensor] | None = None
    fused: tuple[Any, ...] | None = None  # (a draws, b draws, draw, coeff, source)
    cache: dict[str, Any] = field(default_factory=dict)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        if "ab" not in self.cache:
            assert self.get_factors is not None
            self.cache["ab"] = self.get_factors()
        return self.cache["ab"]  # type: ignore[no-any-return]

    def values(self) -> torch.Tensor:
        if "v" not in self.cache:
            assert self.get_values is not None
            self.cache["v"] = self.get_values()
        return self.cache["v"]  # type: ignore[no-any-return]


class _RowsMode(HandlerMode):
    def __init__(self, rows: Rows) -> None:
        super().__init__()
        self.rows = rows
        self.thread = threading.get_ident()
        self._proxies: dict[int, _Proxy] = {}

    def close(self) -> None:
        """The rows are left: derived tensors handed out as proxies behave as plain ones from
        now on (a model may have kept one, e.g. a cached ``1 + weight``)."""
        for p in self._proxies.values():
            p._mode = None
        self._proxies.clear()

    def proxied(self, out: Any) -> Any:
        """``out`` with every derived per-member tensor in it (top level, or in a list or tuple)
        wrapped in a :class:`_Proxy` (one per tensor); marked owned tensors stay as they are."""
        if isinstance(out, torch.Tensor):
            if isinstance(out, (_OwnedParameter, _OwnedTensor)) or self.owned(out) is None:
                return out
            p = self._proxies.get(id(out))
            if p is None or p._target is not out:
                p = self._proxies[id(out)] = _Proxy.make(out, self)
            return p
        if type(out) in (list, tuple):
            return type(out)(self.proxied(x) for x in out)
        return out

    def owned(self, t: Any) -> _Owned | None:
        o = self.rows.owned.get(id(t))
        return o if o is not None and o.tensor is t else None

    def _owned_in(self, args: Any, kwargs: dict[str, Any]) -> list[_Owned]:
        hits = []
        for value in (*args, *kwargs.values()):
            for t in value if isinstance(value, (list, tuple)) else (value,):
                o = self.owned(t)
                if o is not None:
                    hits.append(o)
        return hits

    def __torch_function__(
        self, func: Callable[..., Any], types: Any, args: Any = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        # Most operations of a model touch no owned tensor: let them through at once (a plain
        # loop over the arguments, as this runs for every operation; lists, as torch.cat's, and
        # keywords are looked into only when there are any).
        if func not in _ALWAYS:
            ids = self.rows.owned
            for a in args:
                if id(a) in ids or (type(a) in (list, tuple) and self._owned_in((a,), {})):
                    break
            else:
                if not kwargs or not self._owned_in((), kwargs):
                    return func(*args, **kwargs)
        return super().__torch_function__(func, types, args, kwargs)

    def decline(
        self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        hits = self._owned_in(args, kwargs)
        if not hits:
            return func(*args, **kwargs)
        if getattr(func, "__name__", None) == "__get__" or func in _METADATA:
            out = func(*args, **kwargs)
            if not isinstance(out, torch.Tensor):
                return out  # shape, dtype, device ... are the centre's
        name = getattr(func, "__name__", str(func))
        raise RowsAttributionError(
            f"rows forward: parameter {hits[0].name!r} is used by {name}, which the rows-of-one-"
            "batch forward cannot attribute to members' rows; use population.forward(model, ...) "
            "(the vmap forward) for this model, or keep that parameter out of the optimizer"
        )


# Operations intercepted even without an owned argument: batch norm's statistics must be each
# member's own.
_ALWAYS = {F.batch_norm}


def _hook(
    cls: type, func: Callable[..., Any], types: Any, args: Any = (), kwargs: Any = None
) -> Any:
    """The ``__torch_function__`` of the marked owned tensors and of :class:`_Proxy`: the call
    goes to the rows forward's handlers (an owned tensor takes part by construction), or runs
    as plain PyTorch in a thread other than the one that entered the rows."""
    found: list[_RowsMode] = []
    args = _unwrap(args, found)
    kwargs = {k: _unwrap(v, found) for k, v in kwargs.items()} if kwargs else {}
    mode = found[0] if found else None
    if any(m is not mode for m in found):
        raise RowsAttributionError(
            f"rows forward: {getattr(func, '__name__', func)} takes tensors owned by two "
            "populations' rows at once; it cannot correct both (use watch='all' for the outer "
            "rows, or one population)"
        )
    with torch._C.DisableTorchFunctionSubclass():
        if mode is None or threading.get_ident() != mode.thread:
            return func(*args, **kwargs)
        out = HandlerMode.__torch_function__(mode, func, types, args, kwargs)
    return mode.proxied(out)


class _OwnedParameter(nn.Parameter):
    """The class an owned ``nn.Parameter`` wears while the rows are in use (see :class:`Rows`)."""

    __torch_function__ = classmethod(_hook)  # type: ignore[assignment,var-annotated]

    def __deepcopy__(self, memo: dict[int, Any]) -> nn.Parameter:
        # A copy made while the rows are in use (another thread's deepcopy of the model) is a
        # plain parameter with the centre's values, not one marked for rows that end.
        with torch._C.DisableTorchFunctionSubclass():
            copied = nn.Parameter(
                self.detach().clone(memory_format=torch.preserve_format), self.requires_grad
            )
        memo[id(self)] = copied
        return copied


class _OwnedTensor(torch.Tensor):
    """The class an owned plain tensor wears while the rows are in use."""

    __torch_function__ = classmethod(_hook)  # type: ignore[assignment,var-annotated]


_MARKED: dict[type, type] = {nn.Parameter: _OwnedParameter, torch.Tensor: _OwnedTensor}
_ENTER_LOCK = threading.Lock()


class _Proxy(torch.Tensor):
    """A per-member tensor derived from an owned one inside the rows (``1 + weight``,
    ``weight.float()``): handed back wrapped, so that its next use reaches the handlers too."""

    _target: torch.Tensor
    _mode: _RowsMode | None
    __torch_function__ = classmethod(_hook)  # type: ignore[assignment,var-annotated]

    @staticmethod
    def make(target: torch.Tensor, mode: _RowsMode) -> _Proxy:
        proxy = torch.Tensor._make_subclass(_Proxy, target.detach(), False)
        proxy._target = target
        proxy._mode = mode
        return proxy


def _unwrap(x: Any, found: list[_RowsMode]) -> Any:
    """``x`` with every :class:`_Proxy` (itself, or in a list or tuple, as torch functions take
    them) replaced by the tensor it stands for; the mode of every proxy or marked tensor met is
    appended to ``found``. (By hand rather than with pytree: this runs for every call on an owned
    tensor.)"""
    if isinstance(x, _Proxy):
        if x._mode is not None:
            found.append(x._mode)
        return x._target
    if isinstance(x, (_OwnedParameter, _OwnedTensor)):
        mode = x.__dict__.get("_rows_mode")
        if mode is not None:
            found.append(mode)
        return x
    if type(x) in (list, tuple):
        return type(x)(_unwrap(v, found) for v in x)
    return x


def _markable(tensors: list[torch.Tensor]) -> bool:
    """Whether every tensor can wear a marked class (plain tensors and parameters; not other
    subclasses, nor tensors marked by rows already in use)."""
    return all(type(t) in _MARKED for t in tensors)


class Rows:
    """The population as rows of one batch of ``module`` (see the module doc); made by
    :meth:`Population.rows <torcheggroll.Population.rows>`.

    Use it as a context manager around any code that runs ``module`` on member-major batches::

        with population.rows(model) as rows:
            out = model.generate(rows.repeat(prompt_ids), attention_mask=rows.repeat(mask))
        tokens = rows.split(out)  # (P, B, T)

    How uses of the owned parameters are seen (``watch``):

    * ``"all"`` (default): a torch-function mode receives every operation of the thread and
      picks out those that take an owned tensor (or compute batch statistics).
    * ``"owned"``: the owned tensors themselves wear, for the duration, a tensor subclass whose
      hook receives each operation that takes one of them, wherever it is referenced from;
      other operations run untouched, which costs the host much less (a decode step of a deep
      model: ``benchmarks/population_generate.py --preset cpu-host``). Other threads see plain
      parameters, and derived per-member tensors kept past the context behave as plain ones. It
      does not see what the mode sees beyond that, so use it only for models where that cannot
      matter: batch statistics computed over rows with no owned tensor in the call (a
      batch-norm layer anywhere in the code that runs, also outside ``module``; a model with a
      batch-norm module inside ``module`` is watched with the mode anyway), and calls in which
      another tensor subclass with its own ``__torch_function__`` disables subclass dispatch
      before the hook runs (wrapper tensors, frozen quantized weights).

    Attributes:
        size: ``P``, the number of local members.
        batch: rows per member, once known (from :meth:`repeat`, :meth:`flatten` or the first
            batch the model sees).
    """

    def __init__(
        self,
        population: Any,
        module: nn.Module,
        batch: int | None = None,
        watch: str = "all",
    ) -> None:
        if watch not in ("all", "owned"):
            raise ValueError(f"Invalid watch: {watch!r} (expected 'all' or 'owned')")
        self.watch = watch
        self.population = population
        self.module = module
        self.size = population.size
        self.batch = batch
        self.owned: dict[int, _Owned] = {}
        self._mode: _RowsMode | None = None
        self._marked: list[tuple[torch.Tensor, type]] | None = None
        self._counts: list[tuple[torch.Tensor, torch.Tensor]] = []  # batch norms' counts
        self._derived: dict[Any, _Owned] = {}  # derived tensors made once per context
        _refuse_routed_experts(module)
        paired = bool(population.antithetic) and self.size % 2 == 0
        # One walk over the modules (as named_parameters(remove_duplicate=False) would make):
        # the owned parameters, and the batch-norm modules, whose counts the rows keep.
        self._batch_norms: list[nn.Module] = []
        named = []
        for prefix, mod in module.named_modules(remove_duplicate=False):
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                self._batch_norms.append(mod)
            for pname, t in mod._parameters.items():
                if t is not None:
                    named.append((f"{prefix}.{pname}" if prefix else pname, t))
        for name, t in named:
            if id(t) in self.owned or not population.owns(t):
                continue
            noise = population.entry(t).noise
            if noise.is_low_rank:
                o = _Owned(
                    name, t, True, get_factors=functools.partial(population.lowrank_factors, t)
                )
                if fused_available(t):
                    origin = population.noise_source(t)
                    source = OnTheFly(population.fill_noise)
                    if origin is not None:
                        key, generation, index = origin
                        source = OnTheFly(
                            population.fill_noise, key, generation, index, noise.rank, paired
                        )
                    o.fused = (
                        noise.a,
                        noise.b,
                        population.member_table("pairs", t.device, torch.int64),
                        population.coefficients(t, noise.factor_scale),
                        source,
                    )
            else:
                o = _Owned(name, t, False, get_values=functools.partial(self._dense_values, t))
            self.owned[id(t)] = o
        # The owned parameters (self.owned also collects derived tensors while in use).
        self._params = list(self.owned.values())
        self._values: dict[int, torch.Tensor] = {}  # the dense parameters' values, per context
        self._constants: dict[Any, torch.Tensor] = {}

    def _dense_values(self, t: torch.Tensor) -> torch.Tensor:
        """``(P, *shape)`` the members' values of the dense-noise parameter ``t``, made for all
        of them at the first use in a context (one pass per noise region)."""
        if id(t) not in self._values:
            dense = [o.tensor for o in self._params if not o.low_rank]
            values = self.population.perturbed_many(dense)
            self._values = dict(zip(map(id, dense), values, strict=True))
        return self._values[id(t)]

    # ------------------------------------------------------------------ batches
    def repeat(self, x: Any) -> Any:
        """Inputs shared by every member, ``(B, ...)``, as one batch ``(P * B, ...)``
        (member-major; nested structures of tensors too)."""

        self._set_batch(self._batch_of(x, 0))
        return pytree.tree_map(
            lambda t: (
                t.repeat(self.size, *([1] * (t.dim() - 1))) if isinstance(t, torch.Tensor) else t
            ),
            x,
        )

    def _batch_of(self, x: Any, dim: int) -> int | None:
        """The batch ``B`` shared by every tensor of ``x`` in dimension ``dim`` (None without
        tensors), checked before anything is set."""
        sizes = set()
        for t in pytree.tree_leaves(x):
            if isinstance(t, torch.Tensor):
                if t.dim() <= dim:
                    raise ValueError(
                        f"Invalid input: a tensor of shape {tuple(t.shape)} has no batch "
                        f"dimension {dim}"
                    )
                sizes.add(t.shape[dim])
        if len(sizes) > 1:
            raise ValueError(f"Invalid batch: the inputs hold {sorted(sizes)} rows per member")
        return sizes.pop() if sizes else None

    def flatten(self, x: Any) -> Any:
        """Per-member inputs ``(P, B, ...)`` as one batch ``(P * B, ...)``."""

        for t in pytree.tree_leaves(x):
            if isinstance(t, torch.Tensor) and (t.dim() < 2 or t.shape[0] != self.size):
                raise ValueError(
                    f"Invalid per-member input: expected a shape (P={self.size}, B, ...), got "
                    f"{tuple(t.shape)}"
                )
        self._set_batch(self._batch_of(x, 1))
        return pytree.tree_map(
            lambda t: t.reshape(-1, *t.shape[2:]) if isinstance(t, torch.Tensor) else t, x
        )

    def split(self, x: Any) -> Any:
        """Outputs ``(P * B, ...)`` as ``(P, B, ...)`` (leaves that are not tensors are returned
        as they are). A tensor whose first dimension is not the batch (``P * B``, or a multiple
        of ``P`` while ``B`` is unknown) raises :class:`RowsAttributionError`: it cannot be told
        member by member (a loss averaged over every row, as Hugging Face's ``labels=`` gives,
        mixes all members)."""

        def split(t: torch.Tensor) -> torch.Tensor:
            n = t.shape[0] if t.dim() else None
            if n is None or (n != self.total if self.total is not None else n % self.size):
                expected = (
                    f"{self.total}" if self.total is not None else f"a multiple of {self.size}"
                )
                raise RowsAttributionError(
                    f"rows forward: an output of shape {tuple(t.shape)} is not a batch of the "
                    f"rows (first dimension {expected}, {self.size} members x {self.batch} rows): "
                    "an output reduced over the batch (a loss averaged over every row, as "
                    "labels= gives) mixes every member's rows; compute one loss per row from the "
                    "logits, or use the vmap forward"
                )
            return t.reshape(self.size, n // self.size, *t.shape[1:])

        return pytree.tree_map(lambda t: split(t) if isinstance(t, torch.Tensor) else t, x)

    def _set_batch(self, b: int | None) -> None:
        if b is None:
            return
        if self.batch is not None and self.batch != b:
            raise ValueError(
                f"Invalid batch: the rows already hold {self.batch} rows per member, got {b}"
            )
        self.batch = b

    @property
    def total(self) -> int | None:
        """``P * B``, the rows of one batch, once known."""
        return None if self.batch is None else self.size * self.batch

    # ------------------------------------------------------------------ context
    def __enter__(self) -> Rows:
        with _ENTER_LOCK:  # the check and the marking, atomic across threads
            return self._enter()

    def _enter(self) -> Rows:
        if self._mode is not None:
            raise RuntimeError("these rows are in use already: enter a Rows object once at a time")
        mode = _RowsMode(self)
        tensors = [o.tensor for o in self._params]
        busy = next((o.name for o in self._params if "_rows_mode" in o.tensor.__dict__), None)
        if busy is not None:
            raise RuntimeError(
                f"parameter {busy!r} is in rows in use already: population.rows contexts of the "
                "same parameters cannot be nested"
            )
        if self.watch == "all" or not _markable(tensors) or self._batch_norms:
            # Batch norm needs every call (its statistics are per member even when no owned
            # tensor takes part), and a tensor of another subclass cannot be marked: watch all
            # operations.
            mode.__enter__()
        else:
            # The owned tensors themselves wear a class whose hook sees each operation that takes
            # them, wherever they are referenced from (tied weights, a user's own references).
            self._marked = [(t, type(t)) for t in tensors]
            for t, cls in self._marked:
                t.__class__ = _MARKED[cls]  # type: ignore[assignment]
        for t in tensors:
            t.__dict__["_rows_mode"] = mode
        # A batch-norm module in training mode counts its batches itself; the rows leave its
        # running statistics alone (as the vmap forward does), so its count too.
        self._counts = [
            (m.num_batches_tracked, m.num_batches_tracked.clone())
            for m in self._batch_norms
            if isinstance(m.num_batches_tracked, torch.Tensor)
        ]
        self._mode = mode
        return self

    def __exit__(self, *exc: Any) -> None:
        assert self._mode is not None
        with _ENTER_LOCK:
            if self._marked is None:
                self._mode.__exit__(*exc)
            else:
                for t, cls in self._marked:
                    t.__class__ = cls  # type: ignore[assignment]
                self._marked = None
            for o in self._params:
                o.tensor.__dict__.pop("_rows_mode", None)
            self._mode.close()
            self._mode = None
            with torch.no_grad():
                for count, before in self._counts:
                    count.copy_(before)
            self._counts = []
            for d in self._derived.values():  # the next context derives afresh
                self.owned.pop(id(d.tensor), None)
            self._derived.clear()
            for o in self._params:  # ... and reads the parameters' values again
                o.cache.clear()
            self._values = {}

    def held(self) -> list[Any]:
        """The per-context values computed so far (factors, per-member values, derived
        tensors): a caller that captured the context in a CUDA graph keeps them alive, as its
        replays write and read their memory."""
        out: list[Any] = []
        for o in self.owned.values():
            out.append(o)  # its tensor, and the values a derived tensor's closure holds
            out.extend(o.cache.values())  # cleared when the context is left
        return out

    def derived(self, key: Any, make: Callable[[], _Owned]) -> torch.Tensor:
        """The centre of the derived tensor ``key`` (made by ``make`` on first use in this
        context, and registered as owned), so that a model that derives the same tensor at
        every call (``1 + weight`` in each decode step) does not pile up copies."""
        d = self._derived.get(key)
        if d is None:
            d = self._derived[key] = make()
            self.owned[id(d.tensor)] = d
        return d.tensor

    def ones_like(self, t: torch.Tensor) -> torch.Tensor:
        """A tensor of ones of ``t``'s shape, dtype and device, made once per ``Rows``."""
        key = ("ones", tuple(t.shape), t.dtype, t.device)
        ones = self._constants.get(key)
        if ones is None:
            with torch._C.DisableTorchFunctionSubclass():
                ones = self._constants[key] = torch.ones(t.shape, dtype=t.dtype, device=t.device)
        return ones

    # ------------------------------------------------------------------ row helpers
    def group(
        self,
        t: torch.Tensor,
        o: _Owned,
        op: str,
        rows_of: int | None = None,
        flat_ndim: int = 2,
    ) -> torch.Tensor:
        """``t`` ``(P * B * k, ...)`` as ``(P, B * k, ...)``, or with ``rows_of`` (its last
        dimension) as ``(P, L, rows_of)``: its first dimension is the batch, possibly flattened
        with the next ones (``x.view(-1, d)`` of a ``(P * B, T, d)`` batch-first tensor, as
        GPT-2's ``Conv1D`` does). Errors naming ``o`` and ``op`` where that reading is not
        sure: a first dimension that is not a multiple of the batch; a multiple ``k > 1`` on a
        tensor of more than ``flat_ndim`` dimensions (a flattened batch is ``(rows, features)``,
        ``flat_ndim=1`` for embedding ids; a ``(T, P * B)`` sequence-first tensor or a ``(T, T)``
        table lookup is not); a parameter (a table, never a batch)."""
        n = t.shape[0] if t.dim() else 0
        if self.batch is None and n and n % self.size == 0:
            self.batch = n // self.size
        if self.total is None or n == 0 or n % self.total:
            raise RowsAttributionError(
                f"rows forward: parameter {o.name!r} meets, in {op}, a tensor whose first "
                f"dimension ({n}) is not a multiple of the batch of {self.size} members x "
                f"{self.batch} rows; the rows forward needs every batch member-major (batch "
                "first) in dimension 0"
            )
        if n != self.total and t.dim() > flat_ndim:
            raise RowsAttributionError(
                f"rows forward: parameter {o.name!r} meets, in {op}, a tensor of shape "
                f"{tuple(t.shape)}: its first dimension is {n // self.total} times the batch of "
                f"{self.size} members x {self.batch} rows, but it is not flattened to "
                "(rows, features), so it may not be the batch (a sequence-first tensor, a "
                "table indexed by positions); the rows forward needs every batch member-major "
                "in dimension 0 (flatten extra batch dimensions, such as choices, into the "
                "inputs given to the rows)"
            )
        self.refuse_static(t, o, op)
        if rows_of is not None:
            return t.reshape(self.size, -1, rows_of)
        return t.reshape(self.size, n // self.size, *t.shape[1:])

    def refuse_static(self, t: torch.Tensor, o: _Owned, op: str) -> None:
        """Error naming ``o`` and ``op`` when ``t`` is a parameter (one the rows do not own): a
        table (a relative-position table normalized by a norm whose weight is owned, say), never
        a batch of rows, whatever its first dimension."""
        if isinstance(t, nn.Parameter):
            raise RowsAttributionError(
                f"rows forward: parameter {o.name!r} meets, in {op}, a parameter of shape "
                f"{tuple(t.shape)} (a table, not a batch of rows); keep {o.name!r} out of the "
                "optimizer, or use the vmap forward"
            )

    def member_values(self, o: _Owned, ndim: int, trailing: int | None = None) -> torch.Tensor:
        """``o``'s per-member values ``(P, *shape)`` shaped to broadcast against a grouped
        ``(P, B, *rest)`` tensor, ``ndim = 1 + len(rest)``: ``shape`` right-aligned against
        ``(B, *rest)`` (so a leading 1 of ``shape`` stands for the batch), or with ``trailing``
        dimensions of ``rest`` after it (a per-channel bias of a convolution)."""
        v = o.values()
        shape = (*v.shape[1:], *([1] * (trailing or 0)))
        pad = ndim - len(shape)
        if pad < 0:
            raise RowsAttributionError(
                f"rows forward: parameter {o.name!r} of shape {tuple(v.shape[1:])} does not "
                "broadcast against the rows it meets"
            )
        return v.reshape(self.size, *([1] * pad), *shape)


# Configuration fields of Hugging Face mixture-of-experts models: their number of experts.
_EXPERT_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


def _refuse_routed_experts(module: nn.Module) -> None:
    """Refuse a (Hugging Face) mixture-of-experts model: its router gathers the tokens of all
    rows by expert before each expert's layers, so a row's member can no longer be read from
    its position in the batch."""
    config = getattr(module, "config", None)
    for name in _EXPERT_FIELDS:
        experts = getattr(config, name, None)
        if isinstance(experts, int) and not isinstance(experts, bool) and experts > 1:
            raise RowsAttributionError(
                f"rows forward: {type(module).__name__} is a mixture-of-experts model "
                f"(config.{name}={experts}): its router gathers the tokens of every member's "
                "rows by expert, so the rows forward cannot tell whose rows an expert's layer "
                "sees; it is not supported"
            )


# ---------------------------------------------------------------------------- handlers
def _shared(mode: _RowsMode, t: torch.Tensor | None) -> torch.Tensor | None:
    """``t`` if it is not owned (used as it is), None if it is (its per-member values are
    added separately)."""
    return None if t is None or mode.owned(t) is not None else t


def _add_bias(rows: Rows, y3: torch.Tensor, bias: _Owned | None) -> torch.Tensor:
    """``y3`` ``(P, L, m)``, a fresh result of the caller's, plus each member's bias, in place."""
    if bias is None:
        return y3
    return y3.add_(rows.member_values(bias, y3.dim() - 1))


def _h_linear(
    mode: _RowsMode, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> Any:
    rows, w, b = mode.rows, mode.owned(weight), mode.owned(bias)
    if (w is None and b is None) or mode.owned(input) is not None:
        return NotImplemented
    key = w or b
    assert key is not None
    x3 = rows.group(input, key, "F.linear", rows_of=input.shape[-1])  # (P, L, n)
    if w is not None and w.low_rank:
        if w.fused is not None and _no_grad(input, weight):
            a_draws, b_draws, draw, coeff, source = w.fused
            bias_arg = bias if b is None else b.values()
            y3 = population_linear(x3, weight, bias_arg, a_draws, b_draws, draw, coeff, source)
            return y3.reshape(*input.shape[:-1], weight.shape[0])
        a, bf = w.factors()
        base = F.linear(x3, weight, _shared(mode, bias))
        y3 = _ops.linear_correction(x3, a, bf, base=base, inplace=True)
    elif w is not None:  # dense noise: each member's whole matrix
        y3 = x3 @ w.values().transpose(-1, -2)
        if bias is not None and b is None:
            y3 = y3 + bias
    else:
        y3 = F.linear(x3, weight, None)
    y3 = _add_bias(rows, y3, b)
    return y3.reshape(*input.shape[:-1], y3.shape[-1])


def _right(mode: _RowsMode, x: torch.Tensor, weight: torch.Tensor, op: str) -> torch.Tensor | None:
    """``x @ W`` with ``W`` owned (``W`` ``(m, n)`` used as the right operand), or None."""
    w = mode.owned(weight)
    if w is None or weight.dim() != 2:
        return None
    rows = mode.rows
    x3 = rows.group(x, w, op, rows_of=x.shape[-1])
    if w.low_rank:
        a, b = w.factors()
        y3 = _ops.right_correction(x3, a, b, base=torch.matmul(x3, weight), inplace=True)
    else:
        y3 = x3 @ w.values()
    return y3.reshape(*x.shape[:-1], weight.shape[-1])


def _h_addmm(
    mode: _RowsMode,
    input: torch.Tensor,
    mat1: torch.Tensor,
    mat2: torch.Tensor,
    *,
    beta: Any = 1,
    alpha: Any = 1,
    out: Any = None,
) -> Any:
    if out is not None or beta != 1 or alpha != 1 or mode.owned(mat1) is not None:
        return NotImplemented
    b = mode.owned(input)
    y = _right(mode, mat1, mat2, "torch.addmm")
    if y is None:
        if b is None:
            return NotImplemented
        y = mat1 @ mat2
    if b is None:
        return y + input
    rows = mode.rows
    y3 = rows.group(y, b, "torch.addmm")
    return y3.add_(rows.member_values(b, y3.dim() - 1)).reshape(y.shape)  # y is fresh


def _h_matmul(mode: _RowsMode, input: torch.Tensor, other: torch.Tensor) -> Any:
    if mode.owned(input) is not None:
        return NotImplemented  # W @ x: not a per-row use
    y = _right(mode, input, other, "matmul")
    return NotImplemented if y is None else y


def _h_embedding(
    mode: _RowsMode,
    input: torch.Tensor,
    weight: torch.Tensor,
    padding_idx: int | None = None,
    max_norm: float | None = None,
    norm_type: float = 2.0,
    scale_grad_by_freq: bool = False,
    sparse: bool = False,
) -> Any:
    w = mode.owned(weight)
    if w is None or max_norm is not None:
        return NotImplemented  # max_norm renormalizes rows of the weight in place
    rows = mode.rows
    ids = input
    if ids.dim() and ids.shape[0] == 1 and rows.total not in (None, 1):
        ids = ids.expand(rows.total, *ids.shape[1:])  # shared ids (position tables)
    ids3 = rows.group(ids, w, "F.embedding", flat_ndim=1)
    if w.low_rank:
        a, b = w.factors()
        out = F.embedding(ids3, weight, padding_idx) + _ops.embedding_correction(
            ids3, a.to(weight.dtype), b.to(weight.dtype)
        )
    else:
        table = w.values()  # (P, V, D)
        vocab = table.shape[1]
        offset = torch.arange(rows.size, device=ids.device).view(-1, *([1] * (ids3.dim() - 1)))
        out = F.embedding(ids3 + offset * vocab, table.reshape(-1, table.shape[-1]))
    return out.reshape(*ids.shape, weight.shape[-1])


def _conv(conv: Callable[..., torch.Tensor], name: str) -> Callable[..., Any]:
    def handler(
        mode: _RowsMode,
        input: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        stride: Any = 1,
        padding: Any = 0,
        dilation: Any = 1,
        groups: int = 1,
    ) -> Any:
        w, b = mode.owned(weight), mode.owned(bias)
        if (w is None and b is None) or groups != 1 or mode.owned(input) is not None:
            return NotImplemented
        rows = mode.rows
        key = w or b
        assert key is not None
        x3 = rows.group(input, key, name)
        y = conv(input, weight, _shared(mode, bias), stride, padding, dilation)
        y3 = y.reshape(rows.size, -1, *y.shape[1:])
        if w is not None and w.low_rank:
            a, bf = w.factors()
            y3 = y3 + _ops.conv_correction(
                conv, x3, a, bf, tuple(weight.shape[2:]), stride, padding, dilation
            )
        elif w is not None:  # dense noise: each member's whole kernel, as one grouped conv
            k = w.values() - weight  # (P, out, in, *k): the members' perturbations
            n, p = x3.shape[1], rows.size
            xs = x3.transpose(0, 1).reshape(n, p * x3.shape[2], *x3.shape[3:])
            d = conv(
                xs, k.reshape(p * k.shape[1], *k.shape[2:]), None, stride, padding, dilation, p
            )
            y3 = y3 + d.reshape(n, p, -1, *d.shape[2:]).transpose(0, 1)
        if b is not None:
            y3 = y3 + rows.member_values(b, y3.dim() - 1, trailing=y3.dim() - 3)
        return y3.reshape(y.shape)

    return handler


def _h_layer_norm(
    mode: _RowsMode,
    input: torch.Tensor,
    normalized_shape: Any,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> Any:
    w, b = mode.owned(weight), mode.owned(bias)
    if w is None and b is None:
        return NotImplemented
    rows = mode.rows
    if w is None:  # the centre's weight inside the kernel, each member's bias after it
        y = F.layer_norm(input, normalized_shape, weight, None, eps)
        return _affine(rows, input, y, None, b, "F.layer_norm")
    # Normalized with an identity weight rather than none: the CPU kernel without one measured
    # 2x slower (torch 2.13, (1024, 64) float32: 67 against 34 us).
    assert weight is not None  # w is its record
    y = F.layer_norm(input, normalized_shape, rows.ones_like(weight), None, eps)
    return _affine(rows, input, y, w, b, "F.layer_norm", shift=bias if b is None else None)


def _affine(
    rows: Rows,
    x: torch.Tensor,
    y: torch.Tensor,
    w: _Owned | None,
    b: _Owned | None,
    op: str,
    trailing: int | None = None,
    shift: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y * w_p + b_p`` for ``y``, the normalized ``x``, by member ``p`` of its rows;
    ``shift``, a plain tensor that broadcasts against ``y``, stands for the bias when only ``w``
    is owned."""
    key = w or b
    assert key is not None
    rows.refuse_static(x, key, op)
    y3 = rows.group(y, key, op)
    nd = y3.dim() - 1
    if w is not None and b is not None:  # y * w + b in one pass
        y3 = torch.addcmul(
            rows.member_values(b, nd, trailing), y3, rows.member_values(w, nd, trailing)
        )
    elif w is not None and shift is not None:
        y3 = torch.addcmul(shift, y3, rows.member_values(w, nd, trailing))
    elif w is not None:
        y3 = y3 * rows.member_values(w, nd, trailing)
    elif b is not None:
        y3 = y3 + rows.member_values(b, nd, trailing)
    return y3.reshape(y.shape)


def _h_rms_norm(
    mode: _RowsMode,
    input: torch.Tensor,
    normalized_shape: Any,
    weight: torch.Tensor | None = None,
    eps: float | None = None,
) -> Any:
    w = mode.owned(weight)
    if w is None:
        return NotImplemented
    y = F.rms_norm(input, normalized_shape, None, eps)
    return _affine(mode.rows, input, y, w, None, "F.rms_norm")


def _h_group_norm(
    mode: _RowsMode,
    input: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> Any:
    w, b = mode.owned(weight), mode.owned(bias)
    if w is None and b is None:
        return NotImplemented
    trailing = input.dim() - 2
    if w is None:  # the centre's weight inside the kernel, each member's bias after it
        y = F.group_norm(input, num_groups, weight, None, eps)
        return _affine(mode.rows, input, y, None, b, "F.group_norm", trailing=trailing)
    shift = None if bias is None or b is not None else bias.reshape(-1, *([1] * trailing))
    y = F.group_norm(input, num_groups, None, None, eps)
    return _affine(mode.rows, input, y, w, b, "F.group_norm", trailing=trailing, shift=shift)


def _h_batch_norm(
    mode: _RowsMode,
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Any:
    rows = mode.rows
    w, b = mode.owned(weight), mode.owned(bias)
    if not training and w is None and b is None:
        return NotImplemented
    trailing = input.dim() - 2
    if training:
        # Each member's statistics, over its own rows and positions; the running statistics
        # are left alone (as the vmap forward leaves them).
        if rows.total is None or input.shape[0] != rows.total:
            key = w or b or _Owned("batch_norm statistics", input, False)
            x3 = rows.group(input, key, "F.batch_norm")
        else:
            x3 = input.reshape(rows.size, -1, *input.shape[1:])
        dims = [1, *range(3, x3.dim())]
        mean = x3.mean(dim=dims, keepdim=True)
        var = x3.var(dim=dims, unbiased=False, keepdim=True)
        y = ((x3 - mean) * torch.rsqrt(var + eps)).reshape(input.shape)
    else:
        y = F.batch_norm(input, running_mean, running_var, None, None, False, momentum, eps)
    shape = [1, -1] + [1] * trailing
    if weight is not None and w is None:
        y = y * weight.reshape(shape)
    if bias is not None and b is None:
        y = y + bias.reshape(shape)
    if w is None and b is None:
        return y
    return _affine(rows, input, y, w, b, "F.batch_norm", trailing=trailing)


def _elementwise(
    op: Callable[..., torch.Tensor], name: str, reflected: bool = False
) -> Callable[..., Any]:
    """``op(input, other)`` with an owned dense tensor on either side: member ``p``'s value where
    the other side holds rows; a derived per-member tensor where it does not (``1 + weight``)."""

    def handler(mode: _RowsMode, input: Any, other: Any, *, alpha: Any = 1) -> Any:
        lhs, rhs = (other, input) if reflected else (input, other)

        def call(x: Any, y: Any) -> Any:
            return op(x, y) if alpha == 1 else op(x, y, alpha=alpha)

        ol, orr = mode.owned(lhs), mode.owned(rhs)
        o = ol or orr
        if o is None or (ol is not None and orr is not None) or o.low_rank:
            return NotImplemented
        rows = mode.rows
        plain = rhs if o is ol else lhs
        if (
            isinstance(plain, torch.Tensor)
            and plain.dim()
            and rows.total is not None
            and plain.shape[0] % rows.total == 0
            and plain.dim() >= o.tensor.dim()
        ):
            p3 = rows.group(plain, o, name)
            v = rows.member_values(o, p3.dim() - 1)
            out = call(v, p3) if o is ol else call(p3, v)
            return out.reshape(plain.shape[0], *out.shape[2:])

        # The rows are not involved: a per-member tensor derived from the owned one (made once
        # per context for a number on the other side, as `1 + weight` is at every call).
        def derive() -> _Owned:
            centre = call(lhs, rhs)
            v = o.values()
            values = call(v, plain) if o is ol else call(plain, v)
            return _Owned(f"{o.name} ({name})", centre, False, get_values=lambda: values)

        if isinstance(plain, (int, float, bool)) and isinstance(alpha, (int, float, bool)):
            return rows.derived((id(o.tensor), name, o is ol, plain, alpha), derive)
        derived = derive()
        rows.owned[id(derived.tensor)] = derived
        return derived.tensor

    return handler


def _h_expand(mode: _RowsMode, self: torch.Tensor, *sizes: Any) -> Any:
    o = mode.owned(self)
    if o is None or o.low_rank:
        return NotImplemented
    rows = mode.rows
    shape = (
        list(sizes[0])
        if len(sizes) == 1 and isinstance(sizes[0], (list, tuple, torch.Size))
        else list(sizes)
    )
    if shape and rows.total is not None and shape[0] == rows.total:
        v = o.values()  # (P, 1, ...): member p's value for each of its rows
        target = [rows.size, rows.total // rows.size] + [
            v.shape[i + 1] if s == -1 else s for i, s in enumerate(shape[1:], start=1)
        ]
        return (
            v.unsqueeze(1)
            .reshape(rows.size, 1, *v.shape[2:])
            .expand(*target)
            .reshape(rows.total, *target[2:])
        )
    return NotImplemented


def _h_to(mode: _RowsMode, self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
    """``Tensor.to`` / ``float`` / ``type_as`` of an owned dense tensor: a derived per-member
    tensor converted alike."""
    o = mode.owned(self)
    if o is None:
        return NotImplemented
    if o.low_rank:
        return NotImplemented if self.to(*args, **kwargs) is not self else self

    def derive() -> _Owned:
        values = o.values().to(*args, **kwargs)
        return _Owned(o.name, self.to(*args, **kwargs), False, get_values=lambda: values)

    try:
        key = (id(self), "to", args, tuple(sorted(kwargs.items())))
        hash(key)
    except TypeError:
        derived = derive()
        mode.rows.owned[id(derived.tensor)] = derived
        return derived.tensor
    centre = self.to(*args, **kwargs)
    if centre is self:
        return self
    return mode.rows.derived(key, derive)


def _h_transpose(mode: _RowsMode, self: torch.Tensor, *dims: Any) -> Any:
    """``W.T`` / ``W.t()`` / ``W.mT`` / ``W.transpose(0, 1)`` of an owned matrix (Falcon's
    ``input @ self.weight.T``): a derived owned matrix, low rank with its factors swapped
    (``(A B^T)^T = B A^T``) or dense with each member's value transposed."""
    o = mode.owned(self)
    if o is None or not _ops.matrix_transpose(self, dims):
        return NotImplemented

    def derive() -> _Owned:
        centre = self.t()
        if o.low_rank:
            return _Owned(f"{o.name}.T", centre, True, get_factors=lambda: o.factors()[::-1])
        values = o.values().transpose(-1, -2)
        return _Owned(f"{o.name}.T", centre, False, get_values=lambda: values)

    return mode.rows.derived((id(self), "T"), derive)


def _h_getitem(mode: _RowsMode, self: torch.Tensor, index: Any) -> Any:
    """``W[a:b]`` of an owned tensor, a slice of its first dimension (Whisper's position table,
    ``embed_positions.weight[:T]``): a derived dense per-member tensor, ``W[a:b] + A_p[a:b]
    B_p^T`` for a low-rank matrix, each member's value sliced for dense noise. ``W[ids]`` with
    an integer tensor of ids (``embed_positions.weight[position_ids]``) is ``F.embedding(ids,
    W)``. Other indexing is not attributed."""
    o = mode.owned(self)
    if o is not None and _ops.is_lookup(index):
        return _h_embedding(mode, index, self)
    parts = index if isinstance(index, tuple) else (index,)
    if (
        o is None
        or not parts
        or not isinstance(parts[0], slice)
        or any(p != slice(None) for p in parts[1:])
        or (o.low_rank and self.dim() != 2)
    ):
        return NotImplemented
    first = parts[0]

    def derive() -> _Owned:
        centre = self[index]
        if o.low_rank:
            a, b = o.factors()  # (P, m, r) scaled, (P, n, r)
            values = centre + a[:, first] @ b.transpose(-1, -2)
        else:
            values = o.values()[(slice(None), *parts)]
        return _Owned(
            f"{o.name}[{first.start}:{first.stop}]", centre, False, get_values=lambda: values
        )

    key = (id(self), "getitem", first.start, first.stop, first.step, len(parts))
    return mode.rows.derived(key, derive)


def _no_grad(*tensors: torch.Tensor) -> bool:
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


_RowsMode.HANDLERS = register(
    {
        F.linear: _h_linear,
        torch.addmm: _h_addmm,
        torch.matmul: _h_matmul,
        torch.mm: _h_matmul,
        torch.Tensor.__matmul__: _h_matmul,
        torch.Tensor.matmul: _h_matmul,
        F.embedding: _h_embedding,
        **dict.fromkeys(_ops.TRANSPOSES, _h_transpose),
        torch.Tensor.__getitem__: _h_getitem,
        F.conv1d: _conv(F.conv1d, "F.conv1d"),
        F.conv2d: _conv(F.conv2d, "F.conv2d"),
        F.conv3d: _conv(F.conv3d, "F.conv3d"),
        F.layer_norm: _h_layer_norm,
        F.rms_norm: _h_rms_norm,
        F.group_norm: _h_group_norm,
        F.batch_norm: _h_batch_norm,
        torch.mul: _elementwise(torch.mul, "mul"),
        torch.Tensor.mul: _elementwise(torch.mul, "mul"),
        torch.Tensor.__mul__: _elementwise(torch.mul, "mul"),
        torch.Tensor.__rmul__: _elementwise(torch.mul, "mul", reflected=True),
        torch.add: _elementwise(torch.add, "add"),
        torch.Tensor.add: _elementwise(torch.add, "add"),
        torch.Tensor.__add__: _elementwise(torch.add, "add"),
        torch.Tensor.__radd__: _elementwise(torch.add, "add", reflected=True),
        torch.sub: _elementwise(torch.sub, "sub"),
        torch.Tensor.sub: _elementwise(torch.sub, "sub"),
        torch.Tensor.__sub__: _elementwise(torch.sub, "sub"),
        torch.Tensor.__rsub__: _elementwise(operator.sub, "sub", reflected=True),
        torch.div: _elementwise(torch.div, "div"),
        torch.Tensor.div: _elementwise(torch.div, "div"),
        torch.Tensor.__truediv__: _elementwise(torch.div, "div"),
        torch.Tensor.expand: _h_expand,
        torch.Tensor.to: _h_to,
        torch.Tensor.float: lambda mode, self, *a, **k: _h_to(mode, self, torch.float32),
        torch.Tensor.type_as: lambda mode, self, other: _h_to(mode, self, other.dtype),
    }
)
