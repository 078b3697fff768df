"""EggrollOptimizer: EGGROLL evolution strategies as a ``torch.optim.Optimizer``."""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import Optimizer

from . import distributed as _dist
from .noise import compute_dtype, draw_noise, member_pairs, member_signs, num_draws
from .population import PerturbedParam, Population
from .shaping import SHAPINGS, mask_nonfinite, shape_losses, warn_identical, warn_nonfinite

__all__ = ["EggrollOptimizer"]

Closure = Callable[..., Any]

_GLOBAL_KEYS = ("pop_size", "antithetic")
_SET_ERROR = (
    "Invalid params: a set has no stable order, and a parameter's noise depends on its position; "
    "pass a list"
)


class EggrollOptimizer(Optimizer):
    r"""EGGROLL evolution strategies: gradient-free training with low-rank antithetic noise.

    Every step evaluates a population of ``N = pop_size`` perturbed copies of the parameters and
    moves the parameters against the loss-weighted sum of the perturbations. Member ``i`` sees

    .. math::
        \theta_i = \theta + \sigma\, \mathrm{sign}_i\, E_{k(i)}, \qquad
        E_k = \frac{A_k B_k^\top}{\sqrt{r}} \text{ (matrices)}, \quad
        E_k = \varepsilon_k \text{ (other tensors, or } r = 0)

    with :math:`A_k \in \mathbb{R}^{m\times r}`, :math:`B_k \in \mathbb{R}^{n\times r}`,
    :math:`\varepsilon_k` iid :math:`\mathcal N(0, 1)` (every entry of :math:`E_k` has unit
    variance), and, under antithetic sampling, :math:`k(i) = \lfloor i/2 \rfloor`,
    :math:`\mathrm{sign}_i = (-1)^i`. A tensor of ``ndim > 2`` (a conv kernel) is treated as the
    matrix ``(shape[0], prod(shape[1:]))``. Given the losses :math:`\ell_i` returned by the
    closure and shaped into :math:`s_i` (``shaping``), the update is

    .. math::
        g = \frac{\sigma}{\sqrt N} \sum_{i=1}^{N} s_i\, \mathrm{sign}_i\, E_{k(i)}
            + \lambda \theta, \qquad \theta \leftarrow \theta - \mathrm{lr}\cdot g

    (:math:`\lambda` = ``weight_decay``, as in SGD), computed in factored form for matrices. This
    is the convention of the original torcheggroll and of the EGGROLL reference code, so their
    ``lr`` and ``sigma`` transfer. With ``shaping="raw"``, :math:`g / (\sigma^2 \sqrt N)` is an
    unbiased estimate of the gradient of the Gaussian-smoothed loss.

    Noise is a pure function of ``(seed, generation, parameter index)``: it never reads or
    changes the global RNG, ``seed`` and ``generation`` live in :attr:`state` as Python ints,
    and a run resumed from :meth:`state_dict` is bit-identical to one that never stopped.

    Args:
        params: tensors, ``(name, tensor)`` pairs, or dicts defining parameter groups. Groups may
            set their own ``lr``, ``sigma``, ``rank``, ``weight_decay`` and ``shaping``.
        lr: learning rate (default: 0.05).
        sigma: noise scale (default: 0.02). Read at every step, so it can be scheduled.
        rank: rank of the perturbation of matrices (default: 4); 0 gives dense noise.
        pop_size: population size ``N`` (default: 32); even with antithetic sampling.
        antithetic: mirrored pairs ``(2k, 2k+1)`` sharing one draw with signs ``+, -``
            (default: True).
        seed: the noise seed, any non-negative int. ``None`` (default) draws one from torch's
            global generator at construction (as initializing a layer does): two optimizers get
            different noise, and ``torch.manual_seed(s)`` before construction reproduces a run.
        shaping: how losses become update weights: ``"zscore"`` (default; the original
            torcheggroll's), ``"centered_rank"`` (ranks onto ``[-0.5, 0.5]``, ties share their
            rank), ``"centered"`` (mean-centred) or ``"raw"`` (unchanged).
        weight_decay: L2 penalty added to the update as in SGD (default: 0).
        maximize: the closure returns a fitness to maximize instead of a loss (default: False).
        process_group: shard the population over this torch.distributed group; by default the
            world group when torch.distributed is initialized. ``False`` turns sharding off
            (each process then evaluates the whole population itself).

    The closure (required) is called once per step, in one of two forms, told apart by its
    signature (one required positional parameter or ``*args``: the population form; none: the
    sequential form; parameters with defaults do not count):

    * ``closure(population) -> Tensor`` of shape ``(len(population),)``: evaluate every member
      at once, typically ``loss_fn(population.forward(model, x), y)``
      (see :class:`~torcheggroll.Population`).
    * ``closure() -> scalar``: for code that cannot be vectorized; the optimizer perturbs the
      parameters in place for each member in turn, calls the closure, and restores the
      parameters bit-identically afterwards (also if the closure raises).

    Parameters whose ``requires_grad`` is False are left alone, as by ``torch.optim``: they are
    neither perturbed nor updated (they keep their index, so freezing or unfreezing one does not
    change the noise of the others).

    Attributes:
        last_losses: the ``(pop_size,)`` losses of the last step's members (all ranks), or None
            before the first step.
        seed, generation: the noise seed and the number of steps taken (Python ints in
            :attr:`state`, so :meth:`state_dict` round-trips them exactly).

    Closures run under :func:`torch.no_grad`. Members whose loss is NaN or infinite are treated
    as the worst member (the largest finite loss, or the smallest fitness with ``maximize``) and
    a :class:`~torcheggroll.NonFiniteLossWarning`
    is issued; if no member has a finite loss the update is skipped. When every member returns
    the same loss (a closure that ignores the population) an
    :class:`~torcheggroll.IdenticalLossesWarning` is issued. A non-finite update (or one
    that overflows a float16 parameter) is not applied, with a ``RuntimeWarning``.

    Example:
        >>> model = torch.nn.Linear(4, 1)
        >>> opt = EggrollOptimizer(model.parameters(), lr=0.1, sigma=0.05, pop_size=16, seed=0)
        >>> x, y = torch.randn(32, 4), torch.randn(32, 1)
        >>> def closure(pop):
        ...     out = pop.forward(model, x)  # (16, 32, 1)
        ...     return ((out - y) ** 2).mean(dim=(1, 2))
        >>> loss = opt.step(closure)

    References:
        Sarkar et al., "Evolution Strategies at the Hyperscale" (EGGROLL), arXiv:2511.16652.
        Salimans et al., "Evolution Strategies as a Scalable Alternative to Reinforcement
        Learning", arXiv:1703.03864.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | torch.Tensor = 0.05,
        sigma: float = 0.02,
        rank: int = 4,
        pop_size: int = 32,
        *,
        antithetic: bool = True,
        seed: int | None = None,
        shaping: str = "zscore",
        weight_decay: float = 0.0,
        maximize: bool = False,
        process_group: Any = None,
    ) -> None:
        if isinstance(params, (set, frozenset)):
            raise TypeError(_SET_ERROR)
        defaults = dict(
            lr=lr,
            sigma=sigma,
            rank=rank,
            pop_size=pop_size,
            antithetic=antithetic,
            shaping=shaping,
            weight_decay=weight_decay,
            maximize=maximize,
        )
        _check_group(defaults)
        _check_population(pop_size, antithetic)
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or seed < 0):
            raise ValueError(f"Invalid seed: {seed!r} (expected a non-negative int or None)")
        super().__init__(params, defaults)
        if not any(group["params"] for group in self.param_groups):
            raise ValueError("Invalid params: EggrollOptimizer got no parameters")
        self._process_group = _dist.resolve_group(process_group)
        if seed is None:
            # One draw from torch's global generator, as initializing a layer takes: optimizers
            # built one after another get different seeds (uncorrelated noise for two models),
            # and torch.manual_seed(s) before construction reproduces a run. Steps never touch
            # the global generator.
            seed = int(torch.randint(0, 2**63 - 1, ()).item())
            seed = _dist.agree_on_seed(seed, self._process_group)
        self._global_state().update(seed=int(seed), generation=0)
        self.last_losses: torch.Tensor | None = None

    # ------------------------------------------------------------------ torch.optim plumbing
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; its settings are checked before anything is added."""
        if not isinstance(param_group, dict):
            raise TypeError(
                f"Invalid param_group: expected a dict, got {type(param_group).__name__}"
            )
        merged = {**self.defaults, **param_group}
        _check_group(merged)
        _check_population(merged["pop_size"], merged["antithetic"])
        for key in _GLOBAL_KEYS:
            for other in self.param_groups:
                if other[key] != merged[key]:
                    raise ValueError(
                        f"Invalid {key}: {merged[key]!r} (param groups must share {key}; "
                        f"existing groups use {other[key]!r})"
                    )
        params = param_group["params"]
        if isinstance(params, (set, frozenset)):
            raise TypeError(_SET_ERROR)
        listed = [params] if isinstance(params, torch.Tensor) else list(params)
        for p in listed:
            t = p[1] if isinstance(p, tuple) and len(p) == 2 else p
            if isinstance(t, torch.Tensor) and (not t.is_floating_point() or t.is_complex()):
                raise TypeError(
                    f"Invalid parameter dtype: {t.dtype} (EggrollOptimizer needs real floating-point tensors)"
                )
        tensors = [p[1] if isinstance(p, tuple) else p for p in listed]
        if len({id(t) for t in tensors}) != len(tensors):
            # torch only warns; here each copy would get its own noise and its own update.
            raise ValueError("Invalid params: a parameter appears more than once in the group")
        param_group = {**param_group, "params": listed}
        if "lr" not in param_group and isinstance(self.defaults["lr"], torch.Tensor):
            # Each group gets its own tensor lr: a scheduler's in-place update of one group's lr
            # must not change the others (torch's own optimizers share the default tensor).
            param_group["lr"] = self.defaults["lr"].clone()
        super().add_param_group(param_group)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("shaping", "zscore")
            group.setdefault("weight_decay", 0.0)
            group.setdefault("maximize", False)
            group.setdefault("antithetic", True)
        self.__dict__.setdefault("last_losses", None)
        # Unpickled (the group itself is never pickled): shard over WORLD if it is initialized.
        self.__dict__.setdefault("_process_group", _dist.resolve_group(None))

    def __getstate__(self) -> dict[str, Any]:
        state = dict(super().__getstate__())
        state.pop("_process_group", None)  # a live communicator cannot be pickled or copied
        return state

    def __deepcopy__(self, memo: dict[int, Any]) -> EggrollOptimizer:
        import copy

        cls = self.__class__
        new = cls.__new__(cls)
        memo[id(self)] = new
        for k, v in self.__dict__.items():
            if k == "_process_group":
                new.__dict__[k] = v
            else:
                new.__dict__[k] = copy.deepcopy(v, memo)
        return new

    def _global_state(self) -> dict[str, Any]:
        # As LBFGS does, optimizer-wide state lives in the state of the first parameter, so it
        # rides along in state_dict() as plain Python ints that load_state_dict never casts.
        return self.state[self._first_param()]

    def _first_param(self) -> torch.Tensor:
        # The first group may be empty; the constructor ensures some group is not.
        return next(p for group in self.param_groups for p in group["params"])

    @property
    def seed(self) -> int:
        """The noise seed (a Python int, kept in :attr:`state`)."""
        return int(self._global_state()["seed"])

    @property
    def generation(self) -> int:
        """How many populations have been evaluated (a Python int, kept in :attr:`state`)."""
        return int(self._global_state()["generation"])

    @property
    def pop_size(self) -> int:
        return int(self.param_groups[0]["pop_size"])

    @property
    def antithetic(self) -> bool:
        return bool(self.param_groups[0]["antithetic"])

    @property
    def process_group(self) -> Any:
        """The torch.distributed group the population is sharded over, or None."""
        return self._process_group

    # ------------------------------------------------------------------ the population
    def population(self) -> Population:
        """The population of the current generation, restricted to this rank's members.

        Drawing it has no side effect: calling this twice gives the same noise.
        """
        gs = self._global_state()
        seed, generation = int(gs["seed"]), int(gs["generation"])
        pop_size, antithetic = self.pop_size, self.antithetic
        draws = num_draws(pop_size, antithetic)
        entries: list[PerturbedParam] = []
        index = -1
        for group_index, group in enumerate(self.param_groups):
            for p in group["params"]:
                index += 1  # frozen parameters keep their index, so unfreezing one shifts no noise
                if not p.requires_grad:
                    continue  # as torch.optim: a parameter that does not require grad is left alone
                noise = draw_noise(
                    p.shape,
                    int(group["rank"]),
                    draws,
                    seed=seed,
                    generation=generation,
                    param_index=index,
                    device=p.device,
                    dtype=compute_dtype(p.dtype),
                )
                entries.append(PerturbedParam(p, index, float(group["sigma"]), noise, group_index))
        rank, world = _dist.world_info(self._process_group)
        start, stop = _dist.shard_bounds(pop_size, antithetic, rank, world)
        members = torch.arange(start, stop, dtype=torch.long)
        return Population(
            entries,
            pop_size=pop_size,
            members=members,
            seed=seed,
            generation=generation,
            antithetic=antithetic,
        )

    def evaluate(self, closure: Closure) -> tuple[torch.Tensor, Population]:
        """Evaluate the current generation without updating anything.

        Returns:
            ``(losses, population)``: the ``(pop_size,)`` losses of all members (gathered from
            every rank under torch.distributed) and the local population.
        """
        if closure is None or not callable(closure):
            raise TypeError(
                f"Invalid closure: {closure!r} (EggrollOptimizer.step requires a callable closure)"
            )
        for group in self.param_groups:  # settings may have been changed since construction
            _check_group(group)
        population = self.population()
        pg = self._process_group
        try:
            with torch.no_grad():
                if pg is not None and len(population) == 0:
                    # A rank with no members (more ranks than draws) does not call the closure.
                    local = torch.empty(0, device=self._first_param().device)
                elif _takes_population(closure):
                    local = _as_losses(closure(population), len(population), closure)
                else:
                    local = self._sequential(closure, population)
        except Exception as exc:
            if pg is None:
                raise
            # Tell the other ranks, so every rank raises instead of waiting for the losses.
            _dist.gather_losses(None, population, pg, error=exc)
            raise
        # At the first step, also check that every rank starts from the same parameters.
        check = pg is not None and not self.__dict__.get("_replicas_checked", False)
        losses = _dist.gather_losses(local, population, pg, check_params=check)
        self._replicas_checked = True
        return losses, population

    def _sequential(self, closure: Closure, population: Population) -> torch.Tensor:
        params = [e.param for e in population.params]
        centres = [p.detach().clone() for p in params]
        values: list[torch.Tensor] = []
        try:
            for position in range(len(population)):
                for p, c in zip(params, centres, strict=True):
                    p.copy_(population.member_value(p, position, centre=c))
                values.append(_as_scalar_loss(closure(), position, closure))
        finally:
            for p, c in zip(params, centres, strict=True):
                p.copy_(c)
        if not values:
            device = params[0].device if params else torch.device("cpu")
            return torch.empty(0, device=device)
        device = values[0].device
        return torch.stack(
            [v.to(device, torch.promote_types(v.dtype, torch.float32)) for v in values]
        )

    # ------------------------------------------------------------------ the update
    def _directions(
        self, losses: torch.Tensor, population: Population
    ) -> tuple[list[tuple[torch.Tensor, dict[str, Any], torch.Tensor]], torch.Tensor]:
        """``([(param, group, g)], bad)`` with ``g`` the per-parameter update of the class
        docstring (before ``lr``) and ``bad`` a 0-d tensor counting the non-finite losses.

        No host sync: when every loss is non-finite the directions are meaningless and the
        caller must discard them.
        """
        self.last_losses = losses.detach().clone()
        n = self.pop_size
        all_members = torch.arange(n, device=losses.device)
        out: list[tuple[torch.Tensor, dict[str, Any], torch.Tensor]] = []
        bad = (~torch.isfinite(losses)).sum()
        shaped_by_group: dict[int, torch.Tensor] = {}
        for entry in population.params:
            group = self.param_groups[entry.group]
            if entry.group not in shaped_by_group:
                # Negate before replacing non-finite values, so that they become the worst
                # member (the largest loss) also when the closure returns a fitness to maximize.
                signed_losses = -losses.detach() if group["maximize"] else losses.detach()
                clean, _ = mask_nonfinite(signed_losses)
                shaped_by_group[entry.group] = shape_losses(clean.to(torch.float64), group["shaping"])
            shaped = shaped_by_group[entry.group]
            p, noise = entry.param, entry.noise
            ref = noise.a if noise.a is not None else noise.dense
            assert ref is not None
            members = all_members.to(ref.device)
            # Fold each antithetic pair into one coefficient per draw: c_k = s_2k - s_2k+1.
            weights = shaped.to(ref.device) * member_signs(members, self.antithetic, torch.float64)
            coeffs = torch.zeros(noise.num_draws, dtype=torch.float64, device=ref.device)
            coeffs.index_add_(0, member_pairs(members, self.antithetic), weights)
            # Half-precision parameters get their update GEMM in their own dtype: the update is
            # rounded to it anyway, and a float32 GEMM of (m, draws*r) x (draws*r, n) would cost
            # more than the population's forward.
            low = p.dtype if p.dtype in (torch.float16, torch.bfloat16) else None
            g = noise.weighted_sum(coeffs.to(ref.dtype) * (entry.sigma / math.sqrt(n)), low)
            if group["weight_decay"] != 0:
                g = g.add(p.detach().to(g.dtype), alpha=group["weight_decay"])
            out.append((p, group, g))
        return out, bad

    def _finish(self, losses: torch.Tensor) -> torch.Tensor:
        # A new dict rather than an in-place increment: a state_dict() taken earlier shares the
        # old one and must keep the generation it was taken at.
        first = self._first_param()
        self.state[first] = {**self.state[first], "generation": int(self.state[first]["generation"]) + 1}
        return losses.detach().mean()

    @torch.no_grad()
    def step(self, closure: Closure) -> torch.Tensor:  # type: ignore[override]
        """Evaluate one population, update the parameters, advance the generation.

        Args:
            closure: ``closure(population) -> (len(population),) losses`` or ``closure() -> loss``
                (see the class docstring).

        Returns:
            The mean loss over the population (a 0-d tensor; NaN if some member's loss was NaN).
        """
        losses, population = self.evaluate(closure)
        directions, bad_count = self._directions(losses, population)
        # p - lr * g computed exactly as torch.optim.SGD does (add with alpha). Nothing is
        # written unless every new value is finite where the old one was. float16 can overflow
        # in the addition itself, so its new values are built out of place and checked; wider
        # dtypes only need a finite update, which is then added in place (no copy of p).
        updates = [(p, g.to(p.dtype), -group["lr"]) for p, group, g in directions if _nonzero(group["lr"])]
        del directions
        careful = any(p.dtype not in _WIDE_DTYPES for p, _, _ in updates)
        checked = [p.add(g, alpha=alpha) for p, g, alpha in updates] if careful else [g for _, g, _ in updates]
        # One host sync for the step: the non-finite count and one sum per checked tensor.
        device = bad_count.device
        flags = torch.stack(
            [bad_count.to(device, torch.float64), _identical(losses).to(device, torch.float64)]
            + [c.sum().to(device, torch.float64) for c in checked]
        ).tolist()
        bad = int(flags[0])
        _warn_losses(bad, bool(flags[1]), losses.numel())
        flags = flags[1:]
        if bad == losses.numel():
            return self._finish(losses)
        ok = all(math.isfinite(x) for x in flags[1:])
        if not ok and checked:  # a sum is not finite: an element is, or the sum overflowed
            pairs = [(p, c) for (p, _, _), c in zip(updates, checked, strict=True)]
            ok = _all_stay_finite(pairs) if careful else _all_finite(checked)
        if not ok:
            warnings.warn(
                "the ES update overflowed to a non-finite value; the parameters were left unchanged",
                RuntimeWarning,
                stacklevel=2,
            )
        elif careful:
            for (p, _, _), v in zip(updates, checked, strict=True):
                p.copy_(v)
        else:
            for p, g, alpha in updates:
                p.add_(g, alpha=alpha)
        return self._finish(losses)

    @torch.no_grad()
    def compute_grad(self, closure: Closure) -> torch.Tensor:
        """Evaluate one population and accumulate the ES estimate into ``p.grad``.

        ``p.grad`` receives (added to any existing ``.grad``, as ``backward`` does) exactly the
        ``g`` that :meth:`step` would multiply by ``-lr``, weight decay included: so
        ``torch.optim.SGD(params, lr)`` fed this reproduces ``EggrollOptimizer(lr=lr)``, and
        Adam/AdamW or any other optimizer can consume it (for those, set this optimizer's
        ``weight_decay`` to 0 and let them decay). Its scale is ``sigma / sqrt(N)`` times the
        shaped-loss-weighted noise sum; with ``shaping="raw"``, dividing by ``sigma**2 * sqrt(N)``
        gives the unbiased smoothed-gradient estimate. Parameters are not changed; the
        generation advances, so the next call draws new noise.

        Returns:
            The mean loss over the population (a 0-d tensor).
        """
        losses, population = self.evaluate(closure)
        directions, bad_count = self._directions(losses, population)
        bad, identical = torch.stack([bad_count, _identical(losses).to(bad_count.device)]).tolist()
        _warn_losses(int(bad), bool(identical), losses.numel())
        if bad < losses.numel():
            for p, _, g in directions:
                g = g.to(p.dtype)
                if p.grad is None:
                    p.grad = g.clone()
                else:
                    p.grad.add_(g)
        return self._finish(losses)


