"""The fused low-rank population linear: the shared GEMM plus a rank-r correction per member.

For ``P`` members with ``R`` rows each, stacked into ``M = P * R`` rows (member of row ``m`` is
``p(m) = m // R``), member ``p`` using noise draw ``d_p`` with scale ``c_p = sigma * sign_p /
sqrt(r)``, this computes

    y[m] = x[m] W^T + bias[p(m)] + h[m] A[d_p(m)]^T      with h = c_p x_p B[d_p]  (an (M, r) tensor)

By default (``GEMM_BACKEND``, below) a Triton kernel writes the bias and the correction and
cuBLAS adds the shared GEMM ``x W^T`` into them. The Triton GEMM backends instead add the
correction in the GEMM's epilogue: the GEMM is an ordinary tiled matrix product whose output
tile covers ``BLOCK_M`` rows, which belong to a handful of consecutive members; the correction
for the tile is one more small matrix product added to the accumulator before it is written:

    acc += H_bd (BLOCK_M, MEMBERS * r) @ A_slab (MEMBERS * r, BLOCK_N)

where ``A_slab`` stacks the ``r`` columns of ``A[d_p]`` for the ``MEMBERS`` members that can
occur in
the tile, and ``H_bd`` is block-diagonal: row ``m`` holds ``h[m]`` in the ``r`` columns of its own
member and zeros elsewhere. The extra work is ``MEMBERS * r / K`` of the GEMM (about 0.4% for
16 rows per member, rank 4 and ``K = 8192``), and the output is written once, instead of the
GEMM writing it and a batched ``baddbmm`` reading and writing it again.

``h`` is a separate, memory-bound kernel of the same kind (a block-diagonal product). Both
kernels read the generation's noise draws ``A`` ``(D, m, r)`` and ``B`` ``(D, n, r)`` as they were
drawn (float32), by index: the per-member factors (``P`` scaled, rounded copies, which cost
more memory traffic than the correction itself) are never built. Both need Triton and a CUDA
device (or Triton's interpreter); :func:`lowrank_linear_reference` on :func:`member_factors` is
the readable PyTorch version they are tested against, and what runs everywhere else.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ._triton_modules import fused_enabled, triton_module

__all__ = [
    "OnTheFly",
    "fused_available",
    "lowrank_linear",
    "lowrank_linear_batched",
    "lowrank_linear_fused",
    "lowrank_linear_member",
    "lowrank_linear_reference",
    "member_factors",
    "member_projection_fused",
    "population_linear",
]


@dataclass(frozen=True)
class OnTheFly:
    """What a layer's noise is a function of, for kernels that draw the factors where they use
    them (a few rows per member, :mod:`torcheggroll._triton_onthefly`), and ``fill``, which
    fills the noise buffers before any kernel reads them instead. ``key`` and ``generation`` are
    ints or device tensors; without them only ``fill`` is known."""

    fill: Callable[[], None]
    key: Any = None
    generation: Any = None
    index: int = 0
    rank: int = 0
    paired: bool = False

    def in_kernel(self, x: torch.Tensor, rows: int) -> bool:
        """Whether the on-the-fly kernels take an input of ``rows`` rows per member like ``x``."""
        if self.key is None or not (x.is_cuda or _cpu_interpreted()):
            return False
        kernels = _onthefly()
        return (
            kernels is not None
            and kernels.supported_rank(self.rank)
            and kernels.unit_rows(rows, self.paired) <= kernels.MAX_UNIT_ROWS
        )


def _onthefly() -> Any:
    return triton_module("_triton_onthefly")


def member_factors(
    a: torch.Tensor, b: torch.Tensor, draw: torch.Tensor, coeff: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each member's factors from the generation's draws: ``(P, m, r)`` scaled ``a`` and
    ``(P, n, r)`` ``b`` in ``dtype``, for ``a`` ``(D, m, r)``, ``b`` ``(D, n, r)`` and ``draw``,
    ``coeff`` ``(P,)``. This is what the fused kernels avoid building."""
    a_p = a.index_select(0, draw) * coeff.to(a.dtype).view(-1, 1, 1)
    return a_p.to(dtype), b.index_select(0, draw).to(dtype)


