"""Misuse: settings, state dicts, closures and parameters that must be refused with a clear error
before anything changes, or withheld with a warning, never applied half-way or silently."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from _hf_models import DECODER_CONFIG, tiny
from torch import nn

from torcheggroll import (
    EggrollOptimizer,
    IdenticalLossesWarning,
    TorchEggrollES,
    compute_es_gradient,
    generate_lora_noise,
    generate_noise_for_shapes,
    generate_standard_noise,
)
from torcheggroll.rows import RowsAttributionError


def snapshot(opt: EggrollOptimizer, params: list[torch.Tensor]) -> tuple:
    return (
        [p.detach().clone() for p in params],
        copy.deepcopy(opt.state_dict()),
    )


def assert_unchanged(opt: EggrollOptimizer, params: list[torch.Tensor], before: tuple) -> None:
    values, state = before
    for p, v in zip(params, values, strict=True):
        assert torch.equal(p.detach(), v)
    assert opt.state_dict() == state


# ---------------------------------------------------------------------- the update
@pytest.mark.parametrize(
    ("scale", "lr", "wd"),
    [(1.0, 1e20, 1e20), (1e38, 1.0, 5.0), (1e28, 1e3, 10.0)],
    ids=["huge lr and decay", "decay of a huge parameter", "decay past the bound"],
)
def test_a_weight_decay_that_would_overflow_is_withheld(scale, lr, wd):
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(4, 3) * scale)
    opt = EggrollOptimizer([p], lr=lr, weight_decay=wd, pop_size=4, seed=0)
    before = p.detach().clone()
    with pytest.warns(RuntimeWarning, match="left unchanged"):
        opt.step(lambda pop: torch.arange(4.0))
    assert torch.equal(p.detach(), before)  # not NaN, not inf: untouched
    assert opt.generation == 1


def test_a_weight_decay_inside_the_bound_is_applied_exactly():
    p = nn.Parameter(torch.full((3, 2), 4.0, dtype=torch.float64))
    opt = EggrollOptimizer([p], lr=0.5, weight_decay=0.25, rank=0, pop_size=4, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # not withheld
        warnings.simplefilter("ignore", IdenticalLossesWarning)  # no direction: decay alone
        opt.step(lambda pop: torch.ones(4))
    torch.testing.assert_close(p.detach(), torch.full((3, 2), 3.5, dtype=torch.float64))


def test_weight_decay_of_a_group_of_mixed_dtypes():
    params = [nn.Parameter(torch.full((2, 3), 2.0, dtype=dtype)) for dtype in _DTYPES]
    opt = EggrollOptimizer(params, lr=0.5, weight_decay=0.5, rank=0, pop_size=4, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", IdenticalLossesWarning)
        opt.step(lambda pop: torch.ones(4))
    for p in params:
        assert torch.equal(p.detach(), torch.full((2, 3), 1.5, dtype=p.dtype))


_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


@pytest.mark.filterwarnings("ignore::torcheggroll.IdenticalLossesWarning")
@pytest.mark.parametrize(
    ("key", "value"),
    [("lr", float("nan")), ("lr", -1e3), ("weight_decay", float("nan")), ("sigma", 0.0)],
)
def test_a_closure_that_breaks_the_settings_is_refused_before_the_update(key, value):
    model = nn.Linear(4, 3)
    opt = EggrollOptimizer(model.parameters(), pop_size=4, seed=0)
    params = list(model.parameters())
    before = snapshot(opt, params)

    def closure(pop):
        opt.param_groups[0][key] = value
        return torch.arange(4.0)

    with pytest.raises(ValueError, match="Invalid"):
        opt.step(closure)
    opt.param_groups[0][key] = before[1]["param_groups"][0][key]
    assert_unchanged(opt, params, before)


def test_settings_edited_to_an_invalid_population_are_refused_at_the_step():
    model = nn.Linear(4, 3)
    opt = EggrollOptimizer(model.parameters(), pop_size=4, seed=0)
    opt.param_groups[0]["pop_size"] = 3
    with pytest.raises(ValueError, match="Invalid pop_size: 3"):
        opt.step(lambda pop: torch.arange(4.0))
    opt.param_groups[0]["pop_size"] = 4
    opt.param_groups[0]["capturable"] = 1
    with pytest.raises(ValueError, match="Invalid capturable: 1"):
        opt.step(lambda pop: torch.arange(4.0))


# ---------------------------------------------------------------------- state dicts
def _bad_state_dicts():
    def group(**kw):
        return lambda sd: sd["param_groups"][0].update(kw)

    def state(**kw):
        return lambda sd: sd["state"][0].update(kw)

    def drop(key):
        return lambda sd: sd["state"][0].pop(key)

    return [
        (group(lr=-1.0), "Invalid learning rate: -1.0"),
        (group(sigma=0.0), "Invalid sigma: 0.0"),
        (group(rank=-3), "Invalid rank: -3"),
        (group(shaping="bogus"), "Invalid shaping: 'bogus'"),
        (group(weight_decay=-1.0), "Invalid weight_decay value: -1.0"),
        (group(pop_size=3), "Invalid pop_size: 3"),
        (group(antithetic="yes"), "Invalid antithetic: 'yes'"),
        (group(capturable=1), "Invalid capturable: 1"),
        (group(sigma_scaling="sideways"), "Invalid sigma_scaling: 'sideways'"),
        (state(seed=-5), "seed -5"),
        (state(generation=1.7), "generation 1.7"),
        (state(generation=-1), "generation -1"),
        (state(noise_version="x"), "noise_version 'x'"),
        (state(noise_version=1), "noise version 1"),
        (drop("seed"), "holds no seed"),
    ]


@pytest.mark.parametrize(("tamper", "message"), _bad_state_dicts())
def test_load_state_dict_refuses_what_the_constructor_would(tamper, message):
    model = nn.Linear(4, 3)
    opt = EggrollOptimizer(model.parameters(), pop_size=4, seed=0)
    opt.step(lambda pop: torch.arange(4.0))
    params = list(model.parameters())
    before = snapshot(opt, params)
    sd = copy.deepcopy(opt.state_dict())
    tamper(sd)
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        opt.load_state_dict(sd)
    assert_unchanged(opt, params, before)
    opt.step(lambda pop: torch.arange(4.0))  # still usable


def test_load_state_dict_refuses_another_optimizer_s():
    model = nn.Linear(4, 3)
    opt = EggrollOptimizer(model.parameters(), pop_size=4, seed=0)
    with pytest.raises(ValueError, match="no 'sigma', 'rank', 'pop_size'"):
        opt.load_state_dict(torch.optim.SGD(model.parameters(), lr=0.1).state_dict())
    assert opt.generation == 0


def test_load_state_dict_checks_after_the_pre_hooks():
    p = nn.Parameter(torch.randn(3))
    opt = EggrollOptimizer([p], pop_size=4, seed=0)
    old = copy.deepcopy(opt.state_dict())
    old["state"][0]["noise_version"] = 1

    def migrate(optimizer, sd):
        sd = copy.deepcopy(sd)
        sd["state"][0]["noise_version"] = 2
        return sd

    handle = opt.register_load_state_dict_pre_hook(migrate)
    opt.load_state_dict(old)  # the hook migrates it before the check
    handle.remove()

    def spoil(optimizer, sd):
        sd = copy.deepcopy(sd)
        sd["state"][0]["noise_version"] = 1
        return sd

    opt.register_load_state_dict_pre_hook(spoil)
    with pytest.raises(ValueError, match="noise version 1"):
        opt.load_state_dict(opt.state_dict())


def test_a_loaded_sigma_scaling_takes_effect_after_a_draw():
    def make():
        return EggrollOptimizer(nn.Linear(16, 8).parameters(), pop_size=4, seed=0)

    saved = EggrollOptimizer(
        nn.Linear(16, 8).parameters(), pop_size=4, seed=0, sigma_scaling="fan_in"
    ).state_dict()
    drawn = make()
    drawn.population()  # its plan is built with sigma_scaling="none"
    drawn.load_state_dict(copy.deepcopy(saved))
    fresh = make()
    fresh.load_state_dict(copy.deepcopy(saved))
    sigmas = [e.sigma for e in drawn.population().params]
    assert sigmas == [e.sigma for e in fresh.population().params]
    assert sigmas[0] == pytest.approx(0.02 / 16**0.5)


# ---------------------------------------------------------------------- closures
def test_a_zero_argument_loss_that_views_a_parameter_is_read_per_member():
    p = nn.Parameter(torch.full((3,), 3.0))
    opt = EggrollOptimizer([p], pop_size=4, rank=0, seed=0)
    opt.step(lambda: p[0])
    losses = opt.last_losses
    assert losses is not None
    assert len(set(losses.tolist())) == 4  # each member's own value, not the restored centre


@pytest.mark.parametrize("value", [torch.tensor(1 + 2j), torch.tensor(True)], ids=str)
def test_the_zero_argument_form_refuses_losses_that_are_not_real(value):
    p = nn.Parameter(torch.zeros(3))
    opt = EggrollOptimizer([p], pop_size=4, seed=0)
    with pytest.raises(ValueError, match="expected real numbers"):
        opt.step(lambda: value)
    assert torch.equal(p.detach(), torch.zeros(3)) and opt.generation == 0


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: torch.zeros(4, device="meta"), "on meta"),
        (lambda: torch.zeros(4).to_sparse(), "layout torch.sparse_coo"),
    ],
    ids=["meta", "sparse"],
)
def test_losses_without_values_are_refused(make, match):
    p = nn.Parameter(torch.zeros(3))
    opt = EggrollOptimizer([p], pop_size=4, seed=0)
    with pytest.raises(ValueError, match=match):
        opt.step(lambda pop: make())
    assert opt.generation == 0


def test_float8_losses_are_read_as_float32():
    p = nn.Parameter(torch.zeros(3))
    opt = EggrollOptimizer([p], pop_size=4, seed=0)
    opt.step(lambda pop: torch.arange(4.0).to(torch.float8_e4m3fn))
    assert opt.last_losses is not None and opt.last_losses.dtype == torch.float32


# ---------------------------------------------------------------------- arguments
@pytest.mark.parametrize(
    ("make", "exc", "match"),
    [
        (lambda: torch.randn(4, 3).to_sparse().requires_grad_(), TypeError, "layout"),
        (lambda: nn.Parameter(torch.randn(1)).expand(5), ValueError, "share memory"),
    ],
    ids=["sparse", "expanded"],
)
def test_parameters_that_cannot_be_updated_in_place_are_refused(make, exc, match):
    good = nn.Parameter(torch.randn(5))
    with pytest.raises(exc, match=match):
        EggrollOptimizer([good, make()], rank=0, pop_size=4, seed=0)


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"lr": torch.tensor(0.1 + 1j)}, ValueError, "expected a floating-point tensor"),
        ({"lr": torch.tensor(True)}, ValueError, "expected a floating-point tensor"),
        ({"lr": 1e308}, ValueError, "Invalid learning rate: 1e.308 .larger than"),
        ({"weight_decay": 1e39}, ValueError, "Invalid weight_decay value: 1e.39"),
        ({"process_group": True}, TypeError, "Invalid process_group: True"),
    ],
    ids=["complex lr", "bool lr", "lr too large", "decay too large", "process_group"],
)
def test_arguments_refused_by_name(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        EggrollOptimizer([nn.Parameter(torch.randn(3))], pop_size=4, **kwargs)


# ---------------------------------------------------------------------- the original API
def test_torch_eggroll_es_load_leaves_the_parameters_when_the_state_is_refused():
    model = nn.Linear(4, 3)
    es = TorchEggrollES(model, pop_size=4, seed=0)
    x, y = torch.randn(8, 4), torch.randn(8, 3)

    def loss(out, target):
        return ((out - target) ** 2).mean()

    es.step(x, loss, y)
    saved = es.state_dict()
    es.step(x, loss, y)
    now = [p.detach().clone() for p in model.parameters()]
    as_numpy = copy.deepcopy(saved)
    as_numpy["params"]["weight"] = as_numpy["params"]["weight"].numpy()
    with pytest.raises(ValueError, match="'weight' is a ndarray"):
        es.load_state_dict(as_numpy)
    bad_optimizer = copy.deepcopy(saved)
    bad_optimizer["optimizer"]["param_groups"][0]["sigma"] = -1.0
    with pytest.raises(ValueError, match="Invalid sigma"):
        es.load_state_dict(bad_optimizer)
    for p, v in zip(model.parameters(), now, strict=True):
        assert torch.equal(p.detach(), v)
    assert es.epoch == 2


def test_the_original_functions_refuse_odd_inputs():
    with pytest.raises(ValueError, match=r"Invalid shapes\['w'\]: \(-1, 3\)"):
        generate_noise_for_shapes({"w": (-1, 3)}, {}, 4, 0.1, 0, "cpu")
    with pytest.raises(ValueError, match=r"Invalid dtype: torch\.int64"):
        generate_noise_for_shapes({"w": (4, 3)}, {}, 4, 0.1, 0, "cpu", dtype=torch.int64)
    with pytest.raises(ValueError, match=r"Invalid param dtype: torch\.int64"):
        generate_lora_noise(torch.zeros(4, 3, dtype=torch.int64), 2, 0.1, 0, "cpu")
    noise = generate_noise_for_shapes({"w": (4, 3)}, {}, 4, 0.1, 0, "cpu")
    with pytest.raises(ValueError, match="Invalid normalize_fitness: 'no'"):
        compute_es_gradient(noise, [1.0, 2, 3, 4], normalize_fitness="no")
    with pytest.raises(ValueError, match="expected real numbers"):
        compute_es_gradient(noise, torch.tensor([1, 2, 3, 4j]))
    with pytest.raises(ValueError, match="non-empty"):
        compute_es_gradient({}, [])
    es = TorchEggrollES(nn.Linear(4, 3), pop_size=4, seed=0)
    es.prepare_population()
    with pytest.raises(ValueError, match="expected 4 values"):
        es.apply_fitness_scores([[1.0, 2.0], [3.0, 4.0]])
    es.apply_fitness_scores(torch.arange(4.0)[:, None])  # (N, 1) is one per member
    # NumPy scalars are numbers: np.float32(0.1) is a valid sigma
    assert generate_standard_noise(torch.zeros(3), np.float32(0.1), 0, "cpu").shape == (3,)
    with pytest.raises(ValueError, match=r"Invalid sigma: -0.1 \(expected"):
        generate_standard_noise(torch.zeros(3), -0.1, 0, "cpu")


# ---------------------------------------------------------------------- the rows forward
@pytest.mark.parametrize("fails", [False, True], ids=["step", "closure raises"])
def test_the_rows_forward_leaves_batch_norm_counts_alone(fails):
    net = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5)).train()
    x = torch.randn(6, 4)
    opt = EggrollOptimizer(net.parameters(), pop_size=4, seed=0)

    def closure(pop):
        out = pop.forward(net, x, path="rows")
        if fails:
            raise RuntimeError("the closure fails")
        return out.pow(2).mean(dim=(1, 2))

    if fails:
        with pytest.raises(RuntimeError, match="the closure fails"):
            opt.step(closure)
    else:
        opt.step(closure)
    assert int(net[1].num_batches_tracked) == 0  # as the vmap forward leaves it
    assert net[1].running_mean.abs().sum() == 0


class _BatchMean(nn.Module):
    """Returns the mean over the whole batch: not one value per row."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x).mean()


