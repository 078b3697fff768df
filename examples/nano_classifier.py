#!/usr/bin/env python3
"""nano_classifier: a factorized classifier trained by EGGROLL evolution strategies (no backprop).

Ten classes (5 colours x 2 shapes) of small rendered images. Each image is reduced to two
features: its mean foreground colour (RGB) and its compactness (foreground area over bounding
box area: about 0.79 for a disc, 1 for a square). Two small MLPs predict the colour and the
shape, and the class probability is their outer product::

    p(colour, shape | x) = softmax(colour_mlp(rgb))[colour] * softmax(shape_mlp(compactness))[shape]

Run (as in the original README)::

    python examples/nano_classifier.py --steps 50 --pop-size 64

On CUDA, ``--cuda-graph`` captures the whole step (noise, forward, loss, shaping, update) in one
CUDA graph after two eager steps and replays it for every later generation.

The data are generated here with numpy (fixed seed); accuracy is reported on a held-out set.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
import torch
import torch.nn.functional as F
from _common import (
    INTERRUPTED_EXIT,
    CapturedStep,
    add_common_args,
    progress,
    require_positive,
    resolve_device,
    save_json,
    save_plot,
    torch_threads,
    trim_history,
)
from torch import nn

from torcheggroll import EggrollOptimizer, Population

COLOURS = {
    "red": (0.9, 0.1, 0.1),
    "blue": (0.1, 0.2, 0.9),
    "green": (0.1, 0.8, 0.2),
    "yellow": (0.9, 0.85, 0.1),
    "cyan": (0.1, 0.85, 0.9),
}
SHAPES = ("disc", "square")
CLASSES = [f"{c}_{s}" for c in COLOURS for s in SHAPES]


def render(shape: str, rgb: np.ndarray, rng: np.random.Generator, size: int = 16) -> np.ndarray:
    """A ``(size, size, 3)`` image: a disc or square of random radius and centre on grey."""
    r = rng.uniform(3.0, 6.5)
    cy, cx = rng.uniform(r, size - 1 - r, 2)
    yy, xx = np.mgrid[0:size, 0:size]
    if shape == "disc":
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    else:
        mask = (np.abs(yy - cy) <= r) & (np.abs(xx - cx) <= r)
    img = np.full((size, size, 3), 0.5) + rng.normal(0.0, 0.05, (size, size, 3))
    img[mask] = rgb + rng.normal(0.0, 0.05, 3)
    return img


def features(img: np.ndarray) -> tuple[np.ndarray, float]:
    """Mean foreground colour ``(3,)`` and compactness (area / bounding-box area)."""
    mask = np.abs(img - 0.5).max(axis=2) > 0.2
    if not mask.any():
        return np.full(3, 0.5), 0.0
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    box = (rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1)
    return img[mask].mean(0), float(mask.sum() / box)


def make_dataset(n_per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``rgb (n, 3)``, ``compactness (n, 1)`` (centred and scaled) and ``labels (n,)``."""
    rng = np.random.default_rng(seed)
    rgbs, comp, labels = [], [], []
    for ci, base in enumerate(COLOURS.values()):
        for si, shape in enumerate(SHAPES):
            for _ in range(n_per_class):
                # Each image gets its own shade: the colour classes overlap a little.
                rgb = np.clip(np.asarray(base) + rng.normal(0.0, 0.12, 3), 0.0, 1.0)
                f_rgb, f_comp = features(render(shape, rgb, rng))
                rgbs.append(f_rgb)
                comp.append(f_comp)
                labels.append(2 * ci + si)
    rgb_t = torch.tensor(np.array(rgbs), dtype=torch.float32)
    comp_t = (torch.tensor(comp, dtype=torch.float32).unsqueeze(1) - 0.9) * 10.0
    return rgb_t, comp_t, torch.tensor(labels)


class FactorizedClassifier(nn.Module):
    """Colour MLP ``3 -> h -> 5`` and shape MLP ``1 -> h -> 2``; log-probabilities of the 10
    classes."""

    def __init__(self, hidden: int = 16) -> None:
        super().__init__()
        self.colour = nn.Sequential(
            nn.Linear(3, hidden), nn.ReLU(), nn.Linear(hidden, len(COLOURS))
        )
        self.shape = nn.Sequential(nn.Linear(1, hidden), nn.ReLU(), nn.Linear(hidden, len(SHAPES)))

    def forward(self, rgb: torch.Tensor, comp: torch.Tensor) -> torch.Tensor:
        """``(batch, 3)``, ``(batch, 1)`` -> ``(batch, 10)`` class log-probabilities."""
        lc = F.log_softmax(self.colour(rgb), dim=-1)
        ls = F.log_softmax(self.shape(comp), dim=-1)
        return (lc.unsqueeze(-1) + ls.unsqueeze(-2)).flatten(-2)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Factorized classifier trained by EGGROLL ES")
    p.add_argument("--steps", type=int, default=50, help="ES steps (generations)")
    p.add_argument("--pop-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.5)
    p.add_argument("--sigma", type=float, default=0.1)
    p.add_argument("--rank", type=int, default=2)
    p.add_argument("--hidden", type=int, default=16)
    p.add_argument("--n-per-class", type=int, default=40, help="training images per class")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--cuda-graph",
        action="store_true",
        help="capture the whole ES step in one CUDA graph (capturable=True) and replay it",
    )
    add_common_args(p)
    args = p.parse_args(argv)
    require_positive(p, args, ("steps", "pop_size", "hidden", "n_per_class"))
    if args.cuda_graph and resolve_device(args.device).type != "cuda":
        p.error(f"--cuda-graph needs a CUDA device, got --device {args.device}")
    return args


