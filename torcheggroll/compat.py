"""The original torcheggroll API, built on :class:`~torcheggroll.EggrollOptimizer`.

:class:`TorchEggrollES` and the utility functions keep the names, signatures, defaults and
shapes of the original ``torcheggroll`` package, so code written for it runs unchanged. Noise,
fitness shaping and updates are those of :mod:`torcheggroll.noise`, :mod:`torcheggroll.shaping`
and :class:`~torcheggroll.EggrollOptimizer`; this module only translates between the two APIs.

The original's update rule is reproduced exactly (up to floating-point rounding): with noise
``eps_i = sigma * sign_i * E_i`` that already contains ``sigma`` and fitnesses ``f_i`` z-scored
into ``z_i``, ``grad = mean_i(z_i * eps_i) * sqrt(N)`` and ``theta += lr * grad``. This equals
the optimizer's ``theta -= lr * sigma / sqrt(N) * sum_i s_i * sign_i * E_i`` with
``s_i = zscore(-f_i) = -z_i``, so the original's ``lr`` and ``sigma`` transfer as they are.
The deliberate differences from the original are listed in ``docs/compat.md``.
"""

from __future__ import annotations

import copy
import math
import numbers
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ._checks import check_hyper as _check_hyper
from ._checks import check_population as _check_population
from .noise import compute_dtype, draw_noise, effective_rank, member_pairs, member_signs, num_draws
from .optimizer import EggrollOptimizer
from .population import Population
from .shaping import centered, zscore

__all__ = [
    "TorchEggrollES",
    "compute_es_gradient",
    "generate_lora_noise",
    "generate_noise_for_shapes",
    "generate_standard_noise",
]

ParamFilter = Callable[[nn.Parameter, str], bool]


# ---------------------------------------------------------------------- utilities
def _as_int(value: Any, what: str) -> int:
    if isinstance(value, bool):
        raise ValueError(f"Invalid {what}: {value!r} (expected an int)")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"Invalid {what}: {value!r} (expected an int)") from None


def _check_sigma(sigma: Any) -> float:
    # numbers.Real: Python and NumPy scalars alike (np.float32 is not a float).
    if (
        isinstance(sigma, bool)
        or not isinstance(sigma, numbers.Real)
        or not math.isfinite(float(sigma))
        or not float(sigma) > 0.0
    ):
        raise ValueError(f"Invalid sigma: {sigma!r} (expected a finite float > 0)")
    return float(sigma)


def _check_floating(dtype: Any, what: str) -> None:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"Invalid {what}: {dtype!r} (noise needs a floating-point dtype)")


def _check_rank(rank: Any) -> int:
    r = _as_int(rank, "rank")
    if r < 0:
        raise ValueError(f"Invalid rank: {rank}")
    return r


def generate_lora_noise(
    param: Tensor, rank: int, sigma: float, seed: int, device: torch.device | str
) -> Tensor:
    """Low-rank noise ``sigma * A @ B.T / sqrt(rank)`` for one matrix parameter.

    Args:
        param: the parameter, ``(m, n)``; a tensor of more dimensions is viewed as the matrix
            ``(shape[0], prod(shape[1:]))``, as :class:`~torcheggroll.EggrollOptimizer` does.
        rank: number of factors (``>= 1``); ``A`` is ``(m, rank)``, ``B`` is ``(n, rank)``,
            entries iid N(0, 1), so every entry of the noise has variance ``sigma**2``.
        sigma: the noise scale.
        seed: any int; the noise is a pure function of ``(seed, shape, rank)`` and does not touch
            the global RNG.
        device: where to create the noise.

    Returns:
        A tensor shaped and typed like ``param``, on ``device``.
    """
    if param.dim() < 2:
        raise ValueError(
            f"Invalid param: low-rank noise needs a tensor of 2 or more dimensions, got shape "
            f"{tuple(param.shape)} (use generate_standard_noise)"
        )
    r = _check_rank(rank)
    if r == 0:
        raise ValueError(f"Invalid rank: {rank} (low-rank noise needs rank >= 1)")
    _check_floating(param.dtype, "param dtype")
    return _single_draw(param, r, sigma, seed, device)


