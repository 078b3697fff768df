"""The low-rank population forward against the materialized reference, layer by layer."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
from _devices import CPU_AND_CUDA
from torch import nn
from torch.utils import _pytree as pytree

from torcheggroll import EggrollOptimizer, LowRankFallbackError

POP = 6
DEVICES = CPU_AND_CUDA


def _device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        pytest.skip("CUDA is not available")
    return torch.device(name)


class MinGRU(nn.Module):
    """A minGRU layer (Feng et al. 2024) built from nn.Linear, scanned sequentially."""

    def __init__(self, d_in: int, d_hidden: int) -> None:
        super().__init__()
        self.gate = nn.Linear(d_in, d_hidden)
        self.cand = nn.Linear(d_in, d_hidden)
        self.out = nn.Linear(d_hidden, d_in, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, d_in)
        z = torch.sigmoid(self.gate(x))
        h_tilde = self.cand(x)
        h = torch.zeros_like(h_tilde[:, 0])
        hs = []
        for t in range(x.shape[1]):
            h = (1 - z[:, t]) * h + z[:, t] * h_tilde[:, t]
            hs.append(h)
        return self.out(torch.stack(hs, dim=1))


class HFStyleBlock(nn.Module):
    """Attention written the way HF transformers do: nn.Linear projections and reshapes."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.norm = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, d)
        b, t, d = x.shape
        split = lambda y: y.view(b, t, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        att = (q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5).softmax(-1) @ v
        x = x + self.o(att.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.norm(x))


class TinyCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, stride=2)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 3 * 3, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.c1(x))
        x = torch.relu(self.bn(self.c2(x)))
        return self.fc(x.flatten(1))


class TiedLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 8)
        self.mix = nn.Linear(8, 8)
        self.head = nn.Linear(8, 11, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mix(self.emb(ids))))


def _mha(**kw: Any) -> nn.Module:
    return nn.MultiheadAttention(8, 2, batch_first=True, **kw).eval()


# (id, model factory, input factory (batch leading), forward kwargs)
CASES: list[tuple[str, Callable[[], nn.Module], Callable[[], tuple[Any, ...]], dict[str, Any]]] = [
    (
        "mlp",
        lambda: nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 3)),
        lambda: (torch.randn(4, 5),),
        {},
    ),
    ("linear-3d-input", lambda: nn.Linear(5, 7), lambda: (torch.randn(2, 3, 5),), {}),
    (
        "embedding",
        lambda: nn.Embedding(10, 6, padding_idx=0),
        lambda: (torch.randint(0, 10, (4, 7)),),
        {},
    ),
    ("conv1d", lambda: nn.Conv1d(3, 8, 3, padding="same"), lambda: (torch.randn(2, 3, 9),), {}),
    (
        "conv2d-dilated",
        lambda: nn.Conv2d(3, 4, 3, stride=2, padding=2, dilation=2),
        lambda: (torch.randn(2, 3, 9, 9),),
        {},
    ),
    (
        "conv3d-dilated",
        lambda: nn.Conv3d(2, 3, 2, dilation=(1, 2, 2)),
        lambda: (torch.randn(1, 2, 4, 5, 5),),
        {},
    ),
    ("cnn", TinyCNN, lambda: (torch.randn(2, 3, 8, 8),), {}),
    ("grucell", lambda: nn.GRUCell(5, 7), lambda: (torch.randn(4, 5), torch.randn(4, 7)), {}),
    ("lstmcell", lambda: nn.LSTMCell(5, 7), lambda: (torch.randn(4, 5),), {}),
    ("rnncell", lambda: nn.RNNCell(5, 7), lambda: (torch.randn(4, 5),), {}),
    ("gru-2layer", lambda: nn.GRU(5, 7, num_layers=2), lambda: (torch.randn(6, 3, 5),), {}),
    (
        "lstm-bidir",
        lambda: nn.LSTM(5, 7, batch_first=True, bidirectional=True),
        lambda: (torch.randn(3, 6, 5),),
        {},
    ),
    ("mingru", lambda: MinGRU(6, 10), lambda: (torch.randn(2, 5, 6),), {}),
    ("mha-self", _mha, lambda: (torch.randn(3, 5, 8),) * 3, {}),
    ("mha-self-noweights", _mha, lambda: (torch.randn(3, 5, 8),) * 3, {"need_weights": False}),
    (
        "mha-cross",
        _mha,
        lambda: (torch.randn(3, 5, 8), torch.randn(3, 6, 8), torch.randn(3, 6, 8)),
        {},
    ),
    (
        "mha-masks",
        _mha,
        lambda: (torch.randn(2, 5, 8),) * 3,
        {"key_padding_mask": torch.tensor([[False] * 5, [False] * 3 + [True] * 2])},
    ),
    (
        "mha-kdim",
        lambda: _mha(kdim=6, vdim=4),
        lambda: (torch.randn(2, 5, 8), torch.randn(2, 3, 6), torch.randn(2, 3, 4)),
        {},
    ),
    (
        "transformer-layer",
        lambda: nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True).eval(),
        lambda: (torch.randn(2, 5, 16),),
        {"src_mask": nn.Transformer.generate_square_subsequent_mask(5), "is_causal": True},
    ),
    ("hf-block", lambda: HFStyleBlock(8, 2), lambda: (torch.randn(2, 4, 8),), {}),
    ("tied-lm", TiedLM, lambda: (torch.randint(0, 11, (2, 5)),), {}),
]
IDS = [c[0] for c in CASES]