class _ColumnMeans(_BatchMean):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x).mean(0)  # (3,): as many values as... nothing per row


@pytest.mark.parametrize("model", [_BatchMean, _ColumnMeans], ids=["scalar", "per column"])
def test_a_rows_output_that_is_not_per_row_is_refused(model):
    torch.manual_seed(0)
    net = model()
    opt = EggrollOptimizer(net.parameters(), pop_size=4, seed=0)
    with pytest.raises(RowsAttributionError, match="not a batch of the rows"):
        opt.population().forward(net, torch.randn(3, 4), path="rows")


def test_the_rows_refuse_a_loss_averaged_over_every_member():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=32, n_embd=16, n_layer=1, n_head=2, n_positions=16)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    opt = EggrollOptimizer(model.parameters(), pop_size=4, seed=0)
    ids = torch.randint(0, 32, (2, 5))
    with torch.no_grad(), pytest.raises(RowsAttributionError, match=r"\(\) is not a batch"):
        opt.population().forward(model, input_ids=ids, labels=ids, path="rows")


@pytest.mark.parametrize("path", ["auto", "lowrank", "materialized", "rows"])
def test_a_model_the_population_does_not_perturb_is_refused(path):
    model = nn.Linear(4, 3)
    opt = EggrollOptimizer(model.parameters(), pop_size=4, seed=0)
    twin = copy.deepcopy(model)  # the same values, none of its tensors owned
    population = opt.population()
    with pytest.raises(ValueError, match="Invalid module: no parameter or buffer"):
        population.forward(twin, torch.randn(2, 4), path=path)
    with pytest.raises(ValueError, match="Invalid module"):
        population.stacked(twin)
    with pytest.raises(ValueError, match="Invalid module"):
        population.rows(twin)


