"""The devices that tests parametrized over devices run on: the CPU always, CUDA as a ``cuda``
test (skipped in CI and where no GPU is present; run on the device with ``-m cuda``)."""

from __future__ import annotations

import pytest
import torch

CPU_AND_CUDA = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.cuda,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
        ],
    ),
]