def _single_draw(
    param: Tensor, rank: int, sigma: float, seed: int, device: torch.device | str
) -> Tensor:
    """``sigma`` times one unit-variance draw of rank ``rank`` (0: dense) shaped like ``param``."""
    s = _check_sigma(sigma)
    noise = draw_noise(
        param.shape,
        rank,
        1,
        seed=_as_int(seed, "seed"),
        generation=0,
        param_index=0,
        device=device,
        dtype=compute_dtype(param.dtype),
    )
    return (noise.materialize()[0] * s).to(param.dtype)


def generate_standard_noise(
    param: Tensor, sigma: float, seed: int, device: torch.device | str
) -> Tensor:
    """Dense Gaussian noise ``sigma * eps`` shaped and typed like ``param``, on ``device``.

    ``eps`` has iid N(0, 1) entries and is a pure function of ``(seed, shape)``; the global RNG
    is neither read nor advanced.
    """
    return _single_draw(param, 0, sigma, seed, device)


def _members_in_halves(n: int, antithetic: bool, device: torch.device | str) -> Tensor:
    """The optimizer's member index of each row of the original's layout.

    The optimizer interleaves antithetic pairs (members ``2k``, ``2k + 1``); the original puts
    every ``+`` member first: row ``i < n/2`` is member ``2i``, row ``n/2 + i`` member ``2i + 1``.
    Without antithetic pairs the orders agree.
    """
    if not antithetic:
        return torch.arange(n, device=device)
    return torch.cat([torch.arange(0, n, 2, device=device), torch.arange(1, n, 2, device=device)])


def generate_noise_for_shapes(
    shapes: Mapping[str, Sequence[int]],
    ranks: Mapping[str, int | None],
    pop_size: int,
    sigma: float,
    epoch: int,
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
    antithetic: bool = True,
    *,
    seed: int = 0,
) -> dict[str, Tensor]:
    """The noise of a whole population for tensors given by their shapes.

    Tensor ``j`` (in the order of ``shapes``) of member ``i`` gets ``sigma * sign_i * E``, where
    ``E`` is a draw ``(seed, epoch, j, k)`` of :func:`torcheggroll.noise.draw_noise`: low rank
    ``A @ B.T / sqrt(rank)`` when ``ranks[name]`` is a positive int and the tensor has 2 or more
    dimensions, dense N(0, 1) otherwise (``None``, ``0`` or a missing name). With
    ``antithetic=True`` the layout is the original's halves: member ``i < N/2`` gets draw ``i``
    with sign ``+`` and member ``N/2 + i`` the same draw with sign ``-``, so
    ``noise[:N/2] == -noise[N/2:]``. Otherwise member ``i`` has draw ``i`` and sign ``+``.

    The result is a pure function of the arguments: the global RNG is neither read nor advanced,
    and another ``epoch`` (or ``seed``) gives other noise. For the same ``seed``, ``epoch``,
    parameter order, ranks, ``pop_size``, ``sigma`` and ``antithetic``, it holds exactly the
    noise a :class:`TorchEggrollES` with that ``seed`` applies in generation ``epoch``, with its
    members in another order when ``antithetic=True``: the optimizer interleaves pairs (members
    ``2k`` and ``2k + 1`` share draw ``k``), so row ``i < N/2`` of the result is the optimizer's
    member ``2i`` and row ``N/2 + i`` its member ``2i + 1``. Without ``antithetic`` the orders
    agree. Fitnesses in the optimizer's member order ``f`` match these rows as
    ``torch.cat([f[0::2], f[1::2]])``.

    Args:
        shapes: name -> shape.
        ranks: name -> noise rank (``None`` for dense noise).
        pop_size: population size ``N``; even when ``antithetic``.
        sigma: the noise scale (included in the returned noise).
        epoch: the generation the noise belongs to.
        device: where to return the noise.
        dtype: the dtype to return it in (it is drawn in float32, or float64 when ``dtype`` is
            float64).
        antithetic: mirrored pairs in halves (``noise[:N/2] == -noise[N/2:]``).
        seed: the noise seed (keyword-only; the original had none).

    Returns:
        name -> ``(pop_size, *shape)`` noise.
    """
    n = _as_int(pop_size, "pop_size")
    if not isinstance(antithetic, bool):
        raise ValueError(f"Invalid antithetic: {antithetic!r} (expected a bool)")
    if n < 1:
        raise ValueError(f"Invalid pop_size: {pop_size} (expected an int >= 1)")
    if antithetic and n % 2:
        raise ValueError(f"Invalid pop_size: {pop_size} (must be even with antithetic=True)")
    s = _check_sigma(sigma)
    gen = _as_int(epoch, "epoch")
    seed_ = _as_int(seed, "seed")
    _check_floating(dtype, "dtype")
    checked: list[tuple[str, torch.Size, int]] = []
    for name, shape in shapes.items():
        rank = ranks.get(name)
        size = torch.Size(shape)
        if any(d < 0 for d in size):
            raise ValueError(f"Invalid shapes[{name!r}]: {tuple(shape)} (negative dimension)")
        checked.append((name, size, 0 if rank is None else effective_rank(size, _check_rank(rank))))
    draws = num_draws(n, antithetic)
    members = _members_in_halves(n, antithetic, device)
    noise_dtype = compute_dtype(dtype)
    out: dict[str, Tensor] = {}
    for index, (name, shape, rank) in enumerate(checked):
        noise = draw_noise(
            shape,
            rank,
            draws,
            seed=seed_,
            generation=gen,
            param_index=index,
            device=device,
            dtype=noise_dtype,
        )
        coeffs = s * member_signs(members, antithetic, noise_dtype)
        out[name] = noise.select(member_pairs(members, antithetic)).materialize(coeffs).to(dtype)
    return out


