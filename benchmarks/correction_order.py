"""Where cuBLAS runs the shared GEMM: add the correction after it, or write it first and let the
GEMM add into it.

For a population's low-rank linear layer ``y = x W^T + bias + (x B) A^T`` the correction kernel
either reads and rewrites the GEMM's output (``add after``: one more pass over ``y``), or writes
the correction and the biases and ``y.addmm_(x, W^T)`` adds the GEMM into them (``write
first``: cuBLAS reads ``y`` in its epilogue). Measured for the kernels that draw the factors
themselves (one row per member: ``linear_onthefly``) and for the kernels that read the filled
draws (``lowrank_linear_fused`` with the cuBLAS backend; the persistent TMA kernel, which has
the correction in its own epilogue, beside them), against plain inference of the same rows.
Trials are interleaved; the table gives the median over trials of ``inference ms / method ms``
and the worst trial's ratio.

    python benchmarks/correction_order.py --trials 5 --json out.json --plot out.png
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from torcheggroll import fused_linear
from torcheggroll.noise import seed_key

CONFIGS = (
    dict(name="paper-r1", pop=1024, rows=1, rank=1, kind="onthefly"),
    dict(name="paper-r4", pop=1024, rows=1, rank=4, kind="onthefly"),
    dict(name="paper-r16", pop=1024, rows=1, rank=16, kind="onthefly"),
    dict(name="decode-64x4-r4", pop=64, rows=4, rank=4, kind="onthefly"),
    dict(name="linear-256x16-r4", pop=256, rows=16, rank=4, kind="buffer"),
)


def runners(cfg: dict[str, Any], width: int, dtype: torch.dtype) -> dict[str, Any]:
    from torcheggroll import _triton_onthefly as otf

    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    pop, rows, rank = cfg["pop"], cfg["rows"], cfg["rank"]
    x = torch.randn(pop, rows, width, device=dev, dtype=dtype, generator=g)
    w = torch.randn(width, width, device=dev, dtype=dtype, generator=g) / width**0.5
    draws = pop // 2
    draw = torch.arange(pop, device=dev) // 2
    coeff = torch.randn(pop, device=dev, generator=g) * 1e-2
    x2 = x.reshape(pop * rows, width)
    out: dict[str, Any] = {"inference": lambda: x2 @ w.T}
    if cfg["kind"] == "onthefly":
        key = seed_key(0)

        def onthefly(first: bool) -> Any:
            return lambda: otf.linear_onthefly(
                x2, w, None, draw, coeff, key, 3, 0, rank, True, rows, first
            )

        out["add after"], out["write first"] = onthefly(False), onthefly(True)
        return out
    a = torch.randn(draws, width, rank, device=dev, dtype=torch.float32, generator=g)
    b = torch.randn(draws, width, rank, device=dev, dtype=torch.float32, generator=g)

    def buffered(backend: str, first: bool) -> Any:
        def run() -> torch.Tensor:
            fused_linear.GEMM_BACKEND = backend
            os.environ[fused_linear.CORRECTION_FIRST_ENV] = "1" if first else "0"
            return fused_linear.lowrank_linear_fused(x, w, None, a, b, draw, coeff)

        return run

    out["add after"] = buffered("cublas", False)
    out["write first"] = buffered("cublas", True)
    out["tma epilogue"] = buffered("tma", False)
    return out


def measure(cfg: dict[str, Any], width: int, dtype: torch.dtype, trials: int) -> dict[str, Any]:
    from triton.testing import do_bench

    fns = runners(cfg, width, dtype)
    ref = fns["write first"]().float()
    err = (fns["add after"]().float() - ref).abs().max().item() / ref.abs().max().item()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(trials):
        for k, fn in fns.items():
            times[k].append(float(do_bench(fn, warmup=25, rep=100, return_mode="median")))
    res: dict[str, Any] = {"ms_trials": times, "relative_difference": err}
    for k in fns:
        ratios = [i / t for i, t in zip(times["inference"], times[k], strict=True)]
        res[k] = {
            "ms": statistics.median(times[k]),
            "ratio": statistics.median(ratios),
            "worst_ratio": min(ratios),
        }
    return res


def plot(results: dict[str, Any], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = ["add after", "write first", "tma epilogue"]
    names = list(results)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.25
    for j, m in enumerate(methods):
        xs = [i + (j - 1) * width for i, n in enumerate(names) if m in results[n]]
        ys = [results[n][m]["ratio"] for n in names if m in results[n]]
        if xs:
            ax.bar(xs, ys, width, label=m)
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xticks(range(len(names)), names, fontsize=8)
    ax.set_ylabel("plain inference ms / method ms")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--width", type=int, default=8192)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--trials", type=int, default=5)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--plot", type=Path, default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("correction_order.py measures CUDA kernels: no CUDA device")
    import triton

    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    device = torch.cuda.get_device_name()
    print(f"device: {device}; torch {torch.__version__}; triton {triton.__version__}")
    results = {}
    header = f"{'config':<18}{'inference ms':>14}" + "".join(
        f"{m:>22}" for m in ("add after", "write first", "tma epilogue")
    )
    print(header + f"{'rel. diff':>11}")
    for cfg in CONFIGS:
        res = measure(cfg, args.width, dtype, args.trials)
        results[cfg["name"]] = res
        cells = "".join(
            f"{res[m]['ratio']:>13.3f} (>={res[m]['worst_ratio']:.3f})" if m in res else f"{'':>22}"
            for m in ("add after", "write first", "tma epilogue")
        )
        print(
            f"{cfg['name']:<18}{res['inference']['ms']:>14.4f}{cells}"
            f"{res['relative_difference']:>11.1e}"
        )
    print("ratio = plain inference ms / method ms, median over trials (worst trial)")
    meta = {
        "script": "benchmarks/correction_order.py",
        "argv": sys.argv[1:] if argv is None else argv,
        "device": device,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "width": args.width,
        "dtype": args.dtype,
        "trials": args.trials,
    }
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    if args.plot:
        plot(results, args.plot, f"{device}, torch {torch.__version__}, width {args.width}")


if __name__ == "__main__":
    main()
