"""Fixed-length decoding of a causal language model for a whole population in one batch, with a
static KV cache, and on CUDA no host work per token: each call replays two CUDA graphs.

``model.generate`` inside :meth:`Population.rows <torcheggroll.Population.rows>` decodes every
member in one batch, but it runs Python for every step (logits processors, stopping criteria, a
cache that grows) and, through the rows forward, for every operation of the model: on a GPU a
deep model's decode step then costs what the host needs, not what the kernels need.
:class:`PopulationDecoder` computes what greedy or sampled ``generate`` computes, on buffers
allocated once per input shape:

* the KV cache is a Hugging Face ``StaticCache`` of ``prompt + max_new_tokens`` positions;
* the attention mask is passed to the model ready-made (4-D, additive: ``0`` where a query may
  attend, the dtype's lowest value where it may not), built on the device from the prompt's
  padding mask and the step's position, and the position ids are the prompt's left padding
  subtracted from the cache position (what ``generate`` derives from the padding mask);
* every row gets exactly ``max_new_tokens`` new tokens: after an end-of-sequence token a row
  gets ``pad_token_id``, as ``generate`` pads the rows of a batch that end early (``generate``
  stops once every row has ended; the sequences it returns are a prefix of these);
* sampling uses the Gumbel-max trick (``argmax(logits / temperature + Gumbel noise)`` after the
  ``top_k`` / ``top_p`` filters), which draws from the same distribution as ``generate``'s
  multinomial draw, from torch's default generator.

With ``cuda_graph`` (the default on CUDA, for a plain model or the population of a
``capturable`` optimizer), the first call for an input shape warms up and captures the prompt's
forward (the prefill) and one decode step; every call then copies its prompts into the
captured inputs and replays the prefill once and the step ``max_new_tokens - 1`` times. The
graphs read the parameters, the noise buffers and the generation counter where they live, so
the same graphs serve every later generation and every optimizer step: what the captured
kernels compute changes with them. Anything read at capture as a Python value stays as it was
then (a group's ``sigma``, as for every ``capturable`` step; a changed ``sigma`` makes a new
capture).
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ._checks import number

__all__ = ["PopulationDecoder"]


@dataclass
class _State:
    """The static tensors of one input shape (``N`` rows of ``L`` prompt tokens, ``T`` new
    tokens, ``S = L + T`` cache slots)."""

    ids: torch.Tensor  # (N, L) the prompts
    mask: torch.Tensor  # (N, L) 1 for a prompt token, 0 for left padding
    out: torch.Tensor  # (N, T) the new tokens
    last: torch.Tensor  # (N,) the token fed to the next step
    finished: torch.Tensor  # (N,) bool: the row has produced an end token
    slot: torch.Tensor  # (1,) the cache slot of the token the next step feeds
    pads: torch.Tensor  # (N,) left padding of each row
    visible: torch.Tensor  # (N, S) bool: cache slots a query may attend to (before causality)
    prompt_slots: torch.Tensor  # (L,) 0 .. L - 1
    slots: torch.Tensor  # (S,) 0 .. S - 1
    zero: torch.Tensor  # 0-d, the model's dtype
    lowest: torch.Tensor  # 0-d, the model's dtype's lowest value
    cache: Any


@dataclass
class _Graphs:
    """The captured prefill and step of one input shape and population, and what they read:
    references that keep the capture-time tensors (and the counters the key names) alive."""

    prefill: torch.cuda.CUDAGraph
    step: torch.cuda.CUDAGraph
    held: list[Any] = field(default_factory=list)


def _attention_window(model: nn.Module) -> int | None:
    """The smallest attention window of the model's layers (sliding or local attention), or None
    when every layer attends to the whole sequence. Refuses, with a ``TypeError`` naming the
    model, what the decoder's static cache and ready-made causal mask cannot serve:
    encoder-decoder models, layers that are not softmax attention (state-space, linear or
    chunked attention), and ALiBi models, which build their bias from the 2-D padding mask."""
    config: Any = model.config
    name = type(model).__name__
    hint = "; use model.generate inside population.rows"
    if getattr(config, "is_encoder_decoder", False):
        raise TypeError(f"Invalid model: {name} is an encoder-decoder model{hint}")
    if getattr(config, "model_type", None) == "bloom" or getattr(config, "alibi", False) is True:
        raise TypeError(
            f"Invalid model: {name} uses ALiBi, built from the 2-D padding mask that the "
            f"decoder replaces with a 4-D one{hint}"
        )
    kinds = getattr(config, "layer_types", None) or []
    other = sorted({k for k in kinds if k not in ("full_attention", "sliding_attention")})
    if other:
        raise TypeError(
            f"Invalid model: {name} has layers of type {other}; the decoder serves softmax "
            f"attention with a KV cache only{hint}"
        )
    window = getattr(config, "sliding_window", None)
    window = window if isinstance(window, int) and not isinstance(window, bool) else None
    if "sliding_attention" in kinds:
        return window
    if "local" in (getattr(config, "attention_layers", None) or []):  # GPT-Neo
        return int(config.window_size)
    if not kinds and window is not None and getattr(config, "use_sliding_window", True):
        return window  # Mistral: every layer slides
    return None


class PopulationDecoder:
    """Greedy or sampled decoding of ``max_new_tokens`` tokens for every member of a population
    (or for a plain model) in one batch, with a static KV cache (see the module doc).

    Args:
        model: a Hugging Face causal language model (transformers 5: it takes a ``Cache`` and
            a ready-made 4-D attention mask; eager or sdpa attention).
        max_new_tokens: tokens to generate for every row (at least 1).
        do_sample: sample (True) or take the most likely token (False, the default).
        temperature: the sampling temperature, as in ``generate``.
        top_k: sample among the ``top_k`` most likely tokens (``0`` filters nothing).
        top_p: sample among the most likely tokens of total probability ``top_p`` (``1``
            filters nothing).
        eos_token_id: an int or a list of ints ending a row; None takes the model's
            ``generation_config`` (as ``generate`` does); ``[]`` ends no row.
        pad_token_id: the token of the rows that have ended; None takes the model's
            ``generation_config``, then the first end token, then 0.
        cuda_graph: capture and replay CUDA graphs (None: on CUDA, for a plain model or the
            population of a ``capturable`` optimizer; True demands it; False never).
        watch: how the rows see the owned parameters (see :class:`~torcheggroll.rows.Rows`).
        max_shapes: input shapes whose buffers and KV cache are kept, and (twice as many)
            captures: the least recently used is dropped beyond that (:meth:`clear` drops all).

    Call it with the prompts ``(B, L)`` shared by every member (or ``(P, B, L)`` with
    ``per_member=True``) and the population: it returns ``(P, B, L + max_new_tokens)``, each
    member's rows decoded with its own perturbation (``(B, L + max_new_tokens)`` for
    ``population=None``, the plain model)::

        decode = PopulationDecoder(model, max_new_tokens=32, eos_token_id=tok.eos_token_id)

        def closure(population):
            tokens = decode(prompt_ids, attention_mask=mask, population=population)
            return reward(tokens[:, :, prompt_ids.shape[1]:])  # (P,) fitness

    Prompts are left-padded (``attention_mask`` 0 on the left), as for ``generate``.
    """

    def __init__(
        self,
        model: nn.Module,
        max_new_tokens: int,
        *,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        eos_token_id: int | Sequence[int] | None = None,
        pad_token_id: int | None = None,
        cuda_graph: bool | None = None,
        watch: str = "all",
        max_shapes: int = 2,
    ) -> None:
        if not isinstance(model, nn.Module) or getattr(model, "config", None) is None:
            raise TypeError(
                f"Invalid model: {type(model).__name__} (PopulationDecoder needs a Hugging Face "
                "causal language model, with a .config)"
            )
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool):
            raise ValueError(f"Invalid max_new_tokens: {max_new_tokens!r} (expected an int >= 1)")
        if max_new_tokens < 1:
            raise ValueError(f"Invalid max_new_tokens: {max_new_tokens} (expected an int >= 1)")
        if not isinstance(do_sample, bool):
            raise ValueError(f"Invalid do_sample: {do_sample!r} (expected a bool)")
        if not number(temperature) or not 0 < temperature < math.inf:
            raise ValueError(f"Invalid temperature: {temperature!r} (expected a finite number > 0)")
        if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 0:
            raise ValueError(f"Invalid top_k: {top_k!r} (expected an int >= 0)")
        if not number(top_p) or not 0 < top_p <= 1:
            raise ValueError(f"Invalid top_p: {top_p!r} (expected a number in (0, 1])")
        if cuda_graph not in (None, True, False):
            raise ValueError(f"Invalid cuda_graph: {cuda_graph!r} (expected None, True or False)")
        if watch not in ("all", "owned"):
            raise ValueError(f"Invalid watch: {watch!r} (expected 'all' or 'owned')")
        if not isinstance(max_shapes, int) or isinstance(max_shapes, bool) or max_shapes < 1:
            raise ValueError(f"Invalid max_shapes: {max_shapes!r} (expected an int >= 1)")
        gen_config = getattr(model, "generation_config", None)
        if eos_token_id is None:
            eos_token_id = getattr(gen_config, "eos_token_id", None)
        eos = _token_list(eos_token_id, "eos_token_id")
        if pad_token_id is None:
            pad_token_id = getattr(gen_config, "pad_token_id", None)
            if pad_token_id is None:
                pad_token_id = eos[0] if eos else 0
        if not isinstance(pad_token_id, int) or isinstance(pad_token_id, bool) or pad_token_id < 0:
            raise ValueError(f"Invalid pad_token_id: {pad_token_id!r} (expected an int >= 0)")
        vocab = getattr(model.config, "vocab_size", None)
        self._vocab = vocab if isinstance(vocab, int) and not isinstance(vocab, bool) else None
        if self._vocab is not None and pad_token_id >= self._vocab:
            raise ValueError(
                f"Invalid pad_token_id: {pad_token_id} (the vocabulary has {self._vocab} tokens)"
            )
        self._window = _attention_window(model)
        self.model = model
        self.max_new_tokens = max_new_tokens
        self.do_sample = do_sample
        self.temperature = float(temperature)
        self.top_k = top_k
        self.top_p = float(top_p)
        self.eos_token_id = eos
        self.pad_token_id = pad_token_id
        self.cuda_graph = cuda_graph
        self.watch = watch
        self.max_shapes = max_shapes
        params = inspect.signature(model.forward).parameters
        # transformers 5.25 names the cache argument `cache`; earlier 5.x `past_key_values`.
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self._logits_to_keep = "logits_to_keep" in params
        self._states: OrderedDict[Any, _State] = OrderedDict()
        self._graphs: OrderedDict[Any, _Graphs] = OrderedDict()
        self._eos: dict[torch.device, torch.Tensor] = {}

    def __repr__(self) -> str:
        return (
            f"PopulationDecoder({type(self.model).__name__}, max_new_tokens="
            f"{self.max_new_tokens}, do_sample={self.do_sample}, cuda_graph={self.cuda_graph})"
        )

    def clear(self) -> None:
        """Drop every shape's buffers, KV cache and graphs (the next call builds them again)."""
        self._states.clear()
        self._graphs.clear()

    # ------------------------------------------------------------------ the call
    @torch.no_grad()
    def __call__(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        population: Any = None,
        *,
        per_member: bool = False,
    ) -> torch.Tensor:
        """Decode the prompts for every member of ``population`` (or for the plain model).

        Args:
            input_ids: ``(B, L)`` integer prompts shared by every member, or ``(P, B, L)`` one
                set per member with ``per_member=True``; left-padded.
            attention_mask: the same shape, 1 for a token and 0 for padding (default: all 1).
            population: the :class:`~torcheggroll.Population` whose members decode, or None
                for the model's own parameters.

        Returns:
            ``(P, B, L + T)`` the prompts followed by each member's ``T = max_new_tokens``
            tokens (``(B, L + T)`` without a population), a new tensor.
        """
        flat, mask, lead = self._inputs(input_ids, attention_mask, population, per_member)
        use_graph = self._use_graph(flat.device, population)
        batch = lead[-1]  # rows per member
        # The model's dtype too: model.double() after a call needs a cache of the new dtype.
        dtype = next(self.model.parameters()).dtype
        skey = (flat.shape[0], flat.shape[1], flat.device, dtype)
        state = self._state(skey)
        if use_graph:
            graphs = self._captured(skey, state, population, batch)
            state.ids.copy_(flat)
            state.mask.copy_(mask)
            graphs.prefill.replay()
            for _ in range(self.max_new_tokens - 1):
                graphs.step.replay()
        else:
            state.ids.copy_(flat)
            state.mask.copy_(mask)
            with self._rows(population, batch):
                self._decode(state)
        out = torch.cat([flat, state.out], dim=1)
        return out.reshape(*lead, out.shape[-1])

    def _inputs(
        self, ids: Any, mask: Any, population: Any, per_member: bool
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
        """The prompts and mask as ``(N, L)`` rows, member-major, and the output's leading
        shape ``(P, B)`` (or ``(B,)``)."""
        if not isinstance(ids, torch.Tensor) or ids.is_floating_point() or ids.is_complex():
            raise ValueError(
                f"Invalid input_ids: expected an integer tensor, got "
                f"{getattr(ids, 'dtype', type(ids).__name__)}"
            )
        want = 3 if per_member else 2
        if ids.dim() != want or ids.shape[-1] == 0 or ids.shape[-2] == 0:
            expected = "(P, B, L)" if per_member else "(B, L)"
            raise ValueError(
                f"Invalid input_ids: expected a shape {expected} with B, L >= 1, got "
                f"{tuple(ids.shape)}"
            )
        if self._window is not None and ids.shape[-1] + self.max_new_tokens > self._window:
            raise ValueError(
                f"Invalid input_ids: prompts of {ids.shape[-1]} tokens plus max_new_tokens="
                f"{self.max_new_tokens} exceed the model's attention window of {self._window} "
                "tokens (sliding or local attention), which the decoder's causal mask does not "
                "apply; decode shorter sequences, or use model.generate inside population.rows"
            )
        # Prompts on the CPU only: reading CUDA ids would wait for the device at every call.
        on_cpu = ids.device.type == "cpu"
        if on_cpu and self._vocab is not None and (ids.min() < 0 or ids.max() >= self._vocab):
            raise ValueError(
                f"Invalid input_ids: token ids from {int(ids.min())} to {int(ids.max())}, the "
                f"vocabulary has {self._vocab} tokens (ids 0 to {self._vocab - 1})"
            )
        if mask is None:
            mask = torch.ones_like(ids)
        elif not isinstance(mask, torch.Tensor) or mask.shape != ids.shape:
            raise ValueError(
                f"Invalid attention_mask: expected the shape of input_ids {tuple(ids.shape)}, "
                f"got {tuple(getattr(mask, 'shape', ()))}"
            )
        if population is None:
            if per_member:
                raise ValueError("Invalid per_member: True needs a population")
            return ids.long(), mask.long().to(ids.device), (ids.shape[0],)
        size = len(population)
        if per_member and ids.shape[0] != size:
            raise ValueError(
                f"Invalid per-member input_ids: expected a leading dimension of {size} (the "
                f"local population), got shape {tuple(ids.shape)}"
            )
        if per_member:
            flat, m = ids.reshape(-1, ids.shape[-1]), mask.reshape(-1, mask.shape[-1])
        else:
            flat, m = ids.repeat(size, 1), mask.repeat(size, 1)
        return flat.long(), m.long().to(ids.device), (size, ids.shape[-2])

    def _use_graph(self, device: torch.device, population: Any) -> bool:
        counters = population is None or population.capture_key() is not None
        if self.cuda_graph is False:
            return False
        if self.cuda_graph is None:
            return device.type == "cuda" and counters
        if device.type != "cuda":
            raise ValueError(f"Invalid cuda_graph: True, but the prompts are on {device}")
        if not counters:
            raise ValueError(
                "Invalid cuda_graph: True, but the population's noise counters are Python ints; "
                "make the optimizer with capturable=True so that replays follow its generation"
            )
        return True

    def _rows(self, population: Any, batch: int) -> Any:
        if population is None:
            return contextlib.nullcontext()
        return population.rows(self.model, batch=batch, watch=self.watch)

    # ------------------------------------------------------------------ static buffers
    def _state(self, key: tuple[int, int, torch.device, torch.dtype]) -> _State:
        rows, length, device, _ = key
        state = self._states.get(key)
        if state is None:
            from transformers import StaticCache

            total = length + self.max_new_tokens
            dtype = _dtype_of(self.model)
            config: Any = self.model.config

            def longs(*shape: int) -> torch.Tensor:
                return torch.zeros(shape, dtype=torch.long, device=device)

            state = _State(
                ids=longs(rows, length),
                mask=longs(rows, length) + 1,
                out=longs(rows, self.max_new_tokens),
                last=longs(rows),
                finished=torch.zeros(rows, dtype=torch.bool, device=device),
                slot=longs(1),
                pads=longs(rows),
                visible=torch.ones(rows, total, dtype=torch.bool, device=device),
                prompt_slots=torch.arange(length, device=device),
                slots=torch.arange(total, device=device),
                zero=torch.zeros((), dtype=dtype, device=device),
                lowest=torch.tensor(torch.finfo(dtype).min, dtype=dtype, device=device),
                cache=StaticCache(config=config, max_cache_len=total),
            )
            self._states[key] = state
            while len(self._states) > self.max_shapes:
                old, _ = self._states.popitem(last=False)
                for k in [k for k in self._graphs if k[0] == old]:
                    del self._graphs[k]
        self._states.move_to_end(key)
        return state

    def _eos_on(self, device: torch.device) -> torch.Tensor:
        if device not in self._eos:
            self._eos[device] = torch.tensor(self.eos_token_id, dtype=torch.long, device=device)
        return self._eos[device]

    # ------------------------------------------------------------------ the computation
    def _decode(self, state: _State) -> None:
        self._prefill(state)
        for _ in range(self.max_new_tokens - 1):
            self._step(state)

    def _forward(
        self, state: _State, ids: torch.Tensor, query: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        """``(N, V)`` the logits of the last query position; ``query`` ``(q,)`` are the cache
        slots of the ``q`` tokens ``ids`` ``(N, q)`` and ``positions`` ``(N, q)`` their
        position ids."""
        causal = state.slots.view(1, 1, -1) <= query.view(1, -1, 1)  # (1, q, S)
        allowed = state.visible.unsqueeze(1) & causal  # (N, q, S)
        mask = torch.where(allowed, state.zero, state.lowest).unsqueeze(1)  # (N, 1, q, S)
        kwargs: dict[str, Any] = {
            self._cache_arg: state.cache,
            "attention_mask": mask,
            "position_ids": positions,
            "use_cache": True,
        }
        if self._logits_to_keep:
            kwargs["logits_to_keep"] = 1
        return self.model(input_ids=ids, **kwargs).logits[:, -1]  # type: ignore[no-any-return]

    def _prefill(self, state: _State) -> None:
        """The prompts' forward (which fills the cache) and the first new token."""
        length = state.ids.shape[1]
        state.cache.reset()
        state.visible[:, :length].copy_(state.mask != 0)
        torch.sub(length, state.mask.sum(dim=1), out=state.pads)
        positions = (state.prompt_slots.view(1, -1) - state.pads.view(-1, 1)).clamp_(min=0)
        token = self._select(self._forward(state, state.ids, state.prompt_slots, positions))
        state.out[:, 0].copy_(token)
        state.last.copy_(token)
        state.finished.copy_(self._ends(token))
        state.slot.fill_(length)

    def _step(self, state: _State) -> None:
        """One new token for every row, at the slot ``state.slot`` (then advanced)."""
        length = state.ids.shape[1]
        positions = (state.slot - state.pads).view(-1, 1)
        logits = self._forward(state, state.last.view(-1, 1), state.slot, positions)
        token = torch.where(state.finished, self.pad_token_id, self._select(logits))
        state.out.index_copy_(1, state.slot - (length - 1), token.view(-1, 1))
        state.finished.logical_or_(self._ends(token))
        state.last.copy_(token)
        state.slot.add_(1)

    def _ends(self, token: torch.Tensor) -> torch.Tensor:
        if not self.eos_token_id:
            return torch.zeros_like(token, dtype=torch.bool)
        return torch.isin(token, self._eos_on(token.device))

    def _select(self, logits: torch.Tensor) -> torch.Tensor:
        """``(N,)`` the next token of each row from its logits ``(N, V)``."""
        if not self.do_sample:
            return logits.argmax(dim=-1)
        z = logits.float() / self.temperature
        if self.top_k and self.top_k < z.shape[-1]:
            kth = z.topk(self.top_k, dim=-1).values[:, -1:]
            z = z.masked_fill(z < kth, float("-inf"))
        if self.top_p < 1:
            # Keep the most likely tokens whose probabilities sum to top_p (at least one).
            ordered, order = z.sort(dim=-1, descending=True)
            probs = ordered.softmax(dim=-1)
            drop = probs.cumsum(dim=-1) - probs > self.top_p
            z = z.scatter(-1, order, ordered.masked_fill(drop, float("-inf")))
        # Gumbel-max: argmax(z + G) with G = -log(E), E ~ Exp(1), is a draw from softmax(z).
        return (z - torch.empty_like(z).exponential_().log()).argmax(dim=-1)

    # ------------------------------------------------------------------ CUDA graphs
    def _captured(self, skey: Any, state: _State, population: Any, batch: int) -> _Graphs:
        """The graphs of the shape ``skey`` (buffers ``state``) and ``population`` (captured
        on first use)."""
        pkey = None if population is None else population.capture_key()
        key = (skey, pkey, _storage_key(self.model))
        graphs = self._graphs.get(key)
        if graphs is not None:
            self._graphs.move_to_end(key)
            return graphs
        fresh = (lambda: None) if population is None else population.fresh
        side = torch.cuda.Stream(device=state.ids.device)
        side.wait_stream(torch.cuda.current_stream(state.ids.device))
        with torch.cuda.stream(side):
            # Warm-up: the kernels compiled and tuned, the cache laid out, outside the capture.
            for _ in range(2):
                with self._rows(fresh(), batch):
                    self._prefill(state)
                    self._step(state)
        torch.cuda.current_stream(state.ids.device).wait_stream(side)
        prefill, step = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        captured = fresh()  # a population whose per-generation values are made in the graph
        rows = self._rows(captured, batch)
        with rows:
            with torch.cuda.graph(prefill):
                self._prefill(state)
            with torch.cuda.graph(step, pool=prefill.pool()):
                self._step(state)
            # The buffers, the capture's population and the rows' per-generation tensors: the
            # graphs read and write their memory at every replay.
            held = [state, captured, *(rows.held() if population is not None else [])]
        graphs = self._graphs[key] = _Graphs(prefill, step, held)
        while len(self._graphs) > 2 * self.max_shapes:  # a plain and a population one per shape
            self._graphs.popitem(last=False)
        return graphs


def _dtype_of(model: nn.Module) -> torch.dtype:
    dtype = getattr(model, "dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype
    return next(p.dtype for p in model.parameters() if p.is_floating_point())


def _storage_key(model: nn.Module) -> tuple[int, ...]:
    """Where the model's parameters live: a graph reads them there, so a parameter moved or
    replaced (``p.data = ...``) needs a new capture."""
    return tuple(p.data_ptr() for p in model.parameters())


def _token_list(value: Any, name: str) -> list[int]:
    if value is None:
        return []
    values = [value] if isinstance(value, int) else value
    if not isinstance(values, (list, tuple)) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values
    ):
        raise ValueError(f"Invalid {name}: {value!r} (expected an int >= 0 or a list of them)")
    return list(values)
