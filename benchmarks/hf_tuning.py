"""Two tuning findings on Hugging Face models, reproduced on the CPU (randomly initialized, no
download).

1. ``lm``: small GPT-2 and Llama configurations (vocab 256 bytes, width 64, 2 layers) trained
   for 10 steps on the MiniPile sample of ``examples/nano_egg/data/``: at the README's
   ``lr=0.05, sigma=0.02`` the validation loss barely moves, at ``lr=0.5`` it moves clearly.
   Two more settings test whether the product ``lr * sigma`` is what sets the step: ``lr=0.5,
   sigma=0.002`` and ``lr=0.05, sigma=0.2``.
2. ``resnet``: ``ResNetForImageClassification(ResNetConfig(num_labels=10))`` (the ResNet-50
   layout: bottleneck blocks 3-4-6-3, widths 256-2048) on 60 rendered 16x16 images of the 10
   classes of ``examples/nano_classifier.py``, 10 steps, in eval mode (batch norm with its
   initial running statistics), in eval mode after the running statistics were set from the
   data (as in a trained model), and in train mode: ``lr=0.5`` with ``sigma`` 0.01 and 0.02, and
   smaller ``lr``; plus a small ResNet (widths 16-64) for contrast. Before training it also
   measures how far the members' logits move from the centre's (relative change).

Every step records the centre's loss, the population's mean loss and spread on the step's batch
(the ``gap/spread`` check of docs/tuning.md) and how far the parameters have moved. Writes
``tuning_hf.json``, prints the tables and draws ``tuning_hf.png``::

    pip install transformers
    python benchmarks/hf_tuning.py                          # both parts, ~10-20 min on one core
    python benchmarks/hf_tuning.py --parts lm --quick --out-dir /tmp/hf   # a smoke run
    python benchmarks/hf_tuning.py --plot-only benchmarks/results/tuning_hf.json
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
import warnings
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
from nano_classifier import COLOURS, SHAPES, render  # noqa: E402

from torcheggroll import EggrollOptimizer, Population  # noqa: E402

DATA = ROOT / "examples" / "nano_egg" / "data" / "minipile_valid_1000.npy"
LN2 = math.log(2.0)
LM_SETTINGS = ((0.05, 0.02), (0.15, 0.02), (0.5, 0.02), (1.5, 0.02), (0.5, 0.002), (0.05, 0.2))
# (model, batch norm mode, sigma, lr)
CALIBRATED = "eval, calibrated statistics"
RESNET_CASES = (
    ("resnet50", "eval", 0.01, 0.5),
    ("resnet50", "eval", 0.02, 0.5),
    ("resnet50", "eval", 0.02, 0.15),
    ("resnet50", CALIBRATED, 0.01, 0.5),
    ("resnet50", CALIBRATED, 0.02, 0.5),
    ("resnet50", CALIBRATED, 0.01, 0.15),
    ("resnet50", CALIBRATED, 0.01, 0.05),
    ("resnet50", "train", 0.01, 0.5),
    ("resnet50", "train", 0.02, 0.5),
    ("small", "eval", 0.01, 0.5),
    ("small", "eval", 0.02, 0.5),
)


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


def matrix_rms(model: nn.Module) -> list[float]:
    return [float(p.detach().pow(2).mean().sqrt()) for p in model.parameters() if p.dim() >= 2]


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten().clone() for p in model.parameters()])


def train(
    model: nn.Module,
    member_losses: Any,
    centre_loss: Any,
    score: Any,
    batches: Any,
    *,
    lr: float,
    sigma: float,
    steps: int,
    pop: int,
    rank: int,
    seed: int,
) -> dict[str, Any]:
    """ES steps; per step the centre's and the population's losses on the step's batch."""
    opt = EggrollOptimizer(
        model.parameters(), lr=lr, sigma=sigma, rank=rank, pop_size=pop, seed=seed
    )
    start = flat(model)
    record: dict[str, Any] = {
        "lr": lr,
        "sigma": sigma,
        "score": [score(model)],
        "centre": [],
        "member_mean": [],
        "member_std": [],
        "relative_change": [0.0],
    }
    t0 = time.perf_counter()
    for step in range(steps):
        batch = batches(step)

        def closure(population: Population, batch: Any = batch) -> torch.Tensor:
            return member_losses(population, batch)

        loss = opt.step(closure)
        losses = opt.last_losses.float()
        with torch.no_grad():
            record["centre"].append(float(centre_loss(model, batch)))  # after the update
        record["member_mean"].append(float(loss))
        record["member_std"].append(
            float(losses[torch.isfinite(losses)].std())
            if torch.isfinite(losses).sum() > 1
            else float("nan")
        )
        record["score"].append(score(model))
        record["relative_change"].append(float((flat(model) - start).norm() / start.norm()))
    record["seconds"] = time.perf_counter() - t0
    return record


