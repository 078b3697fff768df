"""The ES update of every perturbed parameter, computed with a few batched operations.

For parameter ``p`` of group ``g`` the direction is (see :class:`~torcheggroll.EggrollOptimizer`)

    d_p = sigma_g / sqrt(N) * sum_k c_gk E_pk + weight_decay_g * p,   c_gk = s_g,2k - s_g,2k+1

(``c_gk = s_gk`` without antithetic pairs), where ``s_g`` are the group's shaped losses, and the
step is ``p -= lr_g * d_p``. The coefficients are made once per group; the low-rank parameters of
one ``(m, n, rank)`` are updated by one batched product ``(A * c) B^T`` over their draws, the dense
ones by one matrix product for all of them, and the parameters are changed with
``torch._foreach_*`` calls (on CUDA, a lone matrix without weight decay takes its update in the
product's epilogue, ``p.addmm_(A * c, B^T, alpha=-lr)``).

Nothing here reads a value on the host. Whether the update is applied is decided on the device
from the coefficients alone, before any product, as ``torch.amp.GradScaler`` does with
``found_inf``: every noise entry the definition produces is below :data:`NORMAL_BOUND` in size,
so ``|(A c B^T)_ij / sqrt(r)| <= sqrt(r) * NORMAL_BOUND**2 * sum_k |c_k|`` (and ``NORMAL_BOUND *
sum_k |c_k|`` for dense noise). If some loss is finite, every coefficient is finite and
``lr`` times that bound stays far inside the float range, the products are finite by
construction and no pass over them is needed to check; otherwise the coefficients are zeroed and
nothing moves. Weight decay adds ``lr * wd * p``, which no bound on the coefficients covers: a
decayed group's largest ``|p|`` is reduced on the device too (one reduction per group), and the
update is withheld when the decay could come near the float range. float16 parameters, whose
range is small, are checked element by element.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ._plan import Plan
from ._triton_modules import fused_enabled, triton_module
from .shaping import replace_nonfinite, shape_losses

__all__ = ["NORMAL_BOUND", "Update", "apply", "directions", "grads", "reads_buffers"]

_HALF = (torch.float16, torch.bfloat16)
NORMAL_BOUND = math.sqrt(-2.0 * math.log(2.0**-24))  # 5.768: the largest |normal| drawn
# The updates allowed: far inside float32's range (3.4e38), so that adding them cannot overflow.
_UPDATE_LIMIT = 1e30
# The devices where a lone matrix takes its update in its product's epilogue (``p.addmm_``); the
# CPU keeps the general path (tests add "cpu" here to check the epilogue's arithmetic there).
EPILOGUE_DEVICES = ("cuda",)
# The devices where the decision is one Triton kernel (:mod:`torcheggroll._triton_decision`);
# tests add "cpu" here, with Triton's interpreter, to check it against the PyTorch path.
DECISION_DEVICES = ("cuda",)
# The devices where a lone matrix's update operands ``A * c`` and ``B`` are drawn by a kernel from
# the noise counters (:func:`torcheggroll._triton_noise.factor_operand`) in the product's dtype,
# instead of read from the filled noise buffer, scaled and cast; tests add "cpu" here, with
# Triton's interpreter.
OPERAND_DEVICES = ("cuda",)
# Which product takes a lone half-precision matrix's update on sm90+: "cublas" (``addmm_``, the
# default) or "triton" (:func:`torcheggroll._triton_update.outer_add_`, which reads the weight's
# tile while its main loop runs). Read at every step; benchmarks/update_gemm.py and
# ``benchmarks/step_graph.py --update-gemm`` compare them.
UPDATE_GEMM_ENV = "TORCHEGGROLL_UPDATE_GEMM"


@dataclass
class Update:
    """What a step's losses decided.

    Attributes:
        coeffs: ``(G, D)`` float64 ``sigma_g / sqrt(N) * c_gk``, all zero unless :attr:`ok`.
        ok: 0-d bool, whether the update is applied.
        flags: ``(3,)`` int64: members with a non-finite loss, whether every loss was the same,
            whether the update was withheld although some loss was finite.
        new_values: float16 parameters' ``p - lr * d_p`` by position in :attr:`Plan.owned`
            (computed to check for overflow; applied where :attr:`ok`).
    """

    coeffs: torch.Tensor
    ok: torch.Tensor
    flags: torch.Tensor
    new_values: dict[int, torch.Tensor] = field(default_factory=dict)


def _finite(losses: torch.Tensor) -> torch.Tensor:
    """``torch.isfinite(losses)`` of floating-point losses in two kernels (``isfinite`` takes
    four): ``x * 0`` is 0 for finite ``x`` and NaN for NaN and ±inf."""
    return (losses * 0) == 0


def _coefficients(
    losses: torch.Tensor,
    finite: torch.Tensor,
    groups: Sequence[dict[str, Any]],
    antithetic: bool,
    pop_size: int,
) -> list[torch.Tensor]:
    """``(D,)`` float64 ``sigma_g / sqrt(N) * c_gk`` of every group ``g`` (``finite``: the
    losses' finite mask). Groups with the same ``maximize`` and ``shaping`` share the work."""
    x = losses.to(torch.float64)
    shaped: dict[tuple[bool, str], torch.Tensor] = {}
    rows = []
    for group in groups:
        key = (bool(group["maximize"]), group["shaping"])
        if key not in shaped:
            # Negate before replacing non-finite values, so that they become the worst member
            # (the largest loss) also when the closure returns a fitness to maximize.
            clean = replace_nonfinite(-x if key[0] else x, finite)
            s = shape_losses(clean, key[1])
            shaped[key] = s.view(-1, 2)[:, 0] - s.view(-1, 2)[:, 1] if antithetic else s
        rows.append(shaped[key] * (float(group["sigma"]) / math.sqrt(pop_size)))
    return rows


def _identical(losses: torch.Tensor, finite: torch.Tensor) -> torch.Tensor:
    """0-d bool: every member's loss is the same finite value (more than one member)."""
    if losses.numel() < 2:
        return torch.zeros((), dtype=torch.bool, device=losses.device)
    return (losses == losses[0]).all() & finite[0]


class _Workspace:
    """Outputs of the products, allocated once per plan, and each parameter's view of them."""

    def __init__(self, plan: Plan) -> None:
        self.products: list[torch.Tensor] = []
        self.raw: list[torch.Tensor | None] = [None] * len(plan.owned)
        self.cast: list[int] = []  # owned whose view must be cast to the parameter's dtype
        for b, buffer in enumerate(plan.buffers):
            for bucket, update in zip(buffer.buckets, plan.bucket_updates[b], strict=True):
                rows, _, m, _ = bucket.a.shape
                dtype = plan.owned[update.owned[0]].param.dtype
                prod_dtype = dtype if dtype in _HALF else buffer.dtype
                prod = torch.zeros(
                    rows, m, bucket.b.shape[2], dtype=prod_dtype, device=buffer.device
                )
                self.products.append(prod)
                for row, o in enumerate(update.owned):
                    self.raw[o] = prod[row].view(plan.owned[o].param.shape)
            if buffer.dense is not None:
                prod = torch.zeros(
                    plan.group_count,
                    buffer.dense.shape[1],
                    dtype=buffer.dtype,
                    device=buffer.device,
                )
                self.products.append(prod)
                for e, (col, numel) in buffer.dense_columns.items():
                    o = plan.entry_owned[b][e]
                    owned = plan.owned[o]
                    self.raw[o] = prod[owned.group, col : col + numel].view(owned.param.shape)
                    if owned.param.dtype != buffer.dtype:
                        self.cast.append(o)
        self.by_group = _by_group_and_device(plan, range(len(plan.owned)))
        self.float16 = [
            o for o, owned in enumerate(plan.owned) if owned.param.dtype == torch.float16
        ]


def _workspace(plan: Plan) -> _Workspace:
    ws = plan.__dict__.get("_workspace")
    if ws is None:
        ws = plan.__dict__["_workspace"] = _Workspace(plan)
    return ws


def _by_group_and_device(plan: Plan, positions: Any) -> dict[tuple[int, torch.device], list[int]]:
    out: dict[tuple[int, torch.device], list[int]] = {}
    for o in positions:
        owned = plan.owned[o]
        out.setdefault((owned.group, owned.param.device), []).append(o)
    return out


def _draw_coefficients(plan: Plan, b: int, k: int, c: torch.Tensor) -> torch.Tensor:
    """``(P, D)`` the coefficients of bucket ``k`` of buffer ``b``'s parameters: their groups'
    rows of ``c`` ``(G, D)`` times each parameter's sigma factor over ``sqrt(rank)``."""
    update = plan.bucket_updates[b][k]
    factors = plan.__dict__.setdefault("_factors", {})
    factor = factors.get((b, k, c.dtype))
    if factor is None:
        r = plan.buffers[b].buckets[k].a.shape[3]
        factor = factors[b, k, c.dtype] = (update.scales / math.sqrt(r)).to(c.dtype)
    return c.index_select(0, update.groups) * factor


def _operands(plan: Plan, b: int, k: int, coef: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(P, m, D r)`` ``A * coef`` and ``(P, n, D r)`` ``B`` of bucket ``k`` of buffer ``b``
    (``coef`` ``(P, D)``), in the product's dtype: the update of row ``p`` is
    ``lhs[p] @ rhs[p].T``."""
    bucket = plan.buffers[b].buckets[k]
    rows, draws, m, r = bucket.a.shape
    n = bucket.b.shape[2]
    param_dtype = plan.owned[plan.bucket_updates[b][k].owned[0]].param.dtype
    # Half-precision parameters: the update is rounded to their dtype anyway, and a float32
    # product would cost more than the population's forward.
    dtype = param_dtype if param_dtype in _HALF else bucket.a.dtype
    if r == 1:
        # (m, D) and (n, D) are transposes of the draws: no copy besides the scaling and cast.
        lhs = torch.empty(rows, draws, m, dtype=dtype, device=coef.device)
        torch.mul(bucket.a[..., 0], coef[:, :, None], out=lhs)
        rhs = bucket.b[..., 0] if dtype == bucket.b.dtype else bucket.b[..., 0].to(dtype)
        return lhs.transpose(1, 2), rhs.transpose(1, 2)
    # The contraction runs over (factor, draw) in that order: (P, D, m * r) transposed to
    # (P, m * r, D) is one 2-D transpose per parameter, cheaper than moving runs of r entries.
    lhs = torch.empty(rows, m * r, draws, dtype=dtype, device=coef.device)
    torch.mul(bucket.a.reshape(rows, draws, m * r).transpose(1, 2), coef[:, None, :], out=lhs)
    rhs = torch.empty(rows, n * r, draws, dtype=dtype, device=coef.device)
    rhs.copy_(bucket.b.reshape(rows, draws, n * r).transpose(1, 2))
    return lhs.view(rows, m, r * draws), rhs.view(rows, n, r * draws)


def _operand_kernels(device: torch.device) -> Any:
    """:mod:`torcheggroll._triton_noise` where it draws the update's operands on ``device``."""
    if device.type not in OPERAND_DEVICES or not fused_enabled():
        return None
    return triton_module("_triton_noise")


def _drawn_operands(
    plan: Plan, b: int, k: int, coef: torch.Tensor, counters: tuple[Any, Any], kernels: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_operands` of a bucket of one parameter, ``coef`` ``(D,)``, drawn from the noise
    counters ``(key, generation)`` without reading the noise buffer: the same values (the same
    definition, rounded once to the product's dtype)."""
    bucket = plan.buffers[b].buckets[k]
    _, draws, m, r = bucket.a.shape
    n = bucket.b.shape[2]
    owned = plan.owned[plan.bucket_updates[b][k].owned[0]]
    dtype = owned.param.dtype if owned.param.dtype in _HALF else bucket.a.dtype
    key, gen = counters
    out = []
    for stream, rows, scale in ((0, m, coef), (1, n, None)):
        if r == 1:  # (D, rows) storage, as _operands: (rows, D) transposed views
            t = torch.empty(draws, rows, dtype=dtype, device=coef.device).T
        else:  # (rows * r, D): entry i * r + q of draw d at [i * r + q, d]
            t = torch.empty(rows * r, draws, dtype=dtype, device=coef.device)
        kernels.factor_operand(t, scale, key, gen, owned.index, stream)
        out.append(t.reshape(1, rows, r * draws) if r > 1 else t[None])
    return out[0], out[1]


def reads_buffers(plan: Plan, groups: Sequence[dict[str, Any]]) -> bool:
    """Whether :func:`apply` reads the noise buffers (else every parameter's operands are drawn
    from the counters and the buffers need not be filled for the update)."""
    for b, buffer in enumerate(plan.buffers):
        if buffer.dense is not None or _operand_kernels(buffer.device) is None:
            return True
        for k in range(len(buffer.buckets)):
            if not _fusable(plan, b, k, groups):
                return True
    return False


def _bound(group: dict[str, Any], lr: Any) -> Any:
    """``lr`` times the largest entry ``|(A B^T)_ij / sqrt(r)|`` or ``|E_ij|`` a unit coefficient
    can make in ``group`` (see the module doc)."""
    return math.sqrt(max(int(group["rank"]), 1)) * NORMAL_BOUND**2 * lr


def _decide_in_kernel(
    plan: Plan, groups: Sequence[dict[str, Any]], losses: torch.Tensor, lrs: Sequence[Any]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """``(coeffs, ok, flags)`` from :mod:`torcheggroll._triton_decision`, or None where it does
    not apply: another device, no Triton, groups differing in ``maximize`` or ``shaping``, a
    shaping it lacks, a learning rate given as a tensor."""
    if losses.device.type not in DECISION_DEVICES or not losses.is_floating_point():
        return None
    key = {(bool(g["maximize"]), g["shaping"]) for g in groups}
    if len(key) != 1 or any(isinstance(lr, torch.Tensor) for lr in lrs):
        return None
    ((maximize, shaping),) = key
    kernel = triton_module("_triton_decision") if fused_enabled() else None
    if kernel is None or shaping not in kernel.SHAPINGS:
        return None
    sigmas = tuple(float(g["sigma"]) for g in groups)
    cached = plan.__dict__.get("_decision_scales")
    if cached is None or cached[0] != (sigmas, losses.device):
        scales = torch.tensor(
            [s / math.sqrt(plan.pop_size) for s in sigmas],
            dtype=torch.float64,
            device=losses.device,
        )
        cached = plan.__dict__["_decision_scales"] = ((sigmas, losses.device), scales)
    # The bound of the module doc on sum_k |c_k| for every group at once; the kernel takes it
    # as a float32 scalar, so it is capped below float32's largest value (a norm that large is
    # refused rather than compared with infinity).
    limit = math.inf
    for g, lr in enumerate(lrs):
        unit = _bound(groups[g], abs(float(lr))) * sigmas[g] / math.sqrt(plan.pop_size)
        if unit > 0:
            limit = min(limit, _UPDATE_LIMIT / unit)
    return kernel.decide(
        losses.contiguous(), cached[1], shaping, maximize, plan.antithetic, min(limit, 3e38)
    )


def directions(
    plan: Plan, groups: Sequence[dict[str, Any]], losses: torch.Tensor, lrs: Sequence[Any]
) -> Update:
    """Decide the update of ``losses`` ``(pop_size,)``: the coefficients, whether to apply it,
    and (float16 parameters) the values to apply. ``lrs`` are the groups' learning rates."""
    losses = losses.detach()
    device = losses.device
    decided = _decide_in_kernel(plan, groups, losses, lrs)
    if decided is not None:
        found = Update(*decided)
    else:
        finite = _finite(losses)
        bad = losses.numel() - finite.sum()
        any_finite = bad < losses.numel()
        rows = _coefficients(losses, finite, groups, plan.antithetic, plan.pop_size)
        # The largest change any product can make, per group (see the module doc). A NaN or an
        # infinite coefficient makes its group's norm NaN or inf, which fails the comparison.
        ok = any_finite
        for g, (lr, row) in enumerate(zip(lrs, rows, strict=True)):
            unit = _bound(groups[g], _number(lr, device))
            norm = torch.linalg.vector_norm(row, 1)
            if isinstance(unit, torch.Tensor):
                ok = ok & (norm * unit < _UPDATE_LIMIT)
            else:
                ok = ok & (norm < (_UPDATE_LIMIT / unit if unit > 0 else math.inf))
        coeffs = torch.where(ok, torch.stack(rows) if len(rows) > 1 else rows[0][None], 0.0)
        # ok implies any_finite, so their exclusive or is "withheld although some was finite".
        flags = torch.stack([bad, _identical(losses, finite), any_finite ^ ok])
        found = Update(coeffs, ok, flags)
    ws = _workspace(plan)
    decay_ok = _decay_bounded(plan, groups, lrs, ws, device)
    if decay_ok is not None:
        _withhold_unless(found, decay_ok)
    if ws.float16:
        # float16 may overflow in p - lr * d itself: build the new values to check them.
        stays = []
        values = grads(plan, groups, found, ws.float16)
        for o in ws.float16:
            p = plan.owned[o].param
            new = p.detach().add(values[o], alpha=-_number(lrs[plan.owned[o].group]))
            stays.append((new.isfinite() | ~p.isfinite()).all().to(device))
            found.new_values[o] = new
        _withhold_unless(found, torch.stack(stays).all())
    return found


def _withhold_unless(found: Update, stays: torch.Tensor) -> None:
    """Withhold ``found``'s update unless ``stays`` (a 0-d bool on the losses' device), counting
    it as withheld although some loss was finite."""
    ok = found.ok & stays
    withheld = (found.ok & ~ok).view(1).to(found.flags.dtype)
    found.flags = torch.cat([found.flags[:2], found.flags[2:] | withheld])
    found.ok = ok
    found.coeffs = torch.where(ok, found.coeffs, 0.0)


def _decay_bounded(
    plan: Plan,
    groups: Sequence[dict[str, Any]],
    lrs: Sequence[Any],
    ws: _Workspace,
    device: torch.device,
) -> torch.Tensor | None:
    """0-d bool: whether weight decay stays far inside the float range, ``|wd| * max|p| *
    max(1, lr) < 1e30`` over every decayed group (its terms ``wd * p`` and ``lr * wd * p`` are
    then finite by a wide margin); None without weight decay. One reduction per group and
    device, decided on the device; a non-finite parameter fails it."""
    checks = []
    for (g, _), members in ws.by_group.items():
        wd = groups[g]["weight_decay"]
        if wd == 0:
            continue
        params = [plan.owned[o].param.detach() for o in members]
        norms = torch._foreach_norm(params, math.inf)  # in each parameter's dtype
        peak = torch.stack([n.to(torch.float64) for n in norms]).max().to(device)
        lr = _number(lrs[g], device)
        scale = torch.clamp(lr, min=1.0) if isinstance(lr, torch.Tensor) else max(1.0, lr)
        checks.append(peak * (abs(wd) * scale) < _UPDATE_LIMIT)
    return torch.stack(checks).all() if checks else None


def grads(
    plan: Plan, groups: Sequence[dict[str, Any]], found: Update, only: Sequence[int] | None = None
) -> dict[int, torch.Tensor]:
    """``d_p`` (weight decay included, zero unless ``found.ok``) by position in
    :attr:`Plan.owned`, in the parameters' dtypes: views of buffers the next call overwrites, or
    new tensors. ``only``: the positions wanted (all by default)."""
    ws = _workspace(plan)
    wanted = set(range(len(plan.owned)) if only is None else only)
    products = iter(ws.products)
    for b, buffer in enumerate(plan.buffers):
        c = found.coeffs.to(buffer.device, buffer.dtype)
        for k, update in enumerate(plan.bucket_updates[b]):
            prod = next(products)
            if wanted.intersection(update.owned):
                lhs, rhs = _operands(plan, b, k, _draw_coefficients(plan, b, k, c))
                torch.bmm(lhs, rhs.transpose(1, 2), out=prod)  # (P, m, n)
        if buffer.dense is not None:
            prod = next(products)
            torch.matmul(c, buffer.dense, out=prod)  # (G, T)
            if plan.dense_scales[b] is not None:
                prod.mul_(plan.dense_scales[b].to(prod.dtype))  # type: ignore[union-attr]
    out: dict[int, torch.Tensor] = {}
    for o in wanted:
        d = ws.raw[o]
        assert d is not None
        out[o] = d.to(plan.owned[o].param.dtype) if o in ws.cast else d
    for (g, device), members in ws.by_group.items():
        wd = groups[g]["weight_decay"]
        members = [o for o in members if o in wanted]
        if wd != 0 and members:
            # No decay when nothing moves: the parameters are scaled by 0 before the sum, so
            # that a decay withheld because it would overflow adds exact zeros.
            decay = found.ok.to(device, torch.float64) * wd
            scaled = torch._foreach_mul([plan.owned[o].param.detach() for o in members], decay)
            decayed = torch._foreach_add([out[o] for o in members], scaled)
            out.update(zip(members, decayed, strict=True))
    return out


def _number(lr: Any, device: torch.device | None = None) -> Any:
    """A learning rate as a Python number, or (a tensor on ``device``'s accelerator) as a 0-d
    tensor there, so that it is never read on the host."""
    if isinstance(lr, torch.Tensor):
        if device is not None and lr.device == device and device.type != "cpu":
            return lr.reshape(()).to(torch.float64)
        return float(lr)
    return lr


def _fusable(plan: Plan, b: int, k: int, groups: Sequence[dict[str, Any]]) -> bool:
    """A bucket whose update can go into its product's epilogue: one CUDA matrix without weight
    decay, contiguous, with a Python-number lr, not float16 (which is checked element-wise)."""
    owned = plan.bucket_updates[b][k].owned
    if len(owned) != 1:
        return False
    p, group = plan.owned[owned[0]].param, groups[plan.owned[owned[0]].group]
    return (
        p.device.type in EPILOGUE_DEVICES
        and p.is_contiguous()
        and p.dtype != torch.float16
        and group["weight_decay"] == 0
        and not isinstance(group["lr"], torch.Tensor)
    )


def _update_gemm() -> str:
    """The product :data:`UPDATE_GEMM_ENV` names; anything but ``cublas``/``triton`` is refused."""
    choice = os.environ.get(UPDATE_GEMM_ENV, "cublas")
    if choice not in ("cublas", "triton"):
        raise ValueError(f"Invalid {UPDATE_GEMM_ENV}: {choice!r} (expected 'cublas' or 'triton')")
    return choice


def _add_product(
    w: torch.Tensor, lhs: torch.Tensor, rhs: torch.Tensor, alpha: float, gemm: str
) -> None:
    """``w += alpha * lhs @ rhs.T`` by ``gemm`` (see :func:`_update_gemm`); the Triton kernel
    where it takes the operands, else ``addmm_``."""
    if gemm == "triton" and fused_enabled():
        kernels = triton_module("_triton_update")
        if kernels is not None and kernels.supported(w, lhs, rhs):
            kernels.outer_add_(w, lhs, rhs, alpha)
            return
    w.addmm_(lhs, rhs.T, alpha=alpha)


def apply(
    plan: Plan,
    groups: Sequence[dict[str, Any]],
    found: Update,
    counters: tuple[Any, Any] | None = None,
) -> None:
    """``p -= lr * d_p`` for every perturbed parameter (nothing changes unless ``found.ok``).

    ``counters``: the generation's noise ``(key, generation)`` (ints or device tensors), with
    which a lone matrix's operands are drawn in a kernel where one is available (see
    :data:`OPERAND_DEVICES`); without them, or elsewhere, they are read from the noise buffers,
    which must then hold the generation's noise."""
    gemm = _update_gemm()  # refused before any parameter moves
    fused: set[int] = set()
    for b, buffer in enumerate(plan.buffers):
        c = None
        kernels = _operand_kernels(buffer.device) if counters is not None else None
        for k, update in enumerate(plan.bucket_updates[b]):
            if _fusable(plan, b, k, groups):
                if c is None:
                    c = found.coeffs.to(buffer.device, buffer.dtype)
                owned = plan.owned[update.owned[0]]
                # The group's row as it is; the sigma factor and 1/sqrt(r) go into alpha.
                if kernels is not None:
                    assert counters is not None
                    lhs, rhs = _drawn_operands(plan, b, k, c[owned.group], counters, kernels)
                else:
                    lhs, rhs = _operands(plan, b, k, c[owned.group][None])
                p2d = owned.param.detach().view(lhs.shape[1], rhs.shape[1])
                alpha = (
                    groups[owned.group]["lr"]
                    * owned.scale
                    / math.sqrt(buffer.buckets[k].a.shape[3])
                )
                _add_product(p2d, lhs[0], rhs[0], -alpha, gemm)
                fused.add(update.owned[0])
    rest = [o for o in range(len(plan.owned)) if o not in fused and o not in found.new_values]
    if rest:
        values = grads(plan, groups, found, rest)
        split = (
            _workspace(plan).by_group
            if len(rest) == len(plan.owned)
            else _by_group_and_device(plan, rest)
        )
        for (g, device), members in split.items():
            lr = groups[g]["lr"]
            params = [plan.owned[o].param for o in members]
            deltas = [values[o] for o in members]
            if isinstance(lr, torch.Tensor) and lr.device.type != "cpu":
                torch._foreach_add_(params, torch._foreach_mul(deltas, -lr.to(device)))
            else:
                torch._foreach_add_(params, deltas, alpha=-_number(lr))
    for o, new in found.new_values.items():
        p = plan.owned[o].param
        p.copy_(torch.where(found.ok.to(p.device), new, p))
