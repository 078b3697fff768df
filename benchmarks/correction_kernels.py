"""Time the pieces of one low-rank linear layer over a population, and ways to add the correction.

    python benchmarks/correction_kernels.py --width 8192 --pop 256 --rows 16 --rank 4

Prints the median time (CUDA events via triton.testing.do_bench, or perf_counter on CPU) of:
the shared GEMM alone, ``x B`` (the rank-r projection), and three ways to add ``(x B) A^T``:
``baddbmm`` onto the GEMM output, ``bmm`` then an in-place add, and the vmapped ``addmm`` the
library uses. Writes JSON with --json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch


def bench(fn, device: torch.device) -> float:  # type: ignore[no-untyped-def]
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=50, rep=300, return_mode="median"))
    fn()
    times = []
    for _ in range(10):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--width", type=int, default=8192)
    p.add_argument("--pop", type=int, default=256)
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    dev, dt = torch.device(args.device), getattr(torch, args.dtype)
    P, R, n, r = args.pop, args.rows, args.width, args.rank
    w = torch.randn(n, n, device=dev, dtype=dt) / n**0.5
    x = torch.randn(P, R, n, device=dev, dtype=dt)
    a = torch.randn(P, n, r, device=dev, dtype=dt)
    b = torch.randn(P, n, r, device=dev, dtype=dt)
    h = x @ b
    base = (x.reshape(P * R, n) @ w.T).reshape(P, R, n)
    at = a.transpose(1, 2)

    def vmapped() -> torch.Tensor:
        return torch.func.vmap(lambda xi, ai, bi: torch.addmm(xi @ w.T, xi @ bi, ai.T))(x, a, b)

    def bmm_add() -> torch.Tensor:
        out = base.clone()
        return out.add_(torch.bmm(h, at))

    results = {
        "gemm": bench(lambda: x.reshape(P * R, n) @ w.T, dev),
        "xB": bench(lambda: x @ b, dev),
        "baddbmm": bench(lambda: torch.baddbmm(base, h, at), dev),
        "bmm+add_ (incl. clone)": bench(bmm_add, dev),
        "clone": bench(lambda: base.clone(), dev),
        "vmapped layer (gemm+xB+addmm)": bench(vmapped, dev),
    }
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    print(f"{name}, torch {torch.__version__}, width {n}, pop {P}, rows {R}, rank {r}, {args.dtype}")
    for k, v in results.items():
        print(f"{k:<32}{v:9.4f} ms")
    if args.json:
        args.json.write_text(json.dumps({"device": name, "torch": torch.__version__, "args": vars(args) | {"json": None}, "ms": results}, indent=1))


if __name__ == "__main__":
    main()
