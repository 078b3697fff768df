"""Tile sizes of the kernels that draw the factors themselves (``linear_onthefly``: a few rows per
member), swept on one GPU.

For each configuration the whole layer (projection kernel, correction kernel, cuBLAS GEMM) is
timed with the default tiles of ``_triton_onthefly.launch_tiles`` and with each candidate for one
kernel's tiles (the other kernel keeping its default), beside plain inference of the same rows.
Every candidate is timed in ``--trials`` interleaved rounds (median of
``triton.testing.do_bench`` each); the table gives, per kernel, the default's and the best
candidate's ratio to inference (median over rounds, and the worst round).

    python benchmarks/onthefly_tiles.py --json out.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from torcheggroll.noise import seed_key

CONFIGS = (
    dict(name="paper-r1", pop=1024, rows=1, rank=1),
    dict(name="paper-r4", pop=1024, rows=1, rank=4),
    dict(name="paper-r16", pop=1024, rows=1, rank=16),
    dict(name="decode-64x4-r4", pop=64, rows=4, rank=4),
)
PROJECTION = [
    dict(block_d=d, block_k=k, split_per_sm=s, projection_warps=w)
    for d, k, s, w in itertools.product((4, 8, 16), (128, 256), (2, 4), (4, 8))
]
CORRECTION = [
    dict(correction_block_d=d, block_n=n, correction_warps=w)
    for d, n, w in itertools.product((4, 8, 16), (128, 256), (4, 8))
]


def _tiles(default: Any, override: dict[str, int]) -> Any:
    import triton

    def tiles(units: int, n: int, G: int, rank: int) -> dict[str, int]:
        out = dict(default(units, n, G, rank))
        over = dict(override)
        per_sm = over.pop("split_per_sm", None)
        out.update(over)
        if per_sm is not None:
            programs = triton.cdiv(units, out["block_d"])
            out["split_k"] = max(1, min(16, triton.cdiv(132 * per_sm, programs)))
        return out

    return tiles


def sweep(cfg: dict[str, Any], width: int, trials: int) -> dict[str, Any]:
    from triton.testing import do_bench

    from torcheggroll import _triton_onthefly as otf

    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    pop, rows, rank = cfg["pop"], cfg["rows"], cfg["rank"]
    x = torch.randn(pop * rows, width, device=dev, dtype=torch.bfloat16, generator=g)
    w = (torch.randn(width, width, device=dev, generator=g) / width**0.5).to(torch.bfloat16)
    draw = torch.arange(pop, device=dev) // 2
    coeff = torch.randn(pop, device=dev, generator=g) * 1e-2
    key = seed_key(0)
    default = otf.launch_tiles

    def layer() -> torch.Tensor:
        return otf.linear_onthefly(x, w, None, draw, coeff, key, 3, 0, rank, True, rows, True)

    ref = layer().float()
    variants: dict[str, dict[str, int]] = {"default": {}}
    for kind, cands in (("projection", PROJECTION), ("correction", CORRECTION)):
        for c in cands:
            variants[kind + ":" + ",".join(f"{k}={v}" for k, v in c.items())] = c
    times: dict[str, list[float]] = {"inference": [], **{k: [] for k in variants}}
    for _ in range(trials):
        times["inference"].append(float(do_bench(lambda: x @ w.T, warmup=25, rep=100)))
        for name, over in variants.items():
            otf.launch_tiles = _tiles(default, over)
            try:
                got = layer().float()
                if (got - ref).abs().max() > 1e-2 * ref.abs().max():
                    raise AssertionError(f"{name}: wrong result")
                times[name].append(float(do_bench(layer, warmup=10, rep=50)))
            finally:
                otf.launch_tiles = default
    out: dict[str, Any] = {"ms": times}
    for name in variants:
        ratios = [i / t for i, t in zip(times["inference"], times[name], strict=True)]
        out[name] = {"ratio": statistics.median(ratios), "worst": min(ratios)}
    for kind in ("projection", "correction"):
        names = [n for n in variants if n.startswith(kind + ":")]
        out["best_" + kind] = max(names, key=lambda n: out[n]["ratio"])
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--width", type=int, default=8192)
    p.add_argument("--trials", type=int, default=2)
    p.add_argument("--configs", default=None, help="comma-separated names (default: all)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("onthefly_tiles.py measures CUDA kernels: no CUDA device")
    import triton

    torch.manual_seed(0)
    device = torch.cuda.get_device_name()
    print(f"device: {device}; torch {torch.__version__}; triton {triton.__version__}")
    results = {}
    for cfg in CONFIGS:
        if args.configs and cfg["name"] not in args.configs.split(","):
            continue
        res = sweep(cfg, args.width, args.trials)
        results[cfg["name"]] = res
        d = res["default"]
        print(f"{cfg['name']}: default {d['ratio']:.3f} (>={d['worst']:.3f})")
        for kind in ("projection", "correction"):
            best = res["best_" + kind]
            print(f"  best {best}: {res[best]['ratio']:.3f} (>={res[best]['worst']:.3f})")
    print("ratio = plain inference ms / layer ms, median over rounds (worst round)")
    meta = {
        "script": "benchmarks/onthefly_tiles.py",
        "argv": sys.argv[1:] if argv is None else argv,
        "device": device,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "width": args.width,
    }
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=1))


if __name__ == "__main__":
    main()
