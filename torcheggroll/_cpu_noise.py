"""The CPU noise kernel: ``_cpu_noise.c`` compiled at first use and called through ctypes.

The PyTorch reference of :mod:`torcheggroll.noise` spends about 150 whole-tensor operations per
refill (Philox's 32-bit products done in int64 pieces), which on the CPU costs far more than the
arithmetic: a model of many small layers spent most of its step drawing noise. The C version
runs the same definition in one pass over the buffer, vectorized by the compiler, about 8x
faster (``benchmarks/step_graph.py --preset cpu``). The integer words are bitwise those of the
reference; the normals agree to a few units in the last place (libmvec's ``logf``, ``sinf``,
``cosf`` against PyTorch's), within the tolerance the tests state.

The shared library is built once per source, compiler flags and CPU capability, into
``$TORCHEGGROLL_CACHE_DIR`` (default ``~/.cache/torcheggroll``). Without a C compiler, on a
failed build, or with ``TORCHEGGROLL_CPU_KERNEL=0``, :func:`load` returns None and the reference
runs instead: the noise is the same either way, only slower.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

__all__ = ["CpuNoiseKernel", "cache_dir", "load"]

_SOURCE = Path(__file__).with_name("_cpu_noise.c")
_I64 = ctypes.c_int64
_U32 = ctypes.c_uint32
_PTR = ctypes.c_void_p


def cache_dir() -> Path:
    """Where the compiled kernel is kept: ``$TORCHEGGROLL_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/torcheggroll`` (``~/.cache/torcheggroll``)."""
    env = os.environ.get("TORCHEGGROLL_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "torcheggroll"


def _flags() -> tuple[list[str], list[str]]:
    """Compile flags and link libraries for this machine."""
    compile_flags = ["-O3", "-ffast-math", "-fPIC", "-std=c99"]
    libs = ["-lm"]
    if platform.machine() in ("x86_64", "AMD64"):
        capability = torch.backends.cpu.get_cpu_capability()
        if capability in ("AVX2", "AVX512"):
            compile_flags += ["-mavx2", "-mfma"]
        if capability == "AVX512":  # 64-bit products in one instruction, AVX-512 libmvec
            compile_flags += ["-mavx512f", "-mavx512dq", "-mavx512vl"]
        if platform.system() == "Linux":
            libs.insert(0, "-lmvec")  # glibc's vector logf/sinf/cosf
    return compile_flags, libs


def _build(compiler: str) -> Path:
    compile_flags, libs = _flags()
    source = _SOURCE.read_bytes()
    version = subprocess.run(
        [compiler, "--version"], capture_output=True, text=True, timeout=30
    ).stdout.splitlines()[:1]
    machine = [platform.machine(), *platform.libc_ver(), *version]
    tag = hashlib.sha256(
        source + " ".join([compiler, *compile_flags, *libs, *machine]).encode()
    ).hexdigest()[:16]
    target = cache_dir() / f"cpu_noise_{tag}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        obj, lib = Path(tmp) / "k.o", Path(tmp) / "k.so"
        run = functools.partial(subprocess.run, check=True, capture_output=True, timeout=120)
        run([compiler, *compile_flags, "-c", str(_SOURCE), "-o", str(obj)])
        # Linked without -ffast-math: that would add crtfastmath.o (flush-to-zero on load).
        run([compiler, "-shared", str(obj), "-o", str(lib), *libs])
        os.replace(lib, target)  # atomic: a concurrent build of the same tag is harmless
    return target


class CpuNoiseKernel:
    """The compiled functions, taking tensors (contiguous, on the CPU)."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self._grid = lib.egg_fill_grid
        self._grid.argtypes = [_PTR, _I64, _I64, _I64, _U32, _PTR, _U32, _U32, _U32]
        self._columns = lib.egg_fill_columns
        self._columns.argtypes = [_PTR, _I64, _I64, _PTR, _PTR, _U32, _U32, _U32]
        self._words = lib.egg_words
        self._words.argtypes = [_PTR, _PTR, _PTR, _I64, _U32, _U32, _U32, _PTR]
        for fn in (self._grid, self._columns, self._words):
            fn.restype = None

    def fill_grid(
        self,
        out: torch.Tensor,
        draws: int,
        blocks: int,
        c0_base: int,
        params: torch.Tensor,
        generation: int,
        key: tuple[int, int],
    ) -> None:
        """Normals of a low-rank region into ``out`` (float32, ``rows * draws * blocks * 4``):
        block ``(p, k, j)`` has counter ``(j + c0_base, k, params[p], generation)``."""
        params = _int64(params)
        _check_out(out, params.numel() * draws * blocks * 4)
        self._grid(
            out.data_ptr(), params.numel(), draws, blocks, c0_base, params.data_ptr(),
            generation, *key,
        )  # fmt: skip

    def fill_columns(
        self,
        out: torch.Tensor,
        draws: int,
        local: torch.Tensor,
        owners: torch.Tensor,
        generation: int,
        key: tuple[int, int],
    ) -> None:
        """Normals of the dense region into ``out`` (float32, ``draws * C * 4``): block
        ``(k, c)`` has counter ``(local[c], k, owners[c], generation)``."""
        local, owners = _int64(local), _int64(owners)
        if owners.numel() != local.numel():
            raise ValueError(
                f"Invalid owners: {owners.numel()} entries for {local.numel()} columns"
            )
        _check_out(out, draws * local.numel() * 4)
        self._columns(
            out.data_ptr(), draws, local.numel(), local.data_ptr(), owners.data_ptr(),
            generation, *key,
        )  # fmt: skip

    def words(
        self,
        c0: torch.Tensor,
        c1: torch.Tensor,
        c2: torch.Tensor,
        c3: int,
        key: tuple[int, int],
    ) -> torch.Tensor:
        """``(n, 4)`` int64 Philox words of the counters ``(c0[i], c1[i], c2[i], c3)``."""
        c0, c1, c2 = (_int64(c.reshape(-1)) for c in (c0, c1, c2))
        n = c0.numel()
        if c1.numel() != n or c2.numel() != n:
            raise ValueError(f"Invalid counters: {n}, {c1.numel()}, {c2.numel()} entries")
        out = torch.empty(n, 4, dtype=torch.int64)
        self._words(c0.data_ptr(), c1.data_ptr(), c2.data_ptr(), n, c3, *key, out.data_ptr())
        return out


