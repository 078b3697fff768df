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

from torcheggroll import EggrollOptimizer
from torcheggroll.noise import draw_noise, seed_key

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.cuda,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
        ],
    ),
]
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
    """Parameters after three steps of lone matrices (and a bias), the operands drawn from the
    counters or read from the buffers; and whether the buffers were ever filled."""
    from torcheggroll import _update

    monkeypatch.setattr(_update, "EPILOGUE_DEVICES", (device,))
    monkeypatch.setattr(_update, "OPERAND_DEVICES", (device,) if drawn else ())
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
    return [p.detach().cpu() for p in model.parameters()], filled


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("capturable", [False, True], ids=["ints", "capturable"])
@pytest.mark.parametrize("rank", [1, 2])
def test_steps_with_drawn_operands_equal_the_buffered_update(
    triton_kernels, monkeypatch, device, capturable, rank
) -> None:
    triton_kernels("_triton_noise", device, needs_fused=True)
    start = [p.detach().cpu() for p in _fresh(device)]
    buffered, filled = _steps(monkeypatch, device, False, capturable, rank)
    assert filled
    drawn, filled_drawn = _steps(monkeypatch, device, True, capturable, rank)
    # With device counters nothing reads the buffers: they are never filled.
    assert filled_drawn != capturable
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
