"""A step free of host work: ``capturable=True``, CUDA-graph capture and ``torch.compile``.

On the CPU (CI) the capturable mode must give the same steps as the default one, and a closure
using ``population.forward`` must compile with ``fullgraph=True``; on CUDA (``-m cuda``) a whole
step is captured in one graph and replayed for ten generations against eager steps.
"""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from torch import nn

from torcheggroll import EggrollOptimizer, IdenticalLossesWarning, NonFiniteLossWarning


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


def data(device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(10, 6, generator=g).to(device), torch.randn(10, 3, generator=g).to(device)


def closure_for(model: nn.Module, x: torch.Tensor, y: torch.Tensor):  # type: ignore[no-untyped-def]
    def closure(population):  # type: ignore[no-untyped-def]
        return (population.forward(model, x) - y).pow(2).mean(dim=(1, 2))

    return closure


def params(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("shaping", ["zscore", "centered_rank"])
def test_capturable_steps_equal_the_default_steps(shaping: str) -> None:
    x, y = data()
    runs = []
    for capturable in (False, True):
        model = mlp()
        opt = EggrollOptimizer(
            model.parameters(),
            lr=0.1,
            sigma=0.05,
            pop_size=8,
            seed=5,
            shaping=shaping,
            weight_decay=0.01,
            capturable=capturable,
        )
        for _ in range(4):
            opt.step(closure_for(model, x, y))
        runs.append((params(model), opt.last_losses, opt.generation))
    (p0, l0, g0), (p1, l1, g1) = runs
    assert g0 == g1 == 4
    assert torch.equal(l0, l1)
    for a, b in zip(p0, p1, strict=True):
        assert torch.equal(a, b)


def test_capturable_state_dict_round_trips_and_refreshes_the_device_counters() -> None:
    x, y = data()
    model = mlp()
    opt = EggrollOptimizer(model.parameters(), lr=0.1, pop_size=8, seed=2**40 + 3, capturable=True)
    for _ in range(3):
        opt.step(closure_for(model, x, y))
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    assert sd["state"][0]["generation"] == 3 and type(sd["state"][0]["generation"]) is int
    twin_model = copy.deepcopy(model)
    twin = EggrollOptimizer(twin_model.parameters(), lr=0.1, pop_size=8, seed=1, capturable=True)
    twin.step(closure_for(twin_model, x, y))  # its device counters exist now ...
    twin_model.load_state_dict(model.state_dict())
    twin.load_state_dict(sd)  # ... and must follow the loaded state
    assert twin.seed == 2**40 + 3 and twin.generation == 3
    for _ in range(2):
        opt.step(closure_for(model, x, y))
        twin.step(closure_for(twin_model, x, y))
    for a, b in zip(params(model), params(twin_model), strict=True):
        assert torch.equal(a, b)
    clone = copy.deepcopy(opt)
    assert clone.generation == opt.generation == 5


def test_a_state_dict_of_the_old_noise_is_refused() -> None:
    model = mlp()
    opt = EggrollOptimizer(model.parameters(), pop_size=4, seed=0)
    sd = opt.state_dict()
    old = copy.deepcopy(sd)
    del old["state"][0]["noise_version"]  # what torcheggroll 0.2 wrote
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match="noise version 1"):
        opt.load_state_dict(old)
    assert opt.state_dict() == before
    old["state"][0]["noise_version"] = 7
    with pytest.raises(ValueError, match="noise version 7"):
        opt.load_state_dict(old)
    opt.load_state_dict(sd)  # the current version loads


def test_capturable_refuses_parameters_on_several_devices_before_any_change() -> None:
    """One set of device counters serves a capturable optimizer: parameters on two devices are
    refused at construction and in add_param_group, which then leaves the optimizer as it was."""
    here = nn.Parameter(torch.zeros(3, 2))
    there = nn.Parameter(torch.zeros(3, 2, device="meta"))
    with pytest.raises(ValueError, match=r"capturable=True needs every parameter on one device"):
        EggrollOptimizer([here, there], pop_size=4, seed=0, capturable=True)
    EggrollOptimizer([here, there], pop_size=4, seed=0)  # without capture: allowed
    opt = EggrollOptimizer([here], pop_size=4, seed=0, capturable=True)
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=r"got cpu, meta"):
        opt.add_param_group({"params": [there]})
    assert opt.state_dict() == before and len(opt.param_groups) == 1
    # Parameters that end up on two devices another way (a group edited in place) are refused
    # at the next step, before it draws, evaluates or updates anything.
    model = mlp()
    opt = EggrollOptimizer(model.parameters(), pop_size=4, seed=0, capturable=True)
    x, y = data()
    opt.step(closure_for(model, x, y))
    before, weights = copy.deepcopy(opt.state_dict()), params(model)
    opt.param_groups[0]["params"].append(there)
    calls = []
    with pytest.raises(ValueError, match=r"got cpu, meta"):
        opt.step(lambda population: calls.append(1))
    assert not calls and opt.generation == 1
    for a, b in zip(params(model), weights, strict=True):
        assert torch.equal(a, b)
    opt.param_groups[0]["params"].pop()
    assert opt.state_dict() == before


