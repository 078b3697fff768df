"""The ES update of every perturbed parameter, computed with a few batched operations.

For parameter ``p`` of group ``g`` the direction is (see :class:`~torcheggroll.EggrollOptimizer`)

    d_p = sigma_g / sqrt(N) * sum_k c_gk E_pk + weight_decay_g * p,   c_gk = s_g,2k - s_g,2k+1

(``c_gk = s_gk`` without antithetic pairs), where ``s_g`` are the group's shaped losses. The
coefficients are made once per group; the low-rank parameters of one ``(m, n, rank)`` are
updated by one batched product ``(A * c) (B)^T`` over their draws, the dense ones by one matrix
product for all of them, and the parameters are changed with ``torch._foreach_*`` calls.
Nothing here reads a value on the host: whether the update is applied (no non-finite
direction, some finite loss, no float16 overflow) is a device tensor that masks it, as
``torch.amp.GradScaler`` does with ``found_inf``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ._plan import Plan
from .shaping import mask_nonfinite, shape_losses

__all__ = ["Directions", "apply", "directions"]

_HALF = (torch.float16, torch.bfloat16)


@dataclass
class Directions:
    """The update directions of one step.

    Attributes:
        grads: ``d_p`` for each of :attr:`Plan.owned`, in the parameter's dtype (weight decay
            included); all zeros where :attr:`ok` is false.
        ok: 0-d bool, whether the update may be applied.
        flags: ``(3,)`` int64: members with a non-finite loss, whether every loss was the same,
            whether the update was withheld although some loss was finite.
        new_values: float16 parameters' ``p - lr * d_p`` (computed to check for overflow),
            by position in :attr:`Plan.owned`.
    """

    grads: list[torch.Tensor]
    ok: torch.Tensor
    flags: torch.Tensor
    new_values: dict[int, torch.Tensor]


def _coefficients(
    losses: torch.Tensor, groups: Sequence[dict[str, Any]], antithetic: bool, pop_size: int
) -> torch.Tensor:
    """``(G, D)`` float64: ``sigma_g / sqrt(N) * c_gk`` for every group ``g`` and draw ``k``."""
    rows = []
    for group in groups:
        # Negate before replacing non-finite values, so that they become the worst member (the
        # largest loss) also when the closure returns a fitness to maximize.
        signed = -losses if group["maximize"] else losses
        clean, _ = mask_nonfinite(signed)
        s = shape_losses(clean.to(torch.float64), group["shaping"])
        c = s.view(-1, 2)[:, 0] - s.view(-1, 2)[:, 1] if antithetic else s
        rows.append(c * (float(group["sigma"]) / math.sqrt(pop_size)))
    return torch.stack(rows)


def _identical(losses: torch.Tensor) -> torch.Tensor:
    """0-d bool: every member's loss is the same finite value (more than one member)."""
    if losses.numel() < 2:
        return torch.zeros((), dtype=torch.bool, device=losses.device)
    return (losses == losses[0]).all() & torch.isfinite(losses[0])


class _Workspace:
    """Outputs of the update's products, allocated once per plan, and each parameter's view of
    them: a step writes into them (``out=``) and makes no per-parameter Python objects."""

    def __init__(self, plan: Plan) -> None:
        self.products: list[torch.Tensor] = []
        self.raw: list[torch.Tensor | None] = [None] * len(plan.owned)
        self.cast: list[int] = []  # owned whose view must be cast to the parameter's dtype
        for b, buffer in enumerate(plan.buffers):
            for bucket, update in zip(buffer.buckets, plan.bucket_updates[b], strict=True):
                rows, _, m, _ = bucket.a.shape
                dtype = plan.owned[update.owned[0]].param.dtype
                prod_dtype = dtype if dtype in _HALF else buffer.dtype
                prod = torch.zeros(rows, m, bucket.b.shape[2], dtype=prod_dtype, device=buffer.device)
                self.products.append(prod)
                for row, o in enumerate(update.owned):
                    self.raw[o] = prod[row].view(plan.owned[o].param.shape)
            if buffer.dense is not None:
                prod = torch.zeros(plan.group_count, buffer.dense.shape[1], dtype=buffer.dtype,
                                   device=buffer.device)
                self.products.append(prod)
                for e, (col, numel) in buffer.dense_columns.items():
                    o = plan.entry_owned[b][e]
                    owned = plan.owned[o]
                    self.raw[o] = prod[owned.group, col : col + numel].view(owned.param.shape)
                    if owned.param.dtype != buffer.dtype:
                        self.cast.append(o)
        self.by_group = _by_group_and_device(plan, range(len(plan.owned)))
        self.float16 = [o for o, owned in enumerate(plan.owned) if owned.param.dtype == torch.float16]


def _workspace(plan: Plan) -> _Workspace:
    ws = plan.__dict__.get("_workspace")
    if ws is None:
        ws = plan.__dict__["_workspace"] = _Workspace(plan)
    return ws


