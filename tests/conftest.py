"""Shared test settings: deterministic hypothesis runs and the population forward path."""

from __future__ import annotations

import importlib.util

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

# The low-rank population forward (torcheggroll/lowrank.py) is the default path when present;
# the materialized reference path works without it.
FORWARD_PATH = "auto" if importlib.util.find_spec("torcheggroll.lowrank") else "materialized"


@pytest.fixture(autouse=True)
def _fresh_threads() -> None:
    # Two shared cores: more intra-op threads than that only adds contention.
    torch.set_num_threads(min(2, torch.get_num_threads()))