def test_capturable_warnings_are_counted_and_reported_on_request() -> None:
    model = mlp()
    opt = EggrollOptimizer(model.parameters(), pop_size=4, seed=0, capturable=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # On the CPU nothing waits: warnings come at once, as without capturable.
        with pytest.raises(NonFiniteLossWarning):
            opt.step(lambda pop: torch.tensor([1.0, float("nan"), 2.0, 3.0]))
    with pytest.warns(IdenticalLossesWarning):
        opt.step(lambda pop: torch.ones(4))


def test_a_compiled_closure_traces_population_forward_in_one_graph() -> None:
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    x, y = data()
    model, ref_model = mlp(), mlp()
    opt = EggrollOptimizer(model.parameters(), lr=0.1, pop_size=8, seed=0)
    ref = EggrollOptimizer(ref_model.parameters(), lr=0.1, pop_size=8, seed=0)
    counter = CompileCounter()
    compiled = torch.compile(closure_for(model, x, y), fullgraph=True, backend=counter)
    for _ in range(3):
        assert torch.equal(opt.step(compiled), ref.step(closure_for(ref_model, x, y)))
    # fullgraph=True raises on any graph break; one frame means no recompilation per step.
    assert counter.frame_count == 1
    for a, b in zip(params(model), params(ref_model), strict=True):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------- CUDA graphs
@pytest.mark.cuda
def test_capturable_counters_follow_the_model_to_another_device() -> None:
    """Steps on the CPU, then the model moves to CUDA: the device counters move with it and the
    steps go on with the generation and noise an optimizer made on CUDA from the start has."""
    if not torch.cuda.is_available():
        pytest.skip("CUDA is not available")
    dev = torch.device("cuda")
    x, y = data()
    moved, fresh = mlp(), mlp()
    kw = dict(lr=0.1, sigma=0.05, pop_size=8, seed=5, capturable=True)
    opt = EggrollOptimizer(moved.parameters(), **kw)
    for _ in range(2):
        opt.step(closure_for(moved, x, y))
    moved.to(dev)  # the parameters move in place: the optimizer keeps them
    reference = EggrollOptimizer(fresh.to(dev).parameters(), **kw)
    fresh.load_state_dict(moved.state_dict())
    reference.load_state_dict(opt.state_dict())
    xd, yd = x.to(dev), y.to(dev)
    for _ in range(2):
        opt.step(closure_for(moved, xd, yd))
        reference.step(closure_for(fresh, xd, yd))
    assert opt._counters is not None and opt._counters[1].device.type == "cuda"
    assert opt.last_losses is not None and opt.last_losses.device.type == "cuda"
    assert opt.generation == reference.generation == 4
    for a, b in zip(params(moved), params(fresh), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_captured_step_replays_generations_like_eager_steps(dtype: torch.dtype) -> None:
    """One CUDA graph holds the whole step (noise, forward, loss, shaping, update, generation
    counter); ten replays give the parameters of ten eager steps, and the integer noise of each
    generation bitwise."""
    if not torch.cuda.is_available():
        pytest.skip("CUDA is not available")
    dev = torch.device("cuda")
    x, y = data(dev)
    x, y = x.to(dtype), y.to(dtype)
    eager_model, graph_model = mlp().to(dev, dtype), mlp().to(dev, dtype)
    kw = dict(lr=0.1, sigma=0.05, pop_size=16, seed=11)
    eager = EggrollOptimizer(eager_model.parameters(), **kw)
    captured = EggrollOptimizer(graph_model.parameters(), capturable=True, **kw)
    closure = closure_for(graph_model, x, y)

    # Warm up on a side stream (the caches and kernels are made eagerly), then capture.
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            captured.step(closure)
            eager.step(closure_for(eager_model, x, y))
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = captured.step(closure)
    # Capturing ran no kernel: the graph's first replay is generation 2.
    for _ in range(10):
        graph.replay()
        expected = eager.step(closure_for(eager_model, x, y))
        torch.testing.assert_close(loss, expected, rtol=1e-3, atol=1e-3)
    torch.cuda.synchronize()
    assert captured.generation == eager.generation == 12
    # float32: the same kernels in the same order (bitwise in practice; a few ulps allowed);
    # bfloat16: the update rounds to the parameter's dtype.
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for a, b in zip(params(graph_model), params(eager_model), strict=True):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    # The noise the graph drew last equals the noise of that generation drawn afresh.
    pop = eager.population()
    captured_pop = captured.population()
    for p_e, p_c in zip(eager_model.parameters(), graph_model.parameters(), strict=True):
        n_e, n_c = pop.noise(p_e), captured_pop.noise(p_c)
        for t_e, t_c in ((n_e.a, n_c.a), (n_e.b, n_c.b), (n_e.dense, n_c.dense)):
            if t_e is not None:
                assert torch.equal(t_e, t_c)
