"""The update of a lone half-precision matrix, ``W += alpha * L R^T``, as one Triton kernel.

The ES update of an ``(m, n)`` weight over ``D`` draws of rank ``r`` is a product whose inner
dimension is ``K = D r`` (512 in the EGGROLL paper's benchmark), small next to ``m`` and ``n``.
Each output tile then runs a short main loop (``K / BLOCK_K`` steps) and spends about as long
again reading and writing its tile of ``W``, the only traffic to memory that counts (``W`` is
read and written once, 2 ``m n`` elements; the operands stay in L2). cuBLAS's ``addmm_`` reads
the tile after its main loop, so the two costs add up. Here the tile of ``W`` is requested
(a tensor-memory-accelerator load) before the main loop and consumed after it, so its transfer
overlaps the products; the grid is persistent.

Operands may be in either layout: ``L`` ``(m, K)`` with ``K`` contiguous or with ``m``
contiguous (the transposed view of draws stored ``(D, m)``, what rank 1 gives), the same for
``R`` ``(n, K)``. Accumulation is in float32 and ``W`` is rounded once, as with ``addmm_``.

Imported only where Triton is; sm90+ (tensor descriptors), ``W`` float16 or bfloat16,
contiguous, every row and operand 16-byte aligned (:func:`supported`).
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from ._triton_kernels import _tile_of, _tuned

__all__ = ["outer_add_", "supported"]


def _configs() -> list[triton.Config]:
    def set_blocks(nargs: dict[str, Any]) -> None:
        bm, bn, bk = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_K"]
        nargs["w_desc"].block_shape = [bm, bn]
        nargs["l_desc"].block_shape = [bm, bk] if nargs["L_KMAJOR"] else [bk, bm]
        nargs["r_desc"].block_shape = [bn, bk] if nargs["R_KMAJOR"] else [bk, bn]

    # (BLOCK_M, BLOCK_N, BLOCK_K, stages, warps, programs per SM, prefetch W)
    shapes = [
        (128, 128, 64, 3, 8, 2, True),
        (128, 256, 64, 3, 8, 1, True),
        (128, 256, 64, 3, 8, 1, False),
        (128, 128, 64, 4, 8, 1, True),
        (128, 128, 64, 3, 4, 2, True),
        (128, 128, 64, 3, 8, 2, False),
    ]
    return _tuned(
        [
            triton.Config(
                {
                    "BLOCK_M": bm,
                    "BLOCK_N": bn,
                    "BLOCK_K": bk,
                    "GROUP_M": 8,
                    "PER_SM": per_sm,
                    "PREFETCH": pre,
                },
                num_warps=w,
                num_stages=s,
                pre_hook=set_blocks,
            )
            for bm, bn, bk, s, w, per_sm, pre in shapes
        ]
    )


@triton.autotune(
    configs=_configs(),
    key=["M", "N", "K", "L_KMAJOR", "R_KMAJOR"],
    restore_value=["w_ptr"],
)
@triton.jit
def _outer_add_kernel(
    w_desc,
    l_desc,
    r_desc,
    w_ptr,  # the same memory as w_desc: named for the autotuner to restore between its trials
    alpha,
    M,
    N,
    K,
    L_KMAJOR: tl.constexpr,
    R_KMAJOR: tl.constexpr,
    NUM_SMS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    PER_SM: tl.constexpr,
    PREFETCH: tl.constexpr,
):
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    for tile in tl.range(tl.program_id(0), num_m * num_n, NUM_SMS * PER_SM):
        pid_m, pid_n = _tile_of(tile, num_m, num_n, GROUP_M)
        om = pid_m * BLOCK_M
        on = pid_n * BLOCK_N
        if PREFETCH:
            wt = w_desc.load([om, on])
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for ki in range(k_tiles):
            ok = ki * BLOCK_K
            if L_KMAJOR:  # noqa: SIM108 (a compile-time branch)
                lt = l_desc.load([om, ok])
            else:
                lt = l_desc.load([ok, om]).T
            if R_KMAJOR:  # noqa: SIM108 (a compile-time branch)
                rt = r_desc.load([on, ok]).T
            else:
                rt = r_desc.load([ok, on])
            acc = tl.dot(lt, rt, acc)
        if not PREFETCH:
            wt = w_desc.load([om, on])
        out = wt.to(tl.float32) + alpha * acc
        w_desc.store([om, on], out.to(wt.dtype))


def _aligned(t: torch.Tensor) -> bool:
    return t.data_ptr() % 16 == 0 and all(
        s == 1 or (s * t.element_size()) % 16 == 0 for s in t.stride()
    )


def _kmajor(t: torch.Tensor) -> bool | None:
    """Whether the operand ``(rows, K)`` has ``K`` contiguous (True), ``rows`` contiguous
    (False), or neither (None)."""
    if t.stride(1) == 1:
        return True
    if t.stride(0) == 1:
        return False
    return None


def supported(w: torch.Tensor, lhs: torch.Tensor, rhs: torch.Tensor) -> bool:
    """Whether :func:`outer_add_` takes ``w`` ``(m, n)``, ``lhs`` ``(m, K)``, ``rhs`` ``(n, K)``."""
    if not w.is_cuda or torch.cuda.get_device_capability(w.device)[0] < 9:
        return False
    if w.dtype not in (torch.float16, torch.bfloat16) or not w.is_contiguous():
        return False
    if lhs.dtype != w.dtype or rhs.dtype != w.dtype:
        return False
    if lhs.shape[0] != w.shape[0] or rhs.shape[0] != w.shape[1] or lhs.shape[1] != rhs.shape[1]:
        return False
    return all(_kmajor(t) is not None and _aligned(t) for t in (w, lhs, rhs))


def outer_add_(w: torch.Tensor, lhs: torch.Tensor, rhs: torch.Tensor, alpha: float) -> None:
    """In place ``w += alpha * lhs @ rhs.T`` (float32 accumulation, ``w`` rounded once).

    Args:
        w: ``(m, n)`` float16/bfloat16, contiguous.
        lhs: ``(m, K)``; rhs: ``(n, K)``; each with ``K`` or its first dimension contiguous, in
            ``w``'s dtype (see :func:`supported`).
        alpha: a Python number.
    """
    from triton.tools.tensor_descriptor import TensorDescriptor

    if not supported(w, lhs, rhs):
        raise ValueError(
            f"Invalid operands: w {tuple(w.shape)} {w.dtype} strides {w.stride()}, "
            f"lhs {tuple(lhs.shape)} {lhs.dtype} strides {lhs.stride()}, "
            f"rhs {tuple(rhs.shape)} {rhs.dtype} strides {rhs.stride()}"
        )
    M, N = w.shape
    K = lhs.shape[1]
    l_kmajor, r_kmajor = bool(_kmajor(lhs)), bool(_kmajor(rhs))
    # Block shapes are set per configuration (see _configs).
    w_desc = TensorDescriptor.from_tensor(w, [16, 16])
    l_desc = TensorDescriptor.from_tensor(lhs if l_kmajor else lhs.T, [16, 16])
    r_desc = TensorDescriptor.from_tensor(rhs if r_kmajor else rhs.T, [16, 16])
    sms = torch.cuda.get_device_properties(w.device).multi_processor_count

    def grid(meta: dict[str, Any]) -> tuple[int]:
        tiles = triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"])
        return (min(sms * meta["PER_SM"], tiles),)

    _outer_add_kernel[grid](
        w_desc,
        l_desc,
        r_desc,
        w,
        float(alpha),
        M,
        N,
        K,
        L_KMAJOR=l_kmajor,
        R_KMAJOR=r_kmajor,
        NUM_SMS=sms,
    )
