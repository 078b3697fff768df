"""Properties of the counter-based EGGROLL noise (torcheggroll/noise.py).

Statistical tolerances are derived from the sample size in the comments next to them; the
hypothesis profile (tests/conftest.py) is derandomized, so every run checks the same examples.
"""

from __future__ import annotations

import math

import pytest
import torch
from _devices import CPU_AND_CUDA
from hypothesis import given, settings
from hypothesis import strategies as st

from torcheggroll import EggrollOptimizer
from torcheggroll.noise import (
    STREAM_B,
    block_normals,
    draw_noise,
    matrix_shape,
    philox4x32,
    seed_key,
)

SEEDS = st.integers(0, 2**63 - 1)
SMALL = st.integers(0, 10_000)
SHAPES = st.lists(st.integers(1, 7), min_size=1, max_size=3).map(tuple)
# How many standard errors a statistic may deviate by (see each test for why this suffices).
K_SE = 6.0


def _noise(shape, rank, draws, seed=0, generation=0, param_index=0, dtype=torch.float64):
    return draw_noise(
        shape,
        rank,
        draws,
        seed=seed,
        generation=generation,
        param_index=param_index,
        device="cpu",
        dtype=dtype,
    )


def _tensors(noise) -> list[torch.Tensor]:
    return [t for t in (noise.a, noise.b, noise.dense) if t is not None]


# --------------------------------------------------------------------------- structure
@given(shape=SHAPES, rank=st.integers(0, 6), draws=st.integers(1, 5))
def test_factor_shapes(shape, rank, draws):
    noise = _noise(shape, rank, draws)
    if rank > 0 and len(shape) >= 2:
        m, n = matrix_shape(shape)
        assert noise.is_low_rank
        assert noise.a.shape == (draws, m, rank) and noise.b.shape == (draws, n, rank)
    else:
        assert not noise.is_low_rank and noise.dense.shape == (draws, *shape)
    assert noise.num_draws == draws
    assert noise.materialize().shape == (draws, *shape)


@given(
    m=st.integers(1, 12),
    n=st.integers(1, 12),
    extra=st.sampled_from([(), (2,), (3, 2)]),
    rank=st.integers(1, 10),
    seed=SEEDS,
)
def test_each_draw_has_rank_at_most_min_r_m_n(m, n, extra, rank, seed):
    shape = (m, n, *extra)
    noise = _noise(shape, rank, draws=3, seed=seed)
    rows, cols = matrix_shape(shape)
    k = min(rank, rows, cols)
    for e in noise.materialize():
        s = torch.linalg.svdvals(e.reshape(rows, cols))
        # float64: a product A B^T of inner dimension r has exactly min(r, m, n) non-zero
        # singular values; the others are rounding noise, ~1e-16 of the largest.
        assert torch.all(s[k:] <= 1e-10 * s[0])
        assert torch.linalg.matrix_rank(e.reshape(rows, cols)) <= k


@given(shape=SHAPES, rank=st.integers(0, 4), draws=st.integers(1, 6), seed=SEEDS)
def test_weighted_sum_matches_materialized_sum(shape, rank, draws, seed):
    noise = _noise(shape, rank, draws, seed=seed)
    coeffs = torch.linspace(-1.5, 2.0, draws, dtype=torch.float64)
    expected = noise.materialize(coeffs).sum(0)
    got = noise.weighted_sum(coeffs)
    assert got.shape == torch.Size(shape)
    # Same float64 sums in a different order: relative error ~ draws * rank * 1e-16.
    scale = noise.materialize().abs().max() * coeffs.abs().sum()
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12 * float(scale))


def test_select_gathers_draws_in_order():
    noise = _noise((4, 3), 2, 5, seed=1)
    idx = torch.tensor([4, 0, 0, 2])
    sub = noise.select(idx)
    assert torch.equal(sub.materialize(), noise.materialize()[idx])
    dense = _noise((6,), 0, 5, seed=1)
    assert torch.equal(dense.select(idx).dense, dense.dense[idx])