def test_population_arguments_are_checked_on_every_path():
    model = nn.Linear(4, 3)
    population = EggrollOptimizer(model.parameters(), pop_size=4, seed=0).population()
    with pytest.raises(ValueError, match="Invalid randomness: 'bogus'"):
        population.forward(model, torch.randn(2, 4), path="rows", randomness="bogus")
    for batch in (-1, "3", True):
        with pytest.raises(ValueError, match="Invalid batch"):
            population.rows(model, batch=batch)


def test_member_value_checks_its_position_and_centre():
    model = nn.Linear(5, 8)
    population = EggrollOptimizer(model.parameters(), rank=2, pop_size=4, seed=0).population()
    for position in (4, -1, 1.0):
        with pytest.raises(ValueError, match="Invalid position"):
            population.member_value(model.weight, position)
    for centre in (torch.zeros(1, 5), torch.zeros(3, 8, 5), torch.zeros(8, 5, dtype=torch.long)):
        with pytest.raises(ValueError, match="Invalid centre"):
            population.member_value(model.weight, 0, centre=centre)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"seed": 1.9}, "Invalid seed: 1.9"),
        ({"seed": "1"}, "Invalid seed: '1'"),
        ({"rank": -1}, "Invalid rank"),
        ({"rank": True}, "Invalid rank: True"),
        ({"dtype": torch.int64}, "Invalid dtype: torch.int64"),
    ],
)
def test_draw_noise_checks_its_arguments(kwargs, match):
    from torcheggroll import draw_noise

    args = {"seed": 1, "generation": 0, "param_index": 0, "device": "cpu", "rank": 2, **kwargs}
    rank = args.pop("rank")
    with pytest.raises(ValueError, match=match):
        draw_noise((4, 5), rank, 2, **args)