def compute_es_gradient(
    noise: Mapping[str, Tensor], rewards: Tensor | Sequence[float], normalize_fitness: bool = True
) -> dict[str, Tensor]:
    """The original torcheggroll's ES gradient: ``mean_i(z_i * noise_i) * sqrt(N)``.

    ``z`` is ``rewards`` z-scored with the unbiased std (only mean-centred when that std is
    ``<= 1e-8``, or always when ``normalize_fitness=False``). ``noise`` is expected to contain
    ``sigma`` (as :func:`generate_noise_for_shapes` returns it), so ``theta += lr * grad``
    ascends the fitness. Rewards are not cleaned: a NaN reward makes the gradient NaN.

    Args:
        noise: name -> ``(N, *shape)`` noise of every member.
        rewards: ``(N,)`` fitness per member, higher is better.
        normalize_fitness: z-score (True) or only mean-centre (False) the rewards.

    Returns:
        name -> ``(*shape)`` gradient, in the dtype of that noise.
    """
    if not isinstance(normalize_fitness, bool):
        raise ValueError(f"Invalid normalize_fitness: {normalize_fitness!r} (expected a bool)")
    r = rewards if isinstance(rewards, Tensor) else torch.as_tensor(rewards, dtype=torch.float64)
    r = r.detach()
    if r.dim() != 1 or r.shape[0] == 0:
        raise ValueError(
            f"Invalid rewards: expected a non-empty 1-D tensor, got shape {tuple(r.shape)}"
        )
    if r.dtype == torch.bool or r.is_complex():
        raise ValueError(f"Invalid rewards: expected real numbers, got dtype {r.dtype}")
    if not r.is_floating_point():
        r = r.to(torch.float32)
    n = r.shape[0]
    for name, t in noise.items():
        if t.dim() < 1 or t.shape[0] != n:
            raise ValueError(
                f"Invalid noise[{name!r}]: expected a leading dimension of {n} (one per reward), "
                f"got shape {tuple(t.shape)}"
            )
    z = zscore(r) if normalize_fitness else centered(r)
    scale = math.sqrt(n) / n  # mean over members, then the original's sqrt(N)
    return {
        name: torch.tensordot(z.to(t.device, t.dtype), t, dims=1) * scale
        for name, t in noise.items()
    }


# ---------------------------------------------------------------------- TorchEggrollES
@dataclass
class _Prepared:
    generation: int
    population: Population
    stacked: dict[str, Tensor]


def _select_parameters(model: nn.Module, param_filter: ParamFilter | None) -> list[str]:
    names = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if param_filter is not None and not param_filter(p, name):
            continue
        names.append(name)
    return names


def _per_member(values: Any, size: int, what: str) -> Tensor:
    t = values.detach() if isinstance(values, Tensor) else torch.as_tensor(values)
    if t.numel() != size or sum(d != 1 for d in t.shape) > 1:  # (N,), (N, 1), (1, N): not (2, 2)
        raise ValueError(
            f"Invalid {what}: expected {size} values (one per population member), got shape "
            f"{tuple(t.shape)}"
        )
    if t.dtype == torch.bool or t.is_complex():
        raise ValueError(f"Invalid {what}: expected real numbers, got dtype {t.dtype}")
    if not isinstance(values, Tensor):
        t = t.to(torch.float64)  # Python floats are doubles: keep them exact
    t = t.reshape(size)
    return t if t.is_floating_point() else t.to(torch.float32)


