"""The Triton update of a lone half-precision matrix (:mod:`torcheggroll._triton_update`):
``W += alpha * L R^T`` against the product in float64, rounded once, and a step through it
against the step through ``addmm_``.

The kernel needs sm90+ (tensor descriptors), so the products run on a GPU only (``-m cuda``);
what it refuses is checked on the CPU too.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from torcheggroll import EggrollOptimizer

HAVE_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAVE_TRITON, reason="Triton is not installed")


def _sm90() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9


sm90 = pytest.mark.skipif(not _sm90(), reason="needs an sm90+ GPU")


def _operand(rows: int, k: int, kmajor: bool, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """``(rows, k)`` with ``k`` contiguous, or the transposed view of ``(k, rows)`` storage."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(rows, k, generator=g) if kmajor else torch.randn(k, rows, generator=g).T
    return t.to("cuda", dtype)


def _ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of ``dtype`` at ``|x|`` (float64), subnormals aside."""
    mant = torch.finfo(dtype).eps
    return torch.exp2(torch.floor(torch.log2(x.abs().clamp_min(1e-30)))) * mant


def _rounding_bound(
    ref: torch.Tensor, lhs: torch.Tensor, rhs: torch.Tensor, alpha: float, dtype: torch.dtype
) -> torch.Tensor:
    """How far ``W + alpha L R^T`` accumulated in float32 and rounded once to ``dtype`` may lie
    from ``ref``, its float64 value: a unit in the last place of the result, plus the
    accumulation's own error over the ``K`` products (float64 operands)."""
    k = lhs.shape[1]
    acc_err = k * torch.finfo(torch.float32).eps * (lhs.abs() @ rhs.abs().T)
    return _ulp(ref, dtype) + abs(alpha) * acc_err


@needs_triton
@sm90
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("l_kmajor", [True, False])
@pytest.mark.parametrize("r_kmajor", [True, False])
@pytest.mark.parametrize(
    "m, n, k", [(200, 136, 48), (64, 520, 512), (384, 256, 8)], ids=lambda v: str(v)
)
def test_outer_add_matches_the_rounded_float64_product(dtype, l_kmajor, r_kmajor, m, n, k) -> None:
    from torcheggroll import _triton_update

    w0 = torch.randn(m, n, generator=torch.Generator().manual_seed(0)).to("cuda", dtype)
    lhs = _operand(m, k, l_kmajor, dtype, 1)
    rhs = _operand(n, k, r_kmajor, dtype, 2)
    alpha = -0.0371
    assert _triton_update.supported(w0, lhs, rhs)
    w = w0.clone()
    _triton_update.outer_add_(w, lhs, rhs, alpha)
    ref = w0.double() + alpha * (lhs.double() @ rhs.double().T)
    bound = _rounding_bound(ref, lhs.double(), rhs.double(), alpha, dtype)
    err = (w.double() - ref).abs()
    assert (err <= bound).all(), (err / bound).max().item()
    # The update is not vacuous: the product moved most entries by more than a rounding.
    assert ((w.double() - w0.double()).abs() > _ulp(w0.double(), dtype)).float().mean() > 0.5


@needs_triton
def test_supported_refuses_what_it_cannot_take() -> None:
    from torcheggroll import _triton_update

    w = torch.zeros(16, 16, dtype=torch.bfloat16)
    lhs = torch.zeros(16, 8, dtype=torch.bfloat16)
    assert not _triton_update.supported(w, lhs, lhs)  # not a CUDA tensor
    with pytest.raises(ValueError, match=r"Invalid operands: w \(16, 16\)"):
        _triton_update.outer_add_(w, lhs, lhs, 1.0)


@needs_triton
@sm90
@pytest.mark.cuda
def test_supported_refuses_layouts_and_dtypes_on_the_gpu() -> None:
    from torcheggroll import _triton_update

    w = torch.zeros(64, 48, device="cuda", dtype=torch.bfloat16)
    lhs = torch.zeros(64, 16, device="cuda", dtype=torch.bfloat16)
    rhs = torch.zeros(48, 16, device="cuda", dtype=torch.bfloat16)
    assert _triton_update.supported(w, lhs, rhs)
    assert not _triton_update.supported(w.float(), lhs.float(), rhs.float())  # float32
    assert not _triton_update.supported(w, lhs.float(), rhs)  # mixed dtypes
    assert not _triton_update.supported(w, lhs[:, ::2], rhs[:, ::2])  # neither side contiguous
    assert not _triton_update.supported(w[:, :47], lhs, rhs[:47])  # rows not 16-byte aligned
    assert not _triton_update.supported(w, lhs[:, :8], rhs)  # inner sizes differ


