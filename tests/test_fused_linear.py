"""The fused low-rank linear (Triton) against the PyTorch reference, and its use by the forward.

On CUDA the compiled kernels run (``-m cuda``). Without a GPU the same kernels run in Triton's
CPU interpreter (float16 only: the interpreter has no bfloat16 products), so CI checks the
kernels' indexing, masks and tile bounds too.
"""

from __future__ import annotations

import importlib.util
import itertools
import os
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from torcheggroll import EggrollOptimizer, fused_linear

HAVE_TRITON = importlib.util.find_spec("triton") is not None


def _interpreter_usable() -> bool:
    import numpy as np

    # Triton 3.6's interpreter converts 1-element arrays with int(), which numpy 2.4 refuses.
    return tuple(int(v) for v in np.__version__.split(".")[:2]) < (2, 4)


@pytest.fixture
def kernels_on(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> torch.device:
    """The device the fused kernels run on for this test: CUDA (compiled) or CPU (interpreted,
    as conftest.py arranges where there is no GPU)."""
    if not HAVE_TRITON:
        pytest.skip("Triton is not installed")
    if request.param == "cuda":
        if not torch.cuda.is_available():
            pytest.skip("CUDA is not available")
        return torch.device("cuda")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton's interpreter is off (TRITON_INTERPRET is not 1)")
    if not _interpreter_usable():
        pytest.skip("Triton's interpreter needs numpy < 2.4")
    monkeypatch.setenv("TORCHEGGROLL_FUSED", "interpret")
    return torch.device("cpu")


BOTH = pytest.mark.parametrize(
    "kernels_on", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)], indirect=True
)


def _dtypes(device: torch.device) -> list[torch.dtype]:
    return [torch.float16] if device.type == "cpu" else [torch.float16, torch.bfloat16]


def _tolerance(dtype: torch.dtype) -> float:
    # Inputs and the output are rounded to dtype (the products accumulate in float32): a few
    # units of the output's last place, relative to its largest entry.
    return 4 * torch.finfo(dtype).eps


