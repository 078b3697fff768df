"""Where an EggrollOptimizer step spends its time: phases timed with device syncs, then cProfile
(host time by Python function) or, with --torch-profiler, torch.profiler (time by kernel).

    python benchmarks/step_phases.py --device cuda --width 8192 --pop 256 --rows 16
    python benchmarks/step_phases.py --device cuda --width 8192 --pop 256 --torch-profiler
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

import torch
from torch import nn

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
    p.add_argument("--iters", type=int, default=20)
    p.add_argument(
        "--torch-profiler", action="store_true", help="per-kernel table instead of cProfile"
    )
    args = p.parse_args(argv)
    torch.manual_seed(0)
    dev, dtype = torch.device(args.device), getattr(torch, args.dtype)
    model = nn.Sequential(
        *[nn.Linear(args.width, args.width, bias=False) for _ in range(args.layers)]
    )
    model = model.to(dev, dtype)  # (the optimizer leaves frozen parameters alone)
    x = torch.randn(args.pop, args.rows, args.width, device=dev, dtype=dtype)
    opt = EggrollOptimizer(model.parameters(), rank=args.rank, pop_size=args.pop, seed=0)

    def closure(pop):  # type: ignore[no-untyped-def]
        return pop.forward(model, x, per_member=True).float().pow(2).mean(dim=(1, 2))

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    phases: dict[str, list[float]] = {
        "population()": [],
        "evaluate": [],
        "directions": [],
        "whole step": [],
    }
    with torch.no_grad():
        for i in range(args.iters + 3):
            sync()
            t0 = time.perf_counter()
            opt.population()
            sync()
            t1 = time.perf_counter()
            losses, pop = opt.evaluate(closure)
            sync()
            t2 = time.perf_counter()
            opt._directions(losses, pop)
            sync()
            t3 = time.perf_counter()
            opt.step(closure)
            sync()
            t4 = time.perf_counter()
            if i >= 3:
                for k, v in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
                    phases[k].append(v * 1e3)
        for k, v in phases.items():
            print(f"{k:<14} median {sorted(v)[len(v) // 2]:8.3f} ms")
        if args.torch_profiler:
            from torch.profiler import ProfilerActivity, profile

            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
            with profile(activities=acts) as tprof:
                for _ in range(args.iters):
                    opt.step(closure)
                sync()
            key = "cuda_time_total" if dev.type == "cuda" else "cpu_time_total"
            print(tprof.key_averages().table(sort_by=key, row_limit=25))
            return
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(args.iters):
            opt.step(closure)
        sync()
        prof.disable()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(22)
    print(s.getvalue())


if __name__ == "__main__":
    main()
