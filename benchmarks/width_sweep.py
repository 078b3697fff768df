"""Do ``sigma`` and ``lr`` carry over when a model gets wider? A grid search at every width.

For each task, width, ``sigma_scaling`` (``"none"``, and ``"fan_in"`` through
``width_scaled_groups``: matrices get ``sigma / sqrt(fan_in)``, embeddings and vectors keep
``sigma``), and every ``(sigma, lr)`` of a grid, one short ES run from a fixed seed; the final
loss of every run is recorded, averaged over the seeds, and the best ``(sigma, lr)`` of each
width is reported. Two tasks:

* ``mlp``: the ten-class problem of ``examples/nano_classifier.py`` (its 4 image features,
  standardized), with an MLP ``4 -> width -> width -> 10`` (ReLU); the loss is the centre
  model's cross-entropy on its 100 training examples after ``--mlp-steps`` full-batch steps.
* ``lm``: the byte-level minGRU language model of ``examples/nano_egg`` (one block of hidden
  size ``width``) on ``examples/nano_egg/data/minipile_valid_1000.npy``; the loss is the centre
  model's bits per byte on a fixed set of validation windows after ``--lm-gens`` generations.

The grids are fixed lists, spaced by factors of 2; the same seed gives every grid point the same
initialization, data order and noise. The claim under test: with the scaling, the best
``(sigma, lr)`` stays within a factor of 2 across a 16x change of width; without it, the best
``sigma`` falls like ``1/sqrt(width)``.

Examples::

    # the full sweep (~20 min, one CPU thread)
    python benchmarks/width_sweep.py --json benchmarks/results/width_sweep.json \\
        --plot benchmarks/results/width_sweep.png
    # a smoke run
    python benchmarks/width_sweep.py --tasks mlp --widths 32,64 --seeds 0 --mlp-steps 10
    # the analysis again, from a JSON's points
    python benchmarks/width_sweep.py --replot benchmarks/results/width_sweep.json \\
        --plot benchmarks/results/width_sweep.png
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
for _p in (ROOT, ROOT / "examples", ROOT / "examples" / "nano_egg"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from torcheggroll import EggrollOptimizer, Population, width_scaled_groups  # noqa: E402

LN2 = math.log(2.0)
SCALINGS = ("none", "fan_in")
DATA = ROOT / "examples" / "nano_egg" / "data" / "minipile_valid_1000.npy"

# (sigmas, lrs) per task and scaling. "fan_in" sigmas are per-output scales: a matrix of fan-in
# n gets sigma / sqrt(n), so they sit about sqrt(width) above the "none" ones.
GRIDS: dict[str, dict[str, tuple[list[float], list[float]]]] = {
    "mlp": {
        "none": ([0.0125, 0.025, 0.05, 0.1, 0.2], [0.25, 0.5, 1.0, 2.0]),
        "fan_in": ([0.0625, 0.125, 0.25, 0.5, 1.0], [0.25, 0.5, 1.0, 2.0]),
    },
    "lm": {
        "none": ([0.0125, 0.025, 0.05, 0.1, 0.2], [0.15, 0.3, 0.6]),
        "fan_in": ([0.0625, 0.125, 0.25, 0.5, 1.0], [0.15, 0.3, 0.6]),
    },
}
WIDTHS = {"mlp": [32, 64, 128, 256, 512], "lm": [16, 32, 64, 128, 256]}
SEEDS = {"mlp": [0, 1], "lm": [0]}  # the seeds averaged (the lm runs cost 20x more)
TOLERANCE = 0.02  # "near-optimal" with one seed: within 2% of the best loss of its width


# ------------------------------------------------------------------------------------ tasks
class MLPTask:
    """nano_classifier's data, an MLP of two hidden layers of ``width``."""

    def __init__(self, args: argparse.Namespace) -> None:
        from nano_classifier import make_dataset

        rgb, comp, labels = make_dataset(args.mlp_per_class, 0)
        x = torch.cat([rgb, comp], dim=1)
        self.x = (x - x.mean(0)) / x.std(0)
        self.y = labels
        self.steps = args.mlp_steps
        self.pop = args.mlp_pop
        self.rank = args.rank

    def build(self, width: int) -> nn.Module:
        return nn.Sequential(
            nn.Linear(self.x.shape[1], width),
            nn.ReLU(),
            nn.Linear(width, width),
            nn.ReLU(),
            nn.Linear(width, 10),
        )

    def run(self, model: nn.Module, opt: EggrollOptimizer, seed: int) -> float:
        x, y = self.x, self.y

        def closure(population: Population) -> torch.Tensor:
            logits = population.forward(model, x)  # (pop, n, 10)
            nll = F.cross_entropy(logits.flatten(0, 1), y.repeat(logits.shape[0]), reduction="none")
            return nll.view(logits.shape[0], -1).mean(1)

        for _ in range(self.steps):
            opt.step(closure)
        with torch.no_grad():
            return float(F.cross_entropy(model(x), y))


