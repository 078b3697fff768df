"""Profile one low-rank population forward (and step) with torch.profiler: where the time goes.

    python benchmarks/profile_population_forward.py --device cuda --width 8192 --pop 256 --rows 16
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from torcheggroll import EggrollOptimizer


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--device", default="cpu")
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--pop", type=int, default=64)
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--rows-shown", type=int, default=18)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    dev, dtype = torch.device(args.device), getattr(torch, args.dtype)
    layers = [nn.Linear(args.width, args.width, bias=False) for _ in range(args.layers)]
    model = nn.Sequential(*layers).to(dev, dtype).requires_grad_(False)
    x = torch.randn(args.pop, args.rows, args.width, device=dev, dtype=dtype)
    opt = EggrollOptimizer(model.parameters(), rank=args.rank, pop_size=args.pop, seed=0)

    def closure(pop):  # type: ignore[no-untyped-def]
        return pop.forward(model, x, per_member=True).float().pow(2).mean(dim=(1, 2))

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    key = "cuda_time_total" if dev.type == "cuda" else "cpu_time_total"
    with torch.no_grad():
        for _ in range(3):
            opt.step(closure)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        with profile(activities=acts) as prof:
            for _ in range(5):
                opt.step(closure)
            if dev.type == "cuda":
                torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by=key, row_limit=args.rows_shown))


if __name__ == "__main__":
    main()