def _reference(
    population: Any,
    model: nn.Module,
    inputs: tuple[Any, ...],
    kwargs: dict[str, Any],
    per_member: bool,
) -> Any:
    """One member at a time with its materialized parameters: obviously correct, slow."""
    stacked = population.stacked(model)
    outs = []
    for j in range(len(population)):
        xs = tuple(x[j] for x in inputs) if per_member else inputs
        kw = (
            pytree.tree_map(lambda t, j=j: t[j] if isinstance(t, torch.Tensor) else t, kwargs)
            if per_member
            else kwargs
        )
        params = {k: v[j] for k, v in stacked.items()}
        outs.append(
            torch.func.functional_call(copy.deepcopy(model), params, xs, kw, tie_weights=False)
        )
    return (
        pytree.tree_map(lambda *ys: torch.stack(ys) if ys[0] is not None else None, *outs)
        if isinstance(outs[0], tuple)
        else torch.stack(outs)
    )


def _assert_close(actual: Any, expected: Any, rtol: float, atol: float) -> None:
    for a, e in zip(pytree.tree_leaves(actual), pytree.tree_leaves(expected), strict=True):
        torch.testing.assert_close(a, e, rtol=rtol, atol=atol)


def _setup(
    factory: Callable[[], nn.Module],
    device: torch.device,
    rank: int = 3,
    dtype: torch.dtype = torch.float32,
) -> tuple[nn.Module, EggrollOptimizer]:
    torch.manual_seed(0)
    model = factory().to(device=device, dtype=dtype)
    opt = EggrollOptimizer(model.parameters(), sigma=0.2, rank=rank, pop_size=POP, seed=3)
    return model, opt


