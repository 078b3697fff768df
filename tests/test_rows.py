"""The population as rows of one batch (``path="rows"``, ``population.rows``) against references:
every member's parameters copied into a plain model, and the vmap forward."""

from __future__ import annotations

import copy
import functools
import threading
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from torcheggroll import EggrollOptimizer
from torcheggroll.rows import RowsAttributionError

POP = 6


class Block(nn.Module):
    """Layers a rows forward must correct: linear, embedding, conv, norms, an owned vector."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 8, padding_idx=0)
        self.pos = nn.Parameter(torch.randn(1, 5, 8) * 0.1)  # (1, T, D): dense noise
        self.norm = nn.LayerNorm(8)
        self.rms = nn.RMSNorm(8)
        self.lin = nn.Linear(8, 12)
        self.gain = nn.Parameter(torch.ones(12))  # used as `(1 + gain) * x`
        self.out = nn.Linear(12, 3, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.rms(self.norm(self.emb(ids) + self.pos))
        h = torch.tanh(self.lin(h)) * (1 + self.gain)
        return self.out(h).mean(dim=1)


class TinyCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.gn = nn.GroupNorm(2, 8)
        self.c2 = nn.Conv2d(8, 8, 3, stride=2, dilation=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 3 * 3, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.gn(self.c1(x)))
        x = torch.relu(self.bn(self.c2(x)))
        return self.fc(x.flatten(1))


CASES: list[tuple[str, Callable[[], nn.Module], Callable[[], torch.Tensor]]] = [
    (
        "mlp",
        lambda: nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 3)),
        lambda: torch.randn(4, 5),
    ),
    ("block", Block, lambda: torch.randint(0, 11, (3, 5))),
    ("cnn-eval", lambda: TinyCNN().eval(), lambda: torch.randn(2, 3, 8, 8)),
    ("cnn-train", TinyCNN, lambda: torch.randn(3, 3, 8, 8)),
    ("conv1d", lambda: nn.Conv1d(3, 8, 3, padding=1), lambda: torch.randn(2, 3, 9)),
    ("gru-free-linear-3d", lambda: nn.Linear(6, 7), lambda: torch.randn(2, 4, 6)),
]


def _reference(
    population: Any, model: nn.Module, x: torch.Tensor, per_member: bool
) -> torch.Tensor:
    """Each member's parameters copied into a plain model (batch norm on that member's batch,
    running statistics untouched as in the population forwards)."""
    stacked = population.stacked(model)
    outs = []
    for j in range(len(population)):
        m = copy.deepcopy(model)
        with torch.no_grad():
            for name, t in list(m.named_parameters()) + list(m.named_buffers()):
                t.copy_(stacked[name][j])
        outs.append(m(x[j] if per_member else x))
    return torch.stack(outs)


def _setup(factory: Callable[[], nn.Module], rank: int = 2) -> tuple[nn.Module, EggrollOptimizer]:
    torch.manual_seed(0)
    model = factory().double()
    return model, EggrollOptimizer(model.parameters(), sigma=0.2, rank=rank, pop_size=POP, seed=3)


@pytest.mark.parametrize("per_member", [False, True], ids=["shared", "per-member"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_rows_forward_matches_each_member_in_a_plain_model(case: Any, per_member: bool) -> None:
    _, factory, make = case
    model, opt = _setup(factory)
    torch.manual_seed(1)
    x = make()
    if x.is_floating_point():
        x = x.double()
    if per_member:
        x = torch.stack(
            [x]
            + [
                torch.randn_like(x) if x.is_floating_point() else x.roll(j, -1)
                for j in range(1, POP)
            ]
        )
    population = opt.population()
    with torch.no_grad():
        rows = population.forward(model, x, per_member=per_member, path="rows")
        expected = _reference(population, model, x, per_member)
        torch.testing.assert_close(rows, expected, rtol=1e-10, atol=1e-12)
        # ... and the vmap forward computes the same (the shared corrections of _ops).
        vmapped = population.forward(model, x, per_member=per_member)
        torch.testing.assert_close(rows, vmapped, rtol=1e-10, atol=1e-12)


def test_rows_leave_batch_norm_statistics_alone() -> None:
    model, opt = _setup(TinyCNN)
    before = model.bn.running_mean.clone()
    with torch.no_grad():
        opt.population().forward(model, torch.randn(3, 3, 8, 8).double(), path="rows")
    assert torch.equal(model.bn.running_mean, before)


def test_repeat_flatten_split() -> None:
    model, opt = _setup(lambda: nn.Linear(3, 2))
    rows = opt.population().rows(model)
    x = torch.randn(4, 3)
    batch = rows.repeat(x)
    assert batch.shape == (POP * 4, 3) and torch.equal(batch[4:8], x) and rows.batch == 4
    assert rows.split(torch.zeros(POP * 4, 2)).shape == (POP, 4, 2)
    with pytest.raises(ValueError, match="already hold 4 rows per member"):
        rows.repeat(torch.randn(5, 3))
    with pytest.raises(ValueError, match="expected a shape"):
        opt.population().rows(model).flatten(torch.randn(POP + 1, 2, 3))


class Misuse(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.lin = nn.Linear(6, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.how == "sum":
            return self.lin(x) + self.lin.weight.sum()  # not a per-row use
        return self.lin(x.reshape(-1)[: 3 * 6].reshape(3, 6))  # rows that are no batch


@pytest.mark.parametrize("how", ["sum", "not-a-batch"])
def test_an_unattributable_use_raises_naming_parameter_and_operation(how: str) -> None:
    model, opt = _setup(lambda: Misuse(how))
    with (
        pytest.raises(RowsAttributionError, match=r"'lin\.weight'.*(sum|F\.linear)"),
        torch.no_grad(),
    ):
        opt.population().forward(model, torch.randn(4, 6).double(), path="rows")


def test_es_trains_through_the_rows_forward() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))
    x = torch.randn(64, 4)
    y = x[:, :1] * 0.7 - x[:, 1:2] * 0.3
    opt = EggrollOptimizer(model.parameters(), lr=0.3, sigma=0.05, pop_size=32, seed=0)

    def closure(population: Any) -> torch.Tensor:
        return (population.forward(model, x, path="rows") - y).pow(2).mean(dim=(1, 2))

    with torch.no_grad():
        start = float((model(x) - y).pow(2).mean())
        for _ in range(60):
            opt.step(closure)
        assert float((model(x) - y).pow(2).mean()) < 0.5 * start


def test_owned_parameters_are_marked_inside_and_restored_after() -> None:
    # watch="owned" without batch norm: only operations on owned tensors reach the rows forward;
    # the owned tensors wear a marked class for the duration (the same objects, tied ones still
    # tied) and get their own class back on exit, also when the code inside raises.
    torch.manual_seed(0)
    emb = nn.Embedding(7, 4)
    model = nn.Sequential(emb, nn.Linear(4, 7, bias=False))
    model[1].weight = emb.weight  # tied, as language models' heads are
    frozen = nn.Linear(4, 4)
    frozen.requires_grad_(False)
    model.append(frozen)
    before = dict(model.named_parameters(remove_duplicate=False))
    opt = EggrollOptimizer([p for p in model.parameters() if p.requires_grad], pop_size=4, seed=0)
    population = opt.population()
    with pytest.raises(RuntimeError, match="inside"), population.rows(model, watch="owned"):
        assert not torch._C._is_torch_function_mode_enabled()
        assert type(emb.weight) is not nn.Parameter and isinstance(emb.weight, nn.Parameter)
        assert model[1].weight is model[0].weight is before["0.weight"]
        assert population.owns(emb.weight)
        assert type(frozen.weight) is nn.Parameter  # not owned: left alone
        raise RuntimeError("inside")
    after = dict(model.named_parameters(remove_duplicate=False))
    assert after.keys() == before.keys()
    assert all(after[n] is before[n] and type(after[n]) is nn.Parameter for n in before)
    assert not any("_rows_mode" in p.__dict__ for p in after.values())


class Elsewhere(nn.Module):
    """Owned tensors reached other than through the module's own attributes: a reference kept
    in a list, a partial made at construction, and a weight tied to a module outside the one the
    rows are made for."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(5, 5)
        self.dec = nn.Linear(5, 5, bias=False)
        self.dec.weight = self.enc.weight
        self.refs = [self.enc.bias]
        self.act = functools.partial(F.linear, weight=self.enc.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.enc(x)) + self.refs[0]
        return self.dec(h) + self.act(h)