class LMTask:
    """nano_egg's float minGRU LM (one block) on the shipped MiniPile sample."""

    def __init__(self, args: argparse.Namespace) -> None:
        import train as nano_egg
        from corpus import load_corpus, split_documents

        self.egg = nano_egg
        self.train, valid = split_documents(load_corpus(str(DATA)), max_docs=1000)
        rng = np.random.default_rng(1234)  # the same validation windows for every run
        starts = rng.integers(0, valid.size - args.lm_seq_len - 1, args.lm_valid_windows)
        self.vx, self.vy = nano_egg.windows(valid, starts, args.lm_seq_len, torch.device("cpu"))
        self.gens = args.lm_gens
        self.pop = args.lm_pop
        self.rank = args.rank
        self.batch = args.lm_batch
        self.seq_len = args.lm_seq_len

    def build(self, width: int) -> nn.Module:
        from mingru import build_model

        return build_model("float", width, 1)

    def run(self, model: nn.Module, opt: EggrollOptimizer, seed: int) -> float:
        egg = self.egg
        loss = egg.WindowLoss(model, 2)
        rng = np.random.default_rng(seed)  # the data order: the same at every grid point
        for _ in range(self.gens):
            starts = rng.integers(0, self.train.size - self.seq_len - 1, self.batch)
            x, y = egg.windows(self.train, starts, self.seq_len, torch.device("cpu"))

            def closure(
                population: Population, x: torch.Tensor = x, y: torch.Tensor = y
            ) -> torch.Tensor:
                return egg.population_bpb(population, loss, x, y, "auto")

            opt.step(closure)
        return float(egg.centre_bpb(model, self.vx, self.vy, 2))


def one_run(
    task: Any,
    width: int,
    scaling: str,
    sigma: float,
    lr: float,
    seed: int,
    vector_factor: float = 1.0,
) -> float:
    torch.manual_seed(seed)
    model = task.build(width)
    settings = dict(lr=lr, sigma=sigma, rank=task.rank)
    params: Any = (
        width_scaled_groups(model, **settings) if scaling == "fan_in" else model.parameters()
    )
    if scaling == "fan_in" and vector_factor != 1.0:
        # Vectors (biases; this model has no norm weights) in a group of their own, with
        # sigma * factor.
        vectors = [p for g in params for p in g["params"] if p.ndim < 2]
        params = [{**g, "params": [p for p in g["params"] if p.ndim >= 2]} for g in params]
        params.append(
            {**settings, "params": vectors, "sigma": sigma * vector_factor, "sigma_scaling": "none"}
        )
    extra = {} if scaling == "fan_in" else settings
    opt = EggrollOptimizer(params, pop_size=task.pop, seed=seed, **extra)
    with torch.no_grad():
        loss = task.run(model, opt, seed)
    return loss if math.isfinite(loss) else float("inf")


# ------------------------------------------------------------------------------------ analysis
def tolerance(cell: list[dict[str, Any]]) -> float:
    """How far above the best mean loss a grid point still counts as about as good.

    With several seeds: two standard errors of a difference of two means, the seeds' standard
    deviation pooled over the cell's five best points; with one seed: ``TOLERANCE`` of the best
    loss.
    """
    top = sorted((p for p in cell if math.isfinite(p["loss"])), key=lambda p: p["loss"])[:5]
    n = len(top[0]["losses"])
    if n < 2:
        return TOLERANCE * top[0]["loss"]
    var = float(np.mean([np.var(p["losses"], ddof=1) for p in top]))
    return 2.0 * math.sqrt(2.0 * var / n)


