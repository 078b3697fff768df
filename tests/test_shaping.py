"""Fitness shaping and the non-finite loss policy (torcheggroll/shaping.py)."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from torcheggroll.shaping import (
    SHAPINGS,
    NonFiniteLossWarning,
    centered,
    centered_rank,
    mask_nonfinite,
    raw,
    shape_losses,
    warn_nonfinite,
    zscore,
)

FINITE = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False)
LOSSES = st.lists(FINITE, min_size=2, max_size=40).map(
    lambda v: torch.tensor(v, dtype=torch.float64)
)


@given(losses=LOSSES)
def test_zscore_is_standardized_or_centred(losses):
    z = zscore(losses)
    assert z.shape == losses.shape
    std = losses.std(unbiased=True)
    if std > 1e-8:
        torch.testing.assert_close(z.mean(), torch.tensor(0.0, dtype=z.dtype), atol=1e-9, rtol=0)
        torch.testing.assert_close(z.std(unbiased=True), torch.tensor(1.0, dtype=z.dtype))
        torch.testing.assert_close(z, (losses - losses.mean()) / std)
    else:
        assert torch.equal(z, losses - losses.mean())


@given(losses=LOSSES, scale=st.floats(1e-3, 1e3), shift=FINITE)
def test_zscore_ignores_positive_affine_maps(losses, scale, shift):
    assume(losses.std() >= 1e-3)
    torch.testing.assert_close(zscore(losses * scale + shift), zscore(losses), atol=1e-6, rtol=1e-6)


def test_zscore_of_constant_losses_is_zero():
    assert torch.equal(zscore(torch.full((6,), 3.5)), torch.zeros(6))


@given(losses=LOSSES)
def test_centered_rank_is_a_rank_map_onto_minus_half_half(losses):
    s = centered_rank(losses)
    n = losses.numel()
    # Without ties: a permutation of the evenly spaced values -0.5, ..., 0.5, ordered like the
    # losses. With ties, each tied group takes the mean of the values it spans.
    expected = torch.arange(n, dtype=torch.float64) / (n - 1) - 0.5
    ordered = losses.sort().values
    for i in range(n):
        tied = (ordered == losses[i]).nonzero().flatten()
        assert s[i].item() == pytest.approx(expected[tied].mean().item(), abs=1e-12)
    torch.testing.assert_close(s.sum(), torch.tensor(0.0, dtype=s.dtype), atol=1e-9, rtol=0)


@given(losses=LOSSES)
def test_centered_rank_only_sees_the_order(losses):
    # A strictly increasing, non-affine map that is exact in floating point (scaling by powers
    # of two) keeps every rank, ties included.
    warped = torch.where(losses > 0, losses * 4, losses / 2)
    assert torch.equal(centered_rank(warped), centered_rank(losses))


def test_centered_rank_gives_ties_the_same_weight():
    s = centered_rank(torch.tensor([1.0, 0.0, 1.0, 0.0]))
    assert s.tolist() == pytest.approx([1 / 3, -1 / 3, 1 / 3, -1 / 3])
    assert torch.equal(centered_rank(torch.full((7,), 2.5)), torch.zeros(7))
    s = centered_rank(torch.tensor([3.0, 1.0, 2.0, 1.0, 5.0]))
    assert s.tolist() == pytest.approx([0.25, -0.375, 0.0, -0.375, 0.5])


def test_centered_rank_on_a_flat_loss_never_moves_the_weights():
    # A flat landscape gives every member the same loss: the update must be zero, not a random
    # walk driven by member indices.
    from torcheggroll import EggrollOptimizer

    w = torch.nn.Parameter(torch.zeros(3, 4))
    opt = EggrollOptimizer([w], lr=1.0, sigma=0.1, pop_size=8, shaping="centered_rank", seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # identical losses warn, rightly
        for _ in range(20):
            opt.step(lambda pop: torch.ones(len(pop)))
    assert torch.equal(w.detach(), torch.zeros(3, 4))


@given(losses=LOSSES)
def test_centered_and_raw(losses):
    c = centered(losses)
    torch.testing.assert_close(c, losses - losses.mean())
    r = raw(losses)
    assert torch.equal(r, losses)
    r[0] += 1  # a copy: shaping never aliases the optimizer's loss record
    assert not torch.equal(r, losses)


@pytest.mark.parametrize("name", sorted(SHAPINGS))
def test_shape_losses_dispatches_by_name(name):
    losses = torch.tensor([3.0, -1.0, 2.0, 0.5])
    assert torch.equal(shape_losses(losses, name), SHAPINGS[name](losses))


def test_shape_losses_rejects_unknown_names():
    with pytest.raises(ValueError, match=r"Invalid shaping: 'rank'"):
        shape_losses(torch.zeros(4), "rank")


@given(
    values=st.lists(
        st.one_of(FINITE, st.sampled_from([float("nan"), float("inf"), float("-inf")])),
        min_size=1,
        max_size=20,
    )
)
def test_mask_nonfinite_makes_bad_members_the_worst(values):
    losses = torch.tensor(values, dtype=torch.float64)
    finite = torch.isfinite(losses)
    clean, bad = mask_nonfinite(losses)
    assert bad.dim() == 0 and bad.dtype == torch.int64 and int(bad) == int((~finite).sum())
    assert torch.equal(clean[finite], losses[finite])
    if finite.any():
        assert torch.isfinite(clean).all()
        assert torch.all(clean[~finite] == losses[finite].max())
    # the input is untouched
    torch.testing.assert_close(
        losses, torch.tensor(values, dtype=torch.float64), equal_nan=True, atol=0, rtol=0
    )


def test_warn_nonfinite_says_how_many_and_whether_the_update_was_skipped():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warn_nonfinite(2, 8)
        warn_nonfinite(8, 8)
    assert [w.category for w in caught] == [NonFiniteLossWarning, NonFiniteLossWarning]
    assert "2 of 8" in str(caught[0].message) and "skipped" not in str(caught[0].message)
    assert "skipped" in str(caught[1].message)
    assert issubclass(NonFiniteLossWarning, RuntimeWarning)
