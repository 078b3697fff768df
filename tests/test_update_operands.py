"""The update's operands ``A * c`` and ``B`` drawn by a kernel from the noise counters
(:func:`torcheggroll._triton_noise.factor_operand`) against the noise definition's reference
(:func:`torcheggroll.noise.draw_noise`), and whole steps against the update that reads the filled
noise buffers.

On the CPU the kernel runs in Triton's interpreter (``TRITON_INTERPRET=1``, set by conftest.py
when there is no GPU); the CUDA cases run on a GPU.
"""

from __future__ import annotations

import pytest
import torch
from _devices import CPU_AND_CUDA

from torcheggroll import EggrollOptimizer
from torcheggroll.noise import draw_noise, seed_key

DEVICES = CPU_AND_CUDA
# The float transform of two implementations of the noise definition agrees to this (see
# tests/test_noise.py, FLOAT_TOLERANCE).
FLOAT_TOLERANCE = 1e-5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rank", [1, 3, 4])
@pytest.mark.parametrize("layout", ["entries-draws", "draws-entries"])
def test_factor_operand_matches_the_noise_definition(triton_kernels, device, rank, layout) -> None:
    kernels = triton_kernels("_triton_noise", device, needs_fused=True)
    m, n, draws = 10, 7, 37  # entries not a multiple of 4, draws not a multiple of a tile
    seed, generation, index = 2**40 + 9, 5, 3
    ref = draw_noise(
        (m, n), rank, draws, seed=seed, generation=generation, param_index=index, device="cpu"
    )
    coef = torch.randn(draws, generator=torch.Generator().manual_seed(rank))
    for stream, factor, scale in ((0, ref.a, coef), (1, ref.b, None)):
        entries = factor.shape[1] * rank
        if layout == "entries-draws":
            out = torch.full((entries, draws), float("nan"), device=device)
        else:
            out = torch.full((draws, entries), float("nan"), device=device).T
        kernels.factor_operand(
            out,
            None if scale is None else scale.to(device),
            seed_key(seed),
            generation,
            index,
            stream,
        )
        want = factor.reshape(draws, entries).T * (1.0 if scale is None else scale[None, :])
        err = (out.cpu() - want).abs().max().item()
        assert err <= FLOAT_TOLERANCE * max(1.0, coef.abs().max().item()), (stream, err)


def _steps(monkeypatch, device: str, drawn: bool, capturable: bool, rank: int):  # type: ignore[no-untyped-def]
    """Parameters after three steps of two lone matrices, the operands drawn from the counters
    (where the step may: ``capturable``) or read from the buffers; and whether the buffers were
    ever filled."""
    from torcheggroll import _update

    monkeypatch.setattr(_update, "EPILOGUE_DEVICES", (device,))
    monkeypatch.setattr(_update, "OPERAND_DEVICES", (device,) if drawn else ())
    calls: list[int] = []
    real = _update._drawn_operands
    monkeypatch.setattr(
        _update,
        "_drawn_operands",
        lambda *a: calls.append(1) or real(*a),  # type: ignore[func-returns-value]
    )
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(6, 9, bias=False), torch.nn.Tanh(), torch.nn.Linear(9, 3, bias=False)
    ).to(device)
    opt = EggrollOptimizer(
        model.parameters(), lr=0.1, sigma=0.05, rank=rank, pop_size=8, seed=4, capturable=capturable
    )
    weights = torch.arange(8.0, device=device)

    def closure(pop):  # type: ignore[no-untyped-def]
        return (weights - 3.5) ** 2  # losses that read no noise: only the update does

    for _ in range(3):
        opt.step(closure)
    filled = any(bool(torch.count_nonzero(b.buffer)) for b in opt._plan_for_step().buffers)
    monkeypatch.undo()
    return [p.detach().cpu() for p in model.parameters()], filled, len(calls)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("capturable", [False, True], ids=["ints", "capturable"])
@pytest.mark.parametrize("rank", [1, 2])
def test_steps_with_drawn_operands_equal_the_buffered_update(
    triton_kernels, monkeypatch, device, capturable, rank
) -> None:
    triton_kernels("_triton_noise", device, needs_fused=True)
    start = [p.detach().cpu() for p in _fresh(device)]
    buffered, filled, calls = _steps(monkeypatch, device, False, capturable, rank)
    assert filled and not calls
    drawn, filled_drawn, calls = _steps(monkeypatch, device, True, capturable, rank)
    # With device counters the update draws its operands (2 matrices x 3 steps) and nothing
    # reads the buffers: they are never filled. With Python ints the population filled them
    # when it was made, and the update reads them.
    assert filled_drawn != capturable
    assert calls == (6 if capturable else 0)
    for a, b, p0 in zip(drawn, buffered, start, strict=True):
        delta, want = a - p0, b - p0
        assert want.abs().max() > 1e-3  # the update moved the parameters
        err = ((delta - want).abs().max() / want.abs().max()).item()
        assert err < 10 * FLOAT_TOLERANCE, err


