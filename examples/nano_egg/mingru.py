"""Byte-level minGRU language models for the nano_egg example: a float one and an int8 one.

minGRU (Feng et al., "Were RNNs All We Needed?", arXiv:2410.01201) drops the hidden state from
the gates of a GRU::

    z_t = sigmoid(W_z x_t),  h~_t = W_h x_t,  h_t = (1 - z_t) * h_{t-1} + z_t * h~_t

so every matrix product of a layer runs over the whole sequence at once (one GEMM, which the
low-rank population forward evaluates in factored form) and only an elementwise linear
recurrence is left to run step by step. A 0 byte marks the start of a document and resets the
state before it is read.

Both models map ``tokens`` of shape ``(batch, seq)`` (int64 bytes) to logits ``(batch, seq, 256)``
and are written for one population member: ``population.forward`` vmaps them over members.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

VOCAB = 256


def linear_scan(decay: torch.Tensor, inp: torch.Tensor) -> torch.Tensor:
    """``h_t = decay_t * h_{t-1} + inp_t`` with ``h_{-1} = 0`` along dim ``-2``.

    Args:
        decay, inp: ``(..., seq, d)``.

    Returns:
        ``(..., seq, d)`` the states ``h_t``.
    """
    h = torch.zeros_like(inp[..., 0, :])
    out = []
    for t in range(inp.shape[-2]):
        h = decay[..., t, :] * h + inp[..., t, :]
        out.append(h)
    return torch.stack(out, dim=-2)


# ---------------------------------------------------------------------------- float model
class MinGRU(nn.Module):
    """One minGRU mixer: ``(..., seq, d) -> (..., seq, d)``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, 2 * dim)  # gate pre-activation and candidate, one GEMM

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """``keep``: ``(..., seq, 1)``, 0 where the state resets (a document starts)."""
        gate, cand = self.proj(x).chunk(2, dim=-1)
        z = torch.sigmoid(gate)
        return linear_scan((1 - z) * keep, z * cand)


class FloatBlock(nn.Module):
    """Pre-norm residual block: ``x + minGRU(LN(x))``, then ``x + MLP(LN(x))`` (4x, GELU)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.mix = MinGRU(dim)
        self.up = nn.Linear(dim, 4 * dim)
        self.down = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        d = x.shape[-1]
        x = x + self.mix(F.layer_norm(x, (d,)), keep)
        return x + self.down(F.gelu(self.up(F.layer_norm(x, (d,)))))


class FloatMinGRULM(nn.Module):
    """Float byte-level minGRU LM: embedding, ``n_layers`` blocks, LayerNorm, linear head."""

    def __init__(self, hidden_dim: int = 32, n_layers: int = 1) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, hidden_dim)
        self.blocks = nn.ModuleList(FloatBlock(hidden_dim) for _ in range(n_layers))
        self.head = nn.Linear(hidden_dim, VOCAB)
        nn.init.zeros_(self.head.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(batch, seq)`` int64 -> ``(batch, seq, 256)`` logits."""
        keep = (tokens != 0).unsqueeze(-1).to(self.embed.weight.dtype)
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x, keep)
        return self.head(F.layer_norm(x, (x.shape[-1],)))


# ---------------------------------------------------------------------------- int8 model
# Fixed point: an int8 activation or weight q stands for q / 2**FRAC, so 16 means 1.0.
FRAC = 4
QMAX = 127
# A float32 GEMM of integers is exact while every partial sum stays below 2**24 in magnitude:
# |sum_k x_k w_k| <= K * 127 * 127 < 2**24 holds for K <= 1040.
MAX_EXACT_K = (1 << 24) // (QMAX * QMAX)


def quantize(w: torch.Tensor) -> torch.Tensor:
    """Float master value -> int8 value (kept in a float tensor): ``clamp(round(w), -127, 127)``."""
    return w.round().clamp(-QMAX, QMAX)


def saturate(x: torch.Tensor) -> torch.Tensor:
    """Clamp an int32 tensor to the int8 range."""
    return x.clamp(-QMAX, QMAX)


def int_matmul(x: torch.Tensor, w_q: torch.Tensor) -> torch.Tensor:
    """``x @ w_q.T`` of int8 values with exact int32 accumulation.

    ``x``: ``(..., k)`` int32 holding int8 values; ``w_q``: ``(m, k)`` float holding int8 values.
    The product runs as a float32 GEMM, which is exact here (see ``MAX_EXACT_K``), and comes
    back as int32: the same numbers an int8 x int8 -> int32 GEMM gives.
    """
    k = x.shape[-1]
    if k > MAX_EXACT_K:
        raise ValueError(
            f"Invalid inner dimension: {k} (float32 emulation is exact up to {MAX_EXACT_K})"
        )
    # TF32/bf16 matmul modes ("high"/"medium" precision) would round the products: use float64.
    dtype = torch.float32 if torch.get_float32_matmul_precision() == "highest" else torch.float64
    return (x.to(dtype) @ w_q.to(dtype).T).to(torch.int32)


