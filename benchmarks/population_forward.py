"""Benchmark the low-rank population forward against plain inference and the materialized path.

For every configuration it times, on the same device in the same process:

* ``inference``: plain batched inference of the same ``pop x rows`` input rows through the
  unperturbed model (no ES at all): the physical limit;
* ``lowrank-fwd`` / ``lowrank-step``: the population forward with noise drawn every call
  (``EggrollOptimizer.population()`` + ``population.forward``), and the whole
  ``EggrollOptimizer.step`` (noise, forward, loss, update);
* ``materialized-fwd`` / ``materialized-step``: the same through per-member weights
  (``path="materialized"``), skipped when those weights would not fit ``--mem-limit-gib``.

Every member gets its own ``rows`` input rows (``per_member=True``), as in RL or LM rollouts, so
inference and ES process the same number of rows. Peak memory is what one iteration adds on top
of the model, its inputs and the optimizer: CUDA's max_memory_allocated minus what was
allocated before the call on GPU; on CPU each measurement runs in a subprocess and reports the
growth of its peak RSS from just before the timed calls.

Examples::

    python benchmarks/population_forward.py --preset cpu-target
    python benchmarks/population_forward.py --preset gpu --device cuda
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from torcheggroll import EggrollOptimizer, fused_linear

METHODS = ("inference", "lowrank-fwd", "lowrank-step", "materialized-fwd", "materialized-step")


def build(
    width: int, layers: int, bias: bool, device: torch.device, dtype: torch.dtype
) -> nn.Module:
    mods: list[nn.Module] = []
    for i in range(layers):
        mods.append(nn.Linear(width, width, bias=bias))
        if i < layers - 1:
            mods.append(nn.ReLU())
    return nn.Sequential(*mods).to(device=device, dtype=dtype)


def make_runner(cfg: dict[str, Any], method: str, device: torch.device) -> Any:
    """A zero-argument function that runs one iteration of ``method`` for ``cfg``."""
    torch.manual_seed(cfg["seed"])
    dtype = getattr(torch, cfg["dtype"])
    # (Parameters keep requires_grad: the optimizer leaves frozen ones alone, as torch.optim
    # does. The measurements run under torch.no_grad.)
    model = build(cfg["width"], cfg["layers"], cfg["bias"], device, dtype).eval()
    pop, rows, width = cfg["pop"], cfg["rows"], cfg["width"]
    x = torch.randn(pop, rows, width, device=device, dtype=dtype)
    if method == "inference":
        flat = x.reshape(pop * rows, width)
        return lambda: model(flat)
    path = "auto" if method.startswith("lowrank") else "materialized"
    opt = EggrollOptimizer(
        model.parameters(), lr=1e-3, sigma=1e-2, rank=cfg["rank"], pop_size=pop, seed=0
    )

    def closure(population: Any) -> torch.Tensor:
        out = population.forward(model, x, per_member=True, path=path)
        return out.float().pow(2).mean(dim=(1, 2))

    if method.endswith("step"):
        return lambda: opt.step(closure)
    return lambda: opt.population().forward(model, x, per_member=True, path=path)


def materialized_bytes(cfg: dict[str, Any]) -> int:
    elt = torch.finfo(getattr(torch, cfg["dtype"])).bits // 8
    # per-member weights, plus the float32 noise they are built from
    return cfg["layers"] * cfg["pop"] * cfg["width"] ** 2 * (elt + 4)


def time_cuda(fn: Any, warmup: int, repeats: int) -> float:
    try:
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=warmup * 10, rep=repeats * 20, return_mode="median"))
    except ImportError:
        for _ in range(warmup):
            fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)


def time_cpu(fn: Any, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def prepare_cuda(cfg: dict[str, Any], method: str, device: torch.device) -> tuple[Any, float]:
    """The runner of one method and its peak memory (MiB) over one iteration, on CUDA."""
    torch.cuda.empty_cache()
    fn = make_runner(cfg, method, device)
    with torch.no_grad():
        fn()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
    return fn, (torch.cuda.max_memory_allocated() - base) / 2**20


def measure_cuda(
    cfg: dict[str, Any],
    methods: list[str],
    device: torch.device,
    warmup: int,
    repeats: int,
    trials: int,
) -> dict[str, dict[str, Any] | None]:
    """Median milliseconds per iteration over ``trials`` timings (each recorded in ``ms_trials``)
    and peak memory (MiB) of each method. The trials take the methods in turn, so that a drift
    of the GPU's clock during the run (a sustained GEMM heats it) affects them alike."""
    runners: dict[str, tuple[Any, float]] = {}
    for method in methods:
        try:
            runners[method] = prepare_cuda(cfg, method, device)
        except torch.cuda.OutOfMemoryError:
            print(f"  {method} failed: OutOfMemoryError", file=sys.stderr)
    times: dict[str, list[float]] = {m: [] for m in runners}
    with torch.no_grad():
        for _ in range(trials):
            for method, (fn, _) in runners.items():
                times[method].append(time_cuda(fn, warmup, repeats))
    return {
        m: {"ms": statistics.median(times[m]), "peak_mib": runners[m][1], "ms_trials": times[m]}
        if m in runners
        else None
        for m in methods
    }


