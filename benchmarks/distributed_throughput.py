"""Population throughput of full EggrollOptimizer steps on K processes against 1.

Launched with torchrun, every rank holds the same model (``layers`` square ``nn.Linear`` of
``width`` with tanh) and evaluates its share of the population: members get their own ``rows``
input rows each (``per_member=True``, as in RL rollouts), so every GEMM of the forward is sharded.
What stays replicated on every rank is the noise generation and the update, about
``rank / (2 * rows)`` of the forward's FLOPs. The timed unit is the whole ``opt.step`` (noise,
forward, the loss all-gather, shaping, update), measured with CUDA events after warm-up; the
throughput is ``pop_size / step time`` in population members per second, for the whole job.

Run it once per world size, then compare (NCCL, one GPU per process)::

    export NCCL_NVLS_ENABLE=0
    torchrun --standalone --nproc_per_node=1 benchmarks/distributed_throughput.py --out w1.json
    torchrun --standalone --nproc_per_node=2 benchmarks/distributed_throughput.py --out w2.json
    python benchmarks/distributed_throughput.py --plot w1.json w2.json --png speedup.png

and on the CPU with gloo, tiny, to check that it runs::

    torchrun --standalone --nproc_per_node=2 benchmarks/distributed_throughput.py \\
        --device cpu --tiny
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from torcheggroll import EggrollOptimizer


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--width", type=int, default=8192)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--rows", type=int, default=128, help="input rows per member")
    p.add_argument(
        "--pop-sizes", default="32,64,128,256", help="comma-separated global populations"
    )
    p.add_argument("--rank", type=int, default=4, help="perturbation rank")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--no-tf32", action="store_true", help="full-precision float32 GEMMs on GPU")
    p.add_argument(
        "--path",
        default="auto",
        choices=["auto", "lowrank", "materialized"],
        help="population.forward path (auto: low-rank when torcheggroll.lowrank exists)",
    )
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10, help="timed steps per population size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="a seconds-long CPU smoke configuration")
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads per process (0: torch's default; --tiny: 1, as torchrun sets "
        "only for more than one process)",
    )
    p.add_argument("--out", type=Path, default=None, help="JSON results (written by rank 0)")
    p.add_argument(
        "--plot",
        type=Path,
        nargs="+",
        default=None,
        help="instead of measuring: compare these JSON files (one per world size)",
    )
    p.add_argument("--png", type=Path, default=None, help="with --plot: write the figure here")
    args = p.parse_args()
    if args.tiny:
        args.width, args.layers, args.rows, args.pop_sizes = 32, 2, 4, "8,16"
        args.warmup, args.steps = 2, 3
        args.threads = args.threads or 1
    return args


def resolve_path(path: str) -> str:
    if path != "auto":
        return path
    try:
        import torcheggroll.lowrank  # noqa: F401
    except ImportError:
        return "materialized"
    return "auto"


def setup(args: argparse.Namespace) -> tuple[int, int, torch.device]:
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if "RANK" not in os.environ:  # plain `python`: one process, no process group
        rank, world, local = 0, 1, 0
    else:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", 0))
    if args.device == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = not args.no_tf32
        torch.backends.cudnn.allow_tf32 = not args.no_tf32
    else:
        device = torch.device("cpu")
    if "RANK" in os.environ:
        backend = "nccl" if args.device == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=600))
    return rank, world, device


class Timer:
    """Elapsed seconds between marks: CUDA events on GPU, perf_counter on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def mark(self) -> Any:
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def seconds(self, a: Any, b: Any) -> float:
        if self.cuda:
            b.synchronize()
            return a.elapsed_time(b) / 1e3
        return b - a