def _fresh(device: str) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(6, 9, bias=False), torch.nn.Tanh(), torch.nn.Linear(9, 3, bias=False)
    )
    return list(model.to(device).parameters())


def test_a_dense_parameter_still_reads_the_buffers(triton_kernels, monkeypatch) -> None:
    from torcheggroll import _update

    triton_kernels("_triton_noise", "cpu", needs_fused=True)
    monkeypatch.setattr(_update, "EPILOGUE_DEVICES", ("cpu",))
    monkeypatch.setattr(_update, "OPERAND_DEVICES", ("cpu",))
    lone = EggrollOptimizer(torch.nn.Linear(16, 12, bias=False).parameters(), pop_size=4)
    with_bias = EggrollOptimizer(torch.nn.Linear(16, 12).parameters(), pop_size=4)
    assert not _update.reads_buffers(lone._plan_for_step(), lone.param_groups)
    assert _update.reads_buffers(with_bias._plan_for_step(), with_bias.param_groups)
    monkeypatch.setenv("TORCHEGGROLL_FUSED", "0")
    assert _update.reads_buffers(lone._plan_for_step(), lone.param_groups)


@pytest.mark.parametrize("drawn", [False, True], ids=["buffered", "drawn"])
def test_the_steps_population_keeps_its_noise_after_the_step(
    triton_kernels, monkeypatch, drawn
) -> None:
    """Under ``capturable`` the step may never fill the buffers; the population the closure saw
    still gives its own generation's noise after the step (whose generation counter has moved
    on), not the next one's."""
    from torcheggroll import _update

    triton_kernels("_triton_noise", "cpu", needs_fused=True)
    monkeypatch.setattr(_update, "EPILOGUE_DEVICES", ("cpu",))
    monkeypatch.setattr(_update, "OPERAND_DEVICES", ("cpu",) if drawn else ())
    torch.manual_seed(0)
    lin = torch.nn.Linear(6, 9, bias=False)
    opt = EggrollOptimizer(
        lin.parameters(), lr=0.1, sigma=0.05, rank=1, pop_size=4, seed=4, capturable=True
    )
    kept: list = []
    for generation in range(2):
        kept.clear()
        opt.step(lambda pop: kept.append(pop) or torch.arange(4.0))  # type: ignore[func-returns-value]
        # After the step, before another population is drawn (the noise's documented lifetime).
        ref = draw_noise((9, 6), 1, 2, seed=4, generation=generation, param_index=0, device="cpu")
        got = kept[0].noise(lin.weight)
        assert (got.a - ref.a).abs().max() <= FLOAT_TOLERANCE
        assert (got.b - ref.b).abs().max() <= FLOAT_TOLERANCE


def test_factor_operand_refuses_coefficients_of_another_shape(triton_kernels) -> None:
    kernels = triton_kernels("_triton_noise", "cpu")
    with pytest.raises(ValueError, match="Invalid coef"):
        kernels.factor_operand(torch.empty(8, 5), torch.ones(4), seed_key(0), 0, 0, 0)


def test_what_reads_the_buffers(triton_kernels, monkeypatch) -> None:
    """Only lone matrices without weight decay and with a number as lr take drawn operands."""
    from torcheggroll import _update

    triton_kernels("_triton_noise", "cpu", needs_fused=True)
    monkeypatch.setattr(_update, "EPILOGUE_DEVICES", ("cpu",))
    monkeypatch.setattr(_update, "OPERAND_DEVICES", ("cpu",))

    def reads(params, **kw) -> bool:  # type: ignore[no-untyped-def]
        opt = EggrollOptimizer(params, pop_size=4, rank=2, **kw)
        return _update.reads_buffers(opt._plan_for_step(), opt.param_groups)

    def lone() -> list[torch.Tensor]:
        return list(torch.nn.Linear(16, 12, bias=False).parameters())

    assert not reads(lone())
    assert reads(lone(), weight_decay=0.1)
    assert reads(lone(), lr=torch.tensor(0.1))
    assert reads(lone() + lone())  # two matrices of one shape: one bucket, one batched product
