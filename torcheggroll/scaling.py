"""Width-aware perturbation scales: one ``sigma`` for layers of any width.

With a per-entry ``sigma``, a matrix layer's output moves by about ``sigma * sqrt(fan_in)``
times its input's RMS when its weight is perturbed, so a ``sigma`` tuned at width 32 swamps the
signal at width 256. ``sigma_scaling="fan_in"`` divides the perturbation of each matrix by
``sqrt(fan_in)`` (as muP scales learning rates with width; Yang et al., "Tensor Programs V",
arXiv:2203.03466): ``sigma`` then sets how much every layer's *output* moves, whatever its
width. The update is made of the same perturbations, so it scales alike.

Per tensor kind (``shape`` of the parameter):

=====================================  ===================  =========================
kind                                   ``"fan_in"`` scale    ``"fan_in_rows"`` scale
=====================================  ===================  =========================
matrix ``(out, in)`` (``nn.Linear``)    ``1/sqrt(in)``        ``1/sqrt(out)``
conv kernel ``(out, in, *k)``          ``1/sqrt(in * prod(k))``  ``1/sqrt(out)``
vector, scalar (bias, norm weight)      1                     1
=====================================  ===================  =========================

``"fan_in_rows"`` is for weights stored as ``(in, out)`` (Hugging Face's GPT-2 ``Conv1D``).
Embedding tables are looked up, not multiplied: their rows are the layer's output, so they keep
``"none"`` (:func:`width_scaled_groups` sorts a model's parameters accordingly).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

__all__ = ["SIGMA_SCALINGS", "sigma_scale", "width_scaled_groups"]

SIGMA_SCALINGS = ("none", "fan_in", "fan_in_rows")


def sigma_scale(shape: torch.Size | tuple[int, ...], scaling: str) -> float:
    """The factor on ``sigma`` of a parameter of this shape (see the module doc)."""
    if scaling == "none" or len(shape) < 2:
        return 1.0
    fan_in = int(shape[0]) if scaling == "fan_in_rows" else math.prod(int(s) for s in shape[1:])
    return 1.0 / math.sqrt(max(fan_in, 1))


def width_scaled_groups(model: nn.Module, **settings: Any) -> list[dict[str, Any]]:
    """``model``'s parameters as param groups with ``sigma_scaling`` set per kind of layer.

    Embedding tables (``nn.Embedding``, ``nn.EmbeddingBag``) get ``"none"``; weights stored as
    ``(in, out)`` (a module whose class is named ``Conv1D``, as in Hugging Face transformers)
    get ``"fan_in_rows"``; every other parameter ``"fan_in"``. ``settings`` (``lr``, ``sigma``,
    ``rank`` ...) go into every group. Tied parameters appear once, in the first group that
    meets them.
    """
    kinds: dict[int, str] = {}
    tensors: dict[int, torch.Tensor] = {}
    for module in model.modules():
        kind = "fan_in"
        if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
            kind = "none"
        elif type(module).__name__ == "Conv1D":
            kind = "fan_in_rows"
        for p in module.parameters(recurse=False):
            if id(p) not in kinds:
                kinds[id(p)] = kind
                tensors[id(p)] = p
    groups: dict[str, list[torch.Tensor]] = {}
    for pid, kind in kinds.items():
        groups.setdefault(kind, []).append(tensors[pid])
    return [
        {"params": params, "sigma_scaling": kind, **settings} for kind, params in groups.items()
    ]


def scales(params: Iterable[tuple[torch.Tensor, str]]) -> list[float]:
    """Factors of ``(param, scaling)`` pairs."""
    return [sigma_scale(p.shape, s) for p, s in params]
