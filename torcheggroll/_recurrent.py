"""The recurrent layers (``nn.GRU``, ``nn.LSTM``, ``nn.RNN`` and their cells) as cell equations.

PyTorch runs these layers as fused kernels (``torch.gru``, ``torch.lstm_cell`` ...) that have
no batching rule under :func:`torch.func.vmap` and cannot take a weight in factored form. Both
population forwards therefore replace them by the cell equations written with a ``linear``
callable: the materialized forward passes per-member weights to :func:`torch.nn.functional.linear`,
the low-rank forward evaluates owned matrices as a shared GEMM plus a rank-r correction. The
equations are those of PyTorch's documentation for each layer (gate order ``r, z, n`` for GRU,
``i, f, g, o`` for LSTM).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["RECURRENT_FUNCTIONS", "Linear", "cell_function", "recurrent_function"]

# ``linear(x, weight, bias)``: ``x W^T + b`` for whatever the weight is (plain or owned).
Linear = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def _gru_cell(
    lin: Linear,
    x: torch.Tensor,
    h: torch.Tensor,
    w_ih: torch.Tensor,
    w_hh: torch.Tensor,
    b_ih: torch.Tensor | None,
    b_hh: torch.Tensor | None,
) -> torch.Tensor:
    i_r, i_z, i_n = lin(x, w_ih, b_ih).chunk(3, dim=-1)
    h_r, h_z, h_n = lin(h, w_hh, b_hh).chunk(3, dim=-1)
    r = torch.sigmoid(i_r + h_r)
    z = torch.sigmoid(i_z + h_z)
    n = torch.tanh(i_n + r * h_n)
    return (1 - z) * n + z * h


def _lstm_cell(
    lin: Linear,
    x: torch.Tensor,
    hc: Any,
    w_ih: torch.Tensor,
    w_hh: torch.Tensor,
    b_ih: torch.Tensor | None,
    b_hh: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    h, c = hc
    i, f, g, o = (lin(x, w_ih, b_ih) + lin(h, w_hh, b_hh)).chunk(4, dim=-1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def _rnn_cell(act: Callable[[torch.Tensor], torch.Tensor]) -> Callable[..., torch.Tensor]:
    def cell(
        lin: Linear,
        x: torch.Tensor,
        h: torch.Tensor,
        w_ih: torch.Tensor,
        w_hh: torch.Tensor,
        b_ih: torch.Tensor | None,
        b_hh: torch.Tensor | None,
    ) -> torch.Tensor:
        return act(lin(x, w_ih, b_ih) + lin(h, w_hh, b_hh))

    return cell


def cell_function(cell: Callable[..., Any]) -> Callable[..., Any]:
    """``torch.gru_cell``-style function ``(x, hx, w_ih, w_hh, b_ih=None, b_hh=None)`` evaluated
    with ``lin``: returns ``f(lin, *args)``."""

    def run(
        lin: Linear,
        x: torch.Tensor,
        hx: Any,
        w_ih: torch.Tensor,
        w_hh: torch.Tensor,
        b_ih: torch.Tensor | None = None,
        b_hh: torch.Tensor | None = None,
    ) -> Any:
        return cell(lin, x, hx, w_ih, w_hh, b_ih, b_hh)

    return run


def recurrent_function(cell: Callable[..., Any], is_lstm: bool) -> Callable[..., Any]:
    """``torch.gru`` / ``torch.lstm`` / ``torch.rnn_*`` (the padded-input overload, no
    projections) as a loop over time steps of ``cell``: returns ``f(lin, *args)``, or
    ``NotImplemented`` for the overloads it does not cover (packed sequences, LSTM with
    ``proj_size``)."""

    def run(
        lin: Linear,
        input: torch.Tensor,
        hx: Any,
        params: Any,
        has_biases: bool = True,
        num_layers: int = 1,
        dropout: float = 0.0,
        train: bool = False,
        bidirectional: bool = False,
        batch_first: bool = False,
    ) -> Any:
        if not isinstance(params, (list, tuple)) or not isinstance(has_biases, bool):
            return NotImplemented  # the packed-sequence overload
        per = 4 if has_biases else 2
        dirs = 2 if bidirectional else 1
        if len(params) != per * num_layers * dirs:
            return NotImplemented  # LSTM with proj_size
        x = input.transpose(0, 1) if batch_first else input  # (T, B, F) or (T, F) unbatched
        h0 = hx[0] if is_lstm else hx
        c0 = hx[1] if is_lstm else None
        h_n, c_n = [], []
        for layer in range(num_layers):
            outs = []
            for d in range(dirs):
                idx = (layer * dirs + d) * per
                w = [*params[idx : idx + per], None, None][:4]
                h = h0[layer * dirs + d]
                c = c0[layer * dirs + d] if c0 is not None else None
                steps = range(x.shape[0] - 1, -1, -1) if d == 1 else range(x.shape[0])
                ys: list[torch.Tensor] = []
                for t in steps:
                    if is_lstm:
                        h, c = cell(lin, x[t], (h, c), *w)
                    else:
                        h = cell(lin, x[t], h, *w)
                    ys.append(h)
                if d == 1:
                    ys.reverse()
                outs.append(torch.stack(ys))
                h_n.append(h)
                if c is not None:
                    c_n.append(c)
            x = torch.cat(outs, dim=-1) if dirs == 2 else outs[0]
            if dropout > 0 and train and layer < num_layers - 1:
                x = F.dropout(x, p=dropout)
        out = x.transpose(0, 1) if batch_first else x
        if is_lstm:
            return out, torch.stack(h_n), torch.stack(c_n)
        return out, torch.stack(h_n)

    return run


# PyTorch function -> (f(lin, *args, **kwargs), whether its weights are in ``args[2]`` as a
# list (the layers) or in ``args[2:4]`` (the cells)).
RECURRENT_FUNCTIONS: dict[Any, tuple[Callable[..., Any], bool]] = {
    torch.gru_cell: (cell_function(_gru_cell), False),
    torch.lstm_cell: (cell_function(_lstm_cell), False),
    torch.rnn_tanh_cell: (cell_function(_rnn_cell(torch.tanh)), False),
    torch.rnn_relu_cell: (cell_function(_rnn_cell(torch.relu)), False),
    torch.gru: (recurrent_function(_gru_cell, is_lstm=False), True),
    torch.lstm: (recurrent_function(_lstm_cell, is_lstm=True), True),
    torch.rnn_tanh: (recurrent_function(_rnn_cell(torch.tanh), is_lstm=False), True),
    torch.rnn_relu: (recurrent_function(_rnn_cell(torch.relu), is_lstm=False), True),
}