@pytest.mark.parametrize("watch", ["all", "owned"])
def test_owned_tensors_referenced_from_elsewhere_are_corrected(watch: str) -> None:
    model, opt = _setup(Elsewhere)
    x = torch.randn(3, 5, dtype=torch.float64)
    population = opt.population()
    with torch.no_grad():
        expected = _reference(population, model, x, per_member=False)
        # The rows are made for model.enc only; model.dec shares its weight.
        with population.rows(model.enc, watch=watch) as rows:
            got = rows.split(model(rows.repeat(x)))
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_other_threads_see_the_plain_model() -> None:
    model, opt = _setup(lambda: nn.Linear(5, 3))
    x = torch.randn(POP * 2, 5, dtype=torch.float64)  # a batch the rows could take for theirs
    with torch.no_grad():
        plain = model(x)
        seen: list[torch.Tensor] = []
        with opt.population().rows(model, watch="owned"):
            worker = threading.Thread(target=lambda: seen.append(model(x)))
            worker.start()
            worker.join()
    assert torch.equal(seen[0], plain)


@pytest.mark.parametrize("watch", ["all", "owned"])
def test_rows_cannot_be_nested_or_entered_twice(watch: str) -> None:
    model, opt = _setup(lambda: nn.Linear(5, 3))
    population = opt.population()
    rows = population.rows(model, watch=watch)
    with rows:
        with pytest.raises(RuntimeError, match="in use already"), rows:
            pass
        with pytest.raises(RuntimeError, match="cannot be nested"), population.rows(model):
            pass
    assert type(model.weight) is nn.Parameter and type(model.bias) is nn.Parameter
    assert not any("_rows_mode" in p.__dict__ for p in model.parameters())
    with pytest.raises(ValueError, match="Invalid watch: 'some'"):
        population.rows(model, watch="some")