def best_points(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (task, scaling, width): the best grid point, the near-optimal ones, and what transfer
    costs.

    ``transfer_loss`` is the loss at this width with the ``(sigma, lr)`` that was best at the
    smallest width (what a user who tuned small and then grew the model gets); ``near`` lists
    every point within ``TOLERANCE`` of the best (on a ridge of constant ``lr * sigma`` several
    points are about as good, and which one wins is partly chance).
    """
    out = []
    order = {"mlp": 0, "lm": 1}
    keys = sorted(
        {(p["task"], p["scaling"], p["width"]) for p in points},
        key=lambda k: (order.get(k[0], 9), SCALINGS.index(k[1]), k[2]),
    )
    for task, scaling, width in keys:
        cell = [
            p for p in points if (p["task"], p["scaling"], p["width"]) == (task, scaling, width)
        ]
        first_width = min(
            p["width"] for p in points if (p["task"], p["scaling"]) == (task, scaling)
        )
        best = min(cell, key=lambda p: p["loss"])
        first = out[-1]["first"] if width != first_width else best
        sigmas = sorted({p["sigma"] for p in cell})
        lrs = sorted({p["lr"] for p in cell})
        transfer = next(
            p["loss"] for p in cell if (p["sigma"], p["lr"]) == (first["sigma"], first["lr"])
        )
        tol = tolerance(cell)
        near = [(p["sigma"], p["lr"]) for p in cell if p["loss"] <= best["loss"] + tol]
        out.append(
            {
                "task": task,
                "scaling": scaling,
                "width": width,
                "sigma": best["sigma"],
                "lr": best["lr"],
                "loss": best["loss"],
                "sigma_at_edge": best["sigma"] in (sigmas[0], sigmas[-1]),
                "lr_at_edge": best["lr"] in (lrs[0], lrs[-1]),
                "transfer_loss": transfer,
                "near": near,
                "tolerance": tol,
                "first": {"sigma": first["sigma"], "lr": first["lr"]},
            }
        )
    return out


def table(best: list[dict[str, Any]]) -> str:
    lines = [
        f"{'task':<5}{'scaling':<8}{'width':>6}{'sigma':>9}{'lr':>6}{'loss':>8}"
        f"{'x sigma':>8}{'x lr':>6}"
        f"{'x lr*sigma':>11}{'transfer':>9}  near-optimal (sigma, lr)"
    ]
    for b in best:
        near = " ".join(f"({s:g},{lr:g})" for s, lr in b["near"])
        edge = "*" if b["sigma_at_edge"] or b["lr_at_edge"] else " "
        lines.append(
            f"{b['task']:<5}{b['scaling']:<8}{b['width']:>6}{b['sigma']:>9.4g}{b['lr']:>6.3g}"
            f"{b['loss']:>8.3f}"
            f"{b['sigma'] / b['first']['sigma']:>8.3g}{b['lr'] / b['first']['lr']:>6.3g}"
            f"{b['sigma'] * b['lr'] / (b['first']['sigma'] * b['first']['lr']):>11.3g}"
            f"{b['transfer_loss']:>9.3f}{edge} {near}"
        )
    lines.append(
        "x sigma, x lr, x lr*sigma: the best point's value over the best point's at the smallest "
        "width; transfer: the loss with the smallest width's best (sigma, lr); *: best point on "
        "the edge of the grid; near-optimal: mean loss within two standard errors of the best "
        "(seed noise), or within "
        f"{TOLERANCE:.0%} with one seed"
    )
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best = result["best"]
    tasks = [t for t in ("mlp", "lm") if any(b["task"] == t for b in best)]
    fig, axes = plt.subplots(len(tasks), 3, figsize=(13, 3.6 * len(tasks)), dpi=110, squeeze=False)
    ylabel = {"mlp": "train cross-entropy (nats)", "lm": "valid bits/byte"}
    for row, task in zip(axes, tasks, strict=True):
        for scaling, colour in zip(SCALINGS, ("tab:red", "tab:blue"), strict=True):
            bs = [b for b in best if b["task"] == task and b["scaling"] == scaling]
            if not bs:
                continue
            w = np.array([b["width"] for b in bs], dtype=float)
            s = np.array([b["sigma"] for b in bs])
            lr = np.array([b["lr"] for b in bs])
            # The markers: the best point; the bars: the range of the near-optimal points.
            shift = 1.04 if scaling == "fan_in" else 1 / 1.04
            for ax, best_v, key in ((row[0], s, 0), (row[1], lr, 1)):
                lo = np.array([min(n[key] for n in b["near"]) for b in bs]) / best_v[0]
                hi = np.array([max(n[key] for n in b["near"]) for b in bs]) / best_v[0]
                mid = best_v / best_v[0]
                ax.errorbar(
                    w * shift,
                    mid,
                    yerr=[mid - lo, hi - mid],
                    fmt="o-",
                    color=colour,
                    capsize=3,
                    label=f'sigma_scaling="{scaling}" (bars: near-optimal)',
                )
            row[2].plot(
                w,
                [b["loss"] for b in bs],
                "o-",
                color=colour,
                label=f'"{scaling}": best of the grid',
            )
            row[2].plot(
                w,
                [b["transfer_loss"] for b in bs],
                "x--",
                color=colour,
                label=f'"{scaling}": best (sigma, lr) of width {bs[0]["width"]}',
            )
        w = np.array(sorted({b["width"] for b in best if b["task"] == task}), dtype=float)
        for ax in row[:2]:
            ax.plot(w, np.ones_like(w), ":", color="grey", label="constant")
            ax.fill_between(w, 0.5, 2.0, color="grey", alpha=0.12, label="within x2")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log", base=2)
            ax.set_xlabel("width")
            ax.grid(True, alpha=0.3)
        row[0].plot(w, np.sqrt(w[0] / w), "--", color="grey", label="1/sqrt(width)")
        row[0].set_ylabel("best sigma / best sigma at first width")
        row[1].set_ylabel("best lr / best lr at first width")
        row[2].set_xscale("log", base=2)
        row[2].set_xlabel("width")
        row[2].set_ylabel(ylabel[task])
        row[2].grid(True, alpha=0.3)
        row[0].set_title(f"{task}: best sigma", fontsize=10)
        row[1].set_title(f"{task}: best lr", fontsize=10)
        row[2].set_title(f"{task}: final loss", fontsize=10)
        for ax in row:
            ax.legend(fontsize=7)
    meta = result["meta"]
    factor = meta["settings"].get("vector_sigma_factor", 1.0)
    note = f'; "fan_in" runs with the vectors\' sigma x {factor:g}' if factor != 1.0 else ""
    fig.suptitle(f"{meta['script']} on {meta['device']}, torch {meta['torch']}{note}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    heatmaps(result, path.with_name(path.stem + "_heatmaps" + path.suffix))


def heatmaps(result: dict[str, Any], path: Path) -> None:
    """The final loss of every grid point: one panel per (task, scaling, width)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    pts = result["points"]
    rows = [
        (t, s)
        for t in ("mlp", "lm")
        for s in SCALINGS
        if any(p["task"] == t and p["scaling"] == s for p in pts)
    ]
    ncol = max(len({p["width"] for p in pts if p["task"] == t}) for t, _ in rows)
    fig, axes = plt.subplots(
        len(rows), ncol, figsize=(2.9 * ncol, 2.6 * len(rows)), dpi=100, squeeze=False
    )
    for r, (task, scaling) in enumerate(rows):
        sel = [p for p in pts if p["task"] == task and p["scaling"] == scaling]
        widths = sorted({p["width"] for p in sel})
        finite = [p["loss"] for p in sel if math.isfinite(p["loss"])]
        lo = min(finite)
        hi = min(
            float(np.percentile(finite, 90)), 10 * lo
        )  # a log colour scale over the interesting range
        for c in range(ncol):
            ax = axes[r][c]
            if c >= len(widths):
                ax.axis("off")
                continue
            cell = [p for p in sel if p["width"] == widths[c]]
            sigmas, lrs = sorted({p["sigma"] for p in cell}), sorted({p["lr"] for p in cell})
            grid = np.full((len(lrs), len(sigmas)), np.nan)
            for p in cell:
                grid[lrs.index(p["lr"]), sigmas.index(p["sigma"])] = p["loss"]
            ax.imshow(
                np.clip(np.where(np.isfinite(grid), grid, hi), lo, hi),
                origin="lower",
                cmap="viridis_r",
                norm=LogNorm(vmin=lo, vmax=hi),
                aspect="auto",
            )
            j, i = np.unravel_index(np.nanargmin(grid), grid.shape)
            for a in range(len(lrs)):
                for b in range(len(sigmas)):
                    txt = f"{grid[a, b]:.2f}" if np.isfinite(grid[a, b]) else "inf"
                    ax.text(
                        b,
                        a,
                        txt,
                        ha="center",
                        va="center",
                        fontsize=6,
                        color="red"
                        if (a, b) == (j, i)
                        else "black"
                        if grid[a, b] < math.sqrt(lo * hi)
                        else "white",
                    )
            ax.set_xticks(range(len(sigmas)), [f"{s:g}" for s in sigmas], fontsize=6, rotation=45)
            ax.set_yticks(range(len(lrs)), [f"{v:g}" for v in lrs], fontsize=6)
            ax.set_title(f"{task} {scaling} width {widths[c]}", fontsize=8)
            if c == 0:
                ax.set_ylabel("lr", fontsize=7)
            ax.set_xlabel("sigma", fontsize=7)
    meta = result["meta"]
    fig.suptitle(
        f"final loss per grid point (red: best); {meta['script']} on {meta['device']}, "
        f"torch {meta['torch']}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ------------------------------------------------------------------------------------ main
def ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--tasks", default="mlp,lm", help="comma-separated: mlp, lm")
    p.add_argument("--scalings", default="none,fan_in")
    p.add_argument("--widths", type=ints, default=None, help="default: mlp 32-512, lm 16-256")
    p.add_argument("--seeds", type=ints, default=None, help="default: 0,1 for mlp, 0 for lm")
    p.add_argument("--sigmas", type=floats, default=None, help="replace every grid's sigmas")
    p.add_argument("--lrs", type=floats, default=None, help="replace every grid's lrs")
    p.add_argument("--rank", type=int, default=4)
    p.add_argument(
        "--vector-sigma-factor",
        type=float,
        default=1.0,
        help='"fan_in" runs: the vectors (biases) get sigma times this '
        "(default 1, as width_scaled_groups)",
    )
    p.add_argument("--mlp-steps", type=int, default=40)
    p.add_argument("--mlp-pop", type=int, default=32)
    p.add_argument("--mlp-per-class", type=int, default=10, help="training examples per class")
    p.add_argument("--lm-gens", type=int, default=60)
    p.add_argument("--lm-pop", type=int, default=16)
    p.add_argument("--lm-batch", type=int, default=8, help="windows per generation")
    p.add_argument("--lm-seq-len", type=int, default=32)
    p.add_argument("--lm-valid-windows", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--machine",
        default=None,
        help="how to name the machine in the JSON and plots (default: CPU, threads)",
    )
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--plot", type=Path, default=None, help="PNG (and a *_heatmaps.png next to it)")
    p.add_argument(
        "--replot",
        type=Path,
        default=None,
        help="analyse the points of this JSON again (table, --plot, --json); run nothing",
    )
    args = p.parse_args(argv)

    if args.replot:
        result = json.loads(args.replot.read_text())
        result["best"] = best_points(result["points"])  # the analysis of this version of the script
        if args.machine:
            result["meta"]["device"] = args.machine
        print(table(result["best"]))
        if args.json:
            result["meta"]["analysed"] = f"--replot, {time.strftime('%Y-%m-%d')}"
            args.json.write_text(json.dumps(result, indent=1))
        if args.plot:
            plot(result, args.plot)
        return result

    torch.set_num_threads(args.threads)
    meta: dict[str, Any] = {
        "script": "benchmarks/width_sweep.py",
        "argv": sys.argv[1:] if argv is None else argv,
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "device": args.machine or f"{platform.machine()} CPU, {torch.get_num_threads()} thread(s)",
        "settings": {k: v for k, v in vars(args).items() if k not in ("json", "plot", "replot")},
    }
    print(f"{meta['script']}: {meta['device']}, torch {meta['torch']}", flush=True)
    points: list[dict[str, Any]] = []
    start = time.perf_counter()
    for name in args.tasks.split(","):
        task = {"mlp": MLPTask, "lm": LMTask}[name](args)
        for scaling in args.scalings.split(","):
            sigmas, lrs = GRIDS[name][scaling]
            sigmas, lrs = args.sigmas or sigmas, args.lrs or lrs
            for width in args.widths or WIDTHS[name]:
                t0 = time.perf_counter()
                for sigma in sigmas:
                    for lr in lrs:
                        seeds = args.seeds or SEEDS[name]
                        losses = [
                            one_run(task, width, scaling, sigma, lr, seed, args.vector_sigma_factor)
                            for seed in seeds
                        ]
                        points.append(
                            {
                                "task": name,
                                "scaling": scaling,
                                "width": width,
                                "sigma": sigma,
                                "lr": lr,
                                "losses": losses,
                                "loss": float(np.mean(losses)),
                            }
                        )
                cell = [
                    q
                    for q in points
                    if (q["task"], q["scaling"], q["width"]) == (name, scaling, width)
                ]
                b = min(cell, key=lambda q: q["loss"])
                print(
                    f"{name} {scaling:<7} width {width:5d}: best sigma {b['sigma']:g} "
                    f"lr {b['lr']:g} "
                    f"loss {b['loss']:.4f} ({time.perf_counter() - t0:.0f} s)",
                    flush=True,
                )
    meta["seconds"] = time.perf_counter() - start
    best = best_points(points)
    result = {
        "meta": meta,
        "grids": {t: GRIDS[t] for t in args.tasks.split(",")},
        "points": points,
        "best": best,
    }
    print(table(best))
    print(f"total {meta['seconds']:.0f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
    if args.plot:
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        plot(result, args.plot)
    return result


if __name__ == "__main__":
    main()
