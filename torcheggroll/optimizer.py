"""EggrollOptimizer: EGGROLL evolution strategies as a ``torch.optim.Optimizer``."""

from __future__ import annotations

import copy
import functools
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import Optimizer

from . import _update
from . import distributed as _dist
from ._checks import (
    GROUP_DEFAULTS,
    as_losses,
    as_scalar_loss,
    check_groups,
    check_state_dict,
    loss_dtype,
    takes_population,
)
from ._plan import Plan, signature
from .noise import NOISE_VERSION, seed_key
from .population import NoiseBatch, PerturbedParam, Population
from .shaping import (
    IdenticalLossesWarning,
    NonFiniteLossWarning,
    warn_identical,
    warn_nonfinite,
)

__all__ = ["EggrollOptimizer"]

Closure = Callable[..., Any]


def _check_one_device(params: list[Any]) -> torch.device:
    """The one device of ``params``; a ``capturable`` optimizer keeps one set of device counters
    (seed and generation), so parameters on several devices are refused."""
    devices = list(dict.fromkeys(p.device for p in params if isinstance(p, torch.Tensor)))
    if len(devices) > 1:
        raise ValueError(
            f"Invalid params: capturable=True needs every parameter on one device, got "
            f"{', '.join(str(d) for d in devices)} (use one optimizer per device)"
        )
    return devices[0] if devices else torch.device("cpu")


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

    Noise is a pure function of ``(seed, generation, parameter index, draw)`` (counter-based
    Philox, see :mod:`torcheggroll.noise`): it never reads or changes a ``torch.Generator``,
    ``seed`` and ``generation`` live in :attr:`state` as Python ints, and a run resumed from
    :meth:`state_dict` is bit-identical to one that never stopped. A step reads nothing on the
    host: whether an update is applied is decided on the device, and warnings about a step are
    issued when its flags are ready (at the latest by the next step, :meth:`state_dict` or
    :meth:`check_warnings`).

    Args:
        params: tensors, ``(name, tensor)`` pairs, or dicts defining parameter groups. Groups may
            set their own ``lr``, ``sigma``, ``rank``, ``weight_decay``, ``shaping``, ``maximize``
            and ``sigma_scaling``.
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
        sigma_scaling: ``"none"`` (default: ``sigma`` is every entry's noise scale),
            ``"fan_in"`` (matrices and conv kernels ``(out, in, ...)`` get
            ``sigma / sqrt(fan_in)``, so that one ``sigma`` moves every layer's output alike at
            any width) or ``"fan_in_rows"`` (the same for weights stored ``(in, out)``); see
            :mod:`torcheggroll.scaling` and :func:`~torcheggroll.width_scaled_groups`.
        process_group: shard the population over this torch.distributed group; by default the
            world group when torch.distributed is initialized. ``False`` turns sharding off
            (each process then evaluates the whole population itself).
        capturable: keep the seed and the generation in device tensors and never read a value
            on the host in :meth:`step`, so that a whole step (closure included) can be captured
            in a CUDA graph and replayed, each replay with the next generation's noise (as
            ``capturable`` in ``torch.optim``; see the README's recipe). ``lr`` and ``sigma``
            are fixed at capture unless ``lr`` is a device tensor updated in place. Every
            parameter must be on one device (the counters follow it when the model moves).

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
        sigma_scaling: str = "none",
        process_group: Any = None,
        capturable: bool = False,
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
            sigma_scaling=sigma_scaling,
            capturable=capturable,
        )
        check_groups([defaults])
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
        self._global_state().update(seed=int(seed), generation=0, noise_version=NOISE_VERSION)
        self._last_losses: torch.Tensor | None = None
        self._plan: Plan | None = None
        self._pending: list[tuple[torch.Tensor, Any, int]] = []
        self._counters: tuple[torch.Tensor, torch.Tensor] | None = None  # capturable: key, gen

    # ------------------------------------------------------------------ torch.optim plumbing
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; its settings are checked before anything is added."""
        if not isinstance(param_group, dict):
            raise TypeError(
                f"Invalid param_group: expected a dict, got {type(param_group).__name__}"
            )
        merged = {**self.defaults, **param_group}
        # The existing groups first: an error names the new group's value.
        check_groups([*self.param_groups, merged])
        params = param_group["params"]
        if isinstance(params, (set, frozenset)):
            raise TypeError(_SET_ERROR)
        listed = [params] if isinstance(params, torch.Tensor) else list(params)
        for p in listed:
            t = p[1] if isinstance(p, tuple) and len(p) == 2 else p
            if isinstance(t, torch.Tensor) and (not t.is_floating_point() or t.is_complex()):
                raise TypeError(
                    f"Invalid parameter dtype: {t.dtype} (EggrollOptimizer needs real "
                    "floating-point tensors)"
                )
            if isinstance(t, torch.Tensor) and t.layout != torch.strided:
                raise TypeError(
                    f"Invalid parameter layout: {t.layout} (EggrollOptimizer updates dense "
                    "tensors in place)"
                )
            if isinstance(t, torch.Tensor) and torch._debug_has_internal_overlap(t) == 1:
                raise ValueError(
                    f"Invalid parameter: a tensor of shape {tuple(t.shape)} and strides "
                    f"{t.stride()} whose elements share memory (made by expand?) cannot be "
                    "updated in place; pass a tensor that owns its elements (.clone())"
                )
        tensors = [p[1] if isinstance(p, tuple) else p for p in listed]
        if len({id(t) for t in tensors}) != len(tensors):
            # torch only warns; here each copy would get its own noise and its own update.
            raise ValueError("Invalid params: a parameter appears more than once in the group")
        if merged["capturable"]:
            existing = [q for group in self.param_groups for q in group["params"]]
            _check_one_device([*existing, *tensors])
        param_group = {**param_group, "params": listed}
        if "lr" not in param_group and isinstance(self.defaults["lr"], torch.Tensor):
            # Each group gets its own tensor lr: a scheduler's in-place update of one group's lr
            # must not change the others (torch's own optimizers share the default tensor).
            param_group["lr"] = self.defaults["lr"].clone()
        super().add_param_group(param_group)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in GROUP_DEFAULTS.items():
                group.setdefault(key, value)
        for key, value in (
            ("_last_losses", None),
            ("_plan", None),
            ("_pending", []),
            ("_counters", None),
        ):
            self.__dict__.setdefault(key, value)
        # Unpickled (the group itself is never pickled): shard over WORLD if it is initialized.
        self.__dict__.setdefault("_process_group", _dist.resolve_group(None))

    def __getstate__(self) -> dict[str, Any]:
        self._sync_counters()
        state = dict(super().__getstate__())
        # A live communicator cannot be pickled or copied; the noise buffers and pending
        # warnings are rebuilt or dropped.
        for key in ("_process_group", "_plan", "_pending"):
            state.pop(key, None)
        return state

    def __deepcopy__(self, memo: dict[int, Any]) -> EggrollOptimizer:
        self._sync_counters()
        cls = self.__class__
        new = cls.__new__(cls)
        memo[id(self)] = new
        for k, v in self.__dict__.items():
            if k == "_process_group":
                new.__dict__[k] = v
            elif k in ("_plan", "_pending"):
                new.__dict__[k] = None if k == "_plan" else []
            else:
                new.__dict__[k] = copy.deepcopy(v, memo)
        return new

    def state_dict(self) -> dict[str, Any]:
        """As ``torch.optim``'s, with the seed, the generation and the noise version as Python
        ints in the state of the first parameter. Issues the warnings of earlier steps that
        have not been reported yet."""
        self.check_warnings()
        self._sync_counters()
        return super().state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a :meth:`state_dict`. It is checked (after any ``load_state_dict`` pre-hooks,
        before anything changes) as the constructor checks its arguments: every group's
        settings, and the seed, generation and noise version. One written with another noise
        definition is refused (it would resume with different noise)."""

        def check(optimizer: Any, loaded: dict[str, Any]) -> None:
            check_state_dict(loaded, NOISE_VERSION)

        # Registered last, so that the user's pre-hooks (a migration, say) run before it.
        handle = self.register_load_state_dict_pre_hook(check)
        try:
            super().load_state_dict(state_dict)
        finally:
            handle.remove()
        if self._counters is not None:  # capturable: refresh the device counters in place
            key, gen = self._counters
            key.copy_(torch.tensor(seed_key(self.seed), dtype=torch.int64))
            gen.fill_(int(self._global_state()["generation"]))
        self._last_losses = None

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
        """How many populations have been evaluated (a Python int, kept in :attr:`state`; read
        from the device when ``capturable``)."""
        self._sync_counters()
        return int(self._global_state()["generation"])

    @property
    def pop_size(self) -> int:
        return int(self.param_groups[0]["pop_size"])

    @property
    def antithetic(self) -> bool:
        return bool(self.param_groups[0]["antithetic"])

    @property
    def capturable(self) -> bool:
        return bool(self.param_groups[0]["capturable"])

    @property
    def process_group(self) -> Any:
        """The torch.distributed group the population is sharded over, or None."""
        return self._process_group

    @property
    def last_losses(self) -> torch.Tensor | None:
        """The ``(pop_size,)`` losses of the last step's members, or None before the first."""
        return self._last_losses

    # ------------------------------------------------------------------ counters
    def _device_counters(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``capturable``: the Philox key ``(k0, k1)`` and the generation as device tensors."""
        if self._counters is None:
            device = self._first_param().device
            key = torch.tensor(seed_key(self.seed), dtype=torch.int64, device=device)
            gen = torch.tensor(
                int(self._global_state()["generation"]), dtype=torch.int64, device=device
            )
            self._counters = (key, gen)
        return self._counters

    def _sync_counters(self) -> None:
        """Copy the device generation into the Python int of :attr:`state` (capturable)."""
        if self._counters is not None and self.state:
            first = self._first_param()
            self.state[first] = {**self.state[first], "generation": int(self._counters[1])}

    def _plan_for_step(self, check: bool = True) -> Plan:
        """The plan of the current configuration (rebuilt when it changed; ``check=False``
        reuses the one the step's population was drawn with)."""
        if self._plan is None or (check and self._plan.signature != signature(self.param_groups)):
            if self.capturable:
                # The parameters may have moved (model.to) since the counters were made.
                device = _check_one_device([p for g in self.param_groups for p in g["params"]])
                if self._counters is not None and self._counters[0].device != device:
                    self._counters = (self._counters[0].to(device), self._counters[1].to(device))
            self._plan = Plan(self.param_groups)
        return self._plan

    # ------------------------------------------------------------------ the population
    def population(self) -> Population:
        """The population of the current generation, restricted to this rank's members.

        Drawing it has no side effect on the parameters or the generation: calling this twice
        gives the same noise. The noise lives in buffers of the optimizer that the next
        generation refills; the population's methods refill them for its own generation when
        needed, so use a population through its methods (its noise tensors are views).
        """
        plan = self._plan_for_step()
        gs = self._global_state()
        seed = int(gs["seed"])
        generation: Any
        counters: tuple[Any, Any]
        if self.capturable:
            key, generation = self._device_counters()
            counters = (key, generation)
        else:
            generation = int(gs["generation"])
            counters = (seed_key(seed), generation)
            plan.fill(seed, generation)  # now: a closure compiled by torch.compile reads it

        def fill(
            plan: Plan = plan,
            seed: Any = counters[0] if self.capturable else seed,
            generation: Any = generation,
        ) -> None:
            plan.fill(seed, generation)

        sigmas = tuple(float(group["sigma"]) for group in self.param_groups)
        cached = plan.__dict__.get("_entries")  # (sigmas, entries), made again when a sigma changed
        if cached is not None and cached[0] == sigmas:
            entries, batches = cached[1], cached[2]
        else:
            entries = [
                PerturbedParam(
                    o.param,
                    o.index,
                    sigmas[o.group] * o.scale,
                    plan.buffers[o.buffer].noise[o.entry],
                    o.group,
                )
                for o in plan.owned
            ]
            batches = _noise_batches(plan, entries)
            plan.__dict__["_entries"] = (sigmas, entries, batches)
        if not entries:
            warnings.warn(
                "no parameter of EggrollOptimizer requires grad: nothing is perturbed or updated",
                UserWarning,
                stacklevel=2,
            )
        rank, world = _dist.world_info(self._process_group)
        start, stop = _dist.shard_bounds(self.pop_size, self.antithetic, rank, world)
        population = Population(
            entries,
            pop_size=self.pop_size,
            members=torch.arange(start, stop, dtype=torch.long),
            seed=seed,
            generation=generation,
            antithetic=self.antithetic,
            fill=fill,
            tables=plan.member_tables,
            counters=counters,
            batches=batches,
        )
        for buffer in plan.buffers:  # made here, outside any closure that may be compiled
            population.member_table("signs", buffer.device, buffer.dtype)
            population.member_table("pairs", buffer.device, torch.int64)
        return population

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
        # Settings may have been changed since construction (a tensor lr on an accelerator is
        # not read: that would wait for the device).
        check_groups(self.param_groups, read_device_tensors=False)
        self.check_warnings(wait=False)
        population = self.population()
        pg = self._process_group
        try:
            with torch.no_grad():
                if pg is not None and len(population) == 0:
                    # A rank with no members (more ranks than draws) does not call the closure.
                    local = torch.empty(0, device=self._first_param().device)
                elif takes_population(closure):
                    local = as_losses(closure(population), len(population), closure)
                else:
                    local = self._sequential(closure, population)
            # ... and by the closure itself: its changes apply, but only if they are valid.
            check_groups(self.param_groups, read_device_tensors=False)
        except Exception as exc:
            if pg is None:
                raise
            # Tell the other ranks, so every rank raises instead of waiting for the losses.
            _dist.gather_losses(None, population, pg, error=exc)
            raise
        # At the first step, also check that every rank starts from the same parameters.
        check = pg is not None and not self.__dict__.get("_replicas_checked", False)
        losses = _dist.gather_losses(
            local,
            population,
            pg,
            check_params=check,
            checked=not self.capturable,
            settings=_dist.settings_fingerprint(self.param_groups) if pg is not None else 0,
        )
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
                values.append(as_scalar_loss(closure(), position, closure))
        finally:
            for p, c in zip(params, centres, strict=True):
                p.copy_(c)
        if not values:
            device = params[0].device if params else torch.device("cpu")
            return torch.empty(0, device=device)
        device = values[0].device
        return torch.stack([v.to(device, loss_dtype(v)) for v in values])

    # ------------------------------------------------------------------ the update
    def _directions(self, losses: torch.Tensor) -> _update.Update:
        lrs = [group["lr"] for group in self.param_groups]
        return _update.directions(self._plan_for_step(check=False), self.param_groups, losses, lrs)

    def _finish(self, losses: torch.Tensor, flags: torch.Tensor) -> torch.Tensor:
        if (
            self.capturable
            and self._last_losses is not None
            and self._last_losses.shape == losses.shape
            and self._last_losses.device == losses.device
        ):
            self._last_losses.copy_(losses)
        else:
            self._last_losses = losses.detach().clone()
        self._report(flags, losses.numel())
        if self.capturable:
            self._device_counters()[1].add_(1)
        else:
            # A new dict rather than an in-place increment: a state_dict() taken earlier shares
            # the old one and must keep the generation it was taken at.
            first = self._first_param()
            self.state[first] = {
                **self.state[first],
                "generation": int(self.state[first]["generation"]) + 1,
            }
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
        plan = self._plan_for_step(check=False)
        counters = population.counters
        drawn = self.capturable and counters is not None
        drawn = drawn and not _update.reads_buffers(plan, self.param_groups)
        if drawn:
            # The update draws its operands from the counters and the buffers stay unfilled; the
            # population keeps a copy of its generation, so that its noise, if asked for after
            # the generation has advanced, is still its own.
            assert counters is not None
            held = counters[1].clone()
            population._keep_generation(held, functools.partial(plan.fill, counters[0], held))
        else:
            population.fill_noise()  # (with Python-int counters, filled when it was made)
        found = self._directions(losses)
        _update.apply(plan, self.param_groups, found, population.counters if drawn else None)
        return self._finish(losses, found.flags)

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
        generation advances, so the next call draws new noise. When no member has a finite loss
        (or the estimate is not finite) no ``.grad`` is touched; telling so reads one value on
        the host.

        Returns:
            The mean loss over the population (a 0-d tensor).
        """
        losses, population = self.evaluate(closure)
        population.fill_noise()
        found = self._directions(losses)
        if bool(found.ok):
            plan = self._plan_for_step(check=False)
            values = _update.grads(plan, self.param_groups, found)
            for o, owned in enumerate(plan.owned):
                p, g = owned.param, values[o]
                if p.grad is None:
                    p.grad = g.clone()
                else:
                    p.grad.add_(g)
        return self._finish(losses, found.flags)

    # ------------------------------------------------------------------ warnings
    def _report(self, flags: torch.Tensor, total: int) -> None:
        """Issue this step's warnings now on the CPU; on an accelerator, once its flags have
        arrived (read without waiting at the next step, or by :meth:`check_warnings`)."""
        if flags.device.type == "cpu":
            _warn(flags.tolist(), total)
            return
        if self.capturable:
            # Replays of a captured step run no Python: keep counts on the device.
            if not self._pending:
                self._pending.append((torch.zeros_like(flags), None, total))
            elif self._pending[0][0].device != flags.device:  # the model moved: so do the counts
                self._pending[0] = (self._pending[0][0].to(flags.device), None, total)
            self._pending[0][0].add_(flags)
            return
        host = torch.empty(flags.shape, dtype=flags.dtype, pin_memory=True)
        host.copy_(flags, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._pending.append((host, event, total))

    def check_warnings(self, wait: bool = True) -> None:
        """Issue the warnings (non-finite losses, identical losses, withheld updates) of steps
        not reported yet. With ``wait=False`` only those whose flags have arrived; with ``wait``
        (the default) all of them, which may wait for the device. Under ``capturable`` the
        flags are counts summed over the steps (replays included) since the last check."""
        keep: list[tuple[torch.Tensor, Any, int]] = []
        for flags, event, total in self._pending:
            if event is None:  # capturable: counts kept on the device
                if wait:
                    counts = flags.tolist()
                    flags.zero_()
                    _warn_counts(counts, total)
                keep.append((flags, None, total))
            elif wait or event.query():
                event.synchronize()
                _warn(flags.tolist(), total)
            else:
                keep.append((flags, event, total))
        self._pending = keep


def _warn(flags: list[int], total: int) -> None:
    bad, identical, withheld = (int(v) for v in flags)
    if bad:
        warn_nonfinite(bad, total)
    if identical:
        warn_identical(total)
    if withheld:
        warnings.warn(
            "the ES update overflowed to a non-finite value; the parameters were left unchanged",
            RuntimeWarning,
            stacklevel=3,
        )


def _warn_counts(counts: list[int], total: int) -> None:
    bad, identical, withheld = (int(v) for v in counts)
    if bad:
        warnings.warn(
            f"{bad} member losses (of {total} per step) were non-finite over the steps since the "
            "last check; they were treated as the worst member",
            NonFiniteLossWarning,
            stacklevel=3,
        )
    if identical:
        warnings.warn(
            f"in {identical} step(s) since the last check every member returned the same loss: "
            "does the closure evaluate the population (population.forward(model, x))?",
            IdenticalLossesWarning,
            stacklevel=3,
        )
    if withheld:
        warnings.warn(
            f"{withheld} step(s) since the last check withheld their update (a non-finite "
            "direction or a float16 overflow); the parameters were left unchanged by them",
            RuntimeWarning,
            stacklevel=3,
        )


def _noise_batches(plan: Plan, entries: list[PerturbedParam]) -> dict[int, NoiseBatch]:
    """Where each owned parameter's noise lives in its buffer's dense region or low-rank bucket,
    with the sigmas of ``entries``, so that a population gathers each region once."""
    batches: dict[int, NoiseBatch] = {}
    for b, buffer in enumerate(plan.buffers):
        owned = plan.entry_owned[b]
        if buffer.dense is not None:
            sigma = torch.zeros(buffer.dense.shape[1], dtype=torch.float64)
            for e, (start, numel) in buffer.dense_columns.items():
                sigma[start : start + numel] = entries[owned[e]].sigma
            scale = sigma.to(buffer.device, buffer.dtype)
            for e, (start, _) in buffer.dense_columns.items():
                batches[id(entries[owned[e]].param)] = NoiseBatch(buffer.dense, scale, start)
        for bucket in buffer.buckets:
            params = [entries[owned[e]] for e in bucket.entries]
            scale = torch.tensor(
                [p.sigma * p.noise.factor_scale for p in params], dtype=torch.float64
            ).to(buffer.device, buffer.dtype)
            scale = scale.view(-1, 1, 1, 1)
            for row, p in enumerate(params):
                batches[id(p.param)] = NoiseBatch(bucket.a, scale, row, bucket.b)
    return batches