def _to(tree: Any, device: torch.device, dtype: torch.dtype | None = None) -> Any:
    def move(x: Any) -> Any:
        if not isinstance(x, torch.Tensor):
            return x
        if dtype is not None and x.is_floating_point():
            return x.to(device, dtype)
        return x.to(device)

    return pytree.tree_map(move, tree)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("per_member", [False, True], ids=["broadcast", "per-member"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_lowrank_matches_reference(case: Any, per_member: bool, device: str) -> None:
    _, factory, make_inputs, kwargs = case
    dev = _device(device)
    model, opt = _setup(factory, dev)
    torch.manual_seed(1)
    inputs = make_inputs()
    if per_member:
        inputs = tuple(
            torch.stack(
                [x]
                + [
                    torch.randn_like(x) if x.is_floating_point() else x.roll(j, -1)
                    for j in range(1, POP)
                ]
            )
            for x in inputs
        )
        if case[0].startswith("mha-self"):
            inputs = (inputs[0],) * 3  # self-attention: one tensor as query, key and value
        # per_member applies to every tensor input, keyword arguments (masks) included
        kwargs = pytree.tree_map(
            lambda t: t.expand(POP, *t.shape) if isinstance(t, torch.Tensor) else t, kwargs
        )
    inputs, kwargs = _to(inputs, dev), _to(kwargs, dev)
    population = opt.population()
    # cuDNN's convolution and RNN kernels use TF32 by default (about 1e-3 relative error);
    # compare in fp32.
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        fast = population.forward(model, *inputs, per_member=per_member, path="lowrank", **kwargs)
        assert population.last_fallbacks == []
        expected = _reference(population, model, inputs, kwargs, per_member)
    # float32 end to end; the two paths sum in different orders.
    _assert_close(fast, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_auto_equals_materialized_vmap(device: str) -> None:
    dev = _device(device)
    model, opt = _setup(TinyCNN, dev)
    x = torch.randn(2, 3, 8, 8, device=dev)
    population = opt.population()
    fast = population.forward(model, x)
    slow = population.forward(model, x, path="materialized")
    assert fast.shape == (POP, 2, 5)
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-5)


class RawEinsum(nn.Module):
    """An owned matrix used through einsum, which the low-rank forward does not handle."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 6))
        self.lin = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(torch.einsum("bi,oi->bo", x, self.w))


class Transposed(nn.Module):
    """``x @ W.T`` and ``x @ W.t()`` (Falcon's linear layers): low rank, no fallback."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 6))
        self.v = nn.Parameter(torch.randn(8, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.w.T) @ self.v.transpose(0, 1).t()  # a transpose of a transpose


def test_unsupported_use_falls_back_to_materialized_weights() -> None:
    model, opt = _setup(RawEinsum, torch.device("cpu"))
    x = torch.randn(5, 6)
    population = opt.population()
    out = population.forward(model, x)
    assert population.last_fallbacks == ["w"]
    torch.testing.assert_close(
        out, _reference(population, model, (x,), {}, False), rtol=1e-4, atol=1e-5
    )
    with pytest.raises(LowRankFallbackError, match="'w'"):
        population.forward(model, x, path="lowrank")


def test_transposed_matrices_stay_low_rank() -> None:
    model, opt = _setup(Transposed, torch.device("cpu"))
    x = torch.randn(5, 6)
    population = opt.population()
    out = population.forward(model, x, path="lowrank")  # no fallback: it would raise
    torch.testing.assert_close(
        out, _reference(population, model, (x,), {}, False), rtol=1e-4, atol=1e-5
    )
    rows = population.forward(model, x, path="rows")
    torch.testing.assert_close(rows, out, rtol=1e-4, atol=1e-5)


def test_grouped_conv_and_max_norm_embedding_fall_back() -> None:
    for factory, x in [
        (lambda: nn.Conv2d(4, 4, 3, groups=2), torch.randn(1, 4, 5, 5)),
        (lambda: nn.Embedding(9, 4, max_norm=1.0), torch.randint(0, 9, (3,))),
    ]:
        model, opt = _setup(factory, torch.device("cpu"))
        population = opt.population()
        out = population.forward(model, x)
        assert population.last_fallbacks == ["weight"]
        torch.testing.assert_close(
            out, _reference(population, model, (x,), {}, False), rtol=1e-4, atol=1e-5
        )


def test_metadata_of_owned_weight_is_the_centre() -> None:
    class UsesShape(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return (
                self.lin(x).reshape(-1, self.lin.weight.shape[0])
                * self.lin.weight.dtype.is_floating_point
            )

    model, opt = _setup(UsesShape, torch.device("cpu"))
    population = opt.population()
    population.forward(model, torch.randn(2, 3), path="lowrank")
    assert population.last_fallbacks == []


def test_dense_rank_zero_group_is_materialized_per_member() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))
    opt = EggrollOptimizer(
        [{"params": model[0].parameters(), "rank": 0}, {"params": model[2].parameters()}],
        sigma=0.1,
        pop_size=POP,
        seed=0,
    )
    x = torch.randn(3, 4)
    population = opt.population()
    out = population.forward(model, x, path="lowrank")
    torch.testing.assert_close(
        out, _reference(population, model, (x,), {}, False), rtol=1e-4, atol=1e-5
    )


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_model_within_bf16_tolerance(device: str) -> None:
    dev = _device(device)
    model, opt = _setup(
        lambda: nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)),
        dev,
        dtype=torch.bfloat16,
    )
    x = torch.randn(8, 16, device=dev, dtype=torch.bfloat16)
    population = opt.population()
    fast = population.forward(model, x)
    slow = population.forward(model, x, path="materialized")
    assert fast.dtype == torch.bfloat16
    # bf16 has an 8-bit significand (relative rounding 2**-8 ≈ 4e-3); each path rounds the
    # weights and a 16/32-term sum differently, so allow a few roundings.
    torch.testing.assert_close(fast.float(), slow.float(), rtol=3e-2, atol=3e-2)


def test_step_through_either_path_gives_the_same_parameters() -> None:
    torch.manual_seed(0)
    x, y = torch.randn(32, 5), torch.randn(32, 2)
    results = []
    for path in ("materialized", "auto"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 2))
        opt = EggrollOptimizer(
            model.parameters(), lr=0.1, sigma=0.05, pop_size=POP, seed=7, shaping="centered_rank"
        )
        for _ in range(3):
            opt.step(
                lambda pop, path=path, model=model: (
                    (pop.forward(model, x, path=path) - y) ** 2
                ).mean(dim=(1, 2))
            )
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results, strict=True):
        # centered ranks are exact as long as the member order of the losses agrees
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_per_member_input_must_have_population_dimension() -> None:
    model, opt = _setup(lambda: nn.Linear(3, 2), torch.device("cpu"))
    with pytest.raises(ValueError, match="leading dimension of 6"):
        opt.population().forward(model, torch.randn(4, 3), per_member=True)


