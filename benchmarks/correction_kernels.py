"""Time the pieces of one low-rank linear layer over a population, and ways to add the correction.

    python benchmarks/correction_kernels.py --width 8192 --pop 256 --rows 16 --rank 4

Prints the median time (CUDA events via triton.testing.do_bench, or perf_counter on CPU) of:
the shared GEMM alone (plain inference of the same rows), ``x B`` (the rank-r projection) by
``bmm`` and by the Triton kernel, and the ways to get ``x W^T + (x B) A^T``: ``baddbmm`` onto
the GEMM output, ``bmm`` then an in-place add, a vmapped ``addmm``, and the fused Triton kernel
(:mod:`torcheggroll.fused_linear`, the library's path on CUDA for half precision) alone and
with its projection. On CUDA it first checks the fused kernels against the float32 reference.
Writes JSON with --json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from torcheggroll import fused_linear


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
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--width", type=int, default=8192)
    p.add_argument("--pop", type=int, default=256)
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument(
        "--check",
        action="store_true",
        help="also check each backend against the float32 reference on shapes that exercise the "
        "tile edges (autotunes every one of them: several minutes; tests/test_fused_linear.py "
        "-m cuda checks the same shapes with one configuration per kernel)",
    )
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    dev, dt = torch.device(args.device), getattr(torch, args.dtype)
    P, R, n, r = args.pop, args.rows, args.width, args.rank
    w = torch.randn(n, n, device=dev, dtype=dt) / n**0.5
    x = torch.randn(P, R, n, device=dev, dtype=dt)
    # the generation's draws (float32, one per antithetic pair) and each member's draw and scale
    a_d = torch.randn(P // 2, n, r, device=dev)
    b_d = torch.randn(P // 2, n, r, device=dev)
    draw = torch.arange(P, device=dev) // 2
    coeff = 0.01 * (1 - 2 * (torch.arange(P, device=dev) % 2)).float() / r**0.5
    a, b = fused_linear.member_factors(a_d, b_d, draw, coeff, dt)
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
        "member factors from draws": bench(
            lambda: fused_linear.member_factors(a_d, b_d, draw, coeff, dt), dev
        ),
        "vmapped layer (gemm+xB+addmm)": bench(vmapped, dev),
        "reference (gemm+xB+baddbmm)": bench(
            lambda: fused_linear.lowrank_linear_reference(x, w, None, a, b), dev
        ),
    }
    checks: dict[str, float] = {}
    checks_configs: dict[str, str] = {}
    if fused_linear.fused_available(x):
        results["xB (triton, from draws)"] = bench(
            lambda: fused_linear.member_projection_fused(x, b_d, draw, coeff), dev
        )
        hf = fused_linear.member_projection_fused(x, b_d, draw, coeff)
        y = torch.empty(P * R, n, device=dev, dtype=dt)
        results["correction add in place (triton)"] = bench(
            lambda: fused_linear._kernels().correction_add(y, None, hf, a_d, draw, R), dev
        )
        results["correction written (triton)"] = bench(
            lambda: fused_linear._kernels().correction_add(
                y, None, hf, a_d, draw, R, accumulate=False
            ),
            dev,
        )
        if fused_linear._kernels().one_pass_applies(R, r):
            x2 = x.reshape(P * R, n)
            results["xB + correction written, one pass"] = bench(
                lambda: fused_linear._kernels().projection_correction(
                    x2, b_d, a_d, draw, coeff, None, y, R
                ),
                dev,
            )
            results["gemm added into y (addmm_)"] = bench(lambda: y.addmm_(x2, w.T), dev)
        default = fused_linear.GEMM_BACKEND
        for backend in fused_linear.GEMM_BACKENDS:
            fused_linear.GEMM_BACKEND = backend
            try:
                results[f"fused layer, {backend} backend"] = bench(
                    lambda: fused_linear.lowrank_linear_fused(x, w, None, a_d, b_d, draw, coeff),
                    dev,
                )
                if backend == "cublas":
                    os.environ[fused_linear.ONE_PASS_ENV] = "1"
                    results["fused layer, cublas backend, one pass"] = bench(
                        lambda: fused_linear.lowrank_linear_fused(
                            x, w, None, a_d, b_d, draw, coeff
                        ),
                        dev,
                    )
                    os.environ.pop(fused_linear.ONE_PASS_ENV)
                if args.check:
                    checks.update({f"{backend}: {k}": v for k, v in check_fused(dev, dt).items()})
            except Exception as err:  # e.g. a Triton build without tensor descriptors
                print(f"{backend} backend failed: {type(err).__name__}: {str(err)[:500]}")
        fused_linear.GEMM_BACKEND = default
        kernels = fused_linear._kernels()
        for kernel in (
            "_linear_tma_kernel",
            "_linear_kernel",
            "_projection_kernel",
            "_correction_add_kernel",
            "_one_pass_kernel",
        ):
            best = getattr(getattr(kernels, kernel), "best_config", None)
            if best is not None:
                checks_configs[kernel] = str(best)
    draw_only, with_factors = noise_draw(n, P, r, dev, dt)
    results["noise draw (population)"] = bench(draw_only, dev)
    results["noise draw + member factors"] = bench(with_factors, dev)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    print(
        f"{name}, torch {torch.__version__}, width {n}, pop {P}, rows {R}, rank {r}, {args.dtype}"
    )
    for k, v in results.items():
        print(f"{k:<34}{v:9.4f} ms   {results['gemm'] / v:6.3f} of plain inference")
    for k, err in checks.items():
        print(f"check {k}: max error relative to max |y| {err:.2e}")
    for k, cfg in checks_configs.items():
        print(f"autotuned {k}: {cfg}")
    if args.json:
        out = {
            "script": "benchmarks/correction_kernels.py",
            "device": name,
            "torch": torch.__version__,
            "args": vars(args) | {"json": None},
            "ms": results,
            "fused_checks": checks,
            "autotuned": checks_configs,
        }
        args.json.write_text(json.dumps(out, indent=1))


def noise_draw(n: int, pop: int, rank: int, dev: torch.device, dt: torch.dtype):  # type: ignore[no-untyped-def]
    """One generation's noise for an (n, n) layer: the population alone (the draws, what the
    fused kernels read), and the population plus every member's scaled factors."""
    from torcheggroll import EggrollOptimizer

    layer = torch.nn.Linear(
        n, n, bias=False, device=dev, dtype=dt
    )  # (frozen ones are not perturbed)
    opt = EggrollOptimizer(layer.parameters(), lr=0.1, sigma=0.1, rank=rank, pop_size=pop)
    return (lambda: opt.population().noise(layer.weight)), (
        lambda: opt.population().lowrank_factors(layer.weight)
    )