def measure_cpu(cfg: dict[str, Any], method: str, warmup: int, repeats: int) -> dict[str, float]:
    """Median milliseconds per iteration and peak RSS growth (MiB) of one method on CPU."""
    device = torch.device("cpu")
    with torch.no_grad():
        # Import and initialise everything the method touches on a tiny copy of the
        # configuration first, so the peak-RSS growth below is the real configuration's.
        tiny = dict(cfg, width=8, pop=4, rows=1)
        make_runner(tiny, method, device)()
        fn = make_runner(cfg, method, device)
        base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        ms = time_cpu(fn, warmup, repeats)
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss) / 1024
    return {"ms": ms, "peak_mib": peak}


def run_isolated(cfg: dict[str, Any], method: str, args: argparse.Namespace) -> dict[str, float]:
    """On CPU, run one measurement in a fresh process so its peak RSS is its own."""
    cmd = [
        sys.executable,
        __file__,
        "--child",
        json.dumps({"cfg": cfg, "method": method}),
        "--warmup",
        str(args.warmup),
        "--repeats",
        str(args.repeats),
        "--threads",
        str(args.threads),
    ]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def configs(args: argparse.Namespace) -> list[dict[str, Any]]:
    base = dict(
        width=args.width,
        layers=args.layers,
        pop=args.pop,
        rank=args.rank,
        rows=args.rows,
        dtype=args.dtype,
        bias=not args.no_bias,
        seed=0,
    )
    if args.preset == "cpu-target":
        return [
            dict(
                base,
                width=1024,
                layers=3,
                pop=64,
                rows=8,
                rank=4,
                dtype="float32",
                bias=True,
                sweep="target",
            )
        ]
    if args.preset in ("gpu", "gpu-target"):
        out = [
            dict(
                base,
                width=2048,
                layers=3,
                pop=64,
                rows=32,
                rank=4,
                dtype="float32",
                bias=True,
                sweep="target-mlp",
            ),
            dict(
                base,
                width=8192,
                layers=1,
                pop=256,
                rows=16,
                rank=4,
                dtype="bfloat16",
                bias=False,
                sweep="target-linear",
            ),
        ]
        if args.preset == "gpu-target":
            return out
        sweep_base = dict(
            base, width=2048, layers=1, pop=256, rows=16, rank=4, dtype="bfloat16", bias=False
        )
        out += [
            dict(sweep_base, width=w, sweep="width") for w in (256, 512, 1024, 2048, 4096, 8192)
        ]
        out += [dict(sweep_base, pop=p, sweep="pop") for p in (64, 256, 1024, 4096)]
        out += [dict(sweep_base, rank=r, sweep="rank") for r in (1, 4, 16)]
        out += [dict(sweep_base, rows=r, sweep="rows") for r in (1, 16)]
        return out
    if args.preset == "cpu-sweep":
        sweep_base = dict(
            base, width=512, layers=1, pop=64, rows=16, rank=4, dtype="float32", bias=False
        )
        out = [dict(sweep_base, width=w, sweep="width") for w in (256, 512, 1024)]
        out += [dict(sweep_base, pop=p, sweep="pop") for p in (64, 256)]
        out += [dict(sweep_base, rank=r, sweep="rank") for r in (1, 4, 16)]
        out += [dict(sweep_base, rows=r, sweep="rows") for r in (1, 16)]
        return out
    return [dict(base, sweep="single")]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def plot(results: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweeps = [s for s in ("width", "pop", "rank", "rows") if any(r["sweep"] == s for r in results)]
    targets = [r for r in results if r["sweep"].startswith("target")]
    panels = len(sweeps) + (1 if targets else 0)
    fig, axes = plt.subplots(1, max(panels, 1), figsize=(4.2 * max(panels, 1), 3.6), squeeze=False)
    for ax, sweep in zip(axes[0], sweeps, strict=False):
        rows = [r for r in results if r["sweep"] == sweep]
        xs = [r[sweep] for r in rows]
        for method, style in (
            ("lowrank-fwd", "o-"),
            ("lowrank-step", "s-"),
            ("materialized-fwd", "x--"),
        ):
            ys = [
                r["inference"]["ms"] / r[method]["ms"] if r.get(method) else math.nan for r in rows
            ]
            ax.plot(xs, ys, style, label=method)
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(sweep)
        ax.set_ylabel("throughput / plain inference")
        ax.grid(alpha=0.3)
    if targets:
        ax = axes[0][-1]
        labels = [r["sweep"] for r in targets]
        for k, method in enumerate(("inference", "lowrank-step", "materialized-step")):
            vals = [r[method]["ms"] if r.get(method) else 0 for r in targets]
            ax.bar([i + 0.27 * k for i in range(len(targets))], vals, width=0.27, label=method)
        ax.set_xticks([i + 0.27 for i in range(len(targets))], labels)
        ax.set_ylabel("ms per iteration")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    if sweeps:
        axes[0][0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--preset", choices=["cpu-target", "cpu-sweep", "gpu", "gpu-target", "none"], default="none"
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--pop", type=int, default=64)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--no-bias", action="store_true")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument(
        "--mem-limit-gib", type=float, default=24.0, help="skip materialized runs above this"
    )
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument(
        "--trials",
        type=int,
        default=1,
        help="CUDA: time each method this many times and report the median (a forward whose host "
        "time is close to its GPU time varies from one timing to the next)",
    )
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--plot", type=Path, default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        job = json.loads(args.child)
        print(json.dumps(measure_cpu(job["cfg"], job["method"], args.warmup, args.repeats)))
        return
    device = torch.device(args.device)
    methods = args.methods.split(",")
    results = []
    header = (
        f"{'sweep':<14}{'width':>6}{'L':>3}{'pop':>6}{'r':>4}{'rows':>5} {'dtype':<9}"
        + "".join(f"{m:>19}" for m in methods)
    )
    fused = fused_linear._triton_enabled() and fused_linear._kernels() is not None
    print(
        f"device: {device_name(device)}; torch {torch.__version__}; "
        f"fused Triton kernels: {'on' if fused else 'off'}"
    )
    print("ms per iteration (peak MiB)")
    print(header)
    for cfg in configs(args):
        row: dict[str, Any] = dict(cfg)
        fits = [
            m
            for m in methods
            if not (
                m.startswith("materialized")
                and materialized_bytes(cfg) > args.mem_limit_gib * 2**30
            )
        ]
        row.update({m: None for m in methods if m not in fits})
        if device.type == "cuda":
            row.update(measure_cuda(cfg, fits, device, args.warmup, args.repeats, args.trials))
        for method in fits if device.type == "cpu" else []:
            try:
                row[method] = run_isolated(cfg, method, args)
            except subprocess.CalledProcessError as err:
                print(f"  {method} failed: {type(err).__name__}", file=sys.stderr)
                row[method] = None
        results.append(row)
        cells = "".join(
            f"{row[m]['ms']:>10.3f} ({row[m]['peak_mib']:>6.0f})" if row.get(m) else f"{'-':>19}"
            for m in methods
        )
        print(
            f"{cfg['sweep']:<14}{cfg['width']:>6}{cfg['layers']:>3}{cfg['pop']:>6}"
            f"{cfg['rank']:>4}{cfg['rows']:>5} {cfg['dtype']:<9}{cells}",
            flush=True,
        )
    print(
        "\nthroughput relative to plain inference (inference ms / method ms); "
        "speed-up and memory ratio of low-rank over materialized steps"
    )
    for row in results:
        ratios = {
            m: row["inference"]["ms"] / row[m]["ms"]
            for m in methods
            if row.get(m) and row.get("inference")
        }
        extra = ""
        if row.get("lowrank-step") and row.get("materialized-step"):
            speed = row["materialized-step"]["ms"] / row["lowrank-step"]["ms"]
            mem = row["materialized-step"]["peak_mib"] / max(row["lowrank-step"]["peak_mib"], 1e-3)
            extra = f"  step speed-up x{speed:.1f}, peak memory /{mem:.1f}"
            row["step_speedup"], row["step_memory_ratio"] = speed, mem
        row["relative_throughput"] = ratios
        print(
            f"{row['sweep']:<14}{row['width']:>6}{row['pop']:>6}{row['rank']:>4}{row['rows']:>5} "
            + " ".join(f"{m}={v:.3f}" for m, v in ratios.items())
            + extra
        )
    meta = {
        "script": "benchmarks/population_forward.py",
        "argv": sys.argv[1:] if argv is None else argv,
        "device": device_name(device),
        "torch": torch.__version__,
        "timing": "triton.testing.do_bench median"
        if device.type == "cuda"
        else "perf_counter median",
        "date": time.strftime("%Y-%m-%d"),
        "fused_kernels": fused_linear._triton_enabled() and fused_linear._kernels() is not None,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    if args.plot:
        plot(results, args.plot, f"{meta['device']}, torch {meta['torch']}")


if __name__ == "__main__":
    main()