# ---------------------------------------------------------------------- checks and helpers
def _number(value: Any) -> bool:
    """A real Python number (``bool`` is not one here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _invalid(name: str, value: Any, expected: str) -> ValueError:
    return ValueError(
        f"Invalid {name}: {value!r} (expected {expected}, got {type(value).__name__})"
    )


def _check_hyper(
    *, lr: Any, sigma: Any, rank: Any, weight_decay: Any, shaping: Any, maximize: Any = False
) -> None:
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1:
            raise ValueError(
                f"Invalid lr: a tensor lr must have one element, got shape {tuple(lr.shape)}"
            )
        lr_value: Any = float(lr)
    else:
        lr_value = lr
    if not _number(lr_value) or not lr_value >= 0.0 or not math.isfinite(lr_value):
        raise _invalid("learning rate", lr, "a finite float >= 0")
    if not _number(sigma) or not sigma > 0.0 or not math.isfinite(sigma):
        raise _invalid("sigma", sigma, "a finite float > 0")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 0:
        raise _invalid("rank", rank, "an int >= 0")
    if not _number(weight_decay) or not weight_decay >= 0.0 or not math.isfinite(weight_decay):
        raise _invalid("weight_decay value", weight_decay, "a finite float >= 0")
    if not isinstance(shaping, str) or shaping not in SHAPINGS:
        raise ValueError(f"Invalid shaping: {shaping!r} (expected one of {sorted(SHAPINGS)})")
    if not isinstance(maximize, bool):
        raise _invalid("maximize", maximize, "a bool")


def _check_group(group: dict[str, Any]) -> None:
    """Check a (complete) param group's per-group settings."""
    _check_hyper(
        lr=group["lr"],
        sigma=group["sigma"],
        rank=group["rank"],
        weight_decay=group["weight_decay"],
        shaping=group["shaping"],
        maximize=group["maximize"],
    )