def test_invalid_path() -> None:
    model, opt = _setup(lambda: nn.Linear(3, 2), torch.device("cpu"))
    with pytest.raises(ValueError, match="Invalid path: 'fast'"):
        opt.population().forward(model, torch.randn(4, 3), path="fast")  # type: ignore[arg-type]


def test_noise_memory_is_factored() -> None:
    """The only per-member data of a low-rank matrix are its factors: O(pop * r * (m + n))."""
    model, opt = _setup(lambda: nn.Linear(64, 128, bias=False), torch.device("cpu"), rank=2)
    noise = opt.population().noise(model.weight)
    assert noise.is_low_rank and noise.dense is None
    assert noise.a is not None and noise.b is not None
    assert noise.a.shape == (POP // 2, 128, 2) and noise.b.shape == (POP // 2, 64, 2)


def test_per_generation_cache_follows_in_place_changes() -> None:
    """Repeated forwards reuse the member factors, but an in-place change of the centre is seen."""
    model, opt = _setup(lambda: nn.Linear(3, 2), torch.device("cpu"))
    x = torch.randn(4, 3)
    population = opt.population()
    first = population.forward(model, x)
    assert torch.equal(population.forward(model, x), first)
    with torch.no_grad():
        model.weight.add_(1.0)
        model.bias.add_(1.0)
    moved = population.forward(model, x)
    torch.testing.assert_close(
        moved, _reference(population, model, (x,), {}, False), rtol=1e-5, atol=1e-5
    )
    assert not torch.allclose(moved, first)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch-first", "seq-first"])
def test_causal_hint_without_a_mask_does_what_pytorch_does(
    batch_first: bool, training: bool
) -> None:
    """``is_causal=True`` with no ``attn_mask``: PyTorch raises, except on the fused inference
    path (eval, batch_first, ...), which ignores the hint. Both paths must do the same."""
    model, opt = _setup(
        lambda: nn.MultiheadAttention(8, 2, batch_first=batch_first), torch.device("cpu")
    )
    model.train(training)
    x = torch.randn(3, 5, 8)
    kwargs = {"is_causal": True, "need_weights": False}
    population = opt.population()
    with torch.no_grad():
        try:
            plain = [
                torch.func.functional_call(
                    model,
                    {k: v[j] for k, v in population.stacked(model).items()},
                    (x, x, x),
                    kwargs,
                )[0]
                for j in range(POP)
            ]
        except RuntimeError as exc:
            for path in ("auto", "lowrank", "materialized"):
                with pytest.raises(RuntimeError, match=str(exc)[:30]):
                    population.forward(model, x, x, x, path=path, **kwargs)
            return
        expected = torch.stack(plain)
        for path in ("auto", "lowrank", "materialized"):
            out = population.forward(model, x, x, x, path=path, **kwargs)[0]
            torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    assert batch_first and not training  # the only configuration PyTorch accepts


@pytest.mark.parametrize(
    "factory",
    [
        lambda: nn.GRU(5, 7, num_layers=2),
        lambda: nn.LSTM(5, 7, batch_first=True),
        lambda: nn.RNN(5, 7),
    ],
    ids=["gru", "lstm", "rnn"],
)
@pytest.mark.parametrize("rank", [0, 3])
def test_materialized_path_runs_recurrent_layers(
    factory: Callable[[], nn.Module], rank: int
) -> None:
    """The reference path vmaps the module with per-member weights; PyTorch's fused recurrent
    kernels have no batching rule, so they run as cell equations there (and on the low-rank path
    when every weight has dense noise)."""
    model, opt = _setup(factory, torch.device("cpu"), rank=rank)
    x = torch.randn(6, 3, 5)
    population = opt.population()
    expected = _reference(population, model, (x,), {}, False)
    for path in ("materialized", "auto"):
        _assert_close(population.forward(model, x, path=path), expected, rtol=1e-4, atol=1e-5)


def test_last_fallbacks_describe_the_last_call_only() -> None:
    model, opt = _setup(RawEinsum, torch.device("cpu"))
    x = torch.randn(5, 6)
    population = opt.population()
    population.forward(model, x)
    assert population.last_fallbacks == ["w"]
    population.forward(model, x, path="materialized")
    assert population.last_fallbacks == []
    population.forward(model, x)
    with pytest.raises(LowRankFallbackError):
        population.forward(model, x, path="lowrank")
    assert population.last_fallbacks == []


def test_values_assigned_through_data_are_seen_by_the_next_forward() -> None:
    """``.data`` assignment (``vector_to_parameters``) does not move the version counter: nothing
    that depends on a parameter's value may be cached across forwards of a generation."""
    model, opt = _setup(
        lambda: nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)), torch.device("cpu")
    )
    x = torch.randn(5, 3)
    population = opt.population()
    for path in ("auto", "materialized"):
        first = population.forward(model, x, path=path)
        vec = torch.nn.utils.parameters_to_vector(model.parameters())
        torch.nn.utils.vector_to_parameters(vec + 1.0, model.parameters())
        moved = population.forward(model, x, path=path)
        torch.testing.assert_close(
            moved, _reference(population, model, (x,), {}, False), rtol=1e-5, atol=1e-5
        )
        assert not torch.allclose(moved, first)
        for p in model.parameters():
            p.data.sub_(1.0)  # in place through .data: no version bump either
        torch.testing.assert_close(
            population.forward(model, x, path=path), first, rtol=1e-5, atol=1e-6
        )