def test_dense_noise_has_no_factor_scale():
    from torcheggroll import draw_noise

    dense = draw_noise((4, 5), 0, 2, seed=1, generation=0, param_index=0, device="cpu")
    with pytest.raises(ValueError, match="dense noise has no factors"):
        _ = dense.factor_scale


def test_rows_inputs_are_checked_before_the_batch_is_set():
    model = nn.Linear(5, 3)
    rows = EggrollOptimizer(model.parameters(), pop_size=4, seed=0).population().rows(model)
    with pytest.raises(ValueError, match=r"hold \[2, 3\] rows per member"):
        rows.repeat([torch.randn(3, 5), torch.randn(2, 5)])
    assert rows.batch is None
    with pytest.raises(ValueError, match="has no batch dimension 0"):
        rows.repeat(torch.tensor(1.0))
    assert rows.repeat(torch.randn(2, 5)).shape == (8, 5) and rows.batch == 2


def test_the_decoder_checks_token_ids_against_the_vocabulary_and_follows_the_dtype():
    pytest.importorskip("transformers")
    from torcheggroll import PopulationDecoder

    lm = tiny("LlamaForCausalLM", "LlamaConfig", **DECODER_CONFIG).float()
    with pytest.raises(ValueError, match=r"Invalid pad_token_id: 64 \(the vocabulary has 64"):
        PopulationDecoder(lm, 2, pad_token_id=64)
    with pytest.raises(ValueError, match="Invalid temperature: inf"):
        PopulationDecoder(lm, 2, do_sample=True, temperature=float("inf"))
    decode = PopulationDecoder(lm, 2, eos_token_id=[], pad_token_id=0)
    with torch.no_grad():
        with pytest.raises(ValueError, match="token ids from 100 to 100"):
            decode(torch.full((1, 3), 100))
        ids = torch.ones(1, 3, dtype=torch.long)
        first = decode(ids)
        lm.double()  # a new dtype: new buffers, not the float32 cache of the first call
        assert torch.equal(decode(ids), first)