def _check_out(out: torch.Tensor, numel: int) -> None:
    """The kernel writes ``numel`` float32 values at ``out.data_ptr()``: check that it may."""
    if (
        out.device.type != "cpu"
        or out.dtype != torch.float32
        or not out.is_contiguous()
        or out.numel() != numel
    ):
        raise ValueError(
            f"Invalid out: expected a contiguous float32 CPU tensor of {numel} elements, got "
            f"{out.dtype} of {out.numel()} on {out.device} (contiguous: {out.is_contiguous()})"
        )


def _int64(t: torch.Tensor) -> torch.Tensor:
    return t.to(device="cpu", dtype=torch.int64).contiguous()


@functools.lru_cache(maxsize=1)
def load() -> CpuNoiseKernel | None:
    """The kernel, built on first use; None when ``TORCHEGGROLL_CPU_KERNEL=0``, without a C
    compiler (``$CC``, ``cc`` or ``gcc``), or when building or loading it fails."""
    if os.environ.get("TORCHEGGROLL_CPU_KERNEL", "1") == "0":
        return None
    compiler = next((c for c in (os.environ.get("CC"), "cc", "gcc") if c and shutil.which(c)), None)
    if compiler is None:
        return None
    try:
        return CpuNoiseKernel(ctypes.CDLL(str(_build(compiler))))
    except (OSError, RuntimeError, subprocess.SubprocessError, AttributeError) as exc:
        warnings.warn(
            f"torcheggroll: the CPU noise kernel could not be built with {compiler!r} "
            f"({type(exc).__name__}: {str(exc)[:200]}); the PyTorch reference draws the noise "
            "instead (slower; its normals differ from the kernel's by rounding, so processes of "
            "one distributed run should all have the kernel or none)",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