class IntLinear(nn.Module):
    """int8 linear layer: ``saturate(floor((x @ W^T) / round(16 sqrt(k))) + b)``.

    The divisor maps an int32 accumulator of ``k`` products of unit-scale (16) values back to
    unit scale. ``weight`` and ``bias`` are float master values on the int8 scale; the forward
    quantizes them, so every member of a population runs with int8 weights.
    """

    def __init__(self, in_dim: int, out_dim: int, bias: bool = True) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_dim, in_dim) * (1 << FRAC))
        self.bias = nn.Parameter(torch.zeros(out_dim)) if bias else None
        self.divisor = round((1 << FRAC) * math.sqrt(in_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        acc = int_matmul(x, quantize(self.weight))
        out = torch.div(acc, self.divisor, rounding_mode="floor")
        if self.bias is not None:
            out = out + quantize(self.bias).to(torch.int32)
        return saturate(out)


class IntNorm(nn.Module):
    """Integer norm: ``saturate(x * w // max(mean|x|, 1))`` (mean by integer division)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.full((dim,), float(1 << FRAC)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean_abs = torch.div(x.abs().sum(-1, keepdim=True), x.shape[-1], rounding_mode="floor")
        num = x * quantize(self.weight).to(torch.int32)
        return saturate(torch.div(num, mean_abs.clamp_min(1), rounding_mode="floor"))


class IntMinGRU(nn.Module):
    """int8 minGRU: the gate is ``(g + 127) / 256`` (an identity "sigmoid", as in nano-egg)::

        h_t = h_{t-1} + floor((g_t + 127) * (h~_t - h_{t-1}) / 256)

    all in int32, saturated to int8. Runs step by step over the sequence.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = IntLinear(dim, 2 * dim)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        gate, cand = self.proj(x).chunk(2, dim=-1)
        gate = gate + QMAX  # [0, 254]
        h = torch.zeros_like(cand[..., 0, :])
        out = []
        for t in range(cand.shape[-2]):
            h = h * keep[..., t, :]
            h = saturate(h + ((gate[..., t, :] * (cand[..., t, :] - h)) >> 8))
            out.append(h)
        return torch.stack(out, dim=-2)


def clipped_add(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return saturate(a + b)


class IntBlock(nn.Module):
    """Integer pre-norm block: ``x + minGRU(N(x))``, then ``x + MLP(N(x))`` (4x, ReLU)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm1 = IntNorm(dim)
        self.mix = IntMinGRU(dim)
        self.norm2 = IntNorm(dim)
        self.up = IntLinear(dim, 4 * dim)
        self.down = IntLinear(4 * dim, dim)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        x = clipped_add(x, self.mix(self.norm1(x), keep))
        return clipped_add(x, self.down(self.up(self.norm2(x)).clamp_min(0)))


class IntMinGRULM(nn.Module):
    """int8 byte-level minGRU LM: int8 weights and activations, int32 accumulation.

    The logits are int8 values read as fixed point (``q / 16``) for the float cross-entropy
    that serves as the fitness.
    """

    def __init__(self, hidden_dim: int = 32, n_layers: int = 1) -> None:
        super().__init__()
        self.embed = nn.Parameter(torch.randn(VOCAB, hidden_dim) * (1 << FRAC))
        self.blocks = nn.ModuleList(IntBlock(hidden_dim) for _ in range(n_layers))
        self.norm = IntNorm(hidden_dim)
        self.head = IntLinear(hidden_dim, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(batch, seq)`` int64 -> ``(batch, seq, 256)`` float logits (int8 values / 16)."""
        keep = (tokens != 0).unsqueeze(-1).to(torch.int32)
        x = quantize(self.embed)[tokens].to(torch.int32)
        for block in self.blocks:
            x = block(x, keep)
        return self.head(self.norm(x)).to(torch.float32) / (1 << FRAC)


def build_model(mode: str, hidden_dim: int, n_layers: int) -> nn.Module:
    if mode == "float":
        return FloatMinGRULM(hidden_dim, n_layers)
    if mode == "int":
        return IntMinGRULM(hidden_dim, n_layers)
    raise ValueError(f"Invalid mode: {mode!r} (expected 'float' or 'int')")