@torch.no_grad()
def first_gap(
    model: nn.Module,
    member_losses: Any,
    centre_loss: Any,
    batch: Any,
    *,
    sigma: float,
    pop: int,
    rank: int,
    seed: int,
) -> dict[str, float]:
    """``(mean member loss - centre loss) / std(member losses)`` before any update."""
    opt = EggrollOptimizer(model.parameters(), sigma=sigma, rank=rank, pop_size=pop, seed=seed)
    losses, _ = opt.evaluate(lambda population: member_losses(population, batch))
    centre = float(centre_loss(model, batch))
    mean, std = float(losses.mean()), float(losses.std())
    return {
        "centre": centre,
        "mean": mean,
        "std": std,
        "gap_over_spread": (mean - centre) / max(std, 1e-12),
    }


# ---------------------------------------------------------------- part 1: GPT-2 and Llama


def lm_models() -> dict[str, Any]:
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    return {
        "gpt2": lambda: GPT2LMHeadModel(
            GPT2Config(
                vocab_size=256,
                n_positions=128,
                n_embd=64,
                n_layer=2,
                n_head=2,
                bos_token_id=0,
                eos_token_id=0,
            )
        ),
        "llama": lambda: LlamaForCausalLM(
            LlamaConfig(
                vocab_size=256,
                hidden_size=64,
                intermediate_size=172,
                num_hidden_layers=2,
                num_attention_heads=2,
                num_key_value_heads=2,
                max_position_embeddings=128,
                bos_token_id=0,
                eos_token_id=0,
                pad_token_id=0,
            )
        ),
    }