def lowrank_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    a: torch.Tensor,
    b: torch.Tensor,
) -> torch.Tensor:
    """``y_p = x_p W^T + bias_p + (x_p B_p) A_p^T`` with PyTorch's batched products.

    Args:
        x: ``(P, R, n)``: ``R`` input rows for each of ``P`` members.
        weight: ``(m, n)`` the shared matrix (or ``(P, m, n)``, one per member).
        bias: ``None``, ``(m,)`` shared or ``(P, m)`` per member.
        a: ``(P, m, r)``, b: ``(P, n, r)``: each member's factors (scale folded into ``a``),
            see :func:`member_factors`.

    Returns:
        ``(P, R, m)`` in ``x.dtype``.
    """
    P, R, n = x.shape
    if weight.dim() == 3:
        base = torch.bmm(x, weight.transpose(1, 2))
    else:
        base = (x.reshape(P * R, n) @ weight.T).reshape(P, R, -1)
    if bias is not None:
        base = base + (bias if bias.dim() == 1 else bias.unsqueeze(1))
    return torch.baddbmm(base, torch.bmm(x, b), a.transpose(1, 2))


# How the shared GEMM is computed: "tma" (the correction in the epilogue of a Triton GEMM with
# tensor-memory-accelerator loads and a persistent grid; sm90+ and 16-byte aligned rows),
# "triton" (the same with ordinary loads), "cublas" (PyTorch's GEMM, then an in-place kernel
# adds the correction), or "auto" (the default): "cublas". Measured by
# benchmarks/step_graph.py: with the correction written first, cuBLAS is ahead of the TMA
# kernel (256 members x 16 rows, rank 4, width 8192, forward over inference: 0.905 against 0.78
# on an H200, autotuned; 0.74 against 0.64 on an H100 with TORCHEGGROLL_AUTOTUNE=0); the
# plain-load Triton GEMM is well behind both.
GEMM_BACKENDS = ("tma", "triton", "cublas")
GEMM_BACKEND = os.environ.get("TORCHEGGROLL_FUSED_GEMM", "auto")
# Where cuBLAS computes the shared GEMM: whether the correction kernel writes the correction
# first and the GEMM adds into it (``y.addmm_(x, W^T)``, one pass over ``y`` fewer; the
# default), or the kernel adds the correction into the GEMM's output ("0"). Read at every call.
# Measured on an H100 by benchmarks/correction_order.py: writing first is 1-2.5 % faster in every
# configuration (the paper's linear at ranks 1 and 4, 256 members x 16 rows), worst trials too.
CORRECTION_FIRST_ENV = "TORCHEGGROLL_CORRECTION_FIRST"
# In how many parts the projection ``h = x B`` splits its inner dimension: "1" (the default: one
# program per block of rows), "auto" (about four programs per SM,
# :func:`torcheggroll._triton_kernels.projection_splits`) or a number. Read at every call.
PROJECTION_SPLITS_ENV = "TORCHEGGROLL_PROJECTION_SPLITS"


# Where the correction is written first: whether one kernel makes the projection and writes the
# correction in a single pass over the rows ("1"; h stays in registers and one launch replaces
# two) or two kernels do ("0", the default). Tiles of many rows per member only (block-diagonal
# factors, :func:`torcheggroll._triton_kernels.one_pass_applies`); others keep the two kernels.
# Read at every call.
ONE_PASS_ENV = "TORCHEGGROLL_ONE_PASS"


def _correction_first() -> bool:
    return os.environ.get(CORRECTION_FIRST_ENV, "1") != "0"


def _one_pass() -> bool:
    value = os.environ.get(ONE_PASS_ENV, "0")
    if value not in ("0", "1"):
        raise ValueError(f"Invalid {ONE_PASS_ENV}: {value}")
    return value == "1"


# ---------------------------------------------------------------------------- availability
_triton_enabled = fused_enabled


def _cpu_interpreted() -> bool:
    """CPU tensors go to the kernels only when asked for (``TORCHEGGROLL_FUSED=interpret``) and
    Triton runs its interpreter (``TRITON_INTERPRET=1`` before Triton is imported): a check of
    the kernels' logic without a GPU, far slower than PyTorch's own CPU kernels."""
    return (
        os.environ.get("TORCHEGGROLL_FUSED") == "interpret"
        and os.environ.get("TRITON_INTERPRET") == "1"
    )


def _kernels() -> Any:
    """The Triton kernels of the fused linear, imported (and registered) once; None without
    Triton."""
    return triton_module("_triton_kernels")


