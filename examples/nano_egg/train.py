#!/usr/bin/env python3
"""nano_egg: a byte-level minGRU language model trained by EGGROLL evolution strategies.

Quick test of the original torcheggroll example, on the file it used::

    python examples/nano_egg/train.py --data examples/nano_egg/data/minipile_valid_1000.npy \\
        --mode float --epochs 50 --hidden-dim 32 --n-layers 1 --pop-size 512 --max-docs 1000

Without ``--data`` it trains on the Python sources of the standard library (no download).
``--mode int`` runs int8 weights and activations with int32 accumulation (see mingru.py).

On one large GPU (an H200): a model of hidden size 256 with two blocks, a population of 2048,
stopped cleanly after the time given (``--preset h200`` sets the other flags, see ``PRESETS``;
any explicit flag overrides them)::

    python examples/nano_egg/train.py --preset h200 --device cuda --time-limit 270 \\
        --json nano_egg_h200.json --plot nano_egg_h200.png

``--sigma-scaling fan_in`` divides the perturbation of each matrix by ``sqrt(fan_in)`` (the
embedding keeps ``--sigma``), so that one ``--sigma`` suits every width (docs/width.md).

One epoch is one ES generation, as in the original example: every member is scored on the same
``--batch-size`` random windows of ``--seq-len`` bytes from the training split, and the
parameters take one step. "train" is the population's mean loss on that batch; "valid" is the
centre model's loss on a fixed set of ``--valid-windows`` windows of the validation split. Both
are in bits per byte.
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any

_HERE = Path(__file__).resolve().parent
for _p in (_HERE, _HERE.parent):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from _common import (  # noqa: E402
    INTERRUPTED_EXIT,
    add_common_args,
    fmt,
    progress,
    require_positive,
    resolve_device,
    save_json,
    save_plot,
    torch_threads,
    trim_history,
)
from corpus import load_corpus, split_documents  # noqa: E402
from mingru import build_model  # noqa: E402
from torch import nn  # noqa: E402

from torcheggroll import EggrollOptimizer, Population, width_scaled_groups  # noqa: E402

LN2 = math.log(2.0)
clock = time.perf_counter  # the run's clock (--time-limit, seconds, tokens/s); a test replaces it
# Per-mode defaults: int master weights live on the int8 scale (16 = 1.0), so sigma is in those
# units.
MODE_DEFAULTS = {"float": {"lr": 0.3, "sigma": 0.05}, "int": {"lr": 1.0, "sigma": 2.0}}
# The MiniPile sample shipped with the example (data/README.md), from the repository root.
SAMPLE_DATA = "examples/nano_egg/data/minipile_valid_1000.npy"
# Flag values for one large GPU, per mode; explicit flags override them. hidden 256 x 2 blocks
# with sigma 0.01 is the setting that learned best in 200 generations of population 512 on an
# H200 (sigma 0.05, this example's default for width 32, made that width stop learning:
# docs/width.md explains why); the population is 4x larger and the windows per generation 4x
# fewer, so a generation costs about the same. lr 0.3 with a cosine decay over --time-limit beat
# lr 0.6 in two 555 s runs side by side on one H200 (3.78 against 3.95 bits/byte,
# benchmarks/results/nano_egg_h200_float*). The int mode's sigma is in int8 units and already
# width-independent (its layers divide by 16 sqrt(fan_in)); its lr gives about the same step,
# relative to the weights' spread, as the float mode's. Run with --time-limit: the number of
# epochs is only a ceiling.
_H200 = dict(  # what both modes share on one H200
    hidden_dim=256,
    n_layers=2,
    pop_size=2048,
    batch_size=16,
    seq_len=64,
    valid_windows=256,
    epochs=100_000,
    data=SAMPLE_DATA,
    max_docs=1000,
    log_every=25,
    lr_schedule="cosine",
)
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "h200": {
        "float": dict(_H200, chunk=16, lr=0.3, sigma=0.01, tf32=True),
        "int": dict(_H200, chunk=8, lr=0.7, sigma=2.0),
    },
}
# The defaults of the flags a preset may set (argparse gets None, so that explicit flags win).
DEFAULTS: dict[str, Any] = dict(
    hidden_dim=32,
    n_layers=1,
    pop_size=128,
    batch_size=32,
    chunk=2,
    seq_len=64,
    valid_windows=64,
    epochs=60,
    data=None,
    max_docs=0,
    log_every=1,
    tf32=False,
    sigma_scaling="none",
    lr_schedule="constant",
    lr_final=0.05,
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=["float", "int"], default="float")
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=None,
        help="flag values for one large GPU (per --mode, see PRESETS in this file); "
        "explicit flags override them",
    )
    p.add_argument(
        "--epochs", type=int, default=None, help="ES generations (one batch each); default 60"
    )
    p.add_argument("--hidden-dim", type=int, default=None, help="default 32")
    p.add_argument("--n-layers", type=int, default=None, help="default 1")
    p.add_argument("--pop-size", type=int, default=None, help="default 128")
    p.add_argument("--lr", type=float, default=None, help="default: 0.3 (float), 1.0 (int)")
    p.add_argument("--sigma", type=float, default=None, help="default: 0.05 (float), 2.0 (int)")
    p.add_argument(
        "--sigma-scaling",
        choices=["none", "fan_in"],
        default=None,
        help="none (default): --sigma is every weight's noise scale; "
        "fan_in: matrices get sigma/sqrt(fan_in), "
        "the embedding sigma (float mode only; docs/width.md)",
    )
    p.add_argument(
        "--lr-schedule",
        choices=["constant", "cosine"],
        default=None,
        help="constant (default): --lr throughout; cosine: --lr decays along half a cosine to "
        "--lr-final x --lr over the run (its --time-limit when given, else its --epochs)",
    )
    p.add_argument(
        "--lr-final",
        type=float,
        default=None,
        help="with --lr-schedule cosine: the last lr as a fraction of --lr (default 0.05)",
    )
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=None, help="default 64")
    p.add_argument(
        "--batch-size", type=int, default=None, help="windows per generation; default 32"
    )
    p.add_argument(
        "--chunk",
        type=int,
        default=None,
        help="windows evaluated at a time inside the forward (bounds memory); default 2",
    )
    p.add_argument("--valid-windows", type=int, default=None, help="default 64")
    p.add_argument(
        "--data",
        default=None,
        help=".npy of uint8 bytes, 0 before each document (default: the Python standard library "
        f"sources); a MiniPile sample ships as {SAMPLE_DATA}",
    )
    p.add_argument(
        "--max-docs", type=int, default=None, help="keep the first N documents (default 0: all)"
    )
    p.add_argument(
        "--time-limit",
        type=float,
        default=0.0,
        help="stop cleanly (summary, --plot, --json) before an epoch would end past this many "
        "seconds of the run; 0 (default): no limit",
    )
    p.add_argument(
        "--log-every",
        type=int,
        default=None,
        help="print a progress line every N epochs (default 1)",
    )
    p.add_argument(
        "--tf32",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="float mode on CUDA: TF32 matrix products "
        "(torch.set_float32_matmul_precision('high'))",
    )
    p.add_argument("--seed", type=int, default=0)
    add_common_args(
        p,
        path_help="population.forward path for float mode (int mode always materializes); "
        "materialized can be faster at small widths on CPU: docs/examples.md",
    )
    args = p.parse_args(argv)
    preset = PRESETS[args.preset][args.mode] if args.preset else {}
    for key, value in {**DEFAULTS, **MODE_DEFAULTS[args.mode], **preset}.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if (
        args.data == SAMPLE_DATA and not Path(args.data).is_file()
    ):  # run from outside the repository root
        args.data = str(_HERE.parents[1] / SAMPLE_DATA)
    if args.data is not None and not Path(args.data).is_file():
        p.error(f"--data: no such file: {args.data} (the MiniPile sample: {SAMPLE_DATA})")
    if args.mode == "int" and args.sigma_scaling != "none":
        p.error(
            "--sigma-scaling fan_in is for float mode: the int layers already divide their "
            "products by 16 * sqrt(fan_in), so one --sigma moves every layer's output alike at "
            "any width"
        )
    require_positive(
        p,
        args,
        (
            "epochs",
            "pop_size",
            "batch_size",
            "chunk",
            "seq_len",
            "valid_windows",
            "hidden_dim",
            "n_layers",
            "log_every",
        ),
    )
    if args.time_limit < 0:
        p.error(f"--time-limit must be >= 0, got {args.time_limit}")
    if not 0.0 <= args.lr_final <= 1.0:
        p.error(f"--lr-final must be in [0, 1], got {args.lr_final}")
    return args


def lr_factor(args: argparse.Namespace, epoch: int, seconds: float) -> float:
    """The multiplier of every group's lr for ``epoch`` (1-based), started ``seconds`` into the
    run: 1 for ``--lr-schedule constant``; for cosine, half a cosine from 1 to ``--lr-final``
    over the run's progress, the larger of its share of ``--time-limit`` and of ``--epochs``."""
    if args.lr_schedule == "constant":
        return 1.0
    done = (epoch - 1) / max(args.epochs - 1, 1)  # the last epoch runs at --lr-final
    if args.time_limit:
        done = max(done, seconds / args.time_limit)
    done = min(done, 1.0)
    return args.lr_final + (1.0 - args.lr_final) * 0.5 * (1.0 + math.cos(math.pi * done))