def test_a_call_with_arguments_a_handler_does_not_know_declines(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A newer PyTorch may pass arguments a handler's signature lacks: the call must take the
    materialized fallback (right answer), never raise a TypeError from inside the handler."""
    import torch.nn.functional as F

    class NewArg(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(6, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.linear(x, self.lin.weight, self.lin.bias)

    model, opt = _setup(NewArg, torch.device("cpu"))
    original = F.linear

    def linear_with_new_arg(
        x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None, future_flag: bool = True
    ) -> torch.Tensor:
        """F.linear as a future PyTorch might have it: one more (keyword) argument."""
        if torch.overrides.has_torch_function((x, w, b)):
            return torch.overrides.handle_torch_function(
                linear_with_new_arg, (x, w, b), x, w, b, future_flag=future_flag
            )
        return original(x, w, b)

    from torcheggroll import lowrank

    monkeypatch.setitem(
        lowrank._LowRankMode.HANDLERS, linear_with_new_arg, lowrank._LowRankMode.HANDLERS[F.linear]
    )
    monkeypatch.setattr(F, "linear", linear_with_new_arg)

    x = torch.randn(5, 6)
    population = opt.population()
    out = population.forward(model, x)  # the handler would raise a TypeError on future_flag
    assert population.last_fallbacks == ["lin.weight"]
    torch.testing.assert_close(
        out, _reference(population, model, (x,), {}, False), rtol=1e-5, atol=1e-5
    )