# --------------------------------------------------------------------------- determinism
@given(
    shape=SHAPES,
    rank=st.integers(0, 4),
    seed=SEEDS,
    generation=SMALL,
    param_index=SMALL,
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_same_integers_give_bitwise_identical_noise(
    shape, rank, seed, generation, param_index, dtype
):
    kw = dict(seed=seed, generation=generation, param_index=param_index, dtype=dtype)
    first, second = _noise(shape, rank, 3, **kw), _noise(shape, rank, 3, **kw)
    for x, y in zip(_tensors(first), _tensors(second), strict=True):
        assert torch.equal(x, y)


@pytest.mark.parametrize(
    ("which", "delta"),
    [
        ("seed", 1),
        ("seed", 2**32),  # the high half of the key
        ("seed", 2**40 + 1),
        ("generation", 1),
        ("generation", 2**31),
        ("param_index", 1),
        ("param_index", 1000),
    ],
)
@settings(max_examples=8)
@given(shape=SHAPES, rank=st.integers(0, 4), seed=SEEDS, generation=SMALL, param_index=SMALL)
def test_different_integers_give_different_noise(
    shape, rank, seed, generation, param_index, which, delta
):
    base = dict(seed=seed % 2**62, generation=generation, param_index=param_index)
    other = dict(base)
    other[which] = base[which] + delta
    x = torch.cat([t.flatten() for t in _tensors(_noise(shape, rank, 2, **base))])
    y = torch.cat([t.flatten() for t in _tensors(_noise(shape, rank, 2, **other))])
    # Continuous draws from independent streams: equal entries have probability 0.
    assert not torch.any(x == y)


# --------------------------------------------------------------------------- the definition
# The compiled CPU kernel (torcheggroll/_cpu_noise.c) against the PyTorch reference: the same
# integer words, normals within 4 float32 ulps of the largest |z| (ulp 4.8e-7 in [4, 8));
# measured: 7.2e-7 over 590k normals.
CPU_KERNEL_TOLERANCE = 2e-6


# Known-answer vectors of Philox-4x32-10 from the Random123 distribution (kat_vectors):
# (counter, key) -> output.
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


@pytest.mark.parametrize(("counter", "key", "expected"), KAT)
def test_philox_matches_the_known_answers(counter, key, expected):
    words = philox4x32(torch.tensor([counter[0]]), *counter[1:], *key)
    assert tuple(int(w) for w in words) == expected


def test_noise_is_the_documented_function_of_its_counters():
    # Entry e of stream s of draw k of parameter p in generation g is normal e % 4 of the
    # Philox block (e // 4 + s * 2**31, k, p, g) under the seed's key.
    seed, generation, index = 2**40 + 17, 9, 3
    noise = _noise(
        (5, 3), 2, 4, seed=seed, generation=generation, param_index=index, dtype=torch.float32
    )
    k0, k1 = seed & 0xFFFFFFFF, seed >> 32
    for stream, factor in ((0, noise.a), (1, noise.b)):
        for k in range(4):
            flat = factor[k].reshape(-1)
            for e in range(flat.numel()):
                words = philox4x32(
                    torch.tensor([e // 4 + stream * STREAM_B]), k, index, generation, k0, k1
                )
                # The compiled CPU kernel's logf/sinf/cosf may round differently from
                # PyTorch's: a few ulps of |z| < 5.8 (bitwise without the kernel).
                torch.testing.assert_close(
                    flat[e], block_normals(words)[0, e % 4], rtol=0, atol=CPU_KERNEL_TOLERANCE
                )
    assert seed_key(seed) == (k0, k1)


def test_uniforms_and_normals_of_extreme_words():
    # Words 0 and 2**32 - 1 map to the ends of (0, 1): finite normals, never log(0).
    words = [
        torch.tensor([0, 0xFFFFFFFF, 0, 0xFFFFFFFF]),
        torch.tensor([0, 0xFFFFFFFF, 1 << 31, 1 << 30]),
    ] * 2
    z = block_normals(words)
    assert torch.isfinite(z).all() and z.abs().max() < 5.8  # sqrt(-2 ln 2**-24) = 5.77


@settings(max_examples=10)
@given(
    seed=SEEDS,
    pairs=st.sets(
        st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1)), min_size=2, max_size=40
    ),
)
def test_streams_never_repeat_across_generations_and_parameters(seed, pairs):
    # The first blocks of both streams of two draws, for many (generation, parameter): as
    # Philox is a bijection of the counter under one key, distinct counters give distinct
    # 128-bit blocks; this checks that every integer reaches the counter.
    k0, k1 = seed_key(seed)
    gens = torch.tensor([g for g, _ in pairs]).view(-1, 1, 1, 1)
    params = torch.tensor([p for _, p in pairs]).view(-1, 1, 1, 1)
    j = (torch.arange(3).view(1, 1, 1, 3)) + torch.tensor([0, STREAM_B]).view(1, 1, 2, 1)
    k = torch.arange(2).view(1, 2, 1, 1)
    words = torch.stack(philox4x32(j, k, params, gens, k0, k1), dim=-1).reshape(-1, 4)
    assert torch.unique(words, dim=0).shape[0] == words.shape[0]


def test_a_model_over_many_generations_never_reuses_a_stream():
    # The first block of 100 parameters over 5,000 generations: 500,000 distinct blocks (noise
    # version 1 reused hundreds of CPU streams over 20,000 generations of such a model). Two
    # words suffice to tell them apart: equal 64-bit values by chance have probability ~1e-8.
    k0, k1 = seed_key(0)
    gens = torch.arange(5_000).view(-1, 1)
    params = torch.arange(100).view(1, -1)
    x0, x1, _, _ = philox4x32(torch.zeros(1, dtype=torch.int64), 0, params, gens, k0, k1)
    packed = ((x0 << 32) | x1).reshape(-1)
    assert torch.unique(packed).numel() == packed.numel()
    # The pair that collided in version 1: seed 0, parameter 0, generations 41598 and 114756.
    a = _noise((4, 4), 2, 2, seed=0, generation=41598, param_index=0)
    b = _noise((4, 4), 2, 2, seed=0, generation=114756, param_index=0)
    assert not torch.equal(a.a, b.a)


def test_generations_and_parameter_indices_beyond_32_bits_are_refused():
    with pytest.raises(ValueError, match="Invalid generation: 4294967296"):
        _noise((3,), 0, 2, generation=2**32)
    with pytest.raises(ValueError, match="Invalid param_index"):
        _noise((3,), 0, 2, param_index=2**32)


def test_drawing_noise_leaves_the_global_rng_untouched():
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    _noise((5, 4), 2, 8, seed=9)
    _noise((7,), 0, 8, seed=9)
    assert torch.equal(torch.get_rng_state(), before)


def test_optimizer_step_leaves_the_global_rng_untouched():
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3)
    opt = EggrollOptimizer(model.parameters(), pop_size=8, seed=3)
    x = torch.randn(4, 5)

    def closure(pop):
        return pop.forward(model, x, path="materialized").pow(2).mean(dim=(1, 2))

    before = torch.get_rng_state()
    opt.step(closure)
    opt.step(lambda: model(x).pow(2).mean())  # the sequential form too
    opt.population()
    assert torch.equal(torch.get_rng_state(), before)


