"""Tiny Hugging Face models for the tests, built from configs (random weights, no download).
``transformers`` is imported when a model is built, so that importing this module needs none."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

# Llama, Qwen2, Mistral and their kin take these fields (grouped-query attention: 4 heads, 2 KV
# heads).
DECODER_CONFIG: dict[str, Any] = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


def built(model: str, config: str, **kw: Any) -> Callable[[], nn.Module]:
    """A factory of ``transformers.<model>(transformers.<config>(**kw))``."""

    def make() -> nn.Module:
        import transformers

        return getattr(transformers, model)(getattr(transformers, config)(**kw))  # type: ignore[no-any-return]

    return make


def tiny(model: str, config: str, **kw: Any) -> nn.Module:
    """``built(model, config, **kw)()`` after ``torch.manual_seed(0)``, float64, in eval mode."""
    torch.manual_seed(0)
    return built(model, config, **kw)().double().eval()
