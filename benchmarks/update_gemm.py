"""The ES update of one matrix as a GEMM, in the operand layouts it can be given, against the
population's forward GEMM.

The update of a ``(m, n)`` weight over ``D`` distinct draws of rank ``r`` is
``W += -lr * (A * c) B^T`` with ``A`` ``(m, D r)`` and ``B`` ``(n, D r)``: a GEMM whose inner
dimension is ``D r`` (512 for the EGGROLL paper's benchmark: 1024 members x 1 row, rank 1,
antithetic). The draws are made ``(D, m, r)`` (a draw's entries contiguous), so the natural
operands are transposed views; this script times that product with each operand as a view of the
draws or as a copy with the inner dimension contiguous, in place (``addmm_``) and as a product
into a scratch buffer plus an add, beside the forward GEMM ``x W^T`` of ``pop`` rows and the copy
(scale and cast) that makes each operand. Median of ``triton.testing.do_bench`` per trial, trials
interleaved; the table gives the median trial and the worst.

Examples::

    python benchmarks/update_gemm.py --json out.json --plot out.png
    python benchmarks/update_gemm.py --width 4096 --draws 256 --rank 4
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from pathlib import Path
from typing import Any

import torch


def methods(width: int, draws: int, rank: int, pop: int, dtype: torch.dtype) -> dict[str, Any]:
    dev = torch.device("cuda")
    torch.manual_seed(0)
    w = torch.randn(width, width, device=dev, dtype=dtype) * 0.01
    x = torch.randn(pop, width, device=dev, dtype=dtype)
    a_draws = torch.randn(draws, width, rank, device=dev)  # float32, as the noise buffer holds
    b_draws = torch.randn(draws, width, rank, device=dev)
    coef = torch.randn(draws, device=dev)
    k = draws * rank
    # (m, D r) views of the draws (what _update._operands builds for rank 1) and copies with the
    # inner dimension contiguous.
    lhs_t = (a_draws * coef[:, None, None]).to(dtype).reshape(draws, width * rank).T
    rhs_t = b_draws.to(dtype).reshape(draws, width * rank).T
    lhs_t, rhs_t = lhs_t.reshape(width, k), rhs_t.reshape(width, k)
    lhs_c, rhs_c = lhs_t.contiguous(), rhs_t.contiguous()
    scratch = torch.empty(width, width, device=dev, dtype=dtype)
    out_f = torch.empty(pop, width, device=dev, dtype=dtype)
    lhs_buf = torch.empty(draws, width * rank, device=dev, dtype=dtype)
    rhs_buf = torch.empty(draws, width * rank, device=dev, dtype=dtype)
    a2, b2 = a_draws.reshape(draws, -1), b_draws.reshape(draws, -1)
    return {
        "forward x W^T": lambda: torch.mm(x, w.T, out=out_f),
        "update addmm_ (views of draws)": lambda: w.addmm_(lhs_t, rhs_t.T, alpha=-1e-3),
        "update addmm_ (inner contiguous)": lambda: w.addmm_(lhs_c, rhs_c.T, alpha=-1e-3),
        "update addmm_ (lhs view, rhs contiguous)": lambda: w.addmm_(lhs_t, rhs_c.T, alpha=-1e-3),
        "update addmm_ (lhs contiguous, rhs view)": lambda: w.addmm_(lhs_c, rhs_t.T, alpha=-1e-3),
        "update mm + add_ (views)": lambda: (
            torch.mm(lhs_t, rhs_t.T, out=scratch),
            w.add_(scratch, alpha=-1e-3),
        ),
        **_triton_methods(w, lhs_t, rhs_t, lhs_c, rhs_c),
        "operands: scale+cast A, cast B": lambda: (
            torch.mul(a2, coef[:, None], out=lhs_buf),
            rhs_buf.copy_(b2),
        ),
    }


def _triton_methods(w: torch.Tensor, *operands: torch.Tensor) -> dict[str, Any]:
    """The Triton update kernel (torcheggroll._triton_update) in the layouts it supports."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    try:
        from torcheggroll import _triton_update
    except ImportError:
        return {}
    lhs_t, rhs_t, lhs_c, rhs_c = operands
    out = {}
    for name, lhs, rhs in (("views of draws", lhs_t, rhs_t), ("inner contiguous", lhs_c, rhs_c)):
        if _triton_update.supported(w, lhs, rhs):
            out[f"update triton ({name})"] = lambda lhs=lhs, rhs=rhs: _triton_update.outer_add_(
                w, lhs, rhs, -1e-3
            )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=8192)
    p.add_argument("--draws", type=int, default=512)
    p.add_argument("--rank", type=int, default=1)
    p.add_argument("--pop", type=int, default=1024, help="rows of the forward GEMM")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--trials", type=int, default=5)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--plot", type=Path, default=None)
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("update_gemm.py needs a CUDA device")
    from triton.testing import do_bench

    fns = methods(args.width, args.draws, args.rank, args.pop, getattr(torch, args.dtype))
    times: dict[str, list[float]] = {name: [] for name in fns}
    with torch.no_grad():
        for _ in range(args.trials):
            for name, fn in fns.items():
                times[name].append(float(do_bench(fn, warmup=25, rep=100, return_mode="median")))
    meta = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        **vars(args),
    }
    meta["json"] = meta["plot"] = None
    print(
        f"{meta['device']}, torch {meta['torch']}; width {args.width}, {args.draws} draws x rank "
        f"{args.rank}, forward of {args.pop} rows, {args.dtype}"
    )
    print(f"{'method':44s} {'median ms':>10s} {'worst ms':>10s}")
    rows = {}
    for name, ts in times.items():
        rows[name] = {"ms": statistics.median(ts), "worst_ms": max(ts), "ms_trials": ts}
        print(f"{name:44s} {rows[name]['ms']:10.4f} {rows[name]['worst_ms']:10.4f}")
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "results": rows}, indent=2))
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 4))
        names = list(rows)
        ax.barh(names, [rows[n]["ms"] for n in names])
        ax.invert_yaxis()
        ax.set_xlabel("ms (median of trials)")
        ax.set_title(f"update GEMM, width {args.width}, {args.draws} draws x rank {args.rank}")
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)


if __name__ == "__main__":
    main()