def fused_available(x: torch.Tensor) -> bool:
    """Whether the fused kernels can evaluate a layer whose inputs look like ``x``.

    Needs Triton, a CUDA tensor (or, for float16, Triton's CPU interpreter, see
    :func:`_cpu_interpreted`), a half precision dtype (``float16``/``bfloat16``: the dtypes whose
    GEMMs run on tensor cores without changing PyTorch's float32 numerics) and
    ``TORCHEGGROLL_FUSED`` not set to ``0``.
    """
    if not _triton_enabled() or x.dtype not in (torch.float16, torch.bfloat16):
        return False
    if not x.is_cuda and (not _cpu_interpreted() or x.dtype == torch.bfloat16):
        return False  # the interpreter (numpy) has no bfloat16 products
    return _kernels() is not None


def _tma_ok(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Tensor-memory-accelerator loads need sm90+ and 16-byte aligned rows."""
    if not x.is_cuda or torch.cuda.get_device_capability(x.device)[0] < 9:
        return False
    return all(
        t.data_ptr() % 16 == 0 and (t.stride(0) * t.element_size()) % 16 == 0 for t in (x, w)
    )


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` ``(P, R, n)`` as ``(P * R, n)`` with a contiguous last dimension."""
    x2 = x.reshape(x.shape[0] * x.shape[1], x.shape[2])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def member_projection_fused(
    x: torch.Tensor, b: torch.Tensor, draw: torch.Tensor, coeff: torch.Tensor
) -> torch.Tensor:
    """``h = coeff_p * x_p B_{draw_p}`` as ``(P * R, r)`` in ``x.dtype``: ``x`` is ``(P, R, n)``,
    ``b`` the draws ``(D, n, r)``, ``draw`` and ``coeff`` ``(P,)``."""
    P, R, n = x.shape
    kernels = _kernels()
    splits = os.environ.get(PROJECTION_SPLITS_ENV, "1")
    if splits == "auto":
        parts = kernels.projection_splits(P * R, n, x.device)
    elif splits.isdigit() and int(splits) >= 1:
        parts = int(splits)
    else:
        raise ValueError(f"Invalid {PROJECTION_SPLITS_ENV}: {splits}")
    h = torch.empty(P * R, b.shape[-1], device=x.device, dtype=x.dtype)
    kernels.member_projection(_rows(x), b.contiguous(), draw, coeff.float(), h, R, parts)
    return h


def lowrank_linear_fused(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    a: torch.Tensor,
    b: torch.Tensor,
    draw: torch.Tensor,
    coeff: torch.Tensor,
) -> torch.Tensor:
    """:func:`lowrank_linear_reference` on :func:`member_factors` ``(a, b, draw, coeff)``: the
    projection ``h`` and the correction in Triton kernels that read the draws directly, and the
    shared GEMM by the backend of ``GEMM_BACKEND`` (see the module doc).

    Args:
        x: ``(P, R, n)``; weight: ``(m, n)``; bias: ``None``, ``(m,)`` or ``(P, m)``.
        a, b: the generation's draws ``(D, m, r)`` and ``(D, n, r)``, any float dtype.
        draw: ``(P,)`` integer draw of each member; coeff: ``(P,)`` each member's scale.

    Returns:
        ``(P, R, m)`` in ``x.dtype``.
    """
    P, R, n = x.shape
    m, r = weight.shape[0], a.shape[-1]
    if (
        weight.shape != (m, n)
        or a.shape[1] != m
        or b.shape != (a.shape[0], n, r)
        or draw.shape != (P,)
        or coeff.shape != (P,)
    ):
        raise ValueError(
            f"Invalid shapes: x {tuple(x.shape)}, weight {tuple(weight.shape)}, "
            f"a {tuple(a.shape)}, "
            f"b {tuple(b.shape)}, draw {tuple(draw.shape)}, coeff {tuple(coeff.shape)}"
        )
    kernels = _kernels()
    draw = draw.to(torch.int64).contiguous()
    x2 = _rows(x)
    w = weight if weight.stride(-1) == 1 else weight.contiguous()
    y = torch.empty(P * R, m, device=x.device, dtype=x.dtype)
    if bias is not None:
        bias = bias.to(x.dtype).contiguous()
    a = a.contiguous()
    backend = GEMM_BACKEND
    if backend == "auto":
        backend = "cublas"
    elif backend == "tma" and not _tma_ok(x2, w):
        backend = "triton"
    first = backend == "cublas" and _correction_first()
    if first and _one_pass() and kernels.one_pass_applies(R, r):
        kernels.projection_correction(x2, b.contiguous(), a, draw, coeff.float(), bias, y, R)
        y.addmm_(x2, w.T)
        return y.reshape(P, R, m)
    h = member_projection_fused(x, b, draw, coeff)
    if first:
        kernels.correction_add(y, bias, h, a, draw, R, accumulate=False)
        y.addmm_(x2, w.T)
    elif backend == "cublas":
        torch.mm(x2, w.T, out=y)
        kernels.correction_add(y, bias, h, a, draw, R)
    elif backend == "tma":
        kernels.lowrank_linear_tma(x2, w, bias, h, a, draw, y, R)
    else:
        kernels.lowrank_linear(x2, w, bias, h, a, draw, y, R)
    return y.reshape(P, R, m)


# ---------------------------------------------------------------------------- the vmap-aware op
def lowrank_linear_member(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    a: torch.Tensor,
    b: torch.Tensor,
    draw: torch.Tensor,
    coeff: torch.Tensor,
) -> torch.Tensor:
    """One member's ``x W^T + bias + coeff * (x B_d) A_d^T`` with ``d = draw`` (a 0-d index into
    the draws ``a`` ``(D, m, r)``, ``b`` ``(D, n, r)``): the composite body of
    :func:`lowrank_linear`."""
    a_d = (a[draw] * coeff).to(x.dtype)
    return F.linear(x, weight, bias) + (x @ b[draw].to(x.dtype)) @ a_d.T


@torch.library.custom_op("torcheggroll::lowrank_linear", mutates_args=())
def lowrank_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    a: torch.Tensor,
    b: torch.Tensor,
    draw: torch.Tensor,
    coeff: torch.Tensor,
) -> torch.Tensor:
    """:func:`lowrank_linear_member` as an operator with a batching rule.

    Called per member inside :func:`torch.func.vmap` (the low-rank forward), the rule sees the
    whole population at once and runs :func:`lowrank_linear_fused` when the input rows are per
    member and the fused kernels are available, the batched composite otherwise. Forward
    only: it has no autograd formula (ES needs none, and the low-rank forward does not call it
    while gradients are being recorded).
    """
    return lowrank_linear_member(x, weight, bias, a, b, draw, coeff)


