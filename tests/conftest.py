"""Shared test settings: deterministic hypothesis runs and the population forward path."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# Derandomized: the examples are a fixed function of the test, so a statistical tolerance that
# holds once holds on every run and CI cannot flake. deadline=None: first calls pay for imports.
settings.register_profile(
    "torcheggroll",
    derandomize=True,
    deadline=None,
    max_examples=25,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("torcheggroll")

# Without a GPU, run the fused Triton kernels in Triton's CPU interpreter (float16 only), so the
# suite checks them too. Triton reads this when it is first imported, so it is set here, before
# any test imports it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# On a GPU, compile one configuration per kernel rather than autotune each of the suite's many
# small shapes (benchmarks/correction_kernels.py checks the autotuned kernels).
os.environ.setdefault("TORCHEGGROLL_AUTOTUNE", "0")


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    # The tests use tiny tensors, for which intra-op threads only add synchronization; on a
    # busy 2-core machine two spinning OpenMP threads made a step 30x slower than one thread.
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def triton_kernels():  # type: ignore[no-untyped-def]
    """``load(name, device, needs_fused=False)``: the kernel module ``torcheggroll.<name>`` for
    tests that call it on ``device``, or skip: no Triton, no CUDA for ``"cuda"``, Triton's
    interpreter off for ``"cpu"``, or (``needs_fused``: tests that reach the kernels through the
    optimizer) ``TORCHEGGROLL_FUSED=0``."""
    import importlib
    import importlib.util

    def load(name: str, device: str, needs_fused: bool = False):  # type: ignore[no-untyped-def]
        if importlib.util.find_spec("triton") is None:
            pytest.skip("Triton is not installed")
        if device == "cuda" and not torch.cuda.is_available():
            pytest.skip("CUDA is not available")
        if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("Triton's interpreter is off (TRITON_INTERPRET is not 1)")
        if needs_fused and os.environ.get("TORCHEGGROLL_FUSED") == "0":
            pytest.skip("the kernels are off (TORCHEGGROLL_FUSED=0)")
        return importlib.import_module(f"torcheggroll.{name}")

    return load