# --------------------------------------------------------------------------- antithetic pairs
@given(
    shapes=st.lists(SHAPES, min_size=1, max_size=3),
    rank=st.integers(0, 5),
    pairs=st.integers(1, 6),
    seed=SEEDS,
)
def test_antithetic_partners_are_exact_negatives(shapes, rank, pairs, seed):
    params = [torch.zeros(s, dtype=torch.float32, requires_grad=True) for s in shapes]
    opt = EggrollOptimizer(params, rank=rank, pop_size=2 * pairs, sigma=0.3, seed=seed)
    pop = opt.population()
    assert pop.members.tolist() == list(range(2 * pairs))
    for p in params:
        pert = pop.perturbation(p)
        assert pert.shape == (2 * pairs, *p.shape)
        assert torch.equal(pert[0::2], -pert[1::2])
        # ... and every pair uses a different draw.
        if p.numel() > 1 and pairs > 1:
            assert not torch.equal(pert[0], pert[2])


def test_population_noise_uses_the_group_rank_and_parameter_index():
    w1, w2 = torch.zeros(6, 5, requires_grad=True), torch.zeros(6, 5, requires_grad=True)
    opt = EggrollOptimizer(
        [{"params": [w1], "rank": 2}, {"params": [w2], "rank": 3}], pop_size=6, seed=11
    )
    pop = opt.population()
    assert pop.noise(w1).a.shape == (3, 6, 2) and pop.noise(w2).a.shape == (3, 6, 3)
    ref = _noise((6, 5), 3, 3, seed=11, generation=0, param_index=1, dtype=torch.float32)
    assert torch.equal(pop.noise(w2).a, ref.a) and torch.equal(pop.noise(w2).b, ref.b)