def windows(
    data: np.ndarray, starts: np.ndarray, seq_len: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-byte targets, both ``(len(starts), seq_len)`` int64."""
    idx = starts[:, None] + np.arange(seq_len + 1)[None, :]
    w = torch.from_numpy(data[idx].astype(np.int64)).to(device)
    return w[:, :-1], w[:, 1:]


class WindowLoss(nn.Module):
    """``(batch, seq)`` inputs and targets -> ``(batch,)`` summed next-byte NLL in nats.

    Wraps the language model so that ``population.forward`` returns one number per window
    instead of ``(pop, batch, seq, 256)`` logits, and runs the windows ``chunk`` at a time inside
    the forward: the per-member weights (or low-rank factors) are prepared once per generation
    while the logits held in memory stay at ``pop * chunk * seq * 256`` floats.
    """

    def __init__(self, model: nn.Module, chunk: int) -> None:
        super().__init__()
        self.model = model
        self.chunk = chunk

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        parts = []
        for s in range(0, x.shape[0], self.chunk):
            logits = self.model(x[s : s + self.chunk])
            nll = F.cross_entropy(
                logits.flatten(0, 1), y[s : s + self.chunk].flatten(), reduction="none"
            )
            parts.append(nll.view(logits.shape[0], -1).sum(-1))
        return torch.cat(parts)


def population_bpb(
    population: Population, loss: WindowLoss, x: torch.Tensor, y: torch.Tensor, path: str
) -> torch.Tensor:
    """``(len(population),)`` mean bits per byte of every member on ``x -> y``
    (``(batch, seq)``)."""
    return population.forward(loss, x, y, path=path).sum(-1) / (y.numel() * LN2)


@torch.no_grad()
def centre_bpb(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int) -> float:
    nll = 0.0
    for s in range(0, x.shape[0], chunk * 8):
        logits = model(x[s : s + chunk * 8])
        nll += float(
            F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]),
                y[s : s + chunk * 8].reshape(-1),
                reduction="sum",
            )
        )
    return nll / (y.numel() * LN2)


def device_name(device: torch.device) -> str:
    return (
        torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.machine()} CPU"
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train, print the summary, write ``--plot``/``--json``; Ctrl-C or ``--time-limit`` stops
    early and still writes them."""
    args = parse_args(argv)
    precision = torch.get_float32_matmul_precision()
    if args.tf32 and args.mode == "float":
        torch.set_float32_matmul_precision("high")
    try:
        with torch_threads(args.threads):
            return run(args)
    finally:
        torch.set_float32_matmul_precision(precision)


def param_groups(model: nn.Module, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The optimizer's parameter groups: one (``--sigma-scaling none``) or one per kind of
    tensor."""
    settings = dict(lr=args.lr, sigma=args.sigma, rank=args.rank)
    if args.sigma_scaling == "none":
        return [{"params": list(model.parameters()), **settings}]
    # Matrices get sigma / sqrt(fan_in); the embedding table (an nn.Embedding) and vectors keep
    # sigma.
    return width_scaled_groups(model, **settings)


def run(args: argparse.Namespace) -> dict[str, Any]:
    run_start = clock()  # --time-limit counts from here (data and model setup included)
    device = resolve_device(args.device)
    # round(W + sigma E_i) is not low rank: int mode always runs per-member (materialized) weights.
    path = "materialized" if args.mode == "int" else args.path
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)

    data = load_corpus(args.data)
    train, valid = split_documents(data, args.max_docs)
    if min(train.size, valid.size) <= args.seq_len + 1:
        raise ValueError(
            f"Invalid data: splits of {train.size} and {valid.size} bytes are shorter than "
            "--seq-len"
        )
    vx, vy = windows(
        valid,
        rng.integers(0, valid.size - args.seq_len - 1, args.valid_windows),
        args.seq_len,
        device,
    )

    model = build_model(args.mode, args.hidden_dim, args.n_layers).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    window_loss = WindowLoss(model, args.chunk)
    opt = EggrollOptimizer(param_groups(model, args), pop_size=args.pop_size, seed=args.seed)
    base_lrs = [group["lr"] for group in opt.param_groups]
    source = args.data or "Python standard library sources"
    if not args.quiet:
        print(
            f"nano_egg: mode={args.mode} params={n_params:,} hidden={args.hidden_dim} "
            f"layers={args.n_layers} "
            f"pop={args.pop_size} lr={args.lr} sigma={args.sigma} "
            f"sigma_scaling={args.sigma_scaling} "
            f"lr_schedule={args.lr_schedule} "
            f"rank={args.rank} windows={args.batch_size}x{args.seq_len} device={device} "
            f"path={path} "
            f"float32 matmul={torch.get_float32_matmul_precision()}\n"
            f"data: {source}: train {train.size:,} bytes, valid {valid.size:,} bytes",
            flush=True,
        )

    history: dict[str, list[float]] = {
        "epoch": [],
        "train_bpb": [],
        "valid_bpb": [],
        "tokens_per_s": [],
        "seconds": [],
        "lr_factor": [],
    }
    start = clock()
    interrupted = timed_out = False
    # the last epoch's seconds (step + validation): the next one is expected to take as long
    last = 0.0
    # The bar is for a terminal; in a log (stderr not a terminal) the progress lines say it all.
    bar = progress(
        range(1, args.epochs + 1),
        total=args.epochs,
        desc=f"nano_egg[{args.mode}]",
        quiet=args.quiet or not sys.stderr.isatty(),
    )
    try:
        for epoch in bar:
            t0 = clock()
            if args.time_limit and t0 - run_start + last > args.time_limit:
                timed_out = True
                break
            factor = lr_factor(args, epoch, t0 - run_start)
            for group, base_lr in zip(opt.param_groups, base_lrs, strict=True):
                group["lr"] = base_lr * factor
            starts = rng.integers(0, train.size - args.seq_len - 1, args.batch_size)
            x, y = windows(train, starts, args.seq_len, device)

            def closure(
                population: Population, x: torch.Tensor = x, y: torch.Tensor = y
            ) -> torch.Tensor:
                return population_bpb(population, window_loss, x, y, path)

            train_bpb = float(opt.step(closure))
            if device.type == "cuda":
                torch.cuda.synchronize()
            tok_s = args.pop_size * x.numel() / (clock() - t0)
            valid_bpb = centre_bpb(model, vx, vy, args.chunk)
            now = clock()
            last = now - t0
            for key, val in zip(
                history, (epoch, train_bpb, valid_bpb, tok_s, now - start, factor), strict=True
            ):
                history[key].append(val)
            if not args.quiet:
                bar.set_postfix(
                    train=f"{train_bpb:.3f}", valid=f"{valid_bpb:.3f}", tok_s=f"{tok_s:,.0f}"
                )
                if epoch % args.log_every == 0 or epoch in (1, args.epochs):
                    bar.write(
                        f"epoch {epoch:5d} | train {train_bpb:.3f} bpb | "
                        f"valid {valid_bpb:.3f} bpb | "
                        f"{tok_s:,.0f} tok/s | {now - start:.1f} s"
                    )
                    sys.stdout.flush()
    except KeyboardInterrupt:
        interrupted = True
        trim_history(history)
    bar.close()
    elapsed = clock() - start

    done = len(history["epoch"])
    result: dict[str, Any] = {
        "mode": args.mode,
        "epochs": args.epochs,
        "epochs_done": done,
        "interrupted": interrupted,
        "stopped_by_time_limit": timed_out,
        # None when the run was stopped before its first epoch ended.
        "final_train_bpb": history["train_bpb"][-1] if done else None,
        "final_valid_bpb": history["valid_bpb"][-1] if done else None,
        "best_valid_bpb": min(history["valid_bpb"]) if done else None,
        "initial_valid_bpb": history["valid_bpb"][0] if done else None,
        "mean_tokens_per_s": float(np.mean(history["tokens_per_s"])) if done else None,
        "seconds": elapsed,
        "device": str(device),
        "args": vars(args),
        "history": history,
    }
    stopped = f" (interrupted after epoch {done})" if interrupted else ""
    if timed_out:
        stopped = f" (time limit {args.time_limit:g} s reached after epoch {done})"
    print(
        f"nano_egg summary{stopped}: mode={args.mode} epochs={args.epochs} "
        f"train={fmt(result['final_train_bpb'])} bpb "
        f"valid={fmt(result['final_valid_bpb'])} bpb (best {fmt(result['best_valid_bpb'])}) "
        f"{fmt(result['mean_tokens_per_s'], ',.0f')} tok/s {elapsed:.1f}s on {device}",
        flush=True,
    )
    if args.plot:
        save_plot(
            args.plot,
            {
                "train (population mean)": (history["epoch"], history["train_bpb"]),
                "valid (centre)": (history["epoch"], history["valid_bpb"]),
            },
            title=f"nano_egg minGRU ({args.mode}), hidden {args.hidden_dim} x {args.n_layers}, "
            f"pop {args.pop_size}, "
            f"lr {args.lr:g} ({args.lr_schedule}), sigma {args.sigma:g} ({args.sigma_scaling})\n"
            f"examples/nano_egg/train.py on {device_name(device)}, torch {torch.__version__}",
            xlabel="epoch (ES generation)",
            ylabel="bits per byte",
            hline=(8.0, "uniform (8 bits)"),
        )
    if args.json:
        save_json(args.json, result)
    return result


if __name__ == "__main__":
    sys.exit(INTERRUPTED_EXIT if main()["interrupted"] else 0)