def directions(
    plan: Plan, groups: Sequence[dict[str, Any]], losses: torch.Tensor, lrs: Sequence[Any]
) -> Directions:
    """The directions ``d_p`` (see the module doc) of every perturbed parameter for ``losses``
    ``(pop_size,)``, with the decision whether to apply them. ``lrs`` are the groups' learning
    rates (needed only to check float16 parameters for overflow). The returned tensors are
    views of buffers that the next step overwrites."""
    ws = _workspace(plan)
    losses = losses.detach()
    bad = (~torch.isfinite(losses)).sum()
    coeffs = _coefficients(losses, groups, plan.antithetic, plan.pop_size)
    products = iter(ws.products)
    for b, buffer in enumerate(plan.buffers):
        c = coeffs.to(buffer.device, buffer.dtype)
        for bucket, update in zip(buffer.buckets, plan.bucket_updates[b], strict=True):
            rows, draws, m, r = bucket.a.shape
            n = bucket.b.shape[2]
            coef = c.index_select(0, update.groups) * (1.0 / math.sqrt(r))  # (P, D)
            lhs = (bucket.a * coef[:, :, None, None]).permute(0, 2, 1, 3).reshape(rows, m, draws * r)
            rhs = bucket.b.permute(0, 2, 1, 3).reshape(rows, n, draws * r)
            prod = next(products)
            if prod.dtype != lhs.dtype:
                # Half-precision parameters: the update is rounded to their dtype anyway, and a
                # float32 product would cost more than the population's forward.
                lhs, rhs = lhs.to(prod.dtype), rhs.to(prod.dtype)
            torch.bmm(lhs, rhs.transpose(1, 2), out=prod)  # (P, m, n)
        if buffer.dense is not None:
            torch.matmul(c, buffer.dense, out=next(products))  # (G, T)
    finite = (
        torch.stack([torch.isfinite(t).all() for t in ws.products]).all()
        if ws.products else torch.ones((), dtype=torch.bool, device=losses.device)
    )
    any_finite = bad < losses.numel()
    new_values: dict[int, torch.Tensor] = {}
    stays = []
    for o in ws.float16:
        # float16 may overflow in p - lr * d itself: build the new value to check it.
        owned, d = plan.owned[o], ws.raw[o]
        assert d is not None
        group = groups[owned.group]
        full = _with_decay(d.to(torch.float16), owned.param, group["weight_decay"])
        new = owned.param.detach().add(full, alpha=-_number(lrs[owned.group]))
        stays.append((new.isfinite() | ~owned.param.isfinite()).all().to(losses.device))
        new_values[o] = new
    ok = finite.to(losses.device) & any_finite
    if stays:
        ok = ok & torch.stack(stays).all()
    for t in ws.products:
        t.masked_fill_(~ok.to(t.device), 0.0)
    grads = list(ws.raw)
    for o in ws.cast:
        grads[o] = grads[o].to(plan.owned[o].param.dtype)  # type: ignore[union-attr]
    for (g, device), members in ws.by_group.items():
        wd = groups[g]["weight_decay"]
        if wd != 0:
            decayed = torch._foreach_add(
                [grads[o] for o in members], [plan.owned[o].param.detach() for o in members],  # type: ignore[misc]
                alpha=wd,
            )
            # The directions were masked above; the decay term is masked here.
            torch._foreach_mul_(decayed, ok.to(device))
            for o, t in zip(members, decayed, strict=True):
                grads[o] = t
    flags = torch.stack([bad, _identical(losses).long(), (any_finite & ~ok).long()])
    return Directions(grads, ok, flags, new_values)  # type: ignore[arg-type]


def _with_decay(d: torch.Tensor, p: torch.Tensor, wd: float) -> torch.Tensor:
    return d if wd == 0 else d.add(p.detach().to(d.dtype), alpha=wd)


def _number(lr: Any) -> float:
    return float(lr) if isinstance(lr, torch.Tensor) else lr


def _by_group_and_device(plan: Plan, positions: Any) -> dict[tuple[int, torch.device], list[int]]:
    out: dict[tuple[int, torch.device], list[int]] = {}
    for o in positions:
        owned = plan.owned[o]
        out.setdefault((owned.group, owned.param.device), []).append(o)
    return out


def apply(plan: Plan, groups: Sequence[dict[str, Any]], found: Directions) -> None:
    """``p -= lr * d_p`` for every perturbed parameter (nothing changes where ``found.ok`` is
    false: the directions are zero then, and float16 parameters keep their value)."""
    wide = [o for o in range(len(plan.owned)) if o not in found.new_values]
    for (g, device), members in _by_group_and_device(plan, wide).items():
        lr = groups[g]["lr"]
        params = [plan.owned[o].param for o in members]
        grads = [found.grads[o] for o in members]
        if isinstance(lr, torch.Tensor) and lr.device.type != "cpu":
            torch._foreach_add_(params, torch._foreach_mul(grads, -lr.to(device)))
        else:
            torch._foreach_add_(params, grads, alpha=-_number(lr))
    for o, new in found.new_values.items():
        p = plan.owned[o].param
        p.copy_(torch.where(found.ok.to(p.device), new, p))