@needs_triton
@sm90
@pytest.mark.cuda
@pytest.mark.parametrize("rank", [1, 4])
def test_step_through_the_kernel_equals_the_step_through_addmm(monkeypatch, rank) -> None:
    """A step of a lone bf16 matrix through the Triton update and through ``addmm_`` lands,
    both ways, within :func:`_rounding_bound` of the float64 update of the step's own operands
    (recorded as the step passes them to the kernel; both runs draw the same noise): the kernel
    within one rounding of a float32 accumulation, ``addmm_`` within that and one rounding of
    the product (cuBLAS does not document where it rounds; its reduced-precision reduction,
    bf16 partial sums of a split K, on by default in torch, is turned off here)."""
    from torcheggroll import _triton_update, _update

    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_bf16_reduced_precision_reduction", False)
    seen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]] = []
    real = _triton_update.outer_add_

    def recording(w, lhs, rhs, alpha):  # type: ignore[no-untyped-def]
        seen.append((w.double(), lhs.double(), rhs.double(), float(alpha)))
        return real(w, lhs, rhs, alpha)

    monkeypatch.setattr(_triton_update, "outer_add_", recording)

    def run(backend: str) -> tuple[torch.Tensor, torch.Tensor]:
        monkeypatch.setenv(_update.UPDATE_GEMM_ENV, backend)
        torch.manual_seed(0)
        lin = torch.nn.Linear(256, 192, bias=False).to("cuda", torch.bfloat16)
        w0 = lin.weight.detach().double()
        x = torch.randn(32, 4, 256, device="cuda", dtype=torch.bfloat16)
        opt = EggrollOptimizer(lin.parameters(), lr=0.5, sigma=0.05, rank=rank, pop_size=32)
        opt.step(lambda pop: pop.forward(lin, x, per_member=True).float().square().mean((1, 2)))
        return w0, lin.weight.detach().double()

    w0, via_addmm = run("cublas")
    assert not seen
    assert ((via_addmm - w0).abs() > _ulp(w0, torch.bfloat16)).float().mean() > 0.5  # it moved
    _, via_kernel = run("triton")
    assert len(seen) == 1, len(seen)
    before, lhs, rhs, alpha = seen[0]
    assert torch.equal(before, w0), (before - w0).abs().max().item()
    ref = before + alpha * (lhs @ rhs.T)
    bound = _rounding_bound(ref, lhs, rhs, alpha, torch.bfloat16)
    # cuBLAS may round the product to bf16 before adding it (on an H100 the two steps were two
    # units apart where one rounding each allows one): its bound has that rounding too.
    product_ulp = _ulp(alpha * (lhs @ rhs.T), torch.bfloat16)
    for name, got, limit in (
        ("kernel", via_kernel, bound),
        ("addmm_", via_addmm, bound + product_ulp),
    ):
        err = (got - ref).abs()
        assert (err <= limit).all(), (name, (err / limit).max().item(), (err > limit).sum().item())


def test_an_unknown_update_gemm_is_refused_before_anything_moves(monkeypatch) -> None:
    from torcheggroll import _update

    lin = torch.nn.Linear(8, 6, bias=False)
    w0 = lin.weight.detach().clone()
    opt = EggrollOptimizer(lin.parameters(), lr=0.5, sigma=0.05, rank=1, pop_size=8, seed=0)
    state = str(opt.state_dict())
    monkeypatch.setenv(_update.UPDATE_GEMM_ENV, "tritn")
    with pytest.raises(ValueError, match="Invalid TORCHEGGROLL_UPDATE_GEMM: 'tritn'"):
        opt.step(lambda pop: torch.arange(8.0))
    assert torch.equal(lin.weight.detach(), w0)
    assert str(opt.state_dict()) == state  # the generation did not advance
