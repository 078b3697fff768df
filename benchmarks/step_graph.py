"""The ES step at plain-inference speed: captured steps against plain inference of the same rows.

For each configuration, in one process on one device, with noise drawn every call:

* ``inference``: the unperturbed model on the same ``pop x rows`` input rows (the limit);
* ``forward``: ``population()`` + ``population.forward`` of a ``capturable`` optimizer, captured
  once in a CUDA graph and replayed (each replay draws the next generation's noise);
* ``step``: the whole ``EggrollOptimizer.step`` (noise, forward, loss, shaping, update,
  generation counter), captured likewise;
* ``forward-eager`` / ``step-eager``: the same without capture (what the host can feed).

``inference`` is captured too, so all methods are timed alike. Each trial times every method
in turn with ``triton.testing.do_bench`` (median of its repetitions); the table gives the
median over trials of ``inference ms / method ms`` and the worst trial's ratio. ``--pairs N``
alternates each method with inference N times within a trial (shorter timings) and takes the
median of the adjacent pairs' ratios as the trial's: a card whose clock drifts over a trial
then slows both sides of each ratio alike.

``--preset cpu`` measures the CPU target instead: one thread, 128 ``Linear(16, 16)`` layers,
population 64: a step's time minus its closure's (per step, the median over steps), against
``torch.optim.SGD.step`` on the same model, with the noise's own share (one refill of the noise
buffer); ``--trials`` rounds in turn, the median round and the worst one.

Examples::

    python benchmarks/step_graph.py --preset gpu --trials 5 --json out.json --plot out.png
    python benchmarks/step_graph.py --preset cpu --json cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from torcheggroll import EggrollOptimizer, _cpu_noise, _update

METHODS = ("inference", "forward", "step", "forward-eager", "step-eager")


def gpu_configs(preset: str) -> list[dict[str, Any]]:
    paper = dict(width=8192, layers=1, bias=False, dtype="bfloat16", pop=1024, rows=1, shared=False)
    out = [dict(paper, name=f"paper-r{r}", rank=r) for r in (1, 4, 16)]
    out.append(dict(paper, name="linear-256x16", pop=256, rows=16, rank=4))
    mlp = dict(width=1024, layers=3, bias=True, dtype="float32", pop=256, rows=32, rank=4)
    out.append(dict(mlp, name="mlp-shared", shared=True))
    out.append(dict(mlp, name="mlp-per-member", shared=False))
    if preset == "gpu-quick":
        return [c for c in out if c["name"] in ("paper-r1", "mlp-shared")]
    return out


def build(cfg: dict[str, Any], device: torch.device) -> nn.Module:
    layers: list[nn.Module] = []
    for i in range(cfg["layers"]):
        layers.append(nn.Linear(cfg["width"], cfg["width"], bias=cfg["bias"]))
        if i < cfg["layers"] - 1:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers).to(device, getattr(torch, cfg["dtype"])).eval()


def mean_square(y: torch.Tensor) -> torch.Tensor:
    """``(pop,)`` the mean square of each member's outputs, in float32, in one reduction."""
    return torch.linalg.vector_norm(y, dim=(1, 2), dtype=torch.float32).square() / y[0].numel()