# --------------------------------------------------------------------------- statistics
# Entry (i, j) of one low-rank draw is e = (1/sqrt r) * sum_l a_il b_jl with all a, b iid N(0,1).
#   E[e] = 0, E[e^2] = 1, E[e^4] = (r * E[(ab)^4] + 3 r (r-1)) / r^2 = (9r + 3r^2 - 3r)/r^2
#   = 3 + 6/r (so Var(e^2) = 2 + 6/r, not the Gaussian 2).
# Entries are uncorrelated, but not independent: two entries of one row share a_i, and given a_i
# they are independent N(0, |a_i|^2/r), so E[e_ij^2 e_ik^2] = E|a_i|^4 / r^2 = (r^2 + 2r)/r^2 and
# Cov(e_ij^2, e_ik^2) = 2/r (likewise along a column); entries sharing neither row nor column are
# independent. Hence, for the mean S of e^2 over the m*n entries of D independent draws,
#   Var(S) = (2 + 6/r + 2(n-1)/r + 2(m-1)/r) / (D m n) = (2 + (2m + 2n + 2)/r) / (D m n),
# far above the Gaussian 2/(D m n) when m or n is large and r small. For the sample mean M,
# uncorrelated unit-variance entries give Var(M) = 1/(D m n) exactly.
# Tails: M * sqrt(D m n) = (1/sqrt(D r)) * sum of D*r products U*V of independent N(0,1), whose
# fourth moment is 3 + 6/(D r); by Markov on the fourth power, P(|.| > 6) <= (3 + 6/(Dr))/6^4,
# under 0.3% for D*r >= 8. S is a mean of D iid per-draw terms (D >= 16 here), close to normal,
# and 6 standard errors leave it far inside Chebyshev's 1/36 even before that.
#
# Power: the tests below must notice noise whose variance is off by 5% (a factor scaled by
# 1.025, or the whole noise by 1.05 for twice that). With a tolerance of K_SE standard errors,
# a 5% shift is missed only if the statistic strays more than 0.05 - K_SE * se against it, which
# for se <= 0.05 / (K_SE + 3) is over 3 standard errors (probability < 0.2% for these near-normal
# means). So each test draws enough entries for se <= 0.05 / (K_SE + 3): M >= v * ((K_SE + 3) /
# 0.05)**2 entries for a statistic of per-entry variance v.
VARIANCE_ERROR = 0.05