@lowrank_linear.register_fake
def _(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    a: torch.Tensor,
    b: torch.Tensor,
    draw: torch.Tensor,
    coeff: torch.Tensor,
) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def population_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    a: torch.Tensor,
    b: torch.Tensor,
    draw: torch.Tensor,
    coeff: torch.Tensor,
    source: OnTheFly | None = None,
) -> torch.Tensor:
    """The whole population's layer in the fused kernels: ``x`` ``(P, R, n)`` member-major, a
    shared ``weight`` ``(m, n)``, ``bias`` ``None``, ``(m,)`` or ``(P, m)``, the generation's
    draws ``a``, ``b`` and each member's ``draw`` and ``coeff`` ``(P,)``. With a few rows per
    member and ``source`` the factors are drawn in the kernels, otherwise read from the filled
    draws. Returns ``(P, R, m)``; both population forwards call this."""
    P, R, _ = x.shape
    if source is not None and source.in_kernel(x, R):
        y = _onthefly().linear_onthefly(
            _rows(x),
            weight,
            bias,
            draw,
            coeff,
            source.key,
            source.generation,
            source.index,
            source.rank,
            source.paired,
            R,
            _correction_first(),
        )
        return y.reshape(P, R, weight.shape[0])
    if source is not None:
        source.fill()
    return lowrank_linear_fused(x, weight, bias, a, b, draw, coeff)