def measure(
    args: argparse.Namespace, pop_size: int, rank: int, world: int, device: torch.device
) -> dict[str, Any]:
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(args.seed)  # same model on every rank
    layers: list[nn.Module] = []
    for _ in range(args.layers):
        layers += [nn.Linear(args.width, args.width), nn.Tanh()]
    model = nn.Sequential(*layers).to(device, dtype)
    opt = EggrollOptimizer(
        model.parameters(), lr=1e-3, sigma=1e-2, rank=args.rank, pop_size=pop_size, seed=args.seed
    )
    local = len(opt.population())
    # Each rank's members get their own rows, made once (data loading is not what is timed).
    g = torch.Generator(device=device).manual_seed(args.seed + 1 + rank)
    x = torch.randn(local, args.rows, args.width, generator=g, device=device, dtype=dtype)
    path = resolve_path(args.path)
    timer = Timer(device)
    closure_marks: list[tuple[Any, Any]] = []

    def closure(population: Any) -> torch.Tensor:
        start = timer.mark()
        out = population.forward(model, x, per_member=True, path=path)  # (local, rows, width)
        losses = out.float().pow(2).mean(dim=(1, 2))
        closure_marks.append((start, timer.mark()))
        return losses

    for _ in range(args.warmup):
        opt.step(closure)
    closure_marks.clear()
    if world > 1:
        dist.barrier()
    if device.type == "cuda":
        torch.cuda.synchronize()
    marks = [timer.mark()]
    for _ in range(args.steps):
        opt.step(closure)
        marks.append(timer.mark())
    steps = [timer.seconds(a, b) for a, b in itertools.pairwise(marks)]
    forward = [timer.seconds(a, b) for a, b in closure_marks]
    if world > 1:  # the job is as fast as its slowest rank
        t = torch.tensor([steps, forward], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        steps, forward = t[0].tolist(), t[1].tolist()
    step_s = statistics.median(steps)
    flops = 2 * pop_size * args.rows * args.width * args.width * args.layers
    return {
        "pop_size": pop_size,
        "local_members_rank0": local,
        "step_s_median": step_s,
        "step_s": steps,
        "closure_s_median": statistics.median(forward),
        "members_per_s": pop_size / step_s,
        "forward_tflops": flops / step_s / 1e12,
        "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30
        if device.type == "cuda"
        else None,
    }


def run(args: argparse.Namespace) -> None:
    rank, world, device = setup(args)
    results = []
    for pop_size in [int(s) for s in args.pop_sizes.split(",")]:
        results.append(measure(args, pop_size, rank, world, device))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    meta = {
        "world_size": world,
        "backend": dist.get_backend() if world > 1 else None,
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "path": resolve_path(args.path),
        "width": args.width,
        "layers": args.layers,
        "rows": args.rows,
        "rank": args.rank,
        "dtype": args.dtype,
        "tf32": device.type == "cuda" and not args.no_tf32,
        "warmup": args.warmup,
        "steps": args.steps,
        "seed": args.seed,
        "cpu_threads": torch.get_num_threads(),
        "nccl_nvls_enable": os.environ.get("NCCL_NVLS_ENABLE"),
    }
    if rank == 0:
        print(
            f"world {world} | {meta['device']} | torch {meta['torch']} | path {meta['path']} | "
            f"width {args.width} x {args.layers} layers, {args.rows} rows/member, "
            f"rank {args.rank}, "
            f"{args.dtype}{' (tf32)' if meta['tf32'] else ''}"
        )
        print(f"{'pop':>6} {'members/s':>12} {'step ms':>9} {'closure ms':>11} {'fwd TFLOP/s':>12}")
        for r in results:
            print(
                f"{r['pop_size']:>6} {r['members_per_s']:>12.1f} {r['step_s_median'] * 1e3:>9.2f} "
                f"{r['closure_s_median'] * 1e3:>11.2f} {r['forward_tflops']:>12.2f}"
            )
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
            print(f"wrote {args.out}")
    if world > 1:
        dist.destroy_process_group()


def compare(paths: list[Path], png: Path | None) -> None:
    """Print members/s per world size and the speedup over the smallest world size."""
    runs = sorted((json.loads(p.read_text()) for p in paths), key=lambda r: r["meta"]["world_size"])
    base = runs[0]
    by_pop = {r["pop_size"]: r["members_per_s"] for r in base["results"]}
    m = base["meta"]
    print(
        f"{m['device']} | torch {m['torch']} | path {m['path']} | width {m['width']} x "
        f"{m['layers']} layers, {m['rows']} rows/member, rank {m['rank']}, {m['dtype']}"
    )
    header = "".join(f" {'w' + str(r['meta']['world_size']) + ' members/s':>16}" for r in runs)
    speedups = "".join(f" {'x w' + str(r['meta']['world_size']):>8}" for r in runs[1:])
    print(f"{'pop':>6}{header}{speedups}")
    for pop in sorted(by_pop):
        values = [
            next((x["members_per_s"] for x in r["results"] if x["pop_size"] == pop), None)
            for r in runs
        ]
        cells = "".join(f" {v:>16.1f}" if v else f" {'-':>16}" for v in values)
        ratio = "".join(f" {v / by_pop[pop]:>8.2f}" if v else f" {'-':>8}" for v in values[1:])
        print(f"{pop:>6}{cells}{ratio}")
    if png is None:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for r in runs:
        pops = [x["pop_size"] for x in r["results"]]
        axes[0].plot(
            pops,
            [x["members_per_s"] for x in r["results"]],
            "o-",
            label=f"{r['meta']['world_size']} process(es)",
        )
        if r is not base:
            shared = [x for x in r["results"] if x["pop_size"] in by_pop]
            axes[1].plot(
                [x["pop_size"] for x in shared],
                [x["members_per_s"] / by_pop[x["pop_size"]] for x in shared],
                "o-",
                label=f"{r['meta']['world_size']} vs {base['meta']['world_size']}",
            )
    for r in runs[1:]:
        axes[1].axhline(
            r["meta"]["world_size"] / base["meta"]["world_size"], color="grey", lw=0.8, ls="--"
        )
    axes[0].set(
        yscale="log",
        xlabel="population size",
        ylabel="members / s",
        title="throughput",
    )
    axes[1].set(xlabel="population size", ylabel="speedup", title="speedup (dashed: linear)")
    axes[1].set_ylim(bottom=0)
    all_pops = sorted({x["pop_size"] for r in runs for x in r["results"]})
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xticks(all_pops, [str(p) for p in all_pops])
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(
        f"EGGROLL steps, {m['device']}, torch {m['torch']}, width {m['width']} x {m['layers']}",
        fontsize=9,
    )
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120)
    print(f"wrote {png}")


if __name__ == "__main__":
    a = parse_args()
    if a.plot:
        compare(a.plot, a.png)
    else:
        run(a)