def capture(fn: Any, warmup: int = 3) -> Any:
    """``fn`` captured in a CUDA graph (after warm-up calls on a side stream): returns replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def runners(cfg: dict[str, Any], device: torch.device) -> dict[str, Any]:
    torch.manual_seed(0)
    dtype = getattr(torch, cfg["dtype"])
    pop, rows, width = cfg["pop"], cfg["rows"], cfg["width"]
    if cfg["shared"]:
        x = torch.randn(rows, width, device=device, dtype=dtype)
        flat = x.repeat(pop, 1)
    else:
        x = torch.randn(pop, rows, width, device=device, dtype=dtype)
        flat = x.reshape(pop * rows, width)
    out: dict[str, Any] = {}
    plain = build(cfg, device)
    with torch.no_grad():
        out["inference"] = capture(lambda: plain(flat))
    for capturable in (True, False):
        model = build(cfg, device)
        opt = EggrollOptimizer(
            model.parameters(),
            lr=1e-3,
            sigma=1e-2,
            rank=cfg["rank"],
            pop_size=pop,
            seed=0,
            capturable=capturable,
        )

        def forward(model: nn.Module = model, opt: EggrollOptimizer = opt) -> torch.Tensor:
            return opt.population().forward(model, x, per_member=not cfg["shared"])

        def closure(population: Any, model: nn.Module = model) -> torch.Tensor:
            y = population.forward(model, x, per_member=not cfg["shared"])
            return mean_square(y)

        def step(opt: EggrollOptimizer = opt) -> torch.Tensor:
            return opt.step(closure)

        with torch.no_grad():
            if capturable:
                out["forward"] = capture(forward)
                out["step"] = capture(step)
            else:
                out["forward-eager"], out["step-eager"] = forward, step
    return out


def profile(cfg: dict[str, Any], device: torch.device, rows: int = 15) -> str:
    """The GPU kernels of a few eager capturable steps, by total time (torch.profiler)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    torch.manual_seed(0)
    dtype = getattr(torch, cfg["dtype"])
    model = build(cfg, device)
    x = torch.randn(cfg["pop"], cfg["rows"], cfg["width"], device=device, dtype=dtype)
    opt = EggrollOptimizer(
        model.parameters(),
        lr=1e-3,
        sigma=1e-2,
        rank=cfg["rank"],
        pop_size=cfg["pop"],
        seed=0,
        capturable=True,
    )

    def closure(population: Any) -> torch.Tensor:
        return mean_square(population.forward(model, x, per_member=True))

    with torch.no_grad():
        for _ in range(3):
            opt.step(closure)
        torch.cuda.synchronize()
        with torch_profile(
            activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True
        ) as prof:
            for _ in range(5):
                opt.step(closure)
            torch.cuda.synchronize()
    events = prof.key_averages()
    kernels = events.table(sort_by="self_cuda_time_total", row_limit=rows, max_name_column_width=60)
    # The operators that launched them, with their inputs' shapes (5 steps: divide by 5).
    ops = prof.key_averages(group_by_input_shape=True).table(
        sort_by="self_cuda_time_total",
        row_limit=2 * rows,
        max_name_column_width=40,
        max_shapes_column_width=80,
    )
    return kernels + "\n" + ops


def time_ms(fn: Any, rep: float = 100) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=rep, return_mode="median"))


def measure_gpu(
    cfg: dict[str, Any], device: torch.device, trials: int, pairs: int = 0
) -> dict[str, Any]:
    """Each trial times every method in turn (100 ms of replays each) and divides the trial's
    inference time by the method's. ``pairs > 0``: within a trial, each method alternates with
    inference ``pairs`` times (``100 / pairs`` ms each, which one goes first alternating) and
    the trial's ratio is the median of the adjacent pairs' ratios, so that a clock that drifts
    over the trial (cards that slow down under sustained load) enters both sides alike."""
    fns = runners(cfg, device)
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    ratios: dict[str, list[float]] = {m: [] for m in METHODS}
    pair_ratios: dict[str, list[list[float]]] = {m: [] for m in METHODS}
    with torch.no_grad():
        for _ in range(trials):
            if pairs <= 0:
                trial = {m: time_ms(fns[m]) for m in METHODS}
                for m in METHODS:
                    times[m].append(trial[m])
                    ratios[m].append(trial["inference"] / trial[m])
                continue
            base: list[float] = []
            for m in METHODS[1:]:
                rs, ms = [], []
                for k in range(pairs):
                    # Which of the two goes first alternates, so a steady drift cancels.
                    if k % 2:
                        ms.append(time_ms(fns[m], 100 / pairs))
                        inf = time_ms(fns["inference"], 100 / pairs)
                    else:
                        inf = time_ms(fns["inference"], 100 / pairs)
                        ms.append(time_ms(fns[m], 100 / pairs))
                    base.append(inf)
                    rs.append(inf / ms[-1])
                times[m].append(statistics.median(ms))
                ratios[m].append(statistics.median(rs))
                pair_ratios[m].append(rs)
            times["inference"].append(statistics.median(base))
            ratios["inference"].append(1.0)
    res: dict[str, Any] = {"ms_trials": times, "pairs": pairs}
    if pairs > 0:
        res["pair_ratios"] = pair_ratios
    for m in METHODS:
        res[m] = {
            "ms": statistics.median(times[m]),
            "ratio": statistics.median(ratios[m]),
            "worst_ratio": min(ratios[m]),
        }
    return res