def _draws_for(per_entry_variance: float, entries_per_draw: int) -> int:
    """Draws needed for the mean of squares to resolve a VARIANCE_ERROR shift (see above)."""
    needed = per_entry_variance * ((K_SE + 3) / VARIANCE_ERROR) ** 2
    return max(64, math.ceil(needed / entries_per_draw))


@settings(max_examples=25)
@given(
    m=st.integers(2, 16),
    n=st.integers(2, 16),
    rank=st.integers(1, 8),
    seed=SEEDS,
)
def test_low_rank_entries_have_mean_zero_and_unit_variance(m, n, rank, seed):
    v = 2 + (2 * m + 2 * n + 2) / rank  # D m n Var(S), see above
    draws = _draws_for(v, m * n)
    noise = _noise((m, n), rank, draws, seed=seed)
    e = noise.materialize()
    total = draws * m * n
    mean_se = math.sqrt(1.0 / total)
    var_se = math.sqrt(v / total)
    assert var_se <= VARIANCE_ERROR / (K_SE + 3)
    assert abs(float(e.mean())) <= K_SE * mean_se
    assert abs(float(e.pow(2).mean()) - 1.0) <= K_SE * var_se
    # The factors themselves are iid N(0, 1): Var(mean of squares) = 2/M for M entries.
    for f in (noise.a, noise.b):
        assert abs(float(f.pow(2).mean()) - 1.0) <= K_SE * math.sqrt(2.0 / f.numel())


@settings(max_examples=25)
@given(shape=SHAPES, seed=SEEDS)
def test_dense_entries_have_mean_zero_and_unit_variance(shape, seed):
    # iid N(0, 1): Var(mean) = 1/M, Var(mean of squares) = 2/M for M entries; both statistics are
    # close to normal at these M, so 6 standard errors fail with probability ~1e-9.
    numel = math.prod(shape)
    draws = _draws_for(2.0, numel)
    e = _noise(shape, 0, draws, seed=seed).dense
    total = e.numel()
    assert math.sqrt(2.0 / total) <= VARIANCE_ERROR / (K_SE + 3)
    assert abs(float(e.mean())) <= K_SE * math.sqrt(1.0 / total)
    assert abs(float(e.pow(2).mean()) - 1.0) <= K_SE * math.sqrt(2.0 / total)


def test_population_perturbations_have_variance_sigma_squared():
    # End to end through the optimizer: member perturbations of a matrix and a bias have entries
    # of variance sigma**2 (the scale the update assumes), to the same 5% resolution.
    m, n, rank, sigma = 8, 8, 4, 0.3
    v = 2 + (2 * m + 2 * n + 2) / rank
    pop_size = 2 * _draws_for(v, m * n)
    layer = torch.nn.Linear(n, m).double()
    opt = EggrollOptimizer(layer.parameters(), sigma=sigma, rank=rank, pop_size=pop_size, seed=1)
    population = opt.population()
    w = population.perturbation(layer.weight)[0::2]  # one member of each antithetic pair
    b = population.perturbation(layer.bias)[0::2]
    assert abs(float(w.pow(2).mean()) / sigma**2 - 1) <= K_SE * math.sqrt(v / w.numel())
    assert abs(float(b.pow(2).mean()) / sigma**2 - 1) <= K_SE * math.sqrt(2.0 / b.numel())


@given(
    m=st.integers(2, 16),
    n=st.integers(2, 16),
    rank=st.integers(0, 6),
    seed=SEEDS,
    gap=st.integers(1, 50),
)
def test_noise_of_different_parameters_is_uncorrelated(m, n, rank, seed, gap):
    # X, Y: the noise of parameters 0 and `gap` (same shape) over D draws, M = D m n entries.
    # E[x y] = 0, and Cov(x_i y_i, x_j y_j) = E[x_i x_j] E[y_i y_j] = 0 for i != j because the
    # entries of one field are uncorrelated, so Var(sum x y) = M and the sample correlation
    # sum(x y) / sqrt(sum x^2 sum y^2) has standard error 1/sqrt(M) (the denominator is M to
    # within the O(1/sqrt(M)) of the variance test).
    draws = 64
    x = _noise((m, n), rank, draws, seed=seed, param_index=0).materialize().flatten()
    y = _noise((m, n), rank, draws, seed=seed, param_index=gap).materialize().flatten()
    corr = float((x * y).sum() / torch.sqrt(x.pow(2).sum() * y.pow(2).sum()))
    assert abs(corr) <= K_SE / math.sqrt(x.numel())


