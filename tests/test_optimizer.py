"""EggrollOptimizer against the torch.optim contract and the ES update rule.

Shaped like torch's own optimizer tests: a table of ``(kwargs, description)`` configurations
and a table of ``(bad kwargs, error regex)`` run through generic tests, then one test per
behaviour that the tables cannot express.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import inspect
import io
import math
import pickle
import re
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from _devices import CPU_AND_CUDA
from torch import nn
from torch.optim.lr_scheduler import CosineAnnealingLR, LambdaLR, ReduceLROnPlateau, StepLR

from torcheggroll import EggrollOptimizer, NonFiniteLossWarning

# The low-rank population forward is the default path when torcheggroll/lowrank.py exists.
FORWARD_PATH = "auto" if importlib.util.find_spec("torcheggroll.lowrank") else "materialized"

# --------------------------------------------------------------------------- the tables
CONFIGS: list[tuple[dict[str, Any], str]] = [
    ({}, "defaults"),
    ({"rank": 1, "lr": 0.1}, "rank 1"),
    ({"rank": 0}, "dense noise everywhere"),
    ({"antithetic": False, "pop_size": 15}, "no mirroring, odd population"),
    ({"shaping": "centered_rank", "lr": 0.1}, "centered ranks"),
    ({"shaping": "centered", "lr": 1.0}, "centred losses (normalize_fitness=False)"),
    ({"shaping": "raw", "lr": 0.5}, "raw losses"),
    ({"weight_decay": 0.01}, "weight decay"),
    ({"maximize": True}, "maximize a fitness"),
    ({"lr": torch.tensor(0.0625)}, "0-d tensor lr"),
]
CONFIG_IDS = [d for _, d in CONFIGS]

BAD_KWARGS: list[tuple[dict[str, Any], type[Exception], str]] = [
    ({"lr": -0.1}, ValueError, "Invalid learning rate: -0.1"),
    ({"lr": float("nan")}, ValueError, "Invalid learning rate: nan"),
    ({"lr": torch.tensor([0.1, 0.2])}, ValueError, "Invalid lr: a tensor lr must have one"),
    ({"sigma": 0.0}, ValueError, "Invalid sigma: 0.0"),
    ({"sigma": -0.5}, ValueError, "Invalid sigma: -0.5"),
    ({"sigma": float("inf")}, ValueError, "Invalid sigma: inf"),
    ({"sigma": float("nan")}, ValueError, "Invalid sigma: nan"),
    (
        {"sigma": "0.1"},
        ValueError,
        r"Invalid sigma: '0.1' \(expected a finite float > 0, got str\)",
    ),
    (
        {"lr": "0.1"},
        ValueError,
        r"Invalid learning rate: '0.1' \(expected a finite float >= 0, got str\)",
    ),
    ({"rank": -1}, ValueError, "Invalid rank: -1"),
    ({"rank": 2.0}, ValueError, r"Invalid rank: 2.0 \(expected an int >= 0, got float\)"),
    ({"pop_size": 1}, ValueError, "Invalid pop_size: 1"),
    ({"pop_size": 0, "antithetic": False}, ValueError, "Invalid pop_size: 0"),
    ({"pop_size": 7}, ValueError, r"Invalid pop_size: 7 \(must be even"),
    ({"pop_size": 8.0}, ValueError, "Invalid pop_size: 8.0"),
    ({"antithetic": 1}, ValueError, "Invalid antithetic: 1"),
    ({"weight_decay": -0.1}, ValueError, "Invalid weight_decay value: -0.1"),
    ({"shaping": "ranks"}, ValueError, "Invalid shaping: 'ranks'"),
    ({"maximize": 1}, ValueError, "Invalid maximize: 1"),
    ({"sigma_scaling": "muP"}, ValueError, "Invalid sigma_scaling: 'muP'"),
    ({"seed": -1}, ValueError, "Invalid seed: -1"),
    ({"seed": 1.5}, ValueError, "Invalid seed: 1.5"),
]
# Settings that live in param_groups and are re-checked at every step.
GROUP_KEYS = ("lr", "sigma", "rank", "weight_decay", "shaping", "maximize", "sigma_scaling")
BAD_GROUP = [case for case in BAD_KWARGS if "seed" not in case[0]]  # seed is optimizer-wide
BAD_STEP = [case for case in BAD_KWARGS if next(iter(case[0])) in GROUP_KEYS]


def _bad_ids(cases: list[tuple[dict[str, Any], type[Exception], str]]) -> list[str]:
    return [", ".join(f"{k}={v!r}" for k, v in kw.items()) for kw, _, _ in cases]


# --------------------------------------------------------------------------- helpers
def _fresh(kwargs: dict[str, Any]) -> dict[str, Any]:
    return copy.deepcopy(kwargs)  # a tensor lr must not be shared between optimizers


def make_model(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 2)).to(dtype)


def make_data(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(42)
    x = torch.randn(32, 5, generator=g)
    y = torch.tanh(x @ torch.randn(5, 2, generator=g)) + 0.05 * torch.randn(32, 2, generator=g)
    return x.to(dtype), y.to(dtype)


def pop_closure(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, sign: float = 1.0, path: str = FORWARD_PATH
) -> Callable[[Any], torch.Tensor]:
    def closure(population: Any) -> torch.Tensor:
        out = population.forward(model, x, path=path)  # (N, batch, 2)
        return sign * (out - y).pow(2).mean(dim=(1, 2))

    return closure


def seq_closure(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, sign: float = 1.0
) -> Callable[[], torch.Tensor]:
    return lambda: sign * (model(x) - y).pow(2).mean()


def sign_of(kwargs: dict[str, Any]) -> float:
    return -1.0 if kwargs.get("maximize") else 1.0


def model_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x) - y).pow(2).mean())


def params_of(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def assert_bitwise(xs: list[torch.Tensor], ys: list[torch.Tensor]) -> None:
    assert len(xs) == len(ys)
    for a, b in zip(xs, ys, strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)


def twin_grads(
    model: nn.Module, opt: EggrollOptimizer, make: Callable[[nn.Module], Callable[..., Any]]
) -> list[torch.Tensor]:
    """The ES directions ``g`` the next step of ``opt`` will use, from an independent copy."""
    m2, o2 = copy.deepcopy((model, opt))
    for p in m2.parameters():
        p.grad = None
    o2.compute_grad(make(m2))
    return [p.grad for p in m2.parameters()]


# --------------------------------------------------------------------------- generic suite
@pytest.mark.parametrize(("kwargs", "desc"), CONFIGS, ids=CONFIG_IDS)
def test_loss_goes_down(kwargs, desc):
    model, (x, y) = make_model(), make_data()
    opt = EggrollOptimizer(model.parameters(), **_fresh({"sigma": 0.05, **kwargs}), seed=1)
    closure = pop_closure(model, x, y, sign_of(kwargs))
    start = model_loss(model, x, y)
    for _ in range(40):
        opt.step(closure)
    assert opt.generation == 40
    assert model_loss(model, x, y) < 0.8 * start, desc


@pytest.mark.parametrize(("kwargs", "desc"), CONFIGS, ids=CONFIG_IDS)
def test_state_dict_lockstep(kwargs, desc):
    seed = 2**40 + 1  # more than float32 (or a cast int64 tensor) could carry exactly
    model, (x, y) = make_model(), make_data()
    opt = EggrollOptimizer(model.parameters(), **_fresh(kwargs), seed=seed)
    closure = pop_closure(model, x, y, sign_of(kwargs))
    for _ in range(3):
        opt.step(closure)

    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    torch.manual_seed(12345)  # disturb the global RNG between saving and loading
    torch.rand(100)
    ckpt = torch.load(buf, map_location="cpu", weights_only=True)
    state = ckpt["opt"]["state"][0]
    assert type(state["seed"]) is int and state["seed"] == seed
    assert type(state["generation"]) is int and state["generation"] == 3

    model2 = make_model(seed=99)
    model2.load_state_dict(ckpt["model"])
    opt2 = EggrollOptimizer(model2.parameters(), **_fresh(kwargs), seed=7)
    opt2.load_state_dict(ckpt["opt"])
    assert (opt2.seed, opt2.generation) == (seed, 3)
    assert type(opt2.seed) is int and type(opt2.generation) is int
    closure2 = pop_closure(model2, x, y, sign_of(kwargs))
    for _ in range(3):
        torch.rand(7)  # ... and between steps
        assert torch.equal(opt.step(closure), opt2.step(closure2))
        assert torch.equal(opt.last_losses, opt2.last_losses)
    assert_bitwise(params_of(model), params_of(model2))
    assert opt.state_dict()["state"] == opt2.state_dict()["state"]


@pytest.mark.parametrize(("kwargs", "desc"), CONFIGS, ids=CONFIG_IDS)
def test_deepcopy_and_pickle_continue_identically(kwargs, desc):
    model, (x, y) = make_model(), make_data()
    opt = EggrollOptimizer(model.parameters(), **_fresh(kwargs), seed=3)
    opt.step(pop_closure(model, x, y, sign_of(kwargs)))
    copies = [copy.deepcopy((model, opt)), pickle.loads(pickle.dumps((model, opt)))]
    opt.step(pop_closure(model, x, y, sign_of(kwargs)))
    for m2, o2 in copies:
        assert o2.param_groups[0]["params"][0] is next(m2.parameters())
        assert (o2.seed, o2.generation) == (3, 1)
        o2.step(pop_closure(m2, x, y, sign_of(kwargs)))
        assert_bitwise(params_of(model), params_of(m2))
        assert o2.generation == opt.generation == 2


@pytest.mark.parametrize(("kwargs", "desc"), CONFIGS, ids=CONFIG_IDS)
def test_sequential_closure_matches_population_closure(kwargs, desc):
    # float64 so that the only difference, model(x) vs the vmapped functional call, stays at
    # rounding level (~1e-16 relative) and cannot reorder members for centered_rank.
    dt = torch.float64
    (x, y), sign = make_data(dt), sign_of(kwargs)
    m_pop, m_seq = make_model(dtype=dt), make_model(dtype=dt)
    o_pop = EggrollOptimizer(m_pop.parameters(), **_fresh(kwargs), seed=5)
    o_seq = EggrollOptimizer(m_seq.parameters(), **_fresh(kwargs), seed=5)
    for _ in range(2):
        l_pop = o_pop.step(pop_closure(m_pop, x, y, sign, path="materialized"))
        l_seq = o_seq.step(seq_closure(m_seq, x, y, sign))
        torch.testing.assert_close(o_seq.last_losses, o_pop.last_losses, rtol=1e-12, atol=0)
        torch.testing.assert_close(l_seq, l_pop, rtol=1e-12, atol=0)
        for p, q in zip(m_seq.parameters(), m_pop.parameters(), strict=True):
            torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(("kwargs", "desc"), CONFIGS, ids=CONFIG_IDS)
def test_compute_grad_then_sgd_is_the_eggroll_step(kwargs, desc):
    # compute_grad writes the exact g that step applies as p.add(g, alpha=-lr), the operation
    # torch.optim.SGD (no momentum) performs, so the two paths agree bit for bit.
    (x, y), sign = make_data(), sign_of(kwargs)
    m1, m2 = make_model(), make_model()
    es = EggrollOptimizer(m1.parameters(), **_fresh(kwargs), seed=9)
    est = EggrollOptimizer(m2.parameters(), **_fresh(kwargs), seed=9)
    sgd = torch.optim.SGD(m2.parameters(), lr=est.param_groups[0]["lr"])
    for _ in range(3):
        es.step(pop_closure(m1, x, y, sign))
        sgd.zero_grad()
        est.compute_grad(pop_closure(m2, x, y, sign))
        sgd.step()
        assert_bitwise(params_of(m1), params_of(m2))
    assert est.generation == 3


@pytest.mark.parametrize(("kwargs", "desc"), CONFIGS, ids=CONFIG_IDS)
def test_repr_lists_every_group_setting(kwargs, desc):
    model = make_model()
    opt = EggrollOptimizer(model.parameters(), **_fresh(kwargs))
    text = repr(opt)
    assert text.startswith("EggrollOptimizer (") and "Parameter Group 0" in text
    for key in ("lr", "sigma", "rank", "pop_size", "antithetic", "shaping", "maximize"):
        assert re.search(rf"^\s+{key}: ", text, re.MULTILINE), key


# --------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize(("bad", "exc", "regex"), BAD_KWARGS, ids=_bad_ids(BAD_KWARGS))
def test_bad_constructor_arguments(bad, exc, regex):
    with pytest.raises(exc, match=regex):
        EggrollOptimizer(make_model().parameters(), **bad)


@pytest.mark.parametrize(("bad", "exc", "regex"), BAD_GROUP, ids=_bad_ids(BAD_GROUP))
def test_bad_param_group_changes_nothing(bad, exc, regex):
    model = make_model()
    extra = nn.Linear(3, 3)
    opt = EggrollOptimizer(list(model.parameters()), seed=0)
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(exc, match=regex):
        opt.add_param_group({"params": list(extra.parameters()), **bad})
    assert len(opt.param_groups) == 1
    assert opt.state_dict() == before


@pytest.mark.parametrize(("bad", "exc", "regex"), BAD_STEP, ids=_bad_ids(BAD_STEP))
def test_bad_group_setting_at_step_changes_nothing(bad, exc, regex):
    (key, value), *_ = bad.items()
    model, (x, y) = make_model(), make_data()
    opt = EggrollOptimizer(model.parameters(), seed=0)
    opt.step(pop_closure(model, x, y))
    before = params_of(model)
    opt.param_groups[0][key] = value
    with pytest.raises(exc, match=regex):
        opt.step(pop_closure(model, x, y))
    assert opt.generation == 1
    assert_bitwise(params_of(model), before)


def test_non_floating_parameters_are_rejected():
    with pytest.raises(TypeError, match=r"Invalid parameter dtype: torch\.int64"):
        EggrollOptimizer([torch.zeros(3, dtype=torch.long)])
    opt = EggrollOptimizer([torch.zeros(3)])
    with pytest.raises(TypeError, match=r"Invalid parameter dtype: torch\.complex64"):
        opt.add_param_group({"params": [torch.zeros(3, dtype=torch.complex64)]})
    with pytest.raises(TypeError, match=r"Invalid parameter dtype: torch\.int32"):
        opt.add_param_group({"params": [("n", torch.zeros(3, dtype=torch.int32))]})
    assert len(opt.param_groups) == 1


def test_unordered_or_empty_parameter_collections_are_rejected():
    w = torch.zeros(2, 2, requires_grad=True)
    with pytest.raises(TypeError, match="Invalid params: a set"):
        EggrollOptimizer({w})
    opt = EggrollOptimizer([w])
    with pytest.raises(TypeError, match="Invalid params: a set"):
        opt.add_param_group({"params": {torch.zeros(2)}})
    with pytest.raises(ValueError, match="empty parameter list"):
        EggrollOptimizer([])
    with pytest.raises(ValueError, match="Invalid params: EggrollOptimizer got no parameters"):
        EggrollOptimizer([{"params": []}])
    with pytest.raises(ValueError, match="appears more than once"):
        EggrollOptimizer([w, w])
    # An empty first group is allowed as long as some group has parameters.
    later = EggrollOptimizer([{"params": []}, {"params": [w]}], pop_size=4, seed=3)
    later.step(lambda pop: torch.arange(4.0))
    assert later.state[w] == {"seed": 3, "generation": 1, "noise_version": 2}
    with pytest.raises(TypeError, match="Invalid param_group"):
        opt.add_param_group([torch.zeros(2)])  # type: ignore[arg-type]


def test_groups_must_agree_on_population_settings():
    a, b = torch.zeros(3), torch.zeros(3)
    with pytest.raises(ValueError, match=r"Invalid pop_size: 16 \(param groups must share"):
        EggrollOptimizer([{"params": [a]}, {"params": [b], "pop_size": 16}], pop_size=8)
    opt = EggrollOptimizer([a], pop_size=8, seed=0)
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match="Invalid pop_size: 16"):
        opt.add_param_group({"params": [b], "pop_size": 16})
    with pytest.raises(ValueError, match="Invalid antithetic: False"):
        opt.add_param_group({"params": [b], "antithetic": False})
    with pytest.raises(ValueError, match="more than one parameter group"):
        opt.add_param_group({"params": [a]})
    assert opt.state_dict() == before and len(opt.param_groups) == 1


def test_closure_errors_change_nothing():
    model = make_model()
    opt = EggrollOptimizer(model.parameters(), pop_size=8, seed=0)
    before = params_of(model)
    cases: list[tuple[Any, type[Exception], str]] = [
        (lambda pop: torch.zeros(8, 1), ValueError, r"1-D tensor of 8 losses.*\(8, 1\)"),
        (lambda pop: torch.zeros(6), ValueError, r"got shape \(6,\)"),
        (lambda pop: torch.zeros(8, dtype=torch.complex64), ValueError, "expected real numbers"),
        (lambda: torch.zeros(2), ValueError, r"\(zero-argument form\) must return a scalar loss"),
        (lambda pop: None, ValueError, r"closure '.*<lambda>' \(population form\) returned None"),
        (lambda: None, ValueError, r"\(zero-argument form\) returned None for member 0"),
        (lambda pop: "loss", ValueError, r"\(population form\) returned a str"),
        (lambda pop, batch: torch.zeros(8), TypeError, "takes 2 required arguments"),
        (None, TypeError, "Invalid closure: None"),
    ]
    for closure, exc, regex in cases:
        with pytest.raises(exc, match=regex):
            opt.step(closure)
        with pytest.raises(exc, match=regex):
            opt.compute_grad(closure)
        assert opt.generation == 0 and opt.last_losses is None
        assert_bitwise(params_of(model), before)
        assert all(p.grad is None for p in model.parameters())


# --------------------------------------------------------------------------- torch.optim API
def test_add_param_group_accepts_generators_tensors_and_named_pairs():
    a, b, c = nn.Linear(4, 3), nn.Linear(3, 2), torch.zeros(5, requires_grad=True)
    opt = EggrollOptimizer(a.parameters(), rank=2, seed=0)  # a generator
    opt.add_param_group({"params": b.parameters(), "rank": 1, "sigma": 0.1})  # a generator
    opt.add_param_group({"params": c, "lr": 0.0})  # a single tensor
    assert [len(g["params"]) for g in opt.param_groups] == [2, 2, 1]
    assert opt.param_groups[2]["params"][0] is c
    assert opt.param_groups[1]["rank"] == 1 and opt.param_groups[1]["lr"] == opt.defaults["lr"]
    pop = opt.population()
    assert [e.index for e in pop.params] == [0, 1, 2, 3, 4]
    assert pop.noise(b.weight).a.shape[-1] == 1 and pop.noise(a.weight).a.shape[-1] == 2
    assert pop.entry(b.bias).sigma == 0.1

    named = EggrollOptimizer(a.named_parameters(), seed=0)
    assert named.param_groups[0]["param_names"] == ["weight", "bias"]
    named.add_param_group({"params": [("head.weight", b.weight), ("head.bias", b.bias)]})
    assert named.state_dict()["param_groups"][1]["param_names"] == ["head.weight", "head.bias"]
    with pytest.raises(ValueError, match="with/without names"):
        named.add_param_group({"params": [c]})


def test_named_parameters_train_like_plain_parameters():
    (x, y), m1, m2 = make_data(), make_model(), make_model()
    plain = EggrollOptimizer(m1.parameters(), seed=4)
    named = EggrollOptimizer(m2.named_parameters(), seed=4)
    for _ in range(2):
        plain.step(pop_closure(m1, x, y))
        named.step(pop_closure(m2, x, y))
    assert_bitwise(params_of(m1), params_of(m2))
    sd = named.state_dict()
    m3 = make_model(seed=5)
    m3.load_state_dict(m2.state_dict())
    again = EggrollOptimizer(m3.named_parameters(), seed=0)
    again.load_state_dict(sd)
    named.step(pop_closure(m2, x, y))
    again.step(pop_closure(m3, x, y))
    assert_bitwise(params_of(m2), params_of(m3))


def test_zero_grad_and_compute_grad_accumulate_like_backward():
    model, (x, y) = make_model(), make_data()
    opt = EggrollOptimizer(model.parameters(), seed=0)
    twin = twin_grads(model, opt, lambda m: pop_closure(m, x, y))
    loss = opt.compute_grad(pop_closure(model, x, y))
    assert loss.shape == () and opt.generation == 1
    assert_bitwise([p.grad for p in model.parameters()], twin)
    # A second call adds (like backward) the next generation's estimate.
    twin2 = twin_grads(model, opt, lambda m: pop_closure(m, x, y))
    opt.compute_grad(pop_closure(model, x, y))
    for p, g1, g2 in zip(model.parameters(), twin, twin2, strict=True):
        assert torch.equal(p.grad, g1 + g2)
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    opt.compute_grad(pop_closure(model, x, y))
    opt.zero_grad(set_to_none=False)
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in model.parameters())


def test_step_hooks():
    model, (x, y) = make_model(), make_data()
    opt = EggrollOptimizer(model.parameters(), seed=0)
    calls: list[tuple[str, int]] = []
    pre = opt.register_step_pre_hook(lambda o, args, kw: calls.append(("pre", o.generation)))
    post = opt.register_step_post_hook(lambda o, args, kw: calls.append(("post", o.generation)))
    opt.step(pop_closure(model, x, y))
    assert calls == [("pre", 0), ("post", 1)]
    pre.remove()
    post.remove()
    opt.step(pop_closure(model, x, y))
    assert len(calls) == 2


def test_state_dict_keeps_integers_exact_through_torch_save():
    model = make_model()
    for seed in (0, 2**31 + 5, 2**40 + 1, 2**63 + 3):
        opt = EggrollOptimizer(model.parameters(), seed=seed)
        buf = io.BytesIO()
        torch.save(opt.state_dict(), buf)
        buf.seek(0)
        sd = torch.load(buf, map_location=torch.device("cpu"), weights_only=True)
        assert sd["state"][0] == {"seed": seed, "generation": 0, "noise_version": 2}
        assert type(sd["state"][0]["seed"]) is int
        fresh = EggrollOptimizer(model.parameters(), seed=1)
        fresh.load_state_dict(sd)
        assert fresh.seed == seed and type(fresh.seed) is int


def test_process_group_is_shared_by_deepcopy_and_dropped_by_pickle():
    model = make_model()
    opt = EggrollOptimizer(model.parameters(), seed=0)
    assert opt.process_group is None
    sentinel = object()  # stands in for a live communicator, which cannot be copied
    opt._process_group = sentinel
    assert copy.deepcopy(opt).process_group is sentinel
    assert pickle.loads(pickle.dumps(opt)).process_group is None  # not initialized here


def test_deepcopy_copies_all_public_attributes():
    model, (x, y) = make_model(), make_data()
    opt = EggrollOptimizer(model.parameters(), seed=0)
    opt.step(pop_closure(model, x, y))
    clone = copy.deepcopy(opt)
    public = {k for k in vars(opt) if not k.startswith("_")}
    assert public == {k for k in vars(clone) if not k.startswith("_")}
    assert torch.equal(clone.last_losses, opt.last_losses)
    assert clone.last_losses is not opt.last_losses


# --------------------------------------------------------------------------- schedules
SCHEDULERS: list[tuple[Callable[[Any], Any], str]] = [
    (lambda o: StepLR(o, step_size=2, gamma=0.5), "StepLR"),
    (lambda o: CosineAnnealingLR(o, T_max=4), "CosineAnnealingLR"),
    (lambda o: LambdaLR(o, lambda k: 1.0 / (k + 1)), "LambdaLR"),
    # threshold=10: no loss ever counts as an improvement, so the lr halves at every step.
    (lambda o: ReduceLROnPlateau(o, patience=0, factor=0.5, threshold=10.0), "plateau"),
]


@pytest.mark.parametrize(("make_sched", "desc"), SCHEDULERS, ids=[d for _, d in SCHEDULERS])
def test_lr_schedulers_drive_the_step(make_sched, desc):
    model, (x, y) = make_model(), make_data()
    opt = EggrollOptimizer(model.parameters(), lr=0.2, seed=0)
    sched = make_sched(opt)
    lrs = []
    for _ in range(4):
        lr = opt.param_groups[0]["lr"]
        lrs.append(float(lr))
        g = twin_grads(model, opt, lambda m: pop_closure(m, x, y))
        before = params_of(model)
        loss = opt.step(pop_closure(model, x, y))
        expected = [p.add(d, alpha=-lr) for p, d in zip(before, g, strict=True)]
        assert_bitwise(params_of(model), expected)
        if isinstance(sched, ReduceLROnPlateau):
            sched.step(loss)
        else:
            sched.step()
    assert len(set(lrs)) > 1, lrs


def test_sigma_changed_between_steps_is_honoured():
    (x, y), m1, m2 = make_data(), make_model(), make_model()
    changed = EggrollOptimizer(m1.parameters(), sigma=0.05, seed=2)
    built = EggrollOptimizer(m2.parameters(), sigma=0.2, seed=2)
    w = m1[0].weight
    pert = changed.population().perturbation(w)
    changed.param_groups[0]["sigma"] = 0.2
    # 0.2 = 4 * 0.05 up to the rounding of the decimal constants; the noise is the same draw.
    torch.testing.assert_close(changed.population().perturbation(w), 4 * pert)
    changed.step(pop_closure(m1, x, y))
    built.step(pop_closure(m2, x, y))
    assert_bitwise(params_of(m1), params_of(m2))

    # A decaying sigma schedule: each step's population sees that step's sigma.
    seen: list[float] = []

    def closure(pop):
        seen.append(pop.params[0].sigma)
        return pop_closure(m1, x, y)(pop)

    for k in range(3):
        for group in changed.param_groups:
            group["sigma"] = 0.1 * 0.5**k
        changed.step(closure)
    assert seen == [0.1, 0.05, 0.025]


def test_per_group_rank_sigma_and_lr():
    model, (x, y) = make_model(), make_data()
    first, last = model[0], model[2]
    opt = EggrollOptimizer(
        [
            {"params": first.parameters(), "lr": 0.0, "rank": 1, "sigma": 0.1},
            {"params": last.parameters(), "rank": 3},
        ],
        lr=0.1,
        seed=0,
    )
    frozen = params_of(first)
    moving = params_of(last)
    pop = opt.population()
    assert pop.noise(first.weight).a.shape[-1] == 1
    # last.weight is (2, 8): a side of 2 <= rank 3, so its noise is dense (factors would be no
    # smaller than the matrix).
    assert pop.noise(last.weight).dense is not None and pop.noise(last.weight).rank == 0
    for e in pop.local_noise(first.weight).materialize():
        assert torch.linalg.matrix_rank(e) == 1
    assert pop.entry(first.weight).sigma == 0.1 and pop.entry(last.weight).sigma == 0.02
    g = twin_grads(model, opt, lambda m: pop_closure(m, x, y))
    opt.step(pop_closure(model, x, y))
    assert_bitwise(params_of(first), frozen)  # lr 0: not even a -0.0 rewrite
    assert_bitwise(
        params_of(last), [p.add(d, alpha=-0.1) for p, d in zip(moving, g[2:], strict=True)]
    )
    for _ in range(3):
        opt.step(pop_closure(model, x, y))
    assert_bitwise(params_of(first), frozen)
    assert not torch.equal(last.weight, moving[0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_low_and_double_precision_parameters(dtype):
    model, (x, y) = make_model(dtype=dtype), make_data(dtype)
    opt = EggrollOptimizer(model.parameters(), lr=0.1, sigma=0.05, seed=0)
    start = model_loss(model, x, y)
    for _ in range(30):
        loss = opt.step(pop_closure(model, x, y))
        assert loss.dtype in (torch.float32, torch.float64)
    assert all(p.dtype == dtype and torch.isfinite(p).all() for p in model.parameters())
    assert model_loss(model, x, y) < 0.9 * start


def test_lr_may_be_a_tensor_and_matches_a_float():
    (x, y), m1, m2 = make_data(), make_model(), make_model()
    o1 = EggrollOptimizer(m1.parameters(), lr=0.0625, seed=0)  # exact in float32 and float64
    o2 = EggrollOptimizer(m2.parameters(), lr=torch.tensor(0.0625), seed=0)
    sched = StepLR(o2, step_size=1, gamma=0.5)
    for _ in range(2):
        o1.step(pop_closure(m1, x, y))
        o2.step(pop_closure(m2, x, y))
        assert_bitwise(params_of(m1), params_of(m2))
        sched.step()
        o1.param_groups[0]["lr"] *= 0.5
    assert isinstance(o2.param_groups[0]["lr"], torch.Tensor)

    # Groups do not share the tensor: per-group schedules stay per group.
    lr = torch.tensor(0.125)
    o3 = EggrollOptimizer([{"params": m1[0].parameters()}, {"params": m1[2].parameters()}], lr=lr)
    LambdaLR(o3, [lambda k: 1.0, lambda k: 0.5])
    assert [float(g["lr"]) for g in o3.param_groups] == [0.125, 0.0625]
    assert float(lr) == 0.125 and float(o3.defaults["lr"]) == 0.125


# --------------------------------------------------------------------------- losses
def test_step_returns_the_mean_loss_and_records_member_losses():
    model, (x, y) = make_model(), make_data()
    opt = EggrollOptimizer(model.parameters(), pop_size=10, seed=0)
    seen = {}

    def closure(pop):
        seen["losses"] = pop_closure(model, x, y)(pop)
        return seen["losses"]

    loss = opt.step(closure)
    assert loss.shape == () and torch.equal(loss, seen["losses"].mean())
    assert opt.last_losses.shape == (10,) and torch.equal(opt.last_losses, seen["losses"])
    assert opt.step(lambda pop: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]).item() == 5.5  # ints, a list


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_members_never_reach_the_parameters(bad):
    model, (x, y) = make_model(), make_data()
    opt = EggrollOptimizer(model.parameters(), pop_size=8, seed=0)

    def closure(pop):
        losses = pop_closure(model, x, y)(pop)
        losses[[1, 4]] = bad
        return losses

    with pytest.warns(NonFiniteLossWarning, match="2 of 8"):
        opt.step(closure)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert torch.isnan(opt.last_losses).any() == (bad != bad)  # recorded as returned


def test_non_finite_members_count_as_the_worst():
    # A NaN member gives the same update as the worst finite member would: the largest loss,
    # or with maximize=True the smallest fitness.
    model = make_model()
    losses = torch.tensor([0.3, float("nan"), 0.1, 0.7, 0.2, 0.4, 0.5, 0.6])
    for maximize, worst in [(False, 0.7), (True, 0.1)]:
        filled = losses.clone()
        filled[1] = worst

        def grads(values, maximize=maximize):
            opt = EggrollOptimizer(model.parameters(), pop_size=8, seed=0, maximize=maximize)
            return twin_grads(model, opt, lambda m: lambda pop: values)

        with pytest.warns(NonFiniteLossWarning):
            g_nan = grads(losses)
        assert_bitwise(g_nan, grads(filled))


def test_all_non_finite_skips_the_update_but_advances_the_generation():
    model = make_model()
    opt = EggrollOptimizer(model.parameters(), pop_size=8, seed=0)
    before = params_of(model)
    with pytest.warns(NonFiniteLossWarning, match="skipped"):
        loss = opt.step(lambda pop: torch.full((8,), float("nan")))
    assert torch.isnan(loss) and opt.generation == 1
    assert_bitwise(params_of(model), before)
    with pytest.warns(NonFiniteLossWarning):
        opt.compute_grad(lambda pop: torch.full((8,), float("inf")))
    assert all(p.grad is None for p in model.parameters())


def test_an_overflowing_update_is_not_applied():
    w = torch.full((4, 4), 6e4, dtype=torch.float16, requires_grad=True)
    opt = EggrollOptimizer([w], lr=3e4, sigma=1.0, pop_size=4, seed=0)
    with pytest.warns(RuntimeWarning, match="overflowed"):
        opt.step(lambda pop: torch.tensor([0.0, 1.0, 2.0, 3.0]))
    assert torch.equal(w.detach(), torch.full((4, 4), 6e4, dtype=torch.float16))


def test_maximize_is_minimizing_the_negated_fitness():
    (x, y), m1, m2 = make_data(), make_model(), make_model()
    o_max = EggrollOptimizer(m1.parameters(), maximize=True, seed=0)
    o_min = EggrollOptimizer(m2.parameters(), seed=0)
    for _ in range(2):
        fitness = o_max.step(pop_closure(m1, x, y, sign=-1.0))
        loss = o_min.step(pop_closure(m2, x, y))
        assert torch.equal(fitness, -loss)
    assert_bitwise(params_of(m1), params_of(m2))


# --------------------------------------------------------------------------- closure forms
def test_sequential_closure_restores_parameters_bitwise():
    model, (x, y) = make_model(), make_data()
    opt = EggrollOptimizer(model.parameters(), pop_size=6, seed=0)
    before = params_of(model)
    seen: list[list[torch.Tensor]] = []

    def closure():
        seen.append(params_of(model))
        return seq_closure(model, x, y)()

    losses, pop = opt.evaluate(closure)
    assert losses.shape == (6,) and opt.generation == 0
    assert_bitwise(params_of(model), before)
    for i, member in enumerate(seen):  # each call saw member i's perturbed parameters
        for p, q in zip(member, model.parameters(), strict=True):
            assert torch.equal(p, pop.member_value(q, i))

    calls = []

    def failing():
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("evaluation failed")
        return seq_closure(model, x, y)()

    with pytest.raises(RuntimeError, match="evaluation failed"):
        opt.step(failing)
    assert_bitwise(params_of(model), before)
    assert opt.generation == 0 and opt.last_losses is None


def _two_args(model, population):
    return torch.zeros(len(population))


class _Evaluator:
    def losses(self, population):
        return torch.zeros(len(population))

    def loss(self):
        return torch.tensor(0.0)

    def __call__(self, population, scale=1.0):
        return torch.zeros(len(population))


CLOSURE_FORMS: list[tuple[Any, bool, str]] = [
    (lambda pop: torch.zeros(len(pop)), True, "lambda pop"),
    (lambda: torch.tensor(0.0), False, "lambda"),
    (lambda i=3: torch.tensor(float(i)), False, "lambda with a default is nullary"),
    (lambda pop, i=3: torch.zeros(len(pop)), True, "population plus a default"),
    (lambda *args: torch.zeros(len(args[0])) if args else torch.tensor(0.0), True, "*args"),
    (functools.partial(_two_args, None), True, "functools.partial"),
    (_Evaluator().losses, True, "bound method"),
    (_Evaluator().loss, False, "nullary bound method"),
    (_Evaluator(), True, "callable object"),
]


@pytest.mark.parametrize(
    ("closure", "takes_population", "desc"), CLOSURE_FORMS, ids=[d for *_, d in CLOSURE_FORMS]
)
def test_closure_form_is_detected_from_its_signature(closure, takes_population, desc):
    model = make_model()
    opt = EggrollOptimizer(model.parameters(), pop_size=4, seed=0)
    calls: list[int] = []

    def spy(*args):
        calls.append(len(args))
        return closure(*args)

    spy.__signature__ = inspect.signature(closure)  # type: ignore[attr-defined]
    opt.step(spy)
    assert calls == ([1] if takes_population else [0, 0, 0, 0])


# --------------------------------------------------------------------------- the estimator
def test_raw_update_agrees_with_autograd():
    # With raw shaping, g / (sigma^2 sqrt N) (g as written to p.grad) is an unbiased estimate of
    # the gradient G of the Gaussian-smoothed loss (= the gradient, up to O(sigma^2)). With
    # antithetic pairs it is  gh = (1/K) sum_k (G.E_k) E_k + O(sigma^2)  over K = N/2 draws, E_k
    # the concatenated unit-variance noise of all d parameters, E[E E^T] = I. Two checks:
    # * along G:  gh.G/|G|^2 = (1/K) sum_k (G.E_k)^2/|G|^2, mean 1, variance
    #   (E(G.E)^4/|G|^4 - 1)/K <= (2 + 6/r)/K (kurtosis <= 3 + 6/r, as in test_noise);
    # * across G: E|gh_perp|^2 = E[(G.E)^2 |E_perp|^2]/K <= sqrt(E(G.E)^4 E|E|^4)/K
    #   (Cauchy-Schwarz), with E|E|^4 = d^2 + Var|E|^2 and Var|E|^2 summed over parameters:
    #   m n (2 + (2m + 2n + 2)/r) for a rank-r matrix, 2 n for a dense one (test_noise).
    #   Gaussian noise would give (d - 1)|G|^2/K; we allow twice the bound (|gh_perp|^2 is a
    #   squared mean of K iid vectors, concentrated around its mean).
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    x = torch.randn(16, 3, dtype=torch.float64)
    y = torch.randn(16, 1, dtype=torch.float64)
    grads = torch.autograd.grad((model(x) - y).pow(2).mean(), list(model.parameters()))
    big_g = torch.cat([g.flatten() for g in grads])

    n, rank, sigma = 4096, 2, 1e-3
    k = n // 2
    opt = EggrollOptimizer(
        model.parameters(), sigma=sigma, rank=rank, pop_size=n, shaping="raw", seed=1
    )
    opt.compute_grad(pop_closure(model, x, y, path="materialized"))
    est = torch.cat([p.grad.flatten() for p in model.parameters()]) / (sigma**2 * math.sqrt(n))

    d = big_g.numel()
    var_sq = 0.0
    for p in model.parameters():
        if p.dim() >= 2:
            m_, n_ = p.shape
            var_sq += m_ * n_ * (2 + (2 * m_ + 2 * n_ + 2) / rank)
        else:
            var_sq += 2 * p.numel()
    kurt = 3 + 6 / rank
    par = float(est @ big_g) / float(big_g @ big_g)
    perp2 = float((est - par * big_g).pow(2).sum() / big_g.pow(2).sum())
    assert abs(par - 1) <= 6 * math.sqrt((kurt - 1) / k), par
    perp_bound = math.sqrt(kurt * (d**2 + var_sq)) / k
    assert perp2 <= 2 * perp_bound, (perp2, perp_bound)
    cos = float(torch.nn.functional.cosine_similarity(est, big_g, dim=0))
    # cos = par / sqrt(par^2 + perp2) grows with par, so the two bounds above give
    min_cos = 1 / math.sqrt(1 + 2 * perp_bound / (1 - 6 * math.sqrt((kurt - 1) / k)) ** 2)
    assert cos >= min_cos, (cos, min_cos)
    assert min_cos > 0.9  # the check above is not vacuous at this N


# --------------------------------------------------------------------------- CUDA
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_lockstep_through_a_cpu_checkpoint_and_sgd_equivalence():
    dev = torch.device("cuda")
    (x, y), m1, m2 = make_data(), make_model().to(dev), make_model().to(dev)
    x, y = x.to(dev), y.to(dev)
    opt = EggrollOptimizer(m1.parameters(), lr=torch.tensor(0.0625), seed=2**40 + 1)
    est = EggrollOptimizer(m2.parameters(), seed=2**40 + 1)
    sgd = torch.optim.SGD(m2.parameters(), lr=0.0625)
    for _ in range(2):
        opt.step(pop_closure(m1, x, y))
        sgd.zero_grad()
        est.compute_grad(pop_closure(m2, x, y))
        sgd.step()
    # On CUDA a lone matrix without weight decay takes its update in its product's epilogue
    # (p.addmm_), which rounds once where SGD's p.add_(g) rounds g first: equal to rounding.
    for a, b in zip(params_of(m1), params_of(m2), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)

    buf = io.BytesIO()
    torch.save({"model": m1.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, map_location="cpu", weights_only=True)
    assert ckpt["opt"]["state"][0] == {"seed": 2**40 + 1, "generation": 2, "noise_version": 2}
    m3 = make_model(seed=9).to(dev)
    m3.load_state_dict(ckpt["model"])
    resumed = EggrollOptimizer(m3.parameters(), seed=0)
    resumed.load_state_dict(ckpt["opt"])
    # The cross-device non-finite path, too. On CUDA the step does not wait for its flags: the
    # warnings come from check_warnings() (or the next step), one per optimizer.
    with pytest.warns(NonFiniteLossWarning) as record:

        def half_nan(closure):
            def wrapped(pop):
                losses = closure(pop)
                losses[0] = float("nan")
                return losses

            return wrapped

        opt.step(half_nan(pop_closure(m1, x, y)))
        resumed.step(half_nan(pop_closure(m3, x, y)))
        opt.check_warnings()
        resumed.check_warnings()
    assert sum(issubclass(w.category, NonFiniteLossWarning) for w in record) == 2
    assert_bitwise(params_of(m1), params_of(m3))
    assert all(torch.isfinite(p).all() for p in m1.parameters())


@pytest.mark.parametrize("device", CPU_AND_CUDA)
@pytest.mark.parametrize("rank", [1, 4])
def test_epilogue_update_equals_the_general_update(monkeypatch, device, rank):
    """A lone matrix's update in its product's epilogue (``addmm_`` with the sigma factor and
    ``1/sqrt(rank)`` in ``alpha``) moves it as the general path does on the same device
    (float64, so the two products differ only by rounding)."""
    from torcheggroll import _update

    def run(epilogue: bool, dev: str) -> torch.Tensor:
        devices = (dev,) if epilogue else ()
        monkeypatch.setattr(_update, "EPILOGUE_DEVICES", devices)
        w = torch.nn.Parameter(torch.linspace(-1, 1, 64 * 48, dtype=torch.float64).view(64, 48))
        w = torch.nn.Parameter(w.detach().to(dev))
        opt = EggrollOptimizer(
            [w], lr=0.05, sigma=0.1, rank=rank, pop_size=16, seed=3, sigma_scaling="fan_in"
        )
        calls = []
        monkeypatch.setattr(_update, "_fusable", wrap(_update._fusable, calls))
        opt.step(lambda pop: torch.arange(16.0, dtype=torch.float64, device=dev).sin())
        assert any(calls) == epilogue
        return w.detach().cpu() - torch.linspace(-1, 1, 64 * 48, dtype=torch.float64).view(64, 48)

    def wrap(fn, calls):
        def fusable(*args):
            calls.append(fn(*args))
            return calls[-1]

        return fusable

    general = run(False, device)
    monkeypatch.undo()
    fused = run(True, device)
    assert general.abs().max() > 1e-4  # the update is not vacuous
    torch.testing.assert_close(fused, general, rtol=1e-10, atol=1e-14)


def test_state_dict_snapshot_keeps_its_generation() -> None:
    """A state_dict taken earlier is not advanced by later steps (its ints are not shared)."""
    model = torch.nn.Linear(3, 2)
    opt = EggrollOptimizer(model.parameters(), pop_size=4, seed=0)
    snapshot = opt.state_dict()
    opt.step(lambda pop: torch.arange(4.0))
    assert snapshot["state"][0]["generation"] == 0
    assert opt.state_dict()["state"][0]["generation"] == 1


# --------------------------------------------------------------------------- review fixes
def test_parameters_that_do_not_require_grad_are_left_alone():
    (x, y), model = make_data(), make_model()
    frozen = model[0].weight
    frozen.requires_grad_(False)
    opt = EggrollOptimizer(model.parameters(), lr=0.5, sigma=0.1, pop_size=8, seed=0)
    before = params_of(model)
    pop = opt.population()
    assert not pop.owns(frozen) and len(pop.params) == 3
    # Frozen parameters keep their index: the others draw the noise they would draw anyway.
    model2 = make_model()
    opt2 = EggrollOptimizer(model2.parameters(), lr=0.5, sigma=0.1, pop_size=8, seed=0)
    pop2 = opt2.population()
    for p, p2 in zip(list(model.parameters())[1:], list(model2.parameters())[1:], strict=True):
        assert torch.equal(pop.perturbation(p), pop2.perturbation(p2))
    opt.step(pop_closure(model, x, y))
    opt.step(seq_closure(model, x, y))
    after = params_of(model)
    assert torch.equal(after[0], before[0])
    assert all(not torch.equal(a, b) for a, b in zip(after[1:], before[1:], strict=True))
    frozen.requires_grad_(True)  # unfreezing takes effect at the next step
    opt.step(pop_closure(model, x, y))
    assert not torch.equal(frozen, before[0])


def test_default_seeds_differ_between_optimizers_and_follow_manual_seed():
    model = make_model()
    torch.manual_seed(5)
    a = EggrollOptimizer(model.parameters(), pop_size=4)
    b = EggrollOptimizer(model.parameters(), pop_size=4)
    torch.manual_seed(5)
    c = EggrollOptimizer(model.parameters(), pop_size=4)
    assert a.seed != b.seed and a.seed == c.seed
    assert not torch.equal(
        a.population().perturbation(model[0].weight), b.population().perturbation(model[0].weight)
    )


def test_identical_losses_warn_that_the_closure_ignores_the_population():
    from torcheggroll import IdenticalLossesWarning

    (x, y), model = make_data(), make_model()
    opt = EggrollOptimizer(model.parameters(), pop_size=8, seed=0)

    def ignores_population(pop: Any) -> torch.Tensor:
        return ((model(x) - y) ** 2).mean().expand(len(pop))

    with pytest.warns(IdenticalLossesWarning, match="same loss"):
        opt.step(ignores_population)
    with pytest.warns(IdenticalLossesWarning):
        opt.compute_grad(ignores_population)
    with pytest.warns(IdenticalLossesWarning):
        opt.step(lambda: ((model(x) - y) ** 2).mean().item() * 0 + 1.0)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", IdenticalLossesWarning)
        opt.step(pop_closure(model, x, y))


def test_update_matches_an_independent_reference_across_groups():
    """Groups with their own lr, sigma, rank, weight decay and shaping, against the update rule
    written out from the members' values alone (``population.perturbed``): ``theta -= lr *
    (sum_i s_i (theta_i - theta) / sqrt(N) + weight_decay * theta)`` (``theta_i - theta`` is
    ``sigma * sign_i * E_i``, so this is the documented ``sigma / sqrt(N) * sum_i s_i sign_i
    E_i``)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 2)
    ).double()
    groups = [
        {"params": model[0].parameters(), "lr": 0.3, "sigma": 0.05, "rank": 1, "weight_decay": 0.1},
        {
            "params": model[2].parameters(),
            "lr": 0.05,
            "sigma": 0.2,
            "rank": 3,
            "weight_decay": 0.0,
            "shaping": "centered_rank",
            "sigma_scaling": "fan_in",
        },
        {
            "params": model[4].parameters(),
            "lr": 0.7,
            "sigma": 0.01,
            "rank": 0,
            "weight_decay": 0.02,
            "shaping": "raw",
            "sigma_scaling": "fan_in_rows",
        },
    ]
    n = 10
    opt = EggrollOptimizer(groups, pop_size=n, seed=4)
    losses = torch.tensor(
        [0.3, -1.2, 2.5, 0.0, 0.7, 0.7, -0.4, 1.9, 0.1, -2.0], dtype=torch.float64
    )
    population = opt.population()
    before = {p: p.detach().clone() for p in model.parameters()}
    members = {p: population.perturbed(p) for p in model.parameters()}

    def shaped(name: str) -> torch.Tensor:
        if name == "zscore":
            return (losses - losses.mean()) / losses.std()
        if name == "raw":
            return losses
        ranks = torch.tensor([float(sorted(losses.tolist()).index(v)) for v in losses.tolist()])
        ranks += torch.tensor([(losses == v).sum().item() - 1 for v in losses.tolist()]) / 2
        return ranks.double() / (n - 1) - 0.5

    opt.step(lambda pop: losses)
    for group in opt.param_groups:
        s = shaped(group["shaping"])
        for p in group["params"]:
            theta = before[p]
            ascent = torch.einsum("i,i...->...", s, members[p] - theta) / math.sqrt(n)
            expected = theta - group["lr"] * (ascent + group["weight_decay"] * theta)
            torch.testing.assert_close(p.detach(), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_a_non_finite_update_is_never_applied(dtype: torch.dtype):
    """Finite losses can still give an update that overflows (raw shaping of huge losses): in
    every dtype the parameters are left as they were and a RuntimeWarning says so."""
    loss_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    big = torch.finfo(loss_dtype).max
    # sigma / sqrt(N) = 1/2 times (s_0 - s_1) = -big: entries of the update over 2 in size
    # (hundreds of the 256 here) overflow.
    w = torch.nn.Parameter(torch.ones(16, 16, dtype=dtype))
    opt = EggrollOptimizer([w], lr=0.1, sigma=1.0, pop_size=4, seed=0, shaping="raw")
    before = w.detach().clone()
    losses = torch.tensor([0.0, big, -big, 3.0], dtype=loss_dtype)
    with pytest.warns(RuntimeWarning, match="overflowed"):
        opt.step(lambda pop: losses)
    assert torch.equal(w.detach(), before)
    assert opt.generation == 1


def test_an_infinite_coefficient_is_never_applied():
    # float64 losses whose pair difference overflows: the first draw's coefficient is +inf.
    big = torch.finfo(torch.float64).max
    w = torch.nn.Parameter(torch.ones(8, 8, dtype=torch.float64))
    opt = EggrollOptimizer([w], lr=1e-3, sigma=1.0, pop_size=4, seed=0, shaping="raw")
    with pytest.warns(RuntimeWarning, match="overflowed"):
        opt.step(lambda pop: torch.tensor([big, -big, 0.0, 3.0], dtype=torch.float64))
    assert torch.equal(w.detach(), torch.ones(8, 8, dtype=torch.float64))


def test_lr_zero_changes_nothing_and_warns_nothing():
    w = torch.nn.Parameter(torch.ones(8, 8))
    opt = EggrollOptimizer([w], lr=0.0, sigma=0.1, pop_size=4, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step(lambda pop: torch.tensor([0.0, 1.0, 2.0, 3.0]))
    assert torch.equal(w.detach(), torch.ones(8, 8)) and opt.generation == 1


@pytest.mark.parametrize(
    ("scaling", "shape", "fan_in"),
    [
        ("none", (64, 48), 1),
        ("fan_in", (64, 48), 48),
        ("fan_in", (6, 4, 3, 3), 36),
        ("fan_in_rows", (48, 64), 48),
        ("fan_in", (64,), 1),
    ],
)
def test_sigma_scaling_divides_each_matrix_by_its_fan_in(scaling, shape, fan_in):
    # The members' perturbations have entries of variance (sigma / sqrt(fan_in))**2: checked on
    # 4096 entries per draw of 64 draws, to within 6 standard errors of a mean of squares
    # (Var(e**2) < 2 + (2m + 2n + 2)/r per entry, see test_noise.py).
    w = torch.nn.Parameter(torch.zeros(shape, dtype=torch.float64))
    sigma = 0.3
    opt = EggrollOptimizer([w], sigma=sigma, rank=4, pop_size=128, seed=0, sigma_scaling=scaling)
    pert = opt.population().perturbation(w)[0::2]
    expected = sigma**2 / fan_in
    m, n = shape[0], math.prod(shape[1:]) if len(shape) > 1 else 1
    tol = 6 * math.sqrt((2 + (2 * m + 2 * n + 2) / 4) / pert.numel())
    assert abs(float(pert.pow(2).mean()) / expected - 1) < tol
    assert (
        "sigma_scaling" in repr(opt)
        and opt.state_dict()["param_groups"][0]["sigma_scaling"] == scaling
    )


def test_width_scaled_groups_sort_layers_by_kind():
    from torcheggroll import width_scaled_groups

    class Conv1D(nn.Module):  # Hugging Face GPT-2's layout: weight (in, out)
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(8, 12))

    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8), Conv1D())
    model[1].weight = model[1].weight  # no tying here; tied tensors appear once
    groups = width_scaled_groups(model, lr=0.1, sigma=0.2)
    kinds = {g["sigma_scaling"]: [tuple(p.shape) for p in g["params"]] for g in groups}
    assert kinds == {"none": [(10, 8)], "fan_in": [(8, 8), (8,)], "fan_in_rows": [(8, 12)]}
    assert all(g["lr"] == 0.1 and g["sigma"] == 0.2 for g in groups)
    EggrollOptimizer(groups, pop_size=4, seed=0)  # usable as they are