@torch.no_grad()
def accuracy(
    model: nn.Module, rgb: torch.Tensor, comp: torch.Tensor, labels: torch.Tensor
) -> float:
    return float((model(rgb, comp).argmax(-1) == labels).float().mean())


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train, print the summary, write ``--plot``/``--json``; Ctrl-C stops early and still writes
    them."""
    args = parse_args(argv)
    with torch_threads(args.threads):
        return run(args)


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = resolve_device(args.device)
    path = args.path
    torch.manual_seed(args.seed)
    rgb, comp, labels = (t.to(device) for t in make_dataset(args.n_per_class, args.seed))
    t_rgb, t_comp, t_labels = (t.to(device) for t in make_dataset(20, args.seed + 1))
    model = FactorizedClassifier(args.hidden).to(device)
    opt = EggrollOptimizer(
        model.parameters(),
        lr=args.lr,
        sigma=args.sigma,
        rank=args.rank,
        pop_size=args.pop_size,
        seed=args.seed,
        capturable=args.cuda_graph,
    )

    def closure(population: Population) -> torch.Tensor:
        logp = population.forward(model, rgb, comp, path=path)  # (pop, n, 10)
        return -logp.gather(-1, labels.expand(logp.shape[0], -1).unsqueeze(-1)).squeeze(-1).mean(-1)

    step_once = CapturedStep(opt, closure, device) if args.cuda_graph else lambda: opt.step(closure)

    history: dict[str, list[float]] = {"step": [0], "loss": [], "train_acc": [], "test_acc": []}
    history["train_acc"].append(accuracy(model, rgb, comp, labels))
    history["test_acc"].append(accuracy(model, t_rgb, t_comp, t_labels))
    with torch.no_grad():
        history["loss"].append(float(F.nll_loss(model(rgb, comp), labels)))
    start = time.perf_counter()
    interrupted = False
    bar = progress(
        range(1, args.steps + 1), total=args.steps, desc="nano_classifier", quiet=args.quiet
    )
    try:
        for step in bar:
            step_once()
            with torch.no_grad():
                loss = float(F.nll_loss(model(rgb, comp), labels))
            history["step"].append(step)
            history["loss"].append(loss)
            history["train_acc"].append(accuracy(model, rgb, comp, labels))
            history["test_acc"].append(accuracy(model, t_rgb, t_comp, t_labels))
            if not args.quiet:
                bar.set_postfix(loss=f"{loss:.3f}", acc=f"{history['train_acc'][-1]:.1%}")
    except KeyboardInterrupt:
        interrupted = True
        trim_history(history)
    bar.close()
    elapsed = time.perf_counter() - start

    result = {
        "interrupted": interrupted,
        "steps_done": history["step"][-1],
        "initial_loss": history["loss"][0],
        "final_loss": history["loss"][-1],
        "initial_test_acc": history["test_acc"][0],
        "final_train_acc": history["train_acc"][-1],
        "final_test_acc": history["test_acc"][-1],
        "seconds": elapsed,
        "device": str(device),
        "args": vars(args),
        "history": history,
    }
    if not args.quiet:
        with torch.no_grad():
            pred = model(t_rgb, t_comp).argmax(-1)
        for k, name in enumerate(CLASSES):
            sel = t_labels == k
            print(f"  {name:14s} {float((pred[sel] == k).float().mean()):6.1%}")
    stopped = f" (interrupted after step {result['steps_done']})" if interrupted else ""
    print(
        f"nano_classifier summary{stopped}: steps={args.steps} pop={args.pop_size} "
        f"loss {result['initial_loss']:.3f} -> "
        f"{result['final_loss']:.3f}, train acc {result['final_train_acc']:.1%}, test acc "
        f"{result['initial_test_acc']:.1%} -> {result['final_test_acc']:.1%} (chance 10%) "
        f"in {elapsed:.1f}s on {device}"
    )
    if args.plot:
        save_plot(
            args.plot,
            {
                "train accuracy": (history["step"], history["train_acc"]),
                "test accuracy": (history["step"], history["test_acc"]),
            },
            title=f"nano_classifier: EGGROLL ES, pop {args.pop_size}",
            xlabel="ES step",
            ylabel="accuracy",
            hline=(0.1, "chance"),
        )
    if args.json:
        save_json(args.json, result)
    return result


if __name__ == "__main__":
    sys.exit(INTERRUPTED_EXIT if main()["interrupted"] else 0)
