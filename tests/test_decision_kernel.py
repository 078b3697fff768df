"""The step's decision in one Triton kernel (:mod:`torcheggroll._triton_decision`) against an
independent reference written here, and whole steps against the PyTorch path.

On the CPU the kernel runs in Triton's interpreter (``TRITON_INTERPRET=1``, set by conftest.py
when there is no GPU); the CUDA cases run on a GPU.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from _devices import CPU_AND_CUDA
from hypothesis import given, settings
from hypothesis import strategies as st

from torcheggroll import EggrollOptimizer, IdenticalLossesWarning, NonFiniteLossWarning

# The interpreter (numpy) warns on the NaN arithmetic the non-finite cases exercise.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

DEVICES = CPU_AND_CUDA


def reference(losses: list[float], shaping: str, maximize: bool, antithetic: bool) -> dict:
    """The decision by its definition, in Python floats: non-finite losses become the worst
    finite one, shaping, pair differences."""
    x = [-v if maximize else v for v in losses]
    finite = [math.isfinite(v) for v in x]
    if not any(finite):
        return {"c": None, "bad": len(x), "identical": False}
    worst = max(v for v, f in zip(x, finite, strict=True) if f)
    clean = [v if f else worst for v, f in zip(x, finite, strict=True)]
    n = len(clean)
    mean = sum(clean) / n
    if shaping == "raw":
        s = clean
    elif shaping == "centered":
        s = [v - mean for v in clean]
    else:
        std = math.sqrt(sum((v - mean) ** 2 for v in clean) / (n - 1)) if n > 1 else 0.0
        den = std if (n > 1 and std > 1e-8) else 1.0
        s = [(v - mean) / den for v in clean]
    c = [s[2 * k] - s[2 * k + 1] for k in range(n // 2)] if antithetic else s
    identical = n > 1 and math.isfinite(losses[0]) and all(v == losses[0] for v in losses)
    return {"c": c, "bad": n - sum(finite), "identical": identical}


def _decide(kernel, losses, shaping, maximize, antithetic, scales, limit, device):  # type: ignore[no-untyped-def]
    t = torch.tensor(losses, dtype=torch.float32, device=device)
    s = torch.tensor(scales, dtype=torch.float64, device=device)
    coeffs, ok, flags = kernel.decide(t, s, shaping, maximize, antithetic, limit)
    return coeffs.cpu(), bool(ok), flags.cpu().tolist()


def _check(got, losses, shaping, maximize, antithetic, scales, limit) -> None:  # type: ignore[no-untyped-def]
    coeffs, ok, flags = got
    # The reference in float64 of the float32 losses the kernel reads.
    as32 = torch.tensor(losses, dtype=torch.float32).double().tolist()
    ref = reference(as32, shaping, maximize, antithetic)
    c = ref["c"]
    expect_ok = c is not None and sum(abs(v) for v in c) < limit
    assert ok == expect_ok
    assert flags == [ref["bad"], int(ref["identical"]), int(c is not None and not expect_ok)]
    if expect_ok:
        want = torch.tensor([[v * s for v in c] for s in scales], dtype=torch.float64)
        torch.testing.assert_close(coeffs, want, rtol=1e-12, atol=1e-12 * max(scales))
    else:
        assert torch.equal(coeffs, torch.zeros_like(coeffs))


finite_losses = st.floats(-1e6, 1e6, allow_nan=False, width=32)
any_losses = st.one_of(finite_losses, st.sampled_from([math.nan, math.inf, -math.inf, 0.0, 1.0]))


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=40, deadline=None)
@given(
    pairs=st.integers(1, 300),
    data=st.data(),
    shaping=st.sampled_from(["raw", "centered", "zscore"]),
    maximize=st.booleans(),
    antithetic=st.booleans(),
)
def test_kernel_decision_equals_the_definition(
    triton_kernels, device, pairs, data, shaping, maximize, antithetic
) -> None:
    kernel = triton_kernels("_triton_decision", device, needs_fused=True)
    n = 2 * pairs if antithetic else data.draw(st.integers(1, 600))
    losses = data.draw(st.lists(any_losses, min_size=n, max_size=n))
    scales = [0.01, 0.5][: data.draw(st.integers(1, 2))]
    got = _decide(kernel, losses, shaping, maximize, antithetic, scales, 3e38, device)
    _check(got, losses, shaping, maximize, antithetic, scales, 3e38)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "losses",
    [
        [2.0] * 6,  # identical
        [math.nan] * 6,  # no finite loss
        [math.nan, 1.0, math.inf, 3.0, -math.inf, 0.5],
        [1.0, 2.0, 3.0, 4.0, 5.0, 1e30],
        [4.0],  # one member
    ],
    ids=["identical", "all-nan", "mixed", "outlier", "one"],
)
@pytest.mark.parametrize("shaping", ["raw", "centered", "zscore"])
def test_kernel_decision_edge_cases(triton_kernels, device, losses, shaping) -> None:
    kernel = triton_kernels("_triton_decision", device, needs_fused=True)
    for maximize in (False, True):
        for antithetic in (False, True) if len(losses) % 2 == 0 else (False,):
            got = _decide(kernel, losses, shaping, maximize, antithetic, [0.1], 3e38, device)
            _check(got, losses, shaping, maximize, antithetic, [0.1], 3e38)


@pytest.mark.parametrize("device", DEVICES)
def test_kernel_withholds_an_update_beyond_the_limit(triton_kernels, device) -> None:
    kernel = triton_kernels("_triton_decision", device, needs_fused=True)
    losses = [0.0, 10.0, 0.0, 10.0]  # raw pair differences -10, -10: norm 20
    for limit, ok in ((20.5, True), (19.5, False)):
        got = _decide(kernel, losses, "raw", False, True, [1.0], limit, device)
        assert got[1] is ok
        assert got[2][2] == int(not ok)
        _check(got, losses, "raw", False, True, [1.0], limit)


def _step_params(monkeypatch, device: str, in_kernel: bool, **kw) -> tuple:  # type: ignore[no-untyped-def]
    """Parameters after three steps of a small model, the decision in the kernel or not."""
    from torcheggroll import _update

    monkeypatch.setattr(_update, "DECISION_DEVICES", (device,) if in_kernel else ())
    calls: list[bool] = []
    real = _update._decide_in_kernel

    def spy(*args):  # type: ignore[no-untyped-def]
        out = real(*args)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(_update, "_decide_in_kernel", spy)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    model = model.to(device, torch.float64)
    lrs = kw.pop("lrs", (0.1, 0.05))
    groups = [
        {"params": model[0].parameters(), "lr": lrs[0]},
        {"params": model[2].parameters(), "lr": lrs[1], "sigma": 0.02, "rank": 2},
    ]
    opt = EggrollOptimizer(groups, sigma=0.05, pop_size=8, seed=1, **kw)
    x = torch.linspace(-1, 1, 15, dtype=torch.float64, device=device).view(3, 5)

    def closure(pop):  # type: ignore[no-untyped-def]
        y = pop.forward(model, x)
        losses = y.pow(2).mean(dim=(1, 2))
        losses[3] = float("nan")
        return losses

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(3):
            opt.step(closure)
        opt.check_warnings()
    kinds = sorted(str(w.category.__name__) for w in record)
    assert all(calls) == in_kernel and calls
    return [p.detach().cpu() for p in model.parameters()], kinds


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"maximize": True, "shaping": "centered"},
        {"shaping": "raw", "antithetic": False},
        {"lrs": (0.0, 0.0)},
    ],
    ids=["zscore", "maximize-centered", "raw-plain", "lr0"],
)
def test_steps_with_the_kernel_equal_the_pytorch_decision(
    triton_kernels, monkeypatch, device, options
) -> None:
    triton_kernels("_triton_decision", device, needs_fused=True)
    general, warned = _step_params(monkeypatch, device, False, **dict(options))
    monkeypatch.undo()
    fused, warned_fused = _step_params(monkeypatch, device, True, **dict(options))
    assert warned_fused == warned
    assert NonFiniteLossWarning.__name__ in warned
    for a, b in zip(fused, general, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("device", DEVICES)
def test_the_kernel_reports_identical_losses(triton_kernels, monkeypatch, device) -> None:
    from torcheggroll import _update

    triton_kernels("_triton_decision", device, needs_fused=True)
    monkeypatch.setattr(_update, "DECISION_DEVICES", (device,))
    p = torch.nn.Parameter(torch.ones(3, 2, device=device))
    opt = EggrollOptimizer([p], pop_size=4, seed=0)
    with pytest.warns(IdenticalLossesWarning):
        opt.step(lambda pop: torch.full((4,), 2.0, device=device))
        opt.check_warnings()
    assert torch.equal(p.detach().cpu(), torch.ones(3, 2))


def test_fused_off_keeps_the_pytorch_decision(triton_kernels, monkeypatch) -> None:
    from torcheggroll import _update

    triton_kernels("_triton_decision", "cpu", needs_fused=True)
    monkeypatch.setattr(_update, "DECISION_DEVICES", ("cpu",))
    p = torch.nn.Parameter(torch.ones(3, 2))
    opt = EggrollOptimizer([p], pop_size=4, seed=0)
    plan = opt._plan_for_step()
    groups, losses = opt.param_groups, torch.arange(4.0)
    assert _update._decide_in_kernel(plan, groups, losses, [0.1]) is not None
    monkeypatch.setenv("TORCHEGGROLL_FUSED", "0")
    assert _update._decide_in_kernel(plan, groups, losses, [0.1]) is None