@pytest.mark.parametrize("rank", [1, 4])
def test_draws_and_generations_are_uncorrelated(rank):
    # As above, between draw 0 and draw 1 of one generation, and between generation 0 and 1.
    m, n, draws = 16, 12, 32
    g0 = _noise((m, n), rank, draws, seed=5, generation=0).materialize()
    g1 = _noise((m, n), rank, draws, seed=5, generation=1).materialize()
    for x, y in [(g0[0::2], g0[1::2]), (g0, g1)]:
        x, y = x.flatten(), y.flatten()
        corr = float((x * y).sum() / torch.sqrt(x.pow(2).sum() * y.pow(2).sum()))
        assert abs(corr) <= K_SE / math.sqrt(x.numel())


def test_noise_dtype_follows_compute_dtype():
    for dtype, expected in [
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.float32),
        (torch.float32, torch.float32),
        (torch.float64, torch.float64),
    ]:
        p = torch.zeros(8, 6, dtype=dtype, requires_grad=True)
        opt = EggrollOptimizer([p], pop_size=4, seed=0)
        assert opt.population().noise(p).a.dtype == expected


# ------------------------------------------------------------------------ the two implementations
# The integer words agree bitwise; the float transform (float32 log, sqrt, cos, sin of each
# device's math library) to within FLOAT_TOLERANCE. Measured: the Triton interpreter (numpy) vs
# PyTorch on the CPU, and CUDA vs the CPU, differ by at most a few float32 ulps of the result
# (|z| < 5.8); see docs/noise.md for the figures.
FLOAT_TOLERANCE = 1e-5


NOISE_DEVICES = CPU_AND_CUDA


@pytest.mark.parametrize("device", NOISE_DEVICES)
def test_kernel_words_equal_the_reference_bitwise(triton_kernels, device):
    kernels = triton_kernels("_triton_noise", device)
    g = torch.Generator().manual_seed(0)
    counters = torch.randint(0, 2**32, (4, 1000), generator=g, dtype=torch.int64)
    counters[:, 0] = torch.tensor([0, 0, 0, 0])
    counters[:, 1] = 0xFFFFFFFF
    for k0, k1 in [(0, 0), (0xFFFFFFFF, 0xFFFFFFFF), (123, 2**31 + 7)]:
        ref = torch.stack(philox4x32(*counters, k0, k1))
        got = kernels.philox_words(counters.to(device), k0, k1).cpu()
        assert torch.equal(got, ref)


def _buffer_entries():  # type: ignore[no-untyped-def]
    from torcheggroll.noise_buffer import NoiseEntry

    return [
        NoiseEntry(0, torch.Size([6, 5]), 2),
        NoiseEntry(1, torch.Size([6]), 2),
        NoiseEntry(2, torch.Size([6, 5]), 2),  # same bucket as entry 0
        NoiseEntry(3, torch.Size([3, 2, 3]), 3),  # a conv kernel
        NoiseEntry(7, torch.Size([7]), 0),  # dense, size not a multiple of 4
        NoiseEntry(9, torch.Size([2, 3]), 0),  # rank 0: dense matrix
    ]