class CachesScale(nn.Module):
    """Keeps a tensor derived from an owned one across calls (``1 + gain``)."""

    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.zeros(4))
        self.scale: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale is None:
            self.scale = 1 + self.gain
        return x * self.scale


def test_a_derived_tensor_kept_past_the_rows_is_plain_afterwards() -> None:
    model, opt = _setup(CachesScale)
    x = torch.randn(POP * 2, 4, dtype=torch.float64)
    with torch.no_grad(), opt.population().rows(model, watch="owned") as rows:
        model(rows.flatten(x.view(POP, 2, 4)))
    # After the rows, the cached (1 + gain) is the centre's value for every row.
    torch.testing.assert_close(model(x), x * (1 + model.gain.detach()), rtol=0, atol=0)
    copy.deepcopy(model)  # and nothing refuses to be copied


def test_two_populations_in_one_call_are_refused() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(5, 3).double()
    first = EggrollOptimizer([lin.weight], rank=2, pop_size=POP, seed=0).population()
    second = EggrollOptimizer([lin.bias], pop_size=POP, seed=1).population()
    x = torch.randn(POP, 5, dtype=torch.float64)
    with (
        torch.no_grad(),
        first.rows(lin, batch=1, watch="owned"),
        second.rows(lin, batch=1, watch="owned"),
        pytest.raises(RowsAttributionError, match="two populations"),
    ):
        lin(x)


def test_a_deepcopy_taken_inside_the_rows_is_a_plain_model() -> None:
    model, opt = _setup(lambda: nn.Linear(5, 3))
    with opt.population().rows(model, watch="owned"):
        clone = copy.deepcopy(model)
    assert all(type(p) is nn.Parameter for p in clone.parameters())
    assert all(
        torch.equal(a, b) for a, b in zip(clone.parameters(), model.parameters(), strict=True)
    )


class FunctionalBatchNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(5, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(self.lin(x), None, None, training=True)


def test_watch_all_sees_batch_statistics_computed_functionally() -> None:
    model, opt = _setup(FunctionalBatchNorm)
    x = torch.randn(6, 5, dtype=torch.float64)
    population = opt.population()
    with torch.no_grad():
        expected = _reference(population, model, x, per_member=False)
        with population.rows(model, watch="all") as rows:
            got = rows.split(model(rows.repeat(x)))
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_a_model_with_batch_norm_is_watched_by_a_mode() -> None:
    model, opt = _setup(TinyCNN)
    with opt.population().rows(model):
        assert torch._C._is_torch_function_mode_enabled()
    assert not torch._C._is_torch_function_mode_enabled()


class GemmaNorm(nn.Module):
    """Derives ``1 + weight`` at every call, as Gemma's RMSNorm does."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * (1.0 + self.weight.float())


@pytest.mark.parametrize("watch", ["all", "owned"])
def test_a_tensor_derived_at_every_call_is_made_once(watch: str) -> None:
    # A decode of many steps must not pile up one derived tensor per step.
    model, opt = _setup(GemmaNorm)
    x = torch.randn(POP * 2, 4, dtype=torch.float32)
    population = opt.population()
    with torch.no_grad(), population.rows(model, batch=2, watch=watch) as rows:
        first = model(x)
        size = len(rows.owned)
        for _ in range(20):
            torch.testing.assert_close(model(x), first, rtol=0, atol=0)
        assert len(rows.owned) == size
    expected = _reference(population, model.float(), x.view(POP, 2, 4), per_member=True)
    torch.testing.assert_close(first.view(POP, 2, 4), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("watch", ["all", "owned"])
def test_a_rows_object_entered_again_reads_the_current_parameters(watch: str) -> None:
    model, opt = _setup(lambda: nn.Linear(5, 3))
    x = torch.randn(POP, 5, dtype=torch.float64)
    population = opt.population()
    rows = population.rows(model, batch=1, watch=watch)
    with torch.no_grad():
        with rows:
            model(x)
        model.bias.add_(1.0)  # the centre moves (as after a step)
        expected = _reference(population, model, x.view(POP, 1, 5), per_member=True)
        with rows:
            got = model(x)
    torch.testing.assert_close(got.view(POP, 1, 3), expected, rtol=1e-10, atol=1e-12)


class CatsKeyword(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.b = nn.Parameter(torch.zeros(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.cat(tensors=[self.b, self.b])[:3]


@pytest.mark.parametrize("watch", ["all", "owned"])
def test_an_owned_tensor_in_a_keyword_list_is_seen(watch: str) -> None:
    model, opt = _setup(CatsKeyword)
    with (
        torch.no_grad(),
        opt.population().rows(model, batch=1, watch=watch),
        pytest.raises(RowsAttributionError, match=r"'b'.*cat"),
    ):
        model(torch.randn(POP, 3, dtype=torch.float64))


@pytest.mark.parametrize("path", ["rows", "lowrank", "materialized"])
def test_groups_sharing_a_noise_bucket_keep_their_own_sigma(path: str) -> None:
    """Two same-shape linears in groups of different sigma share one bucket of the noise
    buffer, and the biases and the norm one dense region, which a population gathers once for
    all of them: each member's outputs still equal a plain model holding
    ``theta + sigma_g * sign * E`` with ``E`` from :func:`torcheggroll.noise.draw_noise`."""
    from torcheggroll.noise import draw_noise

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6), nn.LayerNorm(6)).double()
    sigmas = {0: 0.05, 2: 0.3, 3: 0.3}
    opt = EggrollOptimizer(
        [{"params": model[i].parameters(), "sigma": s} for i, s in sigmas.items()],
        rank=2,
        pop_size=POP,
        seed=11,
    )
    x = torch.randn(4, 6, dtype=torch.float64)
    population = opt.population()
    with torch.no_grad():
        got = population.forward(model, x, path=path)
    params = [(i, p) for i in sigmas for p in model[i].parameters()]
    for j in range(POP):
        member = copy.deepcopy(model)
        sign = 1.0 if j % 2 == 0 else -1.0
        with torch.no_grad():
            for index, (i, p) in enumerate(params):
                noise = draw_noise(
                    p.shape, 2, POP // 2, seed=11, generation=0, param_index=index,
                    device="cpu", dtype=torch.float64,
                )  # fmt: skip
                d = j // 2
                if noise.dense is not None:
                    e = noise.dense[d]
                else:
                    e = noise.a[d] @ noise.b[d].T / 2**0.5
                target = dict(member.named_parameters())[
                    next(n for n, q in model.named_parameters() if q is p)
                ]
                target.add_(sigmas[i] * sign * e)
            ref = member(x)
        torch.testing.assert_close(got[j], ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_values_of_a_region_equal_each_parameters_own(dtype: torch.dtype) -> None:
    """``perturbed_many`` (one pass over the dense noise region) gives every parameter's
    ``perturbed`` bitwise, for a subset in any order, and reads the centres at each call."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.LayerNorm(7), nn.Linear(7, 3), nn.LayerNorm(3))
    model = model.to(dtype)
    opt = EggrollOptimizer(model.parameters(), sigma=0.1, rank=2, pop_size=POP, seed=2)
    population = opt.population()
    dense = [p for p in model.parameters() if p.dim() == 1]
    for chosen in (dense, dense[::-1][:3]):
        got = population.perturbed_many(chosen)
        for p, g in zip(chosen, got, strict=True):
            assert g.dtype == dtype and torch.equal(g, population.perturbed(p))
    before = population.perturbed_many(dense)[1]
    with torch.no_grad():
        dense[1].add_(1.0)
    moved = population.perturbed_many(dense)[1]
    assert torch.equal(moved, population.perturbed(dense[1]))
    assert not torch.equal(moved, before)


class Norms(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 8)
        self.ln = nn.LayerNorm(8)
        self.gn = nn.GroupNorm(2, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln(self.lin(x))  # (N, 8)
        return self.gn(h.unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize("owned", ["weight", "bias"])
def test_norms_with_one_of_weight_and_bias_owned_match_each_member(owned: str) -> None:
    # A group of norm weights without their biases (or the reverse): the unowned half is the
    # centre's, applied after the normalization, never scaled by the member's weight.
    torch.manual_seed(0)
    model = Norms().double()
    with torch.no_grad():
        for m in (model.ln, model.gn):
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-1.0, 1.0)
    params = [model.lin.weight] + [getattr(m, owned) for m in (model.ln, model.gn)]
    opt = EggrollOptimizer(params, sigma=0.2, rank=2, pop_size=POP, seed=3)
    x = torch.randn(3, 4, dtype=torch.float64)
    population = opt.population()
    with torch.no_grad():
        expected = _reference(population, model, x, False)
        for path in ("rows", "lowrank"):
            out = population.forward(model, x, path=path)
            torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)


class _Square(torch.autograd.Function):
    """A custom autograd Function without vmap support (as Bloom's GeLU is)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return 2 * x * g


class _CustomFunction(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Square.apply(self.lin(x))


def test_a_model_vmap_cannot_run_points_to_the_rows_forward() -> None:
    torch.manual_seed(0)
    model = _CustomFunction()
    opt = EggrollOptimizer(model.parameters(), sigma=0.1, rank=2, pop_size=4, seed=0)
    x = torch.randn(3, 6)
    population = opt.population()
    with pytest.raises(RuntimeError, match="path='rows' runs it as plain inference"):
        population.forward(model, x)
    rows = population.forward(model, x, path="rows")  # (P, B, 5)
    stacked = population.stacked(model)
    for j in range(len(population)):
        y = x @ stacked["lin.weight"][j].T + stacked["lin.bias"][j]
        torch.testing.assert_close(rows[j], y * y)


class _SlicedTables(nn.Module):
    """Position tables read by slices of their first dimension, as Whisper's encoder reads
    `embed_positions.weight[:T]`: one low rank, one dense (a side no larger than the rank)."""

    def __init__(self) -> None:
        super().__init__()
        self.pos = nn.Parameter(torch.randn(16, 8))  # low rank at rank 2
        self.narrow = nn.Parameter(torch.randn(16, 2))  # dense: a side of 2
        self.lin = nn.Linear(10, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        h = torch.cat([x + self.pos[:t], (x[..., :2] + self.narrow[2 : 2 + t])], dim=-1)
        return self.lin(h)


def test_slices_of_owned_tables_are_per_member() -> None:
    torch.manual_seed(0)
    model = _SlicedTables().double()
    opt = EggrollOptimizer(model.parameters(), sigma=0.1, rank=2, pop_size=4, seed=0)
    population = opt.population()
    assert (
        population.noise(model.pos).is_low_rank and not population.noise(model.narrow).is_low_rank
    )
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    stacked = population.stacked(model)
    expected = []
    for j in range(len(population)):
        h = torch.cat([x + stacked["pos"][j][:5], x[..., :2] + stacked["narrow"][j][2:7]], -1)
        expected.append(h @ stacked["lin.weight"][j].T + stacked["lin.bias"][j])
    rows = population.forward(model, x, path="rows")
    torch.testing.assert_close(rows, torch.stack(expected), rtol=0, atol=1e-12)