def part_lm(args: argparse.Namespace) -> dict[str, Any]:
    train_bytes, valid_bytes = split_documents(np.load(DATA), max_docs=0, valid_fraction=0.1)
    train_t = torch.from_numpy(train_bytes.astype(np.int64))
    ctx = 64
    rng = np.random.default_rng(12345)
    starts = rng.integers(0, len(valid_bytes) - ctx - 1, 32)
    valid = torch.tensor(np.stack([valid_bytes[s : s + ctx + 1] for s in starts]).astype(np.int64))

    def batches(step: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(1_000_003 * args.seed + step)
        s = torch.randint(0, len(train_t) - ctx - 1, (16,), generator=g)
        return train_t[s[:, None] + torch.arange(ctx + 1)]

    def bits(logits: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Per-member bits per byte; ``logits`` has a leading member dimension."""
        target = w[:, 1:].expand(logits.shape[0], -1, -1)
        nll = F.cross_entropy(
            logits[..., :-1, :].flatten(0, -2).float(), target.flatten(), reduction="none"
        )
        return nll.view(logits.shape[0], -1).mean(-1) / LN2

    out: dict[str, Any] = {}
    for name, build in lm_models().items():
        runs = []
        for lr, sigma in args.lm_settings:
            torch.manual_seed(args.seed)
            model = build().eval()

            def member_losses(
                population: Population, w: torch.Tensor, model: nn.Module = model
            ) -> torch.Tensor:
                return bits(population.forward(model, input_ids=w).logits, w)

            def centre_loss(m: nn.Module, w: torch.Tensor) -> torch.Tensor:
                return bits(m(input_ids=w).logits.unsqueeze(0), w)[0]

            def score(m: nn.Module) -> float:
                with torch.no_grad():
                    return float(centre_loss(m, valid))

            rms = matrix_rms(model)
            gap = first_gap(
                model,
                member_losses,
                centre_loss,
                batches(0),
                sigma=sigma,
                pop=args.pop,
                rank=args.rank,
                seed=args.seed,
            )
            r = train(
                model,
                member_losses,
                centre_loss,
                score,
                batches,
                lr=lr,
                sigma=sigma,
                steps=args.lm_steps,
                pop=args.pop,
                rank=args.rank,
                seed=args.seed,
            )
            r.update(gap=gap, rms_median=float(np.median(rms)), rms_min=float(min(rms)))
            runs.append(r)
            print(
                f"{name:6s} lr={lr:<5} sigma={sigma:<6} valid {r['score'][0]:.3f} -> "
                f"{r['score'][-1]:.3f} bits/byte, moved {r['relative_change'][-1]:.3f}, "
                f"gap/spread {gap['gap_over_spread']:.2f} "
                f"({r['seconds']:.0f}s)",
                flush=True,
            )
        out[name] = runs
    return out


# ---------------------------------------------------------------- part 2: ResNet and batch norm


def images(per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for ci, base in enumerate(COLOURS.values()):
        for si, shape in enumerate(SHAPES):
            for _ in range(per_class):
                rgb = np.clip(np.asarray(base) + rng.normal(0.0, 0.12, 3), 0.0, 1.0)
                xs.append(render(shape, rgb, rng))
                ys.append(2 * ci + si)
    x = torch.tensor(np.array(xs), dtype=torch.float32).permute(0, 3, 1, 2)
    return (x - 0.5) / 0.25, torch.tensor(ys)


def resnet(size: str) -> nn.Module:
    from transformers import ResNetConfig, ResNetForImageClassification

    if size == "resnet50":
        config = ResNetConfig(num_labels=10)
    else:
        config = ResNetConfig(
            num_labels=10,
            embedding_size=16,
            hidden_sizes=[16, 32, 64],
            depths=[1, 1, 1],
            layer_type="basic",
        )
    return ResNetForImageClassification(config)


def part_resnet(args: argparse.Namespace) -> dict[str, Any]:
    x, y = images(args.images_per_class, args.seed)

    def member_losses(population: Population, batch: Any, model: nn.Module) -> torch.Tensor:
        logits = population.forward(model, pixel_values=x).logits
        return (
            F.cross_entropy(logits.flatten(0, 1), y.repeat(logits.shape[0]), reduction="none")
            .view(logits.shape[0], -1)
            .mean(-1)
        )

    def centre_loss(m: nn.Module, batch: Any) -> torch.Tensor:
        return F.cross_entropy(m(pixel_values=x).logits, y)

    def score(m: nn.Module) -> float:
        with torch.no_grad():
            return float(centre_loss(m, None))

    @torch.no_grad()
    def output_change(model: nn.Module, sigma: float) -> float:
        """Mean over members of |logits_i - logits_centre| / |logits_centre| before training."""
        opt = EggrollOptimizer(
            model.parameters(), sigma=sigma, rank=args.rank, pop_size=args.pop, seed=args.seed
        )
        seen: list[torch.Tensor] = []

        def closure(population: Population) -> torch.Tensor:
            seen.append(population.forward(model, pixel_values=x).logits)
            return seen[-1].flatten(1).norm(dim=1)

        opt.evaluate(closure)
        centre = model(pixel_values=x).logits
        return float(((seen[-1] - centre).flatten(1).norm(dim=1) / centre.norm()).mean())

    out: dict[str, Any] = {}
    for size, mode, sigma, lr in args.resnet_cases:
        torch.manual_seed(args.seed)
        model = resnet(size)
        if mode == CALIBRATED:
            # As in a trained model: running statistics measured on the data (cumulative average).
            for m in model.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.reset_running_stats()
                    m.momentum = None
            model.train()
            with torch.no_grad():
                model(pixel_values=x)
        model.train(mode == "train")
        with torch.no_grad():
            logit_std = float(model(pixel_values=x).logits.std())

        def losses(population: Population, batch: Any, model: nn.Module = model) -> torch.Tensor:
            return member_losses(population, batch, model)

        rms = matrix_rms(model)
        gap = first_gap(
            model,
            losses,
            centre_loss,
            None,
            sigma=sigma,
            pop=args.pop,
            rank=args.rank,
            seed=args.seed,
        )
        change = output_change(model, sigma)
        r = train(
            model,
            losses,
            centre_loss,
            score,
            lambda step: None,
            lr=lr,
            sigma=sigma,
            steps=args.resnet_steps,
            pop=args.pop,
            rank=args.rank,
            seed=args.seed,
        )
        r.update(
            size=size,
            mode=mode,
            gap=gap,
            logit_std=logit_std,
            rms_median=float(np.median(rms)),
            rms_min=float(min(rms)),
            params=sum(p.numel() for p in model.parameters()),
            output_change=change,
        )
        out.setdefault(size, []).append(r)
        print(
            f"{size:8s} {mode:28s} sigma={sigma:<5} lr={lr:<5} loss {r['score'][0]:.3f} -> max "
            f"{max(r['score']):.3g} -> {r['score'][-1]:.3g}, "
            f"gap/spread {gap['gap_over_spread']:.2f}, "
            f"logits moved {change:.3f}, "
            f"sigma/median RMS {sigma / np.median(rms):.2f} ({r['seconds']:.0f}s)",
            flush=True,
        )
    return out


# ---------------------------------------------------------------- report


def tables(result: dict[str, Any]) -> str:
    meta = result["meta"]
    lines = [
        f"benchmarks/hf_tuning.py, {meta['machine']}, torch {meta['torch']}, transformers "
        f"{meta['transformers']}, {meta['threads']} thread(s), population {meta['pop']}, "
        f"rank {meta['rank']}",
        "",
    ]
    for name, runs in result.get("lm", {}).items():
        lines.append(
            f"### {name}: validation bits/byte, {len(runs[0]['score']) - 1} steps "
            f"(matrix RMS at init: median {runs[0]['rms_median']:.3f})"
        )
        lines.append("")
        lines.append(
            "| lr | sigma | lr x sigma | gap/spread at init | before | after | change | "
            "parameters moved (relative) |"
        )
        lines.append("|---|---|---|---|---|---|---|---|")
        for r in runs:
            lines.append(
                f"| {r['lr']:g} | {r['sigma']:g} | {r['lr'] * r['sigma']:.3g} | "
                f"{r['gap']['gap_over_spread']:.2f} | "
                f"{r['score'][0]:.3f} | {r['score'][-1]:.3f} | "
                f"{r['score'][-1] - r['score'][0]:+.3f} | "
                f"{r['relative_change'][-1]:.3f} |"
            )
        lines.append("")
    for size, runs in result.get("resnet", {}).items():
        r0 = runs[0]
        lines.append(
            f"### {size} ({r0['params']:,} parameters): training loss "
            "(nats, 10 classes: 2.303 is chance), "
            f"{len(r0['score']) - 1} steps (matrix RMS at init: median {r0['rms_median']:.3f}, "
            f"smallest {r0['rms_min']:.3f})"
        )
        lines.append("")
        lines.append(
            "| batch norm | sigma | lr | lr x sigma | sigma / median RMS | "
            "members' logits moved (relative) | "
            "gap/spread at init | loss at init | worst | final |"
        )
        lines.append("|---|---|---|---|---|---|---|---|---|---|")
        for r in runs:
            worst = max(v if math.isfinite(v) else float("inf") for v in r["score"])
            lines.append(
                f"| {r['mode']} | {r['sigma']:g} | {r['lr']:g} | {r['lr'] * r['sigma']:.3g} | "
                f"{r['sigma'] / r['rms_median']:.2f} | {r['output_change']:.3f} | "
                f"{r['gap']['gap_over_spread']:.2f} | {r['score'][0]:.3f} | {worst:.3g} | "
                f"{r['score'][-1]:.3g} |"
            )
        lines.append("")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("lm", k) for k in result.get("lm", {})] + [
        ("resnet", k) for k in result.get("resnet", {})
    ]
    cols = 2
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(7.2 * cols, 4.6 * rows), dpi=110, squeeze=False)
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    for ax, (part, name) in zip(axes.flat, panels, strict=False):
        for r in result[part][name]:
            steps = range(len(r["score"]))
            if part == "lm":
                label = (
                    f"lr {r['lr']:g}, sigma {r['sigma']:g} (lr*sigma {r['lr'] * r['sigma']:.3g})"
                )
            else:
                label = f"{r['mode']}, sigma {r['sigma']:g}, lr {r['lr']:g}"
            ys = [v if math.isfinite(v) else np.nan for v in r["score"]]
            ax.plot(steps, ys, marker=".", label=label)
        if part == "lm":
            ax.set_ylabel("validation bits/byte")
            ax.set_title(f"{name} (random init, width 64, 2 layers)", fontsize=9)
        else:
            ax.axhline(math.log(10), color="grey", linestyle="--", linewidth=1, label="chance")
            if max(max(v for v in r["score"] if math.isfinite(v)) for r in result[part][name]) > 20:
                ax.set_yscale("log")
            ax.set_ylabel("training loss (nats)")
            ax.set_title(f"{name} (random init), batch norm in eval or train mode", fontsize=9)
        ax.set_xlabel("ES step")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    meta = result["meta"]
    fig.suptitle(
        f"benchmarks/hf_tuning.py: {meta['machine']}, torch {meta['torch']}, transformers "
        f"{meta['transformers']}, population {meta['pop']}, rank {meta['rank']}",
        fontsize=9,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--parts", default="lm,resnet")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pop", type=int, default=32)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--lm-steps", type=int, default=10)
    p.add_argument("--resnet-steps", type=int, default=10)
    p.add_argument("--images-per-class", type=int, default=6)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="2 steps of each part, small ResNet only")
    p.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--plot-only", default=None, metavar="JSON")
    args = p.parse_args(argv)
    out_dir = Path(args.out_dir)
    if args.plot_only:
        result = json.loads(Path(args.plot_only).read_text())
        print(tables(result))
        plot(result, out_dir / "tuning_hf.png")
        return
    import transformers

    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=UserWarning)
    torch.set_num_threads(args.threads)
    args.lm_settings, args.resnet_cases = LM_SETTINGS, RESNET_CASES
    if args.quick:
        args.lm_steps = args.resnet_steps = 2
        args.lm_settings = LM_SETTINGS[:2]
        args.resnet_cases = [c for c in RESNET_CASES if c[0] == "small"]
    parts = [s for s in args.parts.split(",") if s]
    result: dict[str, Any] = {
        "meta": {
            "script": "benchmarks/hf_tuning.py",
            "argv": sys.argv[1:] if argv is None else argv,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
            "machine": machine(),
            "threads": torch.get_num_threads(),
            "date": datetime.date.today().isoformat(),
            "pop": args.pop,
            "rank": args.rank,
            "seed": args.seed,
        }
    }
    start = time.perf_counter()
    if "lm" in parts:
        result["lm"] = part_lm(args)
    if "resnet" in parts:
        result["resnet"] = part_resnet(args)
    result["meta"]["seconds"] = time.perf_counter() - start
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tuning_hf.json").write_text(json.dumps(result, indent=1))
    print(tables(result))
    plot(result, out_dir / "tuning_hf.png")
    print(
        f"wrote {out_dir / 'tuning_hf.json'} and {out_dir / 'tuning_hf.png'} in "
        f"{result['meta']['seconds']:.0f} s"
    )


if __name__ == "__main__":
    main()
