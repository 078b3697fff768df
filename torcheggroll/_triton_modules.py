"""Where the package's Triton kernels are looked up: each kernel module is imported on first use
and is None where Triton cannot be imported; ``TORCHEGGROLL_FUSED=0`` turns them all off."""

from __future__ import annotations

import functools
import importlib
import os
from typing import Any

__all__ = ["fused_enabled", "triton_module"]


def fused_enabled() -> bool:
    """Whether the Triton kernels may be used (``TORCHEGGROLL_FUSED`` is not ``0``; read at
    every call)."""
    return os.environ.get("TORCHEGGROLL_FUSED", "1") != "0"


@functools.cache
def triton_module(name: str) -> Any:
    """The kernel module ``torcheggroll.<name>``, or None where Triton cannot be imported."""
    try:
        return importlib.import_module(f"{__package__}.{name}")
    except ImportError:
        return None