def _check_population(pop_size: Any, antithetic: Any) -> None:
    if not isinstance(pop_size, int) or isinstance(pop_size, bool) or pop_size < 2:
        raise _invalid("pop_size", pop_size, "an int >= 2")
    if not isinstance(antithetic, bool):
        raise _invalid("antithetic", antithetic, "a bool")
    if antithetic and pop_size % 2:
        raise ValueError(f"Invalid pop_size: {pop_size} (must be even with antithetic=True)")


_WIDE_DTYPES = (torch.float32, torch.float64, torch.bfloat16)


def _identical(losses: torch.Tensor) -> torch.Tensor:
    """0-d bool: every member's loss is the same finite value (more than one member)."""
    if losses.numel() < 2:
        return torch.zeros((), dtype=torch.bool, device=losses.device)
    return (losses == losses[0]).all() & torch.isfinite(losses[0])


def _warn_losses(bad: int, identical: bool, total: int) -> None:
    if bad:
        warn_nonfinite(bad, total)
    if identical:
        warn_identical(total)


def _all_finite(tensors: list[torch.Tensor]) -> bool:
    device = tensors[0].device
    return bool(torch.stack([t.isfinite().all().to(device) for t in tensors]).all())


def _all_stay_finite(new_values: list[tuple[torch.Tensor, torch.Tensor]]) -> bool:
    """Whether every new value is finite wherever the old one was (elementwise; one host sync).

    Only called when some tensor's sum is not finite (an element is, or the sum overflowed).
    """
    device = new_values[0][1].device
    checks = [(v.isfinite() | ~p.isfinite()).all().to(device) for p, v in new_values]
    return bool(torch.stack(checks).all())


def _nonzero(lr: Any) -> bool:
    return bool(lr != 0)


def _takes_population(closure: Closure) -> bool:
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


def _closure_name(closure: Closure) -> str:
    name = getattr(closure, "__qualname__", None) or type(closure).__name__
    return f"the closure {name!r}"


def _as_losses(value: Any, size: int, closure: Closure | str) -> torch.Tensor:
    what = closure if isinstance(closure, str) else f"{_closure_name(closure)} (population form)"
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


def _as_scalar_loss(value: Any, position: int, closure: Closure) -> torch.Tensor:
    what = f"{_closure_name(closure)} (zero-argument form)"
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
