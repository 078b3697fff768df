"""Every code block of the original torcheggroll README, run as written against this package.

The blocks below are the README's ``python`` blocks verbatim, in order (when the original README
is found beside the checkout, a test checks that they still are). Where a block uses a name that
it never defines, which is clearly a slip or a placeholder for the user's code (``nn`` is used
without ``import torch.nn as nn``; ``inputs``, ``targets``, ``your_custom_fitness_fn`` and
``compute_fitness`` are left to the reader), the test defines that name before running the
block; nothing in a block is changed. The API Reference block is a signature, not a statement:
it is checked against ``inspect.signature(TorchEggrollES)``.
"""

from __future__ import annotations

import ast
import inspect
import os
import re
from pathlib import Path

import pytest
import torch

from torcheggroll import TorchEggrollES

# ---------------------------------------------------------------------- the README's blocks
QUICK_START = """\
import torch
import torch.nn as nn
from torcheggroll import TorchEggrollES

# Define your model
model = nn.Sequential(
    nn.Linear(10, 20),
    nn.ReLU(),
    nn.Linear(20, 5)
)

# Create the ES optimizer
es = TorchEggrollES(
    model=model,
    pop_size=32,      # Population size (must be even for antithetic sampling)
    sigma=0.1,        # Noise scale
    lr=0.1,           # Learning rate
    rank=4,           # Rank for low-rank noise on matrices
    antithetic=True,  # Use antithetic sampling for lower variance
)

# Training data
x_train = torch.randn(64, 10)
y_train = torch.randn(64, 5)

# Define your loss function
def mse_loss(outputs, targets):
    return ((outputs - targets) ** 2).mean()

# Optimize!
for step in range(100):
    mean_fitness = es.step(x_train, mse_loss, y_train)
    print(f"Step {step}: fitness = {mean_fitness:.4f}")
"""

API_SIGNATURE = """\
TorchEggrollES(
    model: nn.Module,           # Model to optimize
    pop_size: int = 32,         # Population size per step
    sigma: float = 0.02,        # Noise scale
    lr: float = 0.05,           # Learning rate
    rank: int = 4,              # Rank for low-rank noise
    device: torch.device = None,# Device (inferred from model if None)
    param_filter: Callable = None,  # Filter which params to optimize
    normalize_fitness: bool = True, # Z-score normalize fitness
    antithetic: bool = True,    # Use antithetic sampling
)
"""

UTILITIES = """\
from torcheggroll import generate_noise_for_shapes, compute_es_gradient
import torch

# Define parameter shapes and ranks
shapes = {"W1": (20, 10), "b1": (20,), "W2": (5, 20)}
ranks = {"W1": 4, "b1": None, "W2": 4}  # None = standard noise

# Generate noise for population
noise = generate_noise_for_shapes(
    shapes, ranks,
    pop_size=32,
    sigma=0.1,
    epoch=0,
    device=torch.device("cpu"),
)
# noise["W1"] shape: (32, 20, 10)
# noise["b1"] shape: (32, 20)

# After evaluating fitness...
rewards = torch.randn(32)  # fitness per population member

# Compute gradients
grads = compute_es_gradient(noise, rewards)
# grads["W1"] shape: (20, 10) - same as original param
"""

ASYNC_LOOP = """\
import torch
from torcheggroll import TorchEggrollES

model = nn.Linear(10, 5)
es = TorchEggrollES(model, pop_size=32, sigma=0.1, lr=0.1)

# Step 1: Generate perturbed parameters
population = es.prepare_population()
# population is List[Dict[str, Tensor]], one dict per population member

# Step 2: Evaluate externally (your custom logic)
fitnesses = []
for params in population:
    # Custom evaluation - could be async LLM calls, etc.
    output = torch.func.functional_call(model, params, (inputs,))
    fitness = your_custom_fitness_fn(output)
    fitnesses.append(fitness)
fitnesses = torch.tensor(fitnesses)

# Step 3: Apply fitness scores and update
mean_fitness = es.apply_fitness_scores(fitnesses)
"""

ASYNC_VMAP = """\
# Get stacked params for vmap
population = es.prepare_population()
stacked = es.get_stacked_params()  # Dict[name -> (pop_size, *shape)]

# Use vmap for parallel evaluation
from torch.func import vmap, functional_call

batched_forward = vmap(
    lambda *p: functional_call(model, dict(zip(stacked.keys(), p)), (inputs,)),
    in_dims=tuple(0 for _ in stacked)
)
all_outputs = batched_forward(*stacked.values())  # (pop_size, batch, ...)

# Compute fitness and apply
fitnesses = compute_fitness(all_outputs, targets)
mean_fitness = es.apply_fitness_scores(fitnesses)
"""

CHECKPOINTING = """\
# Save
state = es.state_dict()
torch.save(state, "checkpoint.pt")

# Load
state = torch.load("checkpoint.pt")
es.load_state_dict(state)
"""

BLOCKS = [QUICK_START, API_SIGNATURE, UTILITIES, ASYNC_LOOP, ASYNC_VMAP, CHECKPOINTING]