# ---------------------------------------------------------------------------- CPU target
def measure_cpu(repeats: int, trials: int) -> dict[str, Any]:
    """The CPU target, ``trials`` times in turn: each trial times the step, the closure alone,
    one noise refill and ``SGD.step`` (medians of ``repeats`` calls); the result is the median
    trial's figures and the worst trial's ratio."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(16, 16) for _ in range(128)])
    x = torch.randn(8, 16)
    opt = EggrollOptimizer(model.parameters(), lr=1e-3, sigma=1e-2, rank=4, pop_size=64, seed=0)

    inside: list[float] = []  # the closure's own time, in each timed step

    def closure(population: Any) -> torch.Tensor:
        t0 = time.perf_counter()
        losses = population.forward(model, x).pow(2).mean(dim=(1, 2))
        inside.append((time.perf_counter() - t0) * 1e3)
        return losses

    def med(fn: Any) -> float:
        for _ in range(3):
            fn()
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(ts)

    sgd_model = nn.Sequential(*[nn.Linear(16, 16) for _ in range(128)])
    for p in sgd_model.parameters():
        p.grad = torch.randn_like(p)
    sgd = torch.optim.SGD(sgd_model.parameters(), lr=1e-3)
    gen = [1000]
    rows = []
    with torch.no_grad():
        for _ in range(trials):
            # Per call: the step's time minus its own closure's, so that the closure's jitter
            # (most of the step) does not enter the difference.
            for _ in range(3):
                opt.step(closure)
            steps, rests = [], []
            for _ in range(repeats):
                inside.clear()
                t0 = time.perf_counter()
                opt.step(closure)
                steps.append((time.perf_counter() - t0) * 1e3)
                rests.append(steps[-1] - inside[0])
            step, rest = statistics.median(steps), statistics.median(rests)
            forward = step - rest
            plan = opt._plan_for_step()

            def refill(plan: Any = plan) -> None:
                gen[0] += 1
                for buffer in plan.buffers:
                    buffer.fill(opt.seed, gen[0])

            noise = med(refill)
            sgd_ms = med(sgd.step)
            rows.append(
                {
                    "step_ms": step,
                    "closure_ms": forward,
                    "step_minus_closure_ms": rest,
                    "noise_ms": noise,
                    "sgd_step_ms": sgd_ms,
                    "ratio_to_sgd": rest / sgd_ms,
                    "noise_ratio_to_sgd": noise / sgd_ms,
                    "other_ratio_to_sgd": (rest - noise) / sgd_ms,
                }
            )
    ordered = sorted(rows, key=lambda r: r["ratio_to_sgd"])
    res = dict(ordered[len(ordered) // 2])  # the median trial
    res["worst_ratio_to_sgd"] = ordered[-1]["ratio_to_sgd"]
    res["trials"] = rows
    res["cpu_noise_kernel"] = _cpu_noise.load() is not None
    return res


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} thread(s)"


FOOTER = "ratio = plain inference ms / method ms, median over trials (worst trial)"


def print_header(meta: dict[str, Any]) -> None:
    print(f"device: {meta['device']}; torch {meta['torch']}; triton {meta.get('triton', '?')}")
    print(f"{'config':<16}{'inference ms':>13}" + "".join(f"{m:>22}" for m in METHODS[1:]))


def print_row(row: dict[str, Any]) -> None:
    cells = "".join(
        f"{row[m]['ratio']:>12.3f} (>={row[m]['worst_ratio']:.3f})" for m in METHODS[1:]
    )
    print(f"{row['name']:<16}{row['inference']['ms']:>13.4f}{cells}", flush=True)


def print_table(meta: dict[str, Any], results: list[dict[str, Any]]) -> None:
    print_header(meta)
    for row in results:
        print_row(row)
    print(FOOTER)


def plot_title(meta: dict[str, Any]) -> str:
    return f"{meta['device']}, torch {meta['torch']}, triton {meta.get('triton', '?')}"


def plot(results: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.8), dpi=120)
    names = [r["name"] for r in results]
    for k, m in enumerate(("forward", "step", "forward-eager", "step-eager")):
        vals = [r[m]["ratio"] for r in results]
        worst = [r[m]["ratio"] - r[m]["worst_ratio"] for r in results]
        ax.bar(
            [i + 0.2 * k - 0.3 for i in range(len(names))],
            vals,
            width=0.2,
            label=m,
            yerr=[worst, [0] * len(worst)],
            capsize=2,
        )
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xticks(range(len(names)), names, fontsize=8)
    ax.set_ylabel("plain inference ms / method ms")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--preset", choices=["gpu", "gpu-quick", "cpu"], default="gpu")
    p.add_argument("--trials", type=int, default=5)
    p.add_argument("--repeats", type=int, default=30, help="CPU: timed calls per measurement")
    p.add_argument(
        "--pairs",
        type=int,
        default=0,
        help="GPU: alternate each method with inference this many times per trial and take "
        "the median of the adjacent pairs' ratios (0: each method once per trial)",
    )
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--plot", type=Path, default=None)
    p.add_argument(
        "--replot",
        type=Path,
        default=None,
        help="print the table of this GPU JSON again and draw --plot from it; run nothing",
    )
    p.add_argument("--configs", default=None, help="comma-separated names to run (default: all)")
    p.add_argument("--profile", default=None, help="print the kernels of this configuration's step")
    p.add_argument(
        "--decision",
        choices=["kernel", "pytorch"],
        default="kernel",
        help="the step's decision in one Triton kernel (default) or in PyTorch operations (A/B)",
    )
    p.add_argument(
        "--operands",
        choices=["kernel", "buffer"],
        default="kernel",
        help="a lone matrix's update operands drawn from the counters (default) or read from "
        "the filled noise buffer (A/B)",
    )
    p.add_argument(
        "--update-gemm",
        choices=["cublas", "triton"],
        default=None,
        help="the product taking a lone bf16 matrix's update: addmm_ or the Triton kernel "
        "(sets TORCHEGGROLL_UPDATE_GEMM; default: as the environment says)",
    )
    p.add_argument(
        "--max-unit-rows",
        type=int,
        default=None,
        help="rows sharing a draw that the on-the-fly kernels take at most (A/B of the noise "
        "buffer path, e.g. 32 sends 16 rows per antithetic member to them)",
    )
    args = p.parse_args(argv)
    if args.replot:
        saved = json.loads(args.replot.read_text())
        if not isinstance(saved.get("results"), list):
            raise ValueError(f"Invalid --replot: {args.replot} holds no GPU results (a list)")
        print_table(saved["meta"], saved["results"])
        if args.plot:
            plot(saved["results"], args.plot, plot_title(saved["meta"]))
        return
    if args.max_unit_rows is not None:
        from torcheggroll import _triton_onthefly

        _triton_onthefly.MAX_UNIT_ROWS = args.max_unit_rows
    if args.decision == "pytorch":
        _update.DECISION_DEVICES = ()
    if args.operands == "buffer":
        _update.OPERAND_DEVICES = ()
    if args.update_gemm is not None:
        os.environ[_update.UPDATE_GEMM_ENV] = args.update_gemm
    if args.profile:
        cfg = next(c for c in gpu_configs("gpu") if c["name"] == args.profile)
        print(profile(cfg, torch.device("cuda")))
        return
    meta: dict[str, Any] = {
        "script": "benchmarks/step_graph.py",
        "argv": sys.argv[1:] if argv is None else argv,
        "torch": torch.__version__,
        "decision": args.decision,
        "update_gemm": os.environ.get(_update.UPDATE_GEMM_ENV, "cublas"),
        "date": time.strftime("%Y-%m-%d"),
        # Every switch of the library that was set (TORCHEGGROLL_CPU_KERNEL=0, ...).
        "env": {k: v for k, v in os.environ.items() if k.startswith("TORCHEGGROLL_")},
    }
    if args.preset == "cpu":
        res = measure_cpu(args.repeats, args.trials)
        meta["device"] = device_name(torch.device("cpu"))
        print(f"device: {meta['device']}; torch {torch.__version__}")
        for k, v in res.items():
            if isinstance(v, float):
                print(f"{k:>24}: {v:8.3f}")
        print(
            f"compiled CPU noise kernel: {res['cpu_noise_kernel']}; median of {args.trials} trials"
        )
        results: Any = res
    else:
        device = torch.device("cuda")
        import triton

        meta.update(
            device=device_name(device),
            triton=triton.__version__,
            timing="CUDA graphs, triton.testing.do_bench median per trial"
            + (f", {args.pairs} inference/method pairs per trial" if args.pairs > 0 else ""),
        )
        print_header(meta)
        results = []
        for cfg in gpu_configs(args.preset):
            if args.configs and cfg["name"] not in args.configs.split(","):
                continue
            try:
                row = dict(cfg, **measure_gpu(cfg, device, args.trials, args.pairs))
            except Exception as exc:  # report and go on with the other configurations
                print(f"{cfg['name']:<16}failed: {type(exc).__name__}: {exc}", flush=True)
                torch.cuda.synchronize()
                continue
            results.append(row)
            print_row(row)
        print(FOOTER)
        if args.plot:
            plot(results, args.plot, plot_title(meta))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=1))


if __name__ == "__main__":
    main()
