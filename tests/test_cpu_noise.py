"""The compiled CPU noise kernel (torcheggroll/_cpu_noise.c) against the PyTorch reference of
torcheggroll.noise, its cache, and its fallbacks."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from torcheggroll import EggrollOptimizer, _cpu_noise
from torcheggroll.noise import STREAM_B, block_normals, philox4x32, seed_key
from torcheggroll.noise_buffer import NoiseBuffer, NoiseEntry

# Same bound as tests/test_noise.py: 4 float32 ulps of the largest |z| (5.77).
TOLERANCE = 2e-6


@pytest.fixture(scope="module")
def kernel():
    k = _cpu_noise.load()
    if k is None:
        pytest.skip("no C compiler here: the CPU noise runs the PyTorch reference")
    return k


def _entries() -> list[NoiseEntry]:
    return [
        NoiseEntry(0, torch.Size([16, 16]), 4),
        NoiseEntry(1, torch.Size([16]), 4),
        NoiseEntry(2, torch.Size([16, 16]), 4),  # the same bucket as entry 0
        NoiseEntry(5, torch.Size([3, 2, 3]), 3),  # a conv kernel
        NoiseEntry(7, torch.Size([7]), 0),  # dense, not a multiple of 4
        NoiseEntry(2**32 - 1, torch.Size([9, 40]), 1),  # the largest parameter index
    ]


def _reference_fill(buf: NoiseBuffer, seed: int, generation: int) -> torch.Tensor:
    out = torch.empty_like(buf.buffer)
    saved = buf.buffer
    buf.buffer = out
    try:
        for region in buf._regions:
            buf._fill_reference(region, seed_key(seed), generation)
    finally:
        buf.buffer = saved
    return out


def test_words_equal_the_reference_bitwise(kernel):
    g = torch.Generator().manual_seed(0)
    c = torch.randint(0, 2**32, (3, 5000), generator=g, dtype=torch.int64)
    c[:, 0] = 0
    c[:, 1] = 2**32 - 1
    for c3, key in [(0, (0, 0)), (2**32 - 1, (2**32 - 1, 2**32 - 1)), (77, (123, 2**31 + 7))]:
        ref = torch.stack(philox4x32(c[0], c[1], c[2], c3, *key), dim=-1)
        assert torch.equal(kernel.words(c[0], c[1], c[2], c3, key), ref)


def test_known_answer_vector(kernel):
    # Random123's kat_vectors: counter (0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344) under
    # key (0xa4093822, 0x299f31d0).
    words = kernel.words(
        torch.tensor([0x243F6A88]),
        torch.tensor([0x85A308D3]),
        torch.tensor([0x13198A2E]),
        0x03707344,
        (0xA4093822, 0x299F31D0),
    )
    assert [int(w) for w in words[0]] == [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("draws", [1, 3, 300])  # 300: regions longer than one tile of blocks
def test_fill_equals_the_reference(kernel, dtype, draws):
    seed, generation = 2**40 + 7, 2**32 - 1
    buf = NoiseBuffer(_entries(), draws, torch.device("cpu"), dtype)
    buf.buffer.fill_(float("nan"))  # every element must be written
    buf.fill(seed, generation)
    assert torch.isfinite(buf.buffer).all()
    ref = _reference_fill(buf, seed, generation)
    err = (buf.buffer - ref).abs().max().item()
    assert err <= TOLERANCE, err
    assert err > 0 or dtype == torch.float64 or draws == 1  # the reference really ran


def test_normals_do_not_depend_on_the_layout(kernel):
    # A parameter's noise is the same whether it is the buffer's only entry or sits among others
    # (blocks fall at different places in the kernel's tiles).
    seed, generation = 5, 3
    alone = NoiseBuffer(
        [NoiseEntry(2, torch.Size([16, 16]), 4)], 37, torch.device("cpu"), torch.float32
    )
    among = NoiseBuffer(_entries(), 37, torch.device("cpu"), torch.float32)
    alone.fill(seed, generation)
    among.fill(seed, generation)
    assert torch.equal(alone.noise[0].a, among.noise[2].a)
    assert torch.equal(alone.noise[0].b, among.noise[2].b)


def test_stream_counters_of_a_grid(kernel):
    # Block (p, k, j) of a grid is the counter (j + c0_base, k, params[p], generation).
    params = torch.tensor([3, 9])
    draws, blocks, gen, key = 2, 5, 11, (1, 2)
    out = torch.empty(2 * draws * blocks * 4)
    kernel.fill_grid(out, draws, blocks, STREAM_B, params, gen, key)
    j = torch.arange(blocks).view(1, 1, -1) + STREAM_B
    k = torch.arange(draws).view(1, -1, 1)
    ref = block_normals(philox4x32(j, k, params.view(-1, 1, 1), gen, *key))
    torch.testing.assert_close(out.view(2, draws, blocks, 4), ref, rtol=0, atol=TOLERANCE)


def test_loading_does_not_flush_denormals():
    # Linked with -ffast-math, the library would bring crtfastmath.o, which switches the process
    # to flush-to-zero when it is loaded. A fresh interpreter, so nothing else set the mode.
    code = (
        "import torch\n"
        "from torcheggroll import _cpu_noise\n"
        "assert _cpu_noise.load() is not None\n"
        "x = torch.tensor([1e-38]) / 100\n"
        "print(float(x))\n"
    )
    kernel = _cpu_noise.load()
    if kernel is None:
        pytest.skip("no C compiler here")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert float(out.stdout) > 0


def test_disabled_or_failing_build_falls_back_to_the_reference(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCHEGGROLL_CACHE_DIR", str(tmp_path))
    _cpu_noise.load.cache_clear()
    try:
        monkeypatch.setenv("TORCHEGGROLL_CPU_KERNEL", "0")
        assert _cpu_noise.load() is None
        monkeypatch.delenv("TORCHEGGROLL_CPU_KERNEL")
        _cpu_noise.load.cache_clear()
        broken = tmp_path / "broken.c"
        broken.write_text("this is not C\n")
        monkeypatch.setattr(_cpu_noise, "_SOURCE", broken)
        with pytest.warns(RuntimeWarning, match="could not be built"):
            assert _cpu_noise.load() is None
        # The optimizer still steps, on the reference noise.
        w = torch.nn.Parameter(torch.ones(4, 3))
        opt = EggrollOptimizer([w], lr=0.1, sigma=0.1, rank=1, pop_size=4, seed=0)
        opt.step(lambda pop: torch.arange(4.0))
        assert not torch.equal(w, torch.ones(4, 3))
    finally:
        _cpu_noise.load.cache_clear()


def test_build_is_cached(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCHEGGROLL_CACHE_DIR", str(tmp_path))
    _cpu_noise.load.cache_clear()
    try:
        if _cpu_noise.load() is None:
            pytest.skip("no C compiler here")
        (lib,) = tmp_path.glob("cpu_noise_*.so")
        stamp = lib.stat().st_mtime_ns
        _cpu_noise.load.cache_clear()
        assert _cpu_noise.load() is not None
        assert lib.stat().st_mtime_ns == stamp  # loaded, not built again
        assert [p.name for p in tmp_path.iterdir()] == [lib.name]  # no temporaries left
    finally:
        _cpu_noise.load.cache_clear()


def test_per_parameter_draws_use_the_kernel_within_the_tolerance(kernel):
    from torcheggroll.noise import _stream

    args = (37, 9, 1, 2**32 - 3, 12, seed_key(2**63 + 5), "cpu")
    fast, ref = _stream(*args), _stream(*args, reference=True)
    assert fast.shape == ref.shape == (9, 37)
    err = (fast - ref).abs().max().item()
    assert 0 < err <= TOLERANCE, err  # 0 would mean both ran the same code


def test_kernel_refuses_an_output_it_cannot_write(kernel):
    params = torch.tensor([0])
    for bad in (torch.empty(31), torch.empty(32, dtype=torch.float64), torch.empty(64)[::2]):
        with pytest.raises(ValueError, match="Invalid out"):
            kernel.fill_grid(bad, 2, 4, 0, params, 0, (0, 0))