def _original_readme() -> Path | None:
    """The original package's README, where ``TORCHEGGROLL_ORIGINAL_README`` names it (it is
    not part of this repository)."""
    env = os.environ.get("TORCHEGGROLL_ORIGINAL_README")
    return Path(env) if env and Path(env).is_file() else None


def test_blocks_are_the_readme_verbatim():
    path = _original_readme()
    if path is None:
        pytest.skip("set TORCHEGGROLL_ORIGINAL_README to the original README to compare")
    found = re.findall(r"```python\n(.*?)```", path.read_text(), re.S)
    assert found == BLOCKS


def run(block: str, namespace: dict | None = None, slips: str = "") -> dict:
    namespace = {"__name__": "readme"} if namespace is None else namespace
    exec(compile(slips, "<slips>", "exec"), namespace)
    exec(compile(block, "<README block>", "exec"), namespace)
    return namespace


# ---------------------------------------------------------------------- Quick Start
def test_quick_start(capsys):
    torch.manual_seed(0)  # the block draws its model and data from the global RNG
    ns = run(QUICK_START)
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == [f"Step {k}" for k in range(100)]
    fitness = [float(line.rsplit("=", 1)[1]) for line in lines]
    # lr=0.1, sigma=0.1 as in the original: the fitness (negated MSE) must rise.
    assert fitness[-1] > fitness[0] + 0.1
    assert ns["es"].epoch == 100
    assert isinstance(ns["mean_fitness"], float)


# ---------------------------------------------------------------------- API Reference
def test_api_signature():
    tree = ast.parse("def " + API_SIGNATURE.strip() + ": ...")
    fn = tree.body[0]
    assert isinstance(fn, ast.FunctionDef)
    names = [a.arg for a in fn.args.args]
    defaults = [ast.literal_eval(d) for d in fn.args.defaults]
    documented = dict(zip(names[len(names) - len(defaults) :], defaults, strict=True))
    params = [
        p
        for p in inspect.signature(TorchEggrollES).parameters.values()
        if p.kind is p.POSITIONAL_OR_KEYWORD
    ]
    assert [p.name for p in params] == names
    for p in params:
        if p.name in documented:
            assert p.default == documented[p.name], p.name
        else:
            assert p.default is inspect.Parameter.empty, p.name
    # The methods the reference lists, with their documented parameters.
    methods = {
        "step": ["inputs", "loss_fn", "targets"],
        "prepare_population": [],
        "get_stacked_params": [],
        "apply_fitness_scores": ["fitnesses"],
        "state_dict": [],
        "load_state_dict": ["state"],
    }
    for method, args in methods.items():
        sig = inspect.signature(getattr(TorchEggrollES, method))
        assert list(sig.parameters)[1:] == args, method


# ---------------------------------------------------------------------- utilities
def test_utilities_block():
    ns = run(UTILITIES)
    noise, grads = ns["noise"], ns["grads"]
    assert noise["W1"].shape == (32, 20, 10)
    assert noise["b1"].shape == (32, 20)
    assert noise["W2"].shape == (32, 5, 20)
    assert grads["W1"].shape == (20, 10)
    assert {k: tuple(v.shape) for k, v in grads.items()} == {k: v for k, v in ns["shapes"].items()}


# ---------------------------------------------------------------------- async API + checkpoint
ASYNC_LOOP_SLIPS = """\
import torch
import torch.nn as nn
torch.manual_seed(0)
inputs = torch.randn(8, 10)
def your_custom_fitness_fn(output):
    # a score computed outside torch, as an external evaluator would
    values = output.flatten().tolist()
    return -sum(v * v for v in values) / len(values)
"""

ASYNC_VMAP_SLIPS = """\
targets = torch.zeros(8, 5)
def compute_fitness(all_outputs, targets):
    return -((all_outputs - targets) ** 2).mean(dim=(1, 2))
"""


def test_async_blocks_then_checkpointing(tmp_path, monkeypatch):
    ns = run(ASYNC_LOOP, slips=ASYNC_LOOP_SLIPS)
    es, model = ns["es"], ns["model"]
    assert len(ns["population"]) == 32 and es.epoch == 1
    assert ns["mean_fitness"] == pytest.approx(float(ns["fitnesses"].mean()))

    weight = model.weight.detach().clone()
    run(ASYNC_VMAP, ns, slips=ASYNC_VMAP_SLIPS)
    assert ns["all_outputs"].shape == (32, 8, 5)
    assert set(ns["stacked"]) == {"weight", "bias"}
    assert es.epoch == 2 and not torch.equal(model.weight, weight)

    monkeypatch.chdir(tmp_path)  # the block writes checkpoint.pt into the working directory
    state_before = es.state_dict()
    es.step(ns["inputs"], lambda o, t: ((o - t) ** 2).mean(), ns["targets"])  # move on, then
    run(CHECKPOINTING, ns)  # save and load the current state
    assert (tmp_path / "checkpoint.pt").is_file()
    assert es.epoch == 3
    # Loading an earlier checkpoint rewinds generation and parameters.
    es.load_state_dict(state_before)
    assert es.epoch == 2
    assert torch.equal(model.weight, state_before["params"]["weight"])