def _lowrank_linear_vmap(
    info: Any,
    in_dims: tuple[int | None, ...],
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    a: torch.Tensor,
    b: torch.Tensor,
    draw: torch.Tensor,
    coeff: torch.Tensor,
    source: OnTheFly | None = None,
) -> tuple[torch.Tensor, int]:
    x_dim, w_dim, bias_dim, a_dim, b_dim, draw_dim, coeff_dim = in_dims
    size = info.batch_size

    def batch_first(t: torch.Tensor, dim: int | None) -> torch.Tensor:
        return t.movedim(dim, 0) if dim is not None else t.unsqueeze(0).expand(size, *t.shape)

    xs = batch_first(x, x_dim)
    lead = xs.shape[1:-1]
    x3 = xs.reshape(size, -1, xs.shape[-1])
    draws, coeffs = batch_first(draw, draw_dim), batch_first(coeff, coeff_dim)
    if bias is not None and bias_dim is not None:
        bias = bias.movedim(bias_dim, 0)
    shared = w_dim is None and a_dim is None and b_dim is None
    if shared and x3.numel() > 0 and fused_available(x3):
        out = population_linear(x3, weight, bias, a, b, draws, coeffs, source)
    else:  # per-member centres or draws are not what the low-rank forward passes; kept for totality
        if source is not None:
            source.fill()
        members = torch.arange(size, device=draws.device)
        a_p = a.index_select(0, draws) if a_dim is None else a.movedim(a_dim, 0)[members, draws]
        b_p = b.index_select(0, draws) if b_dim is None else b.movedim(b_dim, 0)[members, draws]
        a_p = (a_p * coeffs.to(a_p.dtype).view(-1, 1, 1)).to(x.dtype)
        w = weight if w_dim is None else weight.movedim(w_dim, 0)
        out = lowrank_linear_reference(x3, w, bias, a_p, b_p.to(x.dtype))
    return out.reshape(size, *lead, out.shape[-1]), 0


lowrank_linear.register_vmap(_lowrank_linear_vmap)


class _VmapInfo:
    def __init__(self, batch_size: int) -> None:
        self.batch_size = batch_size


_BATCHED_KEY = torch._C.DispatchKeySet(torch._C.DispatchKey.FuncTorchBatched)


def lowrank_linear_batched(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    a: torch.Tensor,
    b: torch.Tensor,
    draw: torch.Tensor,
    coeff: torch.Tensor,
    source: OnTheFly | None = None,
) -> torch.Tensor | None:
    """:func:`lowrank_linear` called per member inside the innermost :func:`torch.func.vmap`,
    without the operator dispatch: the batching rule applied to the unwrapped tensors directly.

    The low-rank forward calls this once per linear layer; going through the operator instead
    adds the dispatcher and the generic batching helper, whose Python (argument trees unwrapped
    and rewrapped) took longer than launching the kernels. Returns ``None`` where the shortcut
    does not apply (``draw`` not batched at the innermost vmap level, ``weight``, ``a`` or ``b``
    batched, or tensors batched at an outer level too); call the operator then.

    Per member (inside the vmap): ``x`` ``(..., n)``, ``weight`` ``(m, n)``, ``bias`` ``None`` or
    ``(m,)``, ``a`` ``(D, m, r)`` and ``b`` ``(D, n, r)`` unbatched draws, ``draw`` and ``coeff``
    0-d. ``source``: see :class:`OnTheFly` (with one row per member the factors are drawn in
    the kernels, otherwise the buffer is filled first). Returns ``(..., m)`` in ``x.dtype``,
    batched like ``x``.
    """
    fx = torch._C._functorch
    level = fx.maybe_get_level(draw)
    if level < 0 or level != fx.maybe_current_level() or fx.maybe_get_level(x) != level:
        return None
    if any(fx.is_batchedtensor(t) for t in (weight, a, b)):
        return None
    x_val, x_dim = fx._unwrap_batched(x, level)
    draw_val, draw_dim = fx._unwrap_batched(draw, level)
    coeff_val, coeff_dim = fx._unwrap_batched(coeff, level)
    bias_val, bias_dim = (None, None) if bias is None else fx._unwrap_batched(bias, level)
    values = (
        (x_val, draw_val, coeff_val) if bias_val is None else (x_val, draw_val, coeff_val, bias_val)
    )
    if any(fx.is_batchedtensor(t) for t in values):
        return None
    in_dims = (x_dim, None, bias_dim, None, None, draw_dim, coeff_dim)
    assert x_dim is not None
    with torch._C._ExcludeDispatchKeyGuard(_BATCHED_KEY):
        out, out_dim = _lowrank_linear_vmap(
            _VmapInfo(x_val.shape[x_dim]),
            in_dims,
            x_val,
            weight,
            bias_val,
            a,
            b,
            draw_val,
            coeff_val,
            source,
        )
    return fx._add_batch_dim(out, out_dim, level)