class TorchEggrollES:
    r"""Evolution strategies with low-rank noise: the original torcheggroll trainer.

    Evolves the parameters of ``model`` (those with ``requires_grad`` that ``param_filter``
    accepts) with an :class:`~torcheggroll.EggrollOptimizer` over them. Each generation, member
    ``i`` of ``N = pop_size`` evaluates ``theta + sigma * sign_i * E_{k(i)}`` (low-rank
    ``E = A B^T / sqrt(rank)`` for matrices, dense Gaussian noise otherwise; antithetic pairs
    ``(2k, 2k+1)`` share a draw with opposite signs). Given fitnesses ``f`` (higher is better),

    .. math::
        z = \mathrm{zscore}(f), \qquad
        \theta \leftarrow \theta + \mathrm{lr}\, \sqrt{N}\, \frac1N \sum_i z_i\, \epsilon_i,
        \qquad \epsilon_i = \sigma\, \mathrm{sign}_i E_{k(i)},

    the original's rule (``normalize_fitness=False`` only mean-centres ``f``; a constant
    population is mean-centred too). Noise is a pure function of ``(seed, generation,
    parameter index)``; the global RNG is never read or reseeded, and :meth:`state_dict`
    captures everything needed to resume bit-identically.

    Args:
        model: the module to optimize.
        pop_size: population size per step (default: 32); even when ``antithetic``.
        sigma: noise scale (default: 0.02).
        lr: learning rate (default: 0.05).
        rank: rank of the noise of matrix parameters (default: 4); 0 gives dense noise.
        device: where to run; inferred from the model when None (else the model is moved there).
        param_filter: ``(param, name) -> bool`` choosing which parameters evolve.
        normalize_fitness: z-score the fitnesses (True) or only mean-centre them.
        antithetic: mirrored sampling.
        seed: keyword-only, the noise seed; None takes ``torch.initial_seed()``.

    Attributes:
        model: the module being optimized.
        device: the device it runs on.
        param_names: the names of the evolved parameters, in noise order.
        optimizer: the underlying :class:`~torcheggroll.EggrollOptimizer`; its
            ``param_groups`` hold the hyperparameters, so LR schedulers can drive it.

    ``pop_size``, ``sigma``, ``lr``, ``rank``, ``normalize_fitness`` and ``antithetic`` can be
    read and assigned (assignments are checked); ``epoch`` and ``seed`` are read-only.

    Example:
        >>> model = nn.Linear(10, 5)
        >>> es = TorchEggrollES(model, pop_size=32, sigma=0.1, lr=0.1)
        >>> x, y = torch.randn(64, 10), torch.randn(64, 5)
        >>> mean_fitness = es.step(x, lambda out, t: ((out - t) ** 2).mean(), y)
    """

    def __init__(
        self,
        model: nn.Module,
        pop_size: int = 32,
        sigma: float = 0.02,
        lr: float = 0.05,
        rank: int = 4,
        device: torch.device | str | None = None,
        param_filter: ParamFilter | None = None,
        normalize_fitness: bool = True,
        antithetic: bool = True,
        *,
        seed: int | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"Invalid model: expected an nn.Module, got {type(model).__name__}")
        _check_hyper(lr=lr, sigma=sigma, rank=rank, weight_decay=0.0, shaping="zscore")
        _check_population(pop_size, antithetic)
        if not isinstance(normalize_fitness, bool):
            raise ValueError(f"Invalid normalize_fitness: {normalize_fitness!r} (expected a bool)")
        if param_filter is not None and not callable(param_filter):
            raise TypeError(f"Invalid param_filter: {param_filter!r} (expected a callable)")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or seed < 0):
            raise ValueError(f"Invalid seed: {seed!r} (expected a non-negative int or None)")
        names = _select_parameters(model, param_filter)
        if not names:
            raise ValueError(
                "Invalid model: no parameters selected for ES (check param_filter "
                "and requires_grad)"
            )
        if device is None:
            first = next(iter(model.parameters()), None)
            device = first.device if first is not None else torch.device("cpu")
        self.device = torch.device(device)
        self.model = model.to(self.device)
        named = dict(model.named_parameters())
        self.param_names: list[str] = names
        self.optimizer = EggrollOptimizer(
            [(name, named[name]) for name in names],
            lr=lr,
            sigma=sigma,
            rank=rank,
            pop_size=pop_size,
            antithetic=antithetic,
            seed=seed,
            shaping="zscore" if normalize_fitness else "centered",
            maximize=True,
        )
        self._prepared: _Prepared | None = None

    # ------------------------------------------------------------------ hyperparameters
    def _group(self) -> dict[str, Any]:
        return self.optimizer.param_groups[0]

    def _set(self, key: str, value: Any) -> None:
        for group in self.optimizer.param_groups:
            group[key] = value
        self._prepared = None

    @property
    def pop_size(self) -> int:
        return int(self._group()["pop_size"])

    @pop_size.setter
    def pop_size(self, value: int) -> None:
        _check_population(value, self.antithetic)
        self._set("pop_size", value)

    @property
    def antithetic(self) -> bool:
        return bool(self._group()["antithetic"])

    @antithetic.setter
    def antithetic(self, value: bool) -> None:
        _check_population(self.pop_size, value)
        self._set("antithetic", value)

    @property
    def sigma(self) -> float:
        return float(self._group()["sigma"])

    @sigma.setter
    def sigma(self, value: float) -> None:
        _check_hyper(lr=self.lr, sigma=value, rank=self.rank, weight_decay=0.0, shaping="zscore")
        self._set("sigma", value)

    @property
    def lr(self) -> float:
        return float(self._group()["lr"])

    @lr.setter
    def lr(self, value: float) -> None:
        _check_hyper(lr=value, sigma=self.sigma, rank=self.rank, weight_decay=0.0, shaping="zscore")
        self._set("lr", value)

    @property
    def rank(self) -> int:
        return int(self._group()["rank"])

    @rank.setter
    def rank(self, value: int) -> None:
        _check_hyper(lr=self.lr, sigma=self.sigma, rank=value, weight_decay=0.0, shaping="zscore")
        self._set("rank", value)

    @property
    def normalize_fitness(self) -> bool:
        return self._group()["shaping"] == "zscore"

    @normalize_fitness.setter
    def normalize_fitness(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise ValueError(f"Invalid normalize_fitness: {value!r} (expected a bool)")
        self._set("shaping", "zscore" if value else "centered")

    @property
    def epoch(self) -> int:
        """How many generations have been applied (the optimizer's ``generation``)."""
        return self.optimizer.generation

    @property
    def seed(self) -> int:
        """The noise seed."""
        return self.optimizer.seed

    def __repr__(self) -> str:
        return (
            f"TorchEggrollES(pop_size={self.pop_size}, sigma={self.sigma}, lr={self.lr}, "
            f"rank={self.rank}, normalize_fitness={self.normalize_fitness}, "
            f"antithetic={self.antithetic}, seed={self.seed}, epoch={self.epoch}, "
            f"params={len(self.param_names)})"
        )

    # ------------------------------------------------------------------ vectorized step
    def step(
        self,
        inputs: Any,
        loss_fn: Callable[[Any, Any], Tensor],
        targets: Any,
    ) -> float:
        """Evaluate one population on a batch and update the parameters.

        Every member gets the same ``inputs`` (e.g. ``(batch, ...)``); its outputs get a leading
        ``(pop_size,)`` dimension from a vmapped functional call (the low-rank population
        forward where the layers allow it), and ``loss_fn(outputs, targets)`` is evaluated per
        member under :func:`torch.vmap` and must return a scalar (lower is better). The
        model's train/eval mode is left as it is.

        Returns:
            The mean fitness (mean negated loss) of the population, a Python float.
        """
        if not callable(loss_fn):
            raise TypeError(f"Invalid loss_fn: {loss_fn!r} (expected a callable)")

        def closure(population: Population) -> Tensor:
            outputs = population.forward(self.model, inputs)
            losses = torch.vmap(lambda out: loss_fn(out, targets))(outputs)
            losses = _per_member(losses, len(population), "loss_fn output (a scalar per member)")
            return -losses  # the fitness, which the optimizer maximizes

        self._prepared = None
        return float(self.optimizer.step(closure))

    # ------------------------------------------------------------------ async-friendly API
    def _prepare(self) -> _Prepared:
        population = self.optimizer.population()
        named = dict(self.model.named_parameters())
        with torch.no_grad():
            stacked = {name: population.perturbed(named[name]) for name in self.param_names}
        self._prepared = _Prepared(self.optimizer.generation, population, stacked)
        return self._prepared

    def _current(self) -> _Prepared | None:
        p = self._prepared
        return p if p is not None and p.generation == self.optimizer.generation else None

    def prepare_population(self) -> list[dict[str, Tensor]]:
        """The perturbed parameters of every member of the current generation.

        Returns:
            One dict per member (``pop_size`` of them), evolved parameter name -> tensor of that
            parameter's shape; pass it to :func:`torch.func.functional_call` (parameters not
            listed are taken from the model). The dicts are views of :meth:`get_stacked_params`.

        Nothing advances until :meth:`apply_fitness_scores`: calling this again in the same
        generation returns the same members (recomputed from the current parameters).
        """
        prepared = self._prepare()
        return [
            {name: t[i] for name, t in prepared.stacked.items()}
            for i in range(len(prepared.population))
        ]

    def get_stacked_params(self) -> dict[str, Tensor]:
        """The prepared members' evolved parameters stacked for vmap: name ->
        ``(pop_size, *shape)``.

        Returns the population prepared by :meth:`prepare_population` in this generation
        (row ``i`` is member ``i``), preparing it first if that has not happened yet.
        """
        prepared = self._current() or self._prepare()
        return dict(prepared.stacked)

    def apply_fitness_scores(self, fitnesses: Tensor | Sequence[float]) -> float:
        """Update the parameters from the prepared members' fitnesses and advance the generation.

        Args:
            fitnesses: ``(pop_size,)`` fitness of each member in the order of
                :meth:`prepare_population` (higher is better): a tensor on any device, or a
                list of floats. Non-finite fitnesses count as the worst member (with a
                :class:`~torcheggroll.NonFiniteLossWarning`).

        Returns:
            The mean of ``fitnesses``, a Python float.

        Raises:
            RuntimeError: if no population of the current generation was prepared (each
                prepared population can be applied once).
            ValueError: if there is not one fitness per member.
        """
        prepared = self._current()
        if prepared is None:
            raise RuntimeError(
                "apply_fitness_scores() needs the population of the current generation: call "
                "prepare_population() or get_stacked_params() first, and score its members"
            )
        f = _per_member(fitnesses, len(prepared.population), "fitnesses")
        mean_fitness = self.optimizer.step(lambda population: f)
        self._prepared = None
        return float(mean_fitness)

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: hyperparameters, seed, generation and evolved parameters.

        Returns:
            ``{"optimizer": EggrollOptimizer.state_dict() (hyperparameters in its
            param_groups, seed and generation as Python ints), "params": name -> a copy of each
            evolved parameter}``; loadable with ``torch.load(..., weights_only=True)``.
        """
        named = dict(self.model.named_parameters())
        return {
            # A copy: the optimizer's own state_dict shares its live state dicts.
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),
            "params": {name: named[name].detach().clone() for name in self.param_names},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore hyperparameters, seed, generation and the evolved parameters' values.

        A run resumed this way continues bit-identically to one that never stopped.
        """
        if not isinstance(state, Mapping) or "optimizer" not in state or "params" not in state:
            raise ValueError("Invalid state: expected a dict from TorchEggrollES.state_dict()")
        params = state["params"]
        named = dict(self.model.named_parameters())
        if set(params) != set(self.param_names):
            raise ValueError(
                f"Invalid state: it holds parameters {sorted(params)}, this TorchEggrollES "
                f"evolves {sorted(self.param_names)}"
            )
        for name in self.param_names:
            value = params[name]
            if not isinstance(value, torch.Tensor) or not value.is_floating_point():
                raise ValueError(
                    f"Invalid state: parameter {name!r} is a {type(value).__name__}"
                    f"{f' of dtype {value.dtype}' if isinstance(value, torch.Tensor) else ''}, "
                    "expected a floating-point tensor"
                )
            if tuple(value.shape) != tuple(named[name].shape):
                raise ValueError(
                    f"Invalid state: parameter {name!r} has shape {tuple(value.shape)}, "
                    f"expected {tuple(named[name].shape)}"
                )
        # The optimizer's state is checked before it is loaded; the values are copied after, so
        # that a refused optimizer state leaves the parameters as they were.
        with torch.no_grad():
            before = {name: named[name].detach().clone() for name in self.param_names}
            try:
                for name in self.param_names:
                    named[name].copy_(params[name])
                self.optimizer.load_state_dict(dict(state["optimizer"]))
            except Exception:
                for name in self.param_names:
                    named[name].copy_(before[name])
                raise
        self._prepared = None
