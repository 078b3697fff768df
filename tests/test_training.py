"""End-to-end: EggrollOptimizer trains small models to a stated loss or accuracy.

Data are generated here with fixed seeds, so each run is deterministic; each test takes a few
seconds on one CPU thread.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F
from torch import nn

from torcheggroll import EggrollOptimizer

# The low-rank population forward is the default path when torcheggroll/lowrank.py exists.
FORWARD_PATH = "auto" if importlib.util.find_spec("torcheggroll.lowrank") else "materialized"


def regression_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(128, 2, generator=g) * 4 - 2
    y = torch.sin(1.5 * x[:, :1]) * torch.cos(x[:, 1:])  # variance 0.22
    return x, y


def mlp(width: int, out: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, width), nn.Tanh(), nn.Linear(width, out))


def test_regression_mlp_fits_a_smooth_function():
    x, y = regression_data()
    model = mlp(24, 1)
    opt = EggrollOptimizer(model.parameters(), lr=0.2, sigma=0.05, rank=4, pop_size=32, seed=0)

    def closure(population):
        pred = population.forward(model, x, path=FORWARD_PATH)  # (32, 128, 1)
        return (pred - y).pow(2).mean(dim=(1, 2))

    first = float(opt.step(closure))
    for _ in range(599):
        opt.step(closure)
    with torch.no_grad():
        final = float((model(x) - y).pow(2).mean())
    # Predicting the mean scores the variance, 0.22; the best affine fit scores 0.15.
    assert first > 0.2
    assert final < 0.02, final


def test_compute_grad_drives_adam():
    x, y = regression_data()
    model = mlp(24, 1)
    es = EggrollOptimizer(model.parameters(), sigma=0.02, rank=4, pop_size=32, seed=0)
    adam = torch.optim.Adam(model.parameters(), lr=0.005)

    def closure(population):
        return (population.forward(model, x, path=FORWARD_PATH) - y).pow(2).mean(dim=(1, 2))

    for _ in range(500):
        adam.zero_grad()
        es.compute_grad(closure)
        adam.step()
    with torch.no_grad():
        final = float((model(x) - y).pow(2).mean())
    assert final < 0.02, final


def test_classifier_separates_three_rings():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 2, generator=g)
    labels = torch.bucketize(x.norm(dim=1), torch.tensor([0.8, 1.5]))  # 88 / 120 / 92 points
    model = mlp(16, 3)
    opt = EggrollOptimizer(model.parameters(), lr=0.3, sigma=0.05, rank=4, pop_size=32, seed=0)

    def closure(population):
        logits = population.forward(model, x, path=FORWARD_PATH)  # (32, 300, 3)
        targets = labels.expand(logits.shape[0], -1)
        return F.cross_entropy(logits.transpose(1, 2), targets, reduction="none").mean(dim=1)

    for _ in range(300):
        opt.step(closure)
    with torch.no_grad():
        accuracy = float((model(x).argmax(dim=1) == labels).float().mean())
    # The largest class is 40% of the points, and the classes are not linearly separable.
    assert accuracy >= 0.9, accuracy