def check_fused(dev: torch.device, dt: torch.dtype) -> dict[str, float]:
    """Max error of the fused kernels against the float32 reference, relative to max |y|, for
    shapes that exercise the tile edges (rows per member that do not divide the tile, odd
    widths, rank 1 and 3, shared and per-member bias, one row per member at ranks 4 and 16 where
    the tiles gather each row's factors)."""
    cases = [
        (256, 16, 512, 384, 4, None),
        (7, 5, 200, 136, 3, "shared"),
        (33, 1, 64, 72, 1, "member"),
        (4, 300, 256, 96, 2, "member"),
        (3, 9, 1000, 24, 16, None),
        (300, 1, 256, 200, 4, "member"),
        (130, 1, 520, 136, 16, None),
    ]
    out = {}
    g = torch.Generator(device=dev).manual_seed(0)
    for P, R, n, m, r, bias in cases:
        x = torch.randn(P, R, n, device=dev, generator=g).to(dt)
        w = (torch.randn(m, n, device=dev, generator=g) / n**0.5).to(dt)
        a = torch.randn((P + 1) // 2, m, r, device=dev, generator=g)
        b = torch.randn((P + 1) // 2, n, r, device=dev, generator=g) / n**0.5
        draw = torch.arange(P, device=dev) // 2
        coeff = torch.randn(P, device=dev, generator=g)
        bb = (
            None
            if bias is None
            else torch.randn(m if bias == "shared" else (P, m), device=dev, generator=g).to(dt)
        )
        y = fused_linear.lowrank_linear_fused(x, w, bb, a, b, draw, coeff).float()
        a_p, b_p = fused_linear.member_factors(a, b, draw, coeff, torch.float32)
        ref = fused_linear.lowrank_linear_reference(
            x.float(), w.float(), None if bb is None else bb.float(), a_p, b_p
        )
        out[f"P{P} R{R} n{n} m{m} r{r} bias={bias}"] = float(
            (y - ref).abs().max() / ref.abs().max()
        )
    return out


if __name__ == "__main__":
    main()