def _problem(
    P: int,
    R: int,
    n: int,
    m: int,
    r: int,
    bias: str | None,
    device: torch.device,
    dtype: torch.dtype,
    seed: int = 0,
):  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(P, R, n, generator=g).to(device, dtype)
    w = (torch.randn(m, n, generator=g) / n**0.5).to(device, dtype)
    a = torch.randn((P + 1) // 2, m, r, generator=g).to(device)
    b = (torch.randn((P + 1) // 2, n, r, generator=g) / n**0.5).to(device)
    draw = (torch.arange(P) // 2).to(device)
    coeff = torch.randn(P, generator=g).to(device)
    bb = (
        None
        if bias is None
        else torch.randn(m if bias == "shared" else (P, m), generator=g).to(device, dtype)
    )
    return x, w, bb, a, b, draw, coeff


def _reference(x, w, bb, a, b, draw, coeff) -> torch.Tensor:  # type: ignore[no-untyped-def]
    a_p, b_p = fused_linear.member_factors(a, b, draw, coeff, torch.float32)
    return fused_linear.lowrank_linear_reference(
        x.float(), w.float(), None if bb is None else bb.float(), a_p, b_p
    )


# Rows per member that divide the tile, that do not, and that exceed it; odd widths; ranks 1..16;
# one row per member at ranks 8 and 16, where a tile gathers each row's factors (block-diagonal
# off) in the GEMM epilogue and in the projection.
CASES = [
    (8, 16, 64, 48, 4, None),
    (5, 3, 40, 33, 3, "shared"),
    (9, 1, 32, 24, 1, "member"),
    (3, 40, 72, 20, 2, "member"),
    (2, 70, 16, 16, 16, None),
    (40, 1, 40, 36, 8, "member"),
    (35, 1, 24, 20, 16, None),
]


@BOTH
@pytest.mark.parametrize("backend", fused_linear.GEMM_BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "P{}-R{}-n{}-m{}-r{}-bias{}".format(*c))
def test_fused_matches_reference(
    kernels_on: torch.device, backend: str, case: tuple, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fused_linear, "GEMM_BACKEND", backend)
    # cuBLAS's GEMM and the correction in either order, written first by two kernels or by the
    # one-pass kernel (which the cases of few rows per member leave to the two); the other
    # backends have one order.
    orders = (("1", "0"), ("1", "1"), ("0", "0")) if backend == "cublas" else (("1", "0"),)
    for (order, one_pass), dtype in itertools.product(orders, _dtypes(kernels_on)):
        monkeypatch.setenv(fused_linear.CORRECTION_FIRST_ENV, order)
        monkeypatch.setenv(fused_linear.ONE_PASS_ENV, one_pass)
        args = _problem(*case, kernels_on, dtype)
        assert fused_linear.fused_available(args[0])
        y = fused_linear.lowrank_linear_fused(*args)
        assert y.dtype == dtype and y.shape == (case[0], case[1], case[3])
        ref = _reference(*args)
        err = ((y.float() - ref).abs().max() / ref.abs().max()).item()
        assert err < _tolerance(dtype), (order, one_pass, dtype, err)


@BOTH
@pytest.mark.parametrize("P, R, r", [(6, 5, 3), (20, 1, 16)], ids=["block-diagonal", "row-wise"])
@pytest.mark.parametrize("splits", ["1", "2", "5", "auto"])
def test_projection_matches_reference(
    kernels_on: torch.device, P: int, R: int, r: int, splits: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whole or split over K (each part's partial sums added after; with 5 parts of a 48-wide K
    some parts have no tile and must add nothing)."""
    monkeypatch.setenv(fused_linear.PROJECTION_SPLITS_ENV, splits)
    x, _, _, _, b, draw, coeff = _problem(P, R, 48, 8, r, None, kernels_on, torch.float16)
    h = fused_linear.member_projection_fused(x, b, draw, coeff).float()
    _, b_p = fused_linear.member_factors(b, b, draw, coeff, torch.float32)
    ref = (torch.bmm(x.float(), b_p) * coeff.view(-1, 1, 1)).reshape(P * R, r)
    assert ((h - ref).abs().max() / ref.abs().max()).item() < _tolerance(torch.float16)


@BOTH
def test_projection_refuses_a_bad_split_count(
    kernels_on: torch.device, monkeypatch: pytest.MonkeyPatch
) -> None:
    x, _, _, _, b, draw, coeff = _problem(4, 2, 16, 8, 2, None, kernels_on, torch.float16)
    for bad in ("0", "-2", "two"):
        monkeypatch.setenv(fused_linear.PROJECTION_SPLITS_ENV, bad)
        with pytest.raises(ValueError, match=f"Invalid TORCHEGGROLL_PROJECTION_SPLITS: {bad}"):
            fused_linear.member_projection_fused(x, b, draw, coeff)


@BOTH
def test_one_pass_refuses_a_bad_setting(
    kernels_on: torch.device, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fused_linear, "GEMM_BACKEND", "cublas")
    args = _problem(4, 16, 16, 8, 2, None, kernels_on, torch.float16)
    for bad in ("2", "yes", ""):
        monkeypatch.setenv(fused_linear.ONE_PASS_ENV, bad)
        with pytest.raises(ValueError, match=f"Invalid TORCHEGGROLL_ONE_PASS: {bad}$"):
            fused_linear.lowrank_linear_fused(*args)


@pytest.mark.parametrize(
    "rows, rank, expected", [(16, 4, True), (40, 2, True), (1, 4, False), (3, 3, False)]
)
def test_one_pass_takes_block_diagonal_tiles_only(rows: int, rank: int, expected: bool) -> None:
    pytest.importorskip("triton")
    from torcheggroll._triton_kernels import one_pass_applies, projection_correction

    assert one_pass_applies(rows, rank) is expected
    if not expected:
        x = torch.zeros(rows, 8)
        with pytest.raises(
            ValueError, match=f"Invalid rows for the one-pass kernel at rank {rank}"
        ):
            projection_correction(
                x,
                torch.zeros(1, 8, rank),
                torch.zeros(1, 8, rank),
                torch.zeros(1, dtype=torch.int64),
                torch.ones(1),
                None,
                torch.empty(rows, 8),
                rows,
            )


@pytest.mark.parametrize(
    "block_m, rows, rank_p2, expected",
    [(128, 16, 4, True), (128, 1, 4, False), (128, 32, 16, True), (128, 16, 16, False)],
)
def test_block_diagonal_switch(block_m: int, rows: int, rank_p2: int, expected: bool) -> None:
    pytest.importorskip("triton")
    from torcheggroll._triton_kernels import block_diagonal

    assert block_diagonal(block_m, rows, rank_p2) is expected


@given(
    log_block=st.integers(4, 8),
    rows=st.integers(1, 300),
    rank=st.integers(1, 16),
    tile=st.integers(0, 1000),
)
def test_members_per_tile_bounds_every_tile(
    log_block: int, rows: int, rank: int, tile: int
) -> None:
    pytest.importorskip("triton")
    from torcheggroll._triton_kernels import members_per_tile

    block = 2**log_block
    rank_p2 = 1 << (rank - 1).bit_length()
    bound = members_per_tile(block, rows, rank_p2)
    first, last = tile * block, tile * block + block - 1
    assert last // rows - first // rows + 1 <= bound
    assert bound & (bound - 1) == 0 and bound * rank_p2 >= 16


def test_fused_rejects_mismatched_shapes() -> None:
    x, w, bb, a, b, draw, coeff = _problem(4, 2, 16, 8, 2, None, torch.device("cpu"), torch.float32)
    with pytest.raises(ValueError, match="Invalid shapes"):
        fused_linear.lowrank_linear_fused(x, w.T, bb, a, b, draw, coeff)
    with pytest.raises(ValueError, match="Invalid shapes"):
        fused_linear.lowrank_linear_fused(x, w, bb, a, b, draw[:3], coeff)


def test_op_batching_rule_without_kernels() -> None:
    """The op under vmap (shared or per-member input) equals the per-member composite, also
    where the kernels do not run (float32 on CPU)."""
    x, w, bb, a, b, draw, coeff = _problem(
        4, 3, 16, 8, 2, "member", torch.device("cpu"), torch.float32
    )
    expected = torch.stack(
        [
            fused_linear.lowrank_linear_member(x[i], w, bb[i], a, b, draw[i], coeff[i])
            for i in range(4)
        ]
    )
    got = torch.vmap(fused_linear.lowrank_linear, in_dims=(0, None, 0, None, None, 0, 0))(
        x, w, bb, a, b, draw, coeff
    )
    torch.testing.assert_close(got, expected)
    shared = torch.vmap(fused_linear.lowrank_linear, in_dims=(None, None, 0, None, None, 0, 0))(
        x[0], w, bb, a, b, draw, coeff
    )
    expected0 = torch.stack(
        [
            fused_linear.lowrank_linear_member(x[0], w, bb[i], a, b, draw[i], coeff[i])
            for i in range(4)
        ]
    )
    torch.testing.assert_close(shared, expected0)


def test_batched_shortcut_matches_the_op_and_declines_outside_its_level() -> None:
    """The low-rank forward's shortcut past the operator dispatch gives the batching rule's
    result, and returns None where its inputs are not batched at the innermost vmap level."""
    x, w, bb, a, b, draw, coeff = _problem(
        4, 3, 16, 8, 2, "member", torch.device("cpu"), torch.float32
    )
    dims = (0, None, 0, None, None, 0, 0)
    expected = torch.vmap(fused_linear.lowrank_linear, in_dims=dims)(x, w, bb, a, b, draw, coeff)
    got = torch.vmap(fused_linear.lowrank_linear_batched, in_dims=dims)(x, w, bb, a, b, draw, coeff)
    torch.testing.assert_close(got, expected)
    shared_bias = torch.vmap(
        fused_linear.lowrank_linear_batched, in_dims=(0, None, None, None, None, 0, 0)
    )
    torch.testing.assert_close(
        shared_bias(x, w, bb[0], a, b, draw, coeff),
        torch.vmap(fused_linear.lowrank_linear, in_dims=(0, None, None, None, None, 0, 0))(
            x, w, bb[0], a, b, draw, coeff
        ),
    )
    assert (
        fused_linear.lowrank_linear_batched(x[0], w, bb[0], a, b, draw[0], coeff[0]) is None
    )  # not under vmap

    seen: list[object] = []

    def record(xp: torch.Tensor, d: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        def per_row(row: torch.Tensor) -> torch.Tensor:
            seen.append(fused_linear.lowrank_linear_batched(row, w, None, a, b, d, c))
            return row

        return torch.vmap(per_row)(xp)

    torch.vmap(record)(x, draw, coeff)
    assert seen == [None]


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 24)
        self.l1 = nn.Linear(24, 40)
        self.l2 = nn.Linear(40, 8, bias=False)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.l2(torch.relu(self.l1(self.emb(t))))


@BOTH
@pytest.mark.parametrize("per_member", [True, False], ids=["per-member", "broadcast"])
def test_forward_uses_fused_and_matches_materialized(
    kernels_on: torch.device, per_member: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    original = fused_linear.lowrank_linear_fused

    def counting(*args):  # type: ignore[no-untyped-def]
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(fused_linear, "lowrank_linear_fused", counting)
    for dtype in _dtypes(kernels_on):
        torch.manual_seed(0)
        net = _Net().to(kernels_on, dtype)
        opt = EggrollOptimizer(net.parameters(), lr=0.1, sigma=0.1, rank=2, pop_size=6, seed=3)
        pop = opt.population()
        # 9 rows a member: a pair has more rows than the on-the-fly kernels take.
        t = torch.randint(0, 11, (6, 9) if per_member else (9,), device=kernels_on)
        calls.clear()
        with torch.no_grad():
            fast = pop.forward(net, t, per_member=per_member)
            # The embedding's output differs per member, so both linears see per-member rows.
            assert len(calls) == 2
            slow = pop.forward(net, t, per_member=per_member, path="materialized")
        err = ((fast.float() - slow.float()).abs().max() / slow.float().abs().max()).item()
        assert err < 2 * _tolerance(dtype), (dtype, err)


@BOTH
def test_forward_recording_gradients_does_not_use_the_op(
    kernels_on: torch.device, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    monkeypatch.setattr(fused_linear, "lowrank_linear_fused", lambda *a: calls.append(1))
    net = nn.Linear(16, 8).to(kernels_on, torch.float16)
    opt = EggrollOptimizer(net.parameters(), lr=0.1, sigma=0.1, rank=2, pop_size=4)
    x = torch.randn(4, 3, 16, device=kernels_on, dtype=torch.float16)
    out = opt.population().forward(net, x, per_member=True)
    assert not calls and out.shape == (4, 3, 8)


@BOTH
def test_disabled_by_environment(kernels_on: torch.device, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCHEGGROLL_FUSED", "0")
    assert not fused_linear.fused_available(torch.zeros(2, device=kernels_on, dtype=torch.float16))


# ---------------------------------------------------------------------------- a few rows per member
def _onthefly_reference(
    x: torch.Tensor, w: torch.Tensor, noise: Any, draw: torch.Tensor, coeff: torch.Tensor
) -> torch.Tensor:
    """``(P, rows, m)`` float32 ``x W^T + coeff_p (x B_d) A_d^T`` from the factors of
    :func:`torcheggroll.noise.draw_noise` (``x`` ``(P, rows, n)``, on the CPU)."""
    return x.float() @ w.float().T + torch.einsum(
        "pin,pnr,pmr->pim", x.float(), noise.b[draw], noise.a[draw] * coeff.view(-1, 1, 1)
    )


def _check_onthefly(
    got: torch.Tensor,
    x: torch.Tensor,
    w: torch.Tensor,
    noise: Any,
    draw: torch.Tensor,
    coeff: torch.Tensor,
) -> None:
    """``got`` ``(P * rows, m)`` float16 against :func:`_onthefly_reference`."""
    ref = _onthefly_reference(x, w, noise, draw, coeff)
    err = ((got.float().cpu().reshape(ref.shape) - ref).abs().max() / ref.abs().max()).item()
    assert err < 2 * _tolerance(torch.float16), err


@BOTH
@pytest.mark.parametrize("rank", [1, 2, 4, 8])
@pytest.mark.parametrize("paired", [True, False], ids=["pairs", "singles"])
@pytest.mark.parametrize("bias", [None, "shared", "member"])
@pytest.mark.parametrize("rows", [1, 2, 3, 4])
def test_onthefly_matches_the_noise_definition(
    kernels_on: torch.device, rank: int, paired: bool, bias: str | None, rows: int
) -> None:
    """The kernels that draw the factors themselves against the factors of
    :func:`torcheggroll.noise.draw_noise` (an independent implementation of the definition),
    for one row per member and for several (3: a unit of rows that is not a power of two)."""
    from torcheggroll import _triton_onthefly as otf
    from torcheggroll.noise import draw_noise, seed_key

    g = torch.Generator().manual_seed(rank)
    P, n, m = 6, 72, 40
    seed, generation, index = 2**40 + 5, 3, 7
    noise = draw_noise(
        (m, n),
        rank,
        P // 2 if paired else P,
        seed=seed,
        generation=generation,
        param_index=index,
        device="cpu",
        dtype=torch.float32,
    )
    # One dtype a device: each combination compiles two kernels on CUDA. The correction is
    # added to the GEMM's output, or written first and the GEMM added into it.
    dtype = torch.bfloat16 if kernels_on.type == "cuda" else torch.float16
    for write_first in (False, True):
        x = torch.randn(P, rows, n, generator=g).to(dtype)
        w = (torch.randn(m, n, generator=g) / n**0.5).to(dtype)
        draw = torch.arange(P) // 2 if paired else torch.arange(P)
        coeff = torch.randn(P, generator=g)
        b = (
            None
            if bias is None
            else torch.randn(m if bias == "shared" else (P, m), generator=g).to(dtype)
        )
        got = (
            otf.linear_onthefly(
                x.reshape(P * rows, n).to(kernels_on),
                w.to(kernels_on),
                None if b is None else b.to(kernels_on),
                draw.to(kernels_on),
                coeff.to(kernels_on),
                seed_key(seed),
                generation,
                index,
                rank,
                paired,
                rows,
                write_first=write_first,
            )
            .float()
            .cpu()
            .reshape(P, rows, m)
        )
        ref = _onthefly_reference(x, w, noise, draw, coeff)
        if b is not None:
            ref = ref + (b.float() if b.dim() == 1 else b.float()[:, None])
        err = ((got - ref).abs().max() / ref.abs().max()).item()
        assert err < 2 * _tolerance(dtype), (write_first, err)


def _onthefly_problem(P: int, rows: int, n: int, m: int, rank: int, seed: int) -> dict[str, Any]:
    """A paired problem for ``linear_onthefly`` in float16 on the CPU, with the factors of
    :func:`torcheggroll.noise.draw_noise` for its reference (generation 2, parameter 1)."""
    from torcheggroll.noise import draw_noise

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(P, rows, n, generator=g).half()
    w = (torch.randn(m, n, generator=g) / n**0.5).half()
    noise = draw_noise((m, n), rank, P // 2, seed=seed, generation=2, param_index=1, device="cpu")
    return dict(
        x=x,
        w=w,
        draw=torch.arange(P) // 2,
        coeff=torch.randn(P, generator=g),
        noise=noise,
        rank=rank,
        seed=seed,
    )


def _run_onthefly(prob: dict[str, Any], device: torch.device, **kw: Any) -> torch.Tensor:
    from torcheggroll import _triton_onthefly as otf
    from torcheggroll.noise import seed_key

    x = prob["x"]
    P, rows, n = x.shape
    return otf.linear_onthefly(
        x.reshape(P * rows, n).to(device),
        prob["w"].to(device),
        None,
        prob["draw"].to(device),
        prob["coeff"].to(device),
        seed_key(prob["seed"]),
        2,
        1,
        prob["rank"],
        True,
        rows,
        **kw,
    )


def _check_problem(got: torch.Tensor, prob: dict[str, Any]) -> None:
    _check_onthefly(got, prob["x"], prob["w"], prob["noise"], prob["draw"], prob["coeff"])


@BOTH
@pytest.mark.parametrize("rank", [1, 4])
@pytest.mark.parametrize("rows", [1, 3])
def test_onthefly_split_over_k_is_exact_and_deterministic(
    kernels_on: torch.device, monkeypatch: pytest.MonkeyPatch, rank: int, rows: int
) -> None:
    """The projection split over K (each split's partial sums added by the correction kernel in
    a fixed order): the reference's output, and the same bits on every call."""
    from torcheggroll import _triton_onthefly as otf

    default = otf.launch_tiles
    splits: list[int] = []

    def tiles(*args):  # type: ignore[no-untyped-def]
        out = dict(default(*args), block_k=64, split_k=3)
        splits.append(out["split_k"])
        return out

    monkeypatch.setattr(otf, "launch_tiles", tiles)
    # 200 inputs: 4 blocks of 64 over 3 splits, so one split takes two.
    prob = _onthefly_problem(6, rows, 200, 24, rank, seed=10 + rank + rows)
    got = _run_onthefly(prob, kernels_on)
    assert splits and splits[0] == 3
    assert torch.equal(_run_onthefly(prob, kernels_on), got)
    _check_problem(got, prob)


@BOTH
def test_onthefly_takes_units_above_the_default_limit_when_raised(
    kernels_on: torch.device, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``MAX_UNIT_ROWS`` (raised by ``benchmarks/step_graph.py --max-unit-rows``) only moves the
    limit: a unit of 32 rows (16 rows per antithetic member) gives the reference's output."""
    from torcheggroll import _triton_onthefly as otf

    prob = _onthefly_problem(4, 16, 40, 24, 4, seed=7)
    with pytest.raises(ValueError, match="Invalid rows"):
        _run_onthefly(prob, kernels_on)
    monkeypatch.setattr(otf, "MAX_UNIT_ROWS", 32)
    _check_problem(_run_onthefly(prob, kernels_on, write_first=True), prob)


@BOTH
@pytest.mark.parametrize("rows", [1, 4, 9])
def test_a_few_rows_per_member_never_fill_the_noise_buffer(
    kernels_on: torch.device, monkeypatch: pytest.MonkeyPatch, rows: int
) -> None:
    """A capturable forward with a few rows per member (a pair's rows at most
    ``MAX_UNIT_ROWS``) draws the factors in the kernels: the noise buffer stays unfilled. More
    rows read the filled buffer. Either way the outputs are the reference's."""
    from torcheggroll import _triton_onthefly as otf

    calls: list[int] = []
    original = otf.linear_onthefly
    monkeypatch.setattr(otf, "linear_onthefly", lambda *a: calls.append(1) or original(*a))
    for dtype in _dtypes(kernels_on):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(24, 40, bias=False), nn.ReLU(), nn.Linear(40, 8, bias=False))
        net = net.to(kernels_on, dtype)
        opt = EggrollOptimizer(
            net.parameters(), sigma=0.1, rank=4, pop_size=6, seed=3, capturable=True
        )
        x = torch.randn(6, rows, 24, device=kernels_on, dtype=dtype)
        pop = opt.population()
        calls.clear()
        in_kernel = otf.unit_rows(rows, paired=True) <= otf.MAX_UNIT_ROWS
        with torch.no_grad():
            fast = pop.forward(net, x, per_member=True)
            assert len(calls) == (2 if in_kernel else 0)
            buffer = opt._plan_for_step().buffers[0].buffer
            assert (torch.count_nonzero(buffer) == 0) == in_kernel  # filled only when read
            slow = pop.forward(net, x, per_member=True, path="materialized")
        assert torch.count_nonzero(buffer) > 0  # the reference reads it: filled on first use
        err = ((fast.float() - slow.float()).abs().max() / slow.float().abs().max()).item()
        assert err < 4 * _tolerance(dtype), (dtype, err)