@pytest.mark.parametrize("device", NOISE_DEVICES)
@pytest.mark.parametrize("on_device", [False, True], ids=["host-counters", "device-counters"])
def test_kernel_fill_equals_the_reference(triton_kernels, device, on_device):
    from torcheggroll.noise_buffer import NoiseBuffer

    kernels = triton_kernels("_triton_noise", device)
    seed, generation = 2**40 + 7, 5
    ref = NoiseBuffer(_buffer_entries(), 3, torch.device("cpu"), torch.float32)
    ref.fill(seed, generation)
    buf = NoiseBuffer(_buffer_entries(), 3, torch.device(device), torch.float32)
    buf.buffer.fill_(float("nan"))  # every element must be written
    key: object = seed_key(seed)
    gen: object = generation
    if on_device:
        key, gen = torch.tensor(key, device=device), torch.tensor(generation, device=device)
    for region in buf._regions:
        kernels.fill_region(buf.buffer, region, key, gen)
    got = buf.buffer.cpu()
    assert torch.isfinite(got).all()
    err = (got - ref.buffer).abs().max().item()
    assert err <= FLOAT_TOLERANCE, err
    # ... and the views of both are the per-parameter definition.
    for e, noise in zip(_buffer_entries(), ref.noise, strict=True):
        single = _noise(
            e.shape,
            e.rank,
            3,
            seed=seed,
            generation=generation,
            param_index=e.index,
            dtype=torch.float32,
        )
        for x, y in zip(_tensors(noise), _tensors(single), strict=True):
            assert torch.equal(x, y)


@pytest.mark.cuda
def test_cuda_and_cpu_draw_the_same_noise():
    """A run can move between devices: the optimizer's noise on CUDA (Triton kernels) and on
    the CPU (PyTorch) agree to the float tolerance, and the PyTorch reference on CUDA too."""
    if not torch.cuda.is_available():
        pytest.skip("CUDA is not available")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.ReLU(), torch.nn.Linear(48, 5))
    opt = EggrollOptimizer(model.parameters(), pop_size=64, rank=3, seed=2**33 + 1)
    cpu = {id(p): opt.population().noise(p) for p in model.parameters()}
    cpu = {k: [t.clone() for t in _tensors(v)] for k, v in cpu.items()}
    model.cuda()
    opt_cuda = EggrollOptimizer(model.parameters(), pop_size=64, rank=3, seed=2**33 + 1)
    pop = opt_cuda.population()
    worst = 0.0
    for p in model.parameters():
        for x, y in zip(_tensors(pop.noise(p)), cpu[id(p)], strict=True):
            worst = max(worst, (x.cpu() - y).abs().max().item())
    assert worst <= FLOAT_TOLERANCE, worst
    ref = _noise((48, 64), 3, 32, seed=2**33 + 1, param_index=0, dtype=torch.float32)
    on_cuda = draw_noise(
        (48, 64),
        3,
        32,
        seed=2**33 + 1,
        generation=0,
        param_index=0,
        device="cuda",
        dtype=torch.float32,
    )
    assert (on_cuda.a.cpu() - ref.a).abs().max().item() <= FLOAT_TOLERANCE
    print(f"largest CPU/CUDA difference of the noise: {worst:.3g}")


def test_a_side_no_larger_than_the_rank_gets_dense_noise():
    # (1, 1, D) class tokens, (1, T, D) position tables and narrow matrices: factors would be no
    # smaller than the tensor, so the optimizer draws them dense (and they are used as they are
    # by every operation, never through a fallback).
    params = {
        "cls": torch.zeros(1, 1, 16, requires_grad=True),
        "pos": torch.zeros(1, 5, 16, requires_grad=True),
        "narrow": torch.zeros(3, 16, requires_grad=True),
        "wide": torch.zeros(8, 16, requires_grad=True),
    }
    opt = EggrollOptimizer(list(params.values()), rank=3, pop_size=4, seed=0)
    pop = opt.population()
    kinds = {k: pop.noise(p).is_low_rank for k, p in params.items()}
    assert kinds == {"cls": False, "pos": False, "narrow": False, "wide": True}
