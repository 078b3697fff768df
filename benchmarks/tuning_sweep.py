"""How sigma, lr, rank, population and shaping change what EggrollOptimizer learns in a fixed
budget.

Two small tasks, both on the CPU with one thread:

* ``classifier``: the factorized classifier of ``examples/nano_classifier.py`` (its data, model
  and loss: the negative log-likelihood on its 400 training images; test accuracy on 200
  held-out images is recorded too);
* ``transformer``: a byte-level language model built from ``torch.nn`` (embedding, one pre-norm
  ``nn.TransformerEncoderLayer`` with a causal mask, ``nn.LayerNorm``, a linear head; 26k
  parameters) on the MiniPile sample shipped in ``examples/nano_egg/data/``: every step draws 16
  new windows of 32 bytes from the first 90% of its documents; the score is the centre model's
  loss in bits per byte on 64 fixed windows of the last 10%.

Every run has the same budget of member evaluations (``--budget``, default 4096 =
population x steps). The sweeps:

1. ``sigma x lr`` at population 32 (128 steps), rank 4, z-score shaping;
2. ``rank x population`` at the best (sigma, lr) of sweep 1 (mean over seeds), the number of
   steps being budget / population;
3. the four shapings at that (sigma, lr), population 32, and ``centered_rank`` once more with
   ``lr`` times sqrt(12) (centred ranks have a spread of about 1/sqrt(12) where z-scores have 1,
   so this gives it the same step length);
4. before any training, for every sigma of sweep 1: how far the population's losses sit above
   the centre's, ``(mean(member losses) - centre loss) / std(member losses)`` on the first
   batch (``gap/spread``), a check a user can run before training (see docs/tuning.md).

Writes ``tuning_sweep.json`` (every run, its curve, the machine and versions), prints the tables,
and draws ``tuning_sweep.png``::

    python benchmarks/tuning_sweep.py                       # the full sweep, ~20-40 min on one core
    python benchmarks/tuning_sweep.py --quick --out-dir /tmp/sweep   # a smoke run, seconds
    python benchmarks/tuning_sweep.py --plot-only benchmarks/results/tuning_sweep.json
    python benchmarks/tuning_sweep.py --parts shaping --reuse benchmarks/results/tuning_sweep.json
        # rerun one part; the others are copied from the JSON given
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
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
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "examples" / "nano_egg"))

from corpus import split_documents  # noqa: E402  (examples/nano_egg/corpus.py)
from nano_classifier import FactorizedClassifier, make_dataset  # noqa: E402

from torcheggroll import EggrollOptimizer, Population  # noqa: E402

SIGMAS = (0.003, 0.01, 0.03, 0.1, 0.3)
LRS = (0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
RANKS = (1, 2, 4, 8)
POPS = (16, 32, 64, 128, 256)
SHAPINGS = ("zscore", "centered_rank", "centered", "raw")
# (shaping, lr factor): centred ranks in [-0.5, 0.5] have a spread of ~1/sqrt(12), z-scores 1.
SHAPING_RUNS = (
    ("zscore", 1.0),
    ("centered_rank", 1.0),
    ("centered_rank", math.sqrt(12.0)),
    ("centered", 1.0),
    ("raw", 1.0),
)
PARTS = ("gap", "grid", "rank_pop", "shaping")
DATA = ROOT / "examples" / "nano_egg" / "data" / "minipile_valid_1000.npy"
LN2 = math.log(2.0)


class Task:
    """A model, the loss of every member on the batch of a step, and a score of the centre."""

    name = ""
    unit = ""

    def build(self, seed: int) -> nn.Module:
        raise NotImplementedError

    def batch(self, step: int, seed: int) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def losses(self, out: torch.Tensor, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Per-member losses from outputs with a leading member dimension."""
        raise NotImplementedError

    def inputs(self, batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def score(self, model: nn.Module) -> dict[str, float]:
        """``{"loss": ...}`` (what the sweeps compare) and any extra metric."""
        raise NotImplementedError


class ClassifierTask(Task):
    name = "classifier"
    unit = "NLL (nats), training set"

    def __init__(self) -> None:
        self.train = make_dataset(40, 0)
        self.test = make_dataset(20, 1)

    def build(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return FactorizedClassifier(16)

    def batch(self, step: int, seed: int) -> tuple[torch.Tensor, ...]:
        return self.train

    def inputs(self, batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        return batch[0], batch[1]

    def losses(self, out: torch.Tensor, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        labels = batch[2].expand(out.shape[0], -1).unsqueeze(-1)
        return -out.gather(-1, labels).squeeze(-1).mean(-1)

    @torch.no_grad()
    def score(self, model: nn.Module) -> dict[str, float]:
        rgb, comp, labels = self.train
        t_rgb, t_comp, t_labels = self.test
        acc = float((model(t_rgb, t_comp).argmax(-1) == t_labels).float().mean())
        return {"loss": float(F.nll_loss(model(rgb, comp), labels)), "test_acc": acc}


class TinyLM(nn.Module):
    """Byte embedding + learned positions, pre-norm causal Transformer layers, a linear head."""

    def __init__(
        self, width: int = 32, heads: int = 2, ff: int = 64, layers: int = 1, context: int = 32
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(256, width)
        self.pos = nn.Parameter(0.02 * torch.randn(context, width))
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(
                width, heads, ff, dropout=0.0, batch_first=True, norm_first=True
            )
            for _ in range(layers)
        )
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, 256)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(context))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[-1]
        h = self.embed(x) + self.pos[:t]
        for block in self.blocks:
            h = block(h, src_mask=self.mask[:t, :t], is_causal=True)
        return self.head(self.norm(h))


class TransformerTask(Task):
    name = "transformer"
    unit = "bits/byte, validation"
    context = 32
    batch_windows = 16

    def __init__(self) -> None:
        train, valid = split_documents(np.load(DATA), max_docs=0, valid_fraction=0.1)
        self.train = torch.from_numpy(train.astype(np.int64))
        rng = np.random.default_rng(12345)
        starts = rng.integers(0, len(valid) - self.context - 1, 64)
        self.valid = torch.tensor(
            np.stack([valid[s : s + self.context + 1] for s in starts]).astype(np.int64)
        )

    def build(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return TinyLM(context=self.context)

    def batch(self, step: int, seed: int) -> tuple[torch.Tensor, ...]:
        g = torch.Generator().manual_seed(1_000_003 * seed + step)
        starts = torch.randint(
            0, len(self.train) - self.context - 1, (self.batch_windows,), generator=g
        )
        return (self.train[starts[:, None] + torch.arange(self.context + 1)],)

    def inputs(self, batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        return (batch[0][:, :-1],)

    def losses(self, out: torch.Tensor, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        target = batch[0][:, 1:].expand(out.shape[0], -1, -1)
        nll = F.cross_entropy(out.flatten(0, -2), target.flatten(), reduction="none")
        return nll.view(out.shape[0], -1).mean(-1) / LN2

    @torch.no_grad()
    def score(self, model: nn.Module) -> dict[str, float]:
        out = model(self.valid[:, :-1]).unsqueeze(0)
        return {"loss": float(self.losses(out, (self.valid,))[0])}


def matrix_rms(model: nn.Module) -> dict[str, float]:
    """The root-mean-square entry of every parameter with two or more dimensions, at init."""
    return {
        n: float(p.detach().pow(2).mean().sqrt())
        for n, p in model.named_parameters()
        if p.dim() >= 2
    }


def run_one(
    task: Task,
    *,
    sigma: float,
    lr: float,
    rank: int,
    pop: int,
    steps: int,
    seed: int,
    shaping: str = "zscore",
    curve_points: int = 8,
) -> dict[str, Any]:
    """Train from the seed's initialization for ``steps`` steps; the centre's score along the
    way."""
    model = task.build(seed)
    start = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    opt = EggrollOptimizer(
        model.parameters(), lr=lr, sigma=sigma, rank=rank, pop_size=pop, shaping=shaping, seed=seed
    )
    first = task.score(model)
    every = max(1, steps // curve_points)
    curve = [(0, first["loss"])]
    t0 = time.perf_counter()
    for step in range(steps):
        batch = task.batch(step, seed)

        def closure(
            population: Population, batch: tuple[torch.Tensor, ...] = batch
        ) -> torch.Tensor:
            return task.losses(population.forward(model, *task.inputs(batch)), batch)

        opt.step(closure)
        if (step + 1) % every == 0 or step + 1 == steps:
            curve.append((step + 1, task.score(model)["loss"]))
    seconds = time.perf_counter() - t0
    final = task.score(model)
    end = torch.cat([p.detach().flatten() for p in model.parameters()])
    loss = final["loss"] if math.isfinite(final["loss"]) else float("inf")
    return {
        "task": task.name,
        "sigma": sigma,
        "lr": lr,
        "rank": rank,
        "pop": pop,
        "steps": steps,
        "seed": seed,
        "shaping": shaping,
        "initial": first["loss"],
        "final": loss,
        "extra": {k: v for k, v in final.items() if k != "loss"},
        "relative_change": float((end - start).norm() / start.norm()),
        "curve": curve,
        "seconds": seconds,
    }


@torch.no_grad()
def gap_over_spread(task: Task, sigma: float, rank: int, pop: int, seed: int) -> dict[str, float]:
    """Before training: how much worse the population is than the centre, in units of its spread."""
    model = task.build(seed)
    opt = EggrollOptimizer(model.parameters(), sigma=sigma, rank=rank, pop_size=pop, seed=seed)
    batch = task.batch(0, seed)
    losses, _ = opt.evaluate(
        lambda population: task.losses(population.forward(model, *task.inputs(batch)), batch)
    )
    centre = float(task.losses(model(*task.inputs(batch)).unsqueeze(0), batch)[0])
    spread = float(losses.std())
    return {
        "sigma": sigma,
        "seed": seed,
        "centre": centre,
        "mean": float(losses.mean()),
        "spread": spread,
        "gap_over_spread": (float(losses.mean()) - centre) / max(spread, 1e-12),
    }


def mean_final(runs: list[dict[str, Any]], **match: Any) -> float:
    vals = [r["final"] for r in runs if all(r[k] == v for k, v in match.items())]
    return float(np.mean(vals)) if vals else float("nan")


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} logical CPUs, {platform.system()}"


def shaping_label(shaping: str, factor: float) -> str:
    return shaping if factor == 1.0 else f"{shaping}, lr x {factor:.2f}"


def sweep(args: argparse.Namespace) -> dict[str, Any]:
    tasks: dict[str, Task] = {"classifier": ClassifierTask(), "transformer": TransformerTask()}
    reused = json.loads(Path(args.reuse).read_text()) if args.reuse else None
    out: dict[str, Any] = {
        "meta": {
            "script": "benchmarks/tuning_sweep.py",
            "argv": sys.argv[1:],
            "torch": torch.__version__,
            "python": platform.python_version(),
            "machine": machine(),
            "threads": torch.get_num_threads(),
            "date": datetime.date.today().isoformat(),
            "budget": args.budget,
            "grid_pop": args.grid_pop,
            "grid_rank": args.grid_rank,
            "seeds": args.seeds,
            "parts": args.parts,
        },
        "tasks": {},
    }
    if reused is not None:
        out["meta"]["reused"] = {"from": args.reuse, "meta": reused["meta"]}
    for name in args.tasks:
        task = tasks[name]
        res: dict[str, Any] = {
            "unit": task.unit,
            "rms": matrix_rms(task.build(0)),
            "grid": [],
            "rank_pop": [],
            "shaping": [],
            "gap": [],
        }
        if reused is not None:
            res.update({k: v for k, v in reused["tasks"][name].items() if k in (*PARTS, "best")})
        out["tasks"][name] = res
        steps = args.budget // args.grid_pop
        if "gap" in args.parts:
            res["gap"] = [
                gap_over_spread(task, sigma, args.grid_rank, args.grid_pop, seed)
                for sigma in args.sigmas
                for seed in args.seeds
            ]
        if "grid" in args.parts:
            res["grid"] = []
            for sigma in args.sigmas:
                for lr in args.lrs:
                    for seed in args.seeds:
                        r = run_one(
                            task,
                            sigma=sigma,
                            lr=lr,
                            rank=args.grid_rank,
                            pop=args.grid_pop,
                            steps=steps,
                            seed=seed,
                        )
                        res["grid"].append(r)
                        print(
                            f"{name:12s} sigma={sigma:<6} lr={lr:<5} seed={seed} -> "
                            f"{r['final']:.4f} "
                            f"({r['seconds']:.1f}s)",
                            flush=True,
                        )
            sigmas = sorted({r["sigma"] for r in res["grid"]})
            lrs = sorted({r["lr"] for r in res["grid"]})
            cells = [(mean_final(res["grid"], sigma=s, lr=lr), s, lr) for s in sigmas for lr in lrs]
            best_loss, best_sigma, best_lr = min(cells)
            res["best"] = {"sigma": best_sigma, "lr": best_lr, "final": best_loss}
        best_sigma, best_lr = res["best"]["sigma"], res["best"]["lr"]
        if "rank_pop" in args.parts:
            res["rank_pop"] = []
        for rank in args.ranks if "rank_pop" in args.parts else ():
            for pop in args.pops:
                for seed in args.seeds:
                    r = run_one(
                        task,
                        sigma=best_sigma,
                        lr=best_lr,
                        rank=rank,
                        pop=pop,
                        steps=max(1, args.budget // pop),
                        seed=seed,
                    )
                    res["rank_pop"].append(r)
                    print(
                        f"{name:12s} rank={rank} pop={pop:<4} -> {r['final']:.4f} "
                        f"({r['seconds']:.1f}s)",
                        flush=True,
                    )
        if "shaping" in args.parts:
            res["shaping"] = []
        for shaping, factor in SHAPING_RUNS if "shaping" in args.parts else ():
            for seed in args.seeds:
                r = run_one(
                    task,
                    sigma=best_sigma,
                    lr=best_lr * factor,
                    rank=args.grid_rank,
                    pop=args.grid_pop,
                    steps=steps,
                    seed=seed,
                    shaping=shaping,
                )
                r["label"] = shaping_label(shaping, factor)
                res["shaping"].append(r)
                print(f"{name:12s} shaping={r['label']:<24} -> {r['final']:.4f}", flush=True)
    return out


def fmt(v: float) -> str:
    return "diverged" if not math.isfinite(v) else f"{v:.3f}"


def tables(result: dict[str, Any]) -> str:
    """Markdown tables of the sweeps (means over seeds)."""
    meta = result["meta"]
    lines = [
        f"benchmarks/tuning_sweep.py, {meta['machine']}, torch {meta['torch']}, "
        f"{meta['threads']} thread(s), seeds {meta['seeds']}, "
        f"budget {meta['budget']} member evaluations",
        "",
    ]
    for name, res in result["tasks"].items():
        grid = res["grid"]
        sigmas = sorted({r["sigma"] for r in grid})
        lrs = sorted({r["lr"] for r in grid})
        init = float(np.mean([r["initial"] for r in grid]))
        steps = grid[0]["steps"]
        lines.append(
            f"### {name}: {res['unit']} after {steps} steps of population {grid[0]['pop']} "
            f"(rank {grid[0]['rank']}; at init {init:.3f})"
        )
        lines.append("")
        lines.append("| sigma \\ lr | " + " | ".join(f"{lr:g}" for lr in lrs) + " |")
        lines.append("|---" * (len(lrs) + 1) + "|")
        for s in sigmas:
            row = [fmt(mean_final(grid, sigma=s, lr=lr)) for lr in lrs]
            lines.append(f"| {s:g} | " + " | ".join(row) + " |")
        lines.append("")
        lines.append("parameters moved, |theta_end - theta_0| / |theta_0|:")
        lines.append("")
        lines.append("| sigma \\ lr | " + " | ".join(f"{lr:g}" for lr in lrs) + " |")
        lines.append("|---" * (len(lrs) + 1) + "|")
        for s in sigmas:
            moved = [
                np.mean([r["relative_change"] for r in grid if r["sigma"] == s and r["lr"] == lr])
                for lr in lrs
            ]
            lines.append(f"| {s:g} | " + " | ".join(f"{v:.3f}" for v in moved) + " |")
        best = res["best"]
        lines.append("")
        lines.append(
            f"best: sigma {best['sigma']:g}, lr {best['lr']:g} "
            f"(lr*sigma {best['sigma'] * best['lr']:.3g}): "
            f"{best['final']:.3f}"
        )
        lines.append("")
        rp = res["rank_pop"]
        if rp:
            ranks = sorted({r["rank"] for r in rp})
            pops = sorted({r["pop"] for r in rp})
            lines.append(
                f"rank x population at sigma {best['sigma']:g}, lr {best['lr']:g}, "
                f"{meta['budget']} evaluations (steps = {meta['budget']} / population):"
            )
            lines.append("")
            lines.append(
                "| rank \\ population | "
                + " | ".join(f"{p} ({meta['budget'] // p} steps)" for p in pops)
                + " |"
            )
            lines.append("|---" * (len(pops) + 1) + "|")
            for rank in ranks:
                lines.append(
                    f"| {rank} | "
                    + " | ".join(fmt(mean_final(rp, rank=rank, pop=p)) for p in pops)
                    + " |"
                )
            lines.append("")
        if res["shaping"]:
            labels = list(dict.fromkeys(r.get("label", r["shaping"]) for r in res["shaping"]))
            finals = [
                np.mean([r["final"] for r in res["shaping"] if r.get("label", r["shaping"]) == lab])
                for lab in labels
            ]
            lines.append(
                f"shaping at sigma {best['sigma']:g}, lr {best['lr']:g} "
                f"(population {meta['grid_pop']}):"
            )
            lines.append("")
            lines.append("| shaping | " + " | ".join(labels) + " |")
            lines.append("|---" * (len(labels) + 1) + "|")
            lines.append("| final | " + " | ".join(fmt(float(v)) for v in finals) + " |")
            lines.append("")
        if res["gap"]:
            lines.append("| sigma | " + " | ".join(f"{s:g}" for s in sigmas) + " |")
            lines.append("|---" * (len(sigmas) + 1) + "|")
            ratio = [
                np.mean([g["gap_over_spread"] for g in res["gap"] if g["sigma"] == s])
                for s in sigmas
            ]
            lines.append("| gap/spread at init | " + " | ".join(f"{v:.2f}" for v in ratio) + " |")
            lines.append("")
        rms = res["rms"]
        lines.append("matrix RMS at init: " + ", ".join(f"{k} {v:.3f}" for k, v in rms.items()))
        lines.append("")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["tasks"])
    fig, axes = plt.subplots(len(names), 3, figsize=(15, 4.4 * len(names)), dpi=110, squeeze=False)
    for row, name in zip(axes, names, strict=True):
        res = result["tasks"][name]
        grid = res["grid"]
        sigmas = sorted({r["sigma"] for r in grid})
        lrs = sorted({r["lr"] for r in grid})
        init = float(np.mean([r["initial"] for r in grid]))
        z = np.array([[mean_final(grid, sigma=s, lr=lr) for lr in lrs] for s in sigmas])
        shown = np.where(np.isfinite(z), np.minimum(z, init), init)
        ax = row[0]
        im = ax.imshow(shown, origin="lower", cmap="viridis_r", aspect="auto")
        for i in range(len(sigmas)):
            for j in range(len(lrs)):
                worse = not np.isfinite(z[i, j]) or z[i, j] >= init
                ax.text(
                    j,
                    i,
                    "x" if worse else f"{z[i, j]:.2f}",
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if shown[i, j] > (shown.min() + init) / 2 else "black",
                )
        ax.set_xticks(range(len(lrs)), [f"{v:g}" for v in lrs])
        ax.set_yticks(range(len(sigmas)), [f"{v:g}" for v in sigmas])
        ax.set_xlabel("lr")
        ax.set_ylabel("sigma")
        ax.set_title(
            f"{name}: {res['unit']}\nafter {grid[0]['steps']} steps x pop {grid[0]['pop']} "
            f"(init {init:.2f}; x = no better)",
            fontsize=9,
        )
        fig.colorbar(im, ax=ax)
        ax = row[1]
        for s in sigmas:
            xs = [s * lr for lr in lrs]
            ys = [mean_final(grid, sigma=s, lr=lr) for lr in lrs]
            ys = [y if math.isfinite(y) else np.nan for y in ys]
            ax.plot(xs, ys, marker="o", label=f"sigma {s:g}")
        ax.axhline(init, color="grey", linestyle="--", linewidth=1, label="at init")
        ax.set_xscale("log")
        ax.set_ylim(
            top=init * 1.15, bottom=min(np.nanmin(z), init) * 0.9 if np.isfinite(z).any() else None
        )
        ax.set_xlabel("lr x sigma (step per entry)")
        ax.set_ylabel(res["unit"])
        ax.set_title(f"{name}: the same data against lr x sigma", fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
        ax = row[2]
        rp = res["rank_pop"]
        if rp:
            pops = sorted({r["pop"] for r in rp})
            for rank in sorted({r["rank"] for r in rp}):
                ax.plot(
                    pops,
                    [mean_final(rp, rank=rank, pop=p) for p in pops],
                    marker="o",
                    label=f"rank {rank}",
                )
            ax.axhline(init, color="grey", linestyle="--", linewidth=1, label="at init")
            ax.set_xscale("log", base=2)
            ax.set_xticks(pops, [str(p) for p in pops])
            ax.set_xlabel(f"population (steps = {result['meta']['budget']} / population)")
            ax.set_ylabel(res["unit"])
            best = res["best"]
            ax.set_title(
                f"{name}: rank and population at a fixed budget\n(sigma {best['sigma']:g}, "
                f"lr {best['lr']:g})",
                fontsize=9,
            )
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
    meta = result["meta"]
    fig.suptitle(
        f"benchmarks/tuning_sweep.py: {meta['machine']}, torch {meta['torch']}, "
        f"{meta['threads']} thread, mean of seeds {meta['seeds']}",
        fontsize=10,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--tasks", default="classifier,transformer")
    p.add_argument(
        "--seeds", default="0,1", help="comma-separated seeds (model init, noise and batches)"
    )
    p.add_argument(
        "--budget", type=int, default=4096, help="member evaluations per run (population x steps)"
    )
    p.add_argument("--grid-pop", type=int, default=32)
    p.add_argument("--grid-rank", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="a tiny grid and budget (a smoke run)")
    p.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument(
        "--plot-only", default=None, metavar="JSON", help="redraw the plot and tables from a JSON"
    )
    p.add_argument(
        "--parts", default=",".join(PARTS), help=f"which sweeps to run, of {','.join(PARTS)}"
    )
    p.add_argument(
        "--reuse", default=None, metavar="JSON", help="take the parts not run from this JSON"
    )
    args = p.parse_args(argv)
    out_dir = Path(args.out_dir)
    if args.plot_only:
        result = json.loads(Path(args.plot_only).read_text())
        print(tables(result))
        plot(result, out_dir / "tuning_sweep.png")
        return
    torch.set_num_threads(args.threads)
    args.tasks = [t for t in args.tasks.split(",") if t]
    args.parts = [t for t in args.parts.split(",") if t]
    if set(args.parts) - set(PARTS) or (set(PARTS) - set(args.parts) and not args.reuse):
        p.error(f"--parts takes {','.join(PARTS)}; leaving one out needs --reuse JSON")
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.sigmas, args.lrs, args.ranks, args.pops = SIGMAS, LRS, RANKS, POPS
    if args.quick:
        args.sigmas, args.lrs, args.ranks, args.pops = (0.01, 0.1), (0.1, 1.0), (1, 4), (16, 32)
        args.budget, args.seeds = 128, args.seeds[:1]
    start = time.perf_counter()
    result = sweep(args)
    result["meta"]["seconds"] = time.perf_counter() - start
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tuning_sweep.json").write_text(json.dumps(result, indent=1))
    print(tables(result))
    plot(result, out_dir / "tuning_sweep.png")
    print(
        f"wrote {out_dir / 'tuning_sweep.json'} and {out_dir / 'tuning_sweep.png'} "
        f"in {result['meta']['seconds']:.0f} s"
    )


if __name__ == "__main__":
    main()
