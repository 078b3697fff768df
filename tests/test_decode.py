"""PopulationDecoder: fixed-length decoding with a static KV cache, for a plain model and for a
whole population in one batch.

References are independent of the decoder: Hugging Face ``generate`` of the plain model, and of
plain copies of the model holding one member's parameters each (``population.stacked``), in
float64 so that greedy tokens agree exactly. CUDA tests compare graph replays with the same
decoder run eagerly, also across optimizer steps.
"""

from __future__ import annotations

import copy
import math
import warnings
from typing import Any

import pytest
import torch
from _hf_models import DECODER_CONFIG, built, tiny
from torch import nn

from torcheggroll import EggrollOptimizer, PopulationDecoder

transformers = pytest.importorskip("transformers")

POP = 4
_DECODER_CONFIG = DECODER_CONFIG
_llama = built("LlamaForCausalLM", "LlamaConfig", **DECODER_CONFIG)
_qwen2 = built("Qwen2ForCausalLM", "Qwen2Config", **DECODER_CONFIG)


def _gpt2() -> nn.Module:
    cfg = transformers.GPT2Config(
        vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1,
        eos_token_id=2,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(cfg)


_MHA = {k: v for k, v in _DECODER_CONFIG.items() if k != "num_key_value_heads"}
FACTORIES = {
    "llama": _llama,
    "qwen2": _qwen2,
    "gpt2": _gpt2,
    # More families (1-2 layers): Gemma's 1 + weight norms, GPT-NeoX's fused projection, OPT's
    # embedding projection and learned positions, Falcon's transposed weights, GPT-BigCode's
    # multi-query attention.
    "gemma": built("GemmaForCausalLM", "GemmaConfig", **_DECODER_CONFIG, head_dim=8),
    "gpt-neox": built("GPTNeoXForCausalLM", "GPTNeoXConfig", **_MHA),
    "opt": built(
        "OPTForCausalLM", "OPTConfig", vocab_size=64, hidden_size=32, ffn_dim=48,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64,
        word_embed_proj_dim=16,
    ),
    "falcon": built(
        "FalconForCausalLM", "FalconConfig", vocab_size=64, hidden_size=32,
        num_hidden_layers=2, num_attention_heads=4,
    ),
    "gpt-bigcode": built(
        "GPTBigCodeForCausalLM", "GPTBigCodeConfig", vocab_size=64, n_embd=32, n_layer=2,
        n_head=4, n_positions=64,
    ),
}  # fmt: skip


def _model(name: str, dtype: torch.dtype = torch.float64, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return FACTORIES[name]().to(dtype).eval()


def _prompts(batch: int = 2, length: int = 7, seed: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 64, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding
    ids[1, :2] = 0
    return ids, mask


def _member_models(population: Any, model: nn.Module) -> list[nn.Module]:
    """Plain copies of ``model``, one per member, with that member's parameters."""
    stacked = population.stacked(model)
    members = []
    for j in range(len(population)):
        m = copy.deepcopy(model)
        with torch.no_grad():
            for name, t in list(m.named_parameters()) + list(m.named_buffers()):
                t.copy_(stacked[name][j])
        members.append(m)
    return members


@pytest.mark.parametrize("name", list(FACTORIES))
def test_plain_model_matches_generate_with_padding_and_end_tokens(name: str) -> None:
    model = _model(name)
    ids, mask = _prompts(batch=6, length=5)
    mask[3, :4] = 0
    ids[3, :4] = 0
    new = 12
    with torch.no_grad():
        free = PopulationDecoder(model, new, eos_token_id=[])(ids, mask)
        # An end token that some rows produce early, so that generate pads them.
        eos = int(free[0, 5 + 2])
        ref = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=new,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=0,
        )
        out = PopulationDecoder(model, new, eos_token_id=eos, pad_token_id=0)(ids, mask)
    assert out.shape == (6, 5 + new)
    # generate stops once every row has ended: its sequences are a prefix, the rest is padding.
    assert torch.equal(out[:, : ref.shape[1]], ref)
    assert bool((out[:, ref.shape[1] :] == 0).all())
    first = int((out[0, 5:] == eos).nonzero()[0])  # row 0 ends at its first end token
    assert first <= 2 and bool((out[0, 5 + first + 1 :] == 0).all())


@pytest.mark.parametrize("name", list(FACTORIES))
def test_every_member_decodes_with_its_own_parameters(name: str) -> None:
    model = _model(name)
    opt = EggrollOptimizer(model.parameters(), sigma=0.05, rank=2, pop_size=POP, seed=1)
    ids, mask = _prompts()
    population = opt.population()
    settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    decode = PopulationDecoder(model, 6, eos_token_id=[], pad_token_id=0)
    with torch.no_grad():
        out = decode(ids, mask, population=population)
        assert out.shape == (POP, 2, 13)
        for j, member in enumerate(_member_models(population, model)):
            member.generation_config.eos_token_id = None
            ref = member.generate(input_ids=ids, attention_mask=mask, **settings)
            assert torch.equal(out[j], ref), j
        # The centre's own decode is the plain model's: nothing of the rows is left behind.
        assert torch.equal(decode(ids, mask), model.generate(ids, attention_mask=mask, **settings))
    assert not all(torch.equal(out[0], out[j]) for j in range(1, POP))


def test_per_member_prompts() -> None:
    model = _model("llama")
    opt = EggrollOptimizer(model.parameters(), sigma=0.05, rank=2, pop_size=POP, seed=3)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, 64, (POP, 2, 6), generator=g)
    mask = torch.ones_like(ids)
    mask[:, 0, :3] = 0
    population = opt.population()
    with torch.no_grad():
        out = PopulationDecoder(model, 5, eos_token_id=[])(
            ids, mask, population=population, per_member=True
        )
        for j, member in enumerate(_member_models(population, model)):
            member.generation_config.eos_token_id = None
            ref = member.generate(
                input_ids=ids[j], attention_mask=mask[j], max_new_tokens=5, do_sample=False,
                pad_token_id=0,
            )  # fmt: skip
            assert torch.equal(out[j], ref), j


def test_the_decoder_follows_the_optimizer_across_steps() -> None:
    """One decoder across generations: each call decodes the current parameters and noise."""
    model = _model("gpt2")
    opt = EggrollOptimizer(model.parameters(), lr=0.5, sigma=0.05, rank=2, pop_size=POP, seed=4)
    ids, mask = _prompts()
    decode = PopulationDecoder(model, 4, eos_token_id=[])

    def closure(population: Any) -> torch.Tensor:
        tokens = decode(ids, mask, population=population)
        return (tokens[:, :, 7:] % 5).double().mean(dim=(1, 2))

    with torch.no_grad():
        for _ in range(2):
            opt.step(closure)
        population = opt.population()
        out = decode(ids, mask, population=population)
        fresh = PopulationDecoder(model, 4, eos_token_id=[])(ids, mask, population=population)
    assert torch.equal(out, fresh)
    assert opt.generation == 2


@pytest.mark.parametrize("filters", [dict(top_k=1), dict(top_p=1e-6)])
def test_sampling_with_one_candidate_is_greedy(filters: dict[str, Any]) -> None:
    model = _model("llama")
    ids, mask = _prompts()
    with torch.no_grad():
        greedy = PopulationDecoder(model, 6)(ids, mask)
        sampled = PopulationDecoder(model, 6, do_sample=True, temperature=3.0, **filters)(ids, mask)
    assert torch.equal(sampled, greedy)


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p"), [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.6)]
)
def test_sampled_first_tokens_follow_the_filtered_distribution(
    temperature: float, top_k: int, top_p: float
) -> None:
    """Frequencies of the first sampled token over many rows of one prompt against the
    probabilities generate's warpers give; tolerance 5 standard errors of a frequency, plus 3
    counts for the rare tokens (a count of Poisson(N p) with N p << 1 exceeds 3 with
    probability below (N p)^4 / 24)."""
    model = _model("llama", torch.float32)
    model.lm_head.weight.data.mul_(30)  # a spread-out distribution over a few tokens
    rows = 6000
    ids = torch.randint(3, 64, (1, 4), generator=torch.Generator().manual_seed(0))
    decode = PopulationDecoder(
        model, 1, do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p
    )
    torch.manual_seed(0)
    with torch.no_grad():
        first = decode(ids.expand(rows, 4))[:, -1]
        logits = model(input_ids=ids).logits[0, -1].double() / temperature
    if top_k:
        logits[logits < logits.topk(top_k).values[-1]] = -math.inf
    probs = logits.softmax(-1)
    if top_p < 1:
        ordered, order = probs.sort(descending=True)
        drop = ordered.cumsum(0) - ordered > top_p
        probs[order[drop]] = 0
        probs /= probs.sum()
    freq = torch.bincount(first, minlength=probs.numel()).double() / rows
    bound = 5 * (probs * (1 - probs) / rows).sqrt() + 3 / rows
    assert bool(((freq - probs).abs() <= bound).all()), (freq - probs).abs().max()
    assert int((probs > 0.01).sum()) >= 3  # the check is about a real distribution


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(max_new_tokens=2.0), "max_new_tokens"),
        (dict(temperature=0.0), "temperature"),
        (dict(top_k=-1), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(eos_token_id="2"), "eos_token_id"),
        (dict(pad_token_id=-1), "pad_token_id"),
        (dict(cuda_graph="yes"), "cuda_graph"),
        (dict(watch="some"), "watch"),
        (dict(do_sample=1), "do_sample"),
        (dict(max_shapes=0), "max_shapes"),
    ],
)
def test_bad_settings_are_refused(kwargs: dict[str, Any], match: str) -> None:
    model = _model("llama")
    settings = {"max_new_tokens": 3, **kwargs}
    with pytest.raises(ValueError, match=f"Invalid {match}"):
        PopulationDecoder(model, **settings)


def test_bad_inputs_are_refused_before_anything_runs() -> None:
    model = _model("llama")
    opt = EggrollOptimizer(model.parameters(), pop_size=POP, seed=0)
    decode = PopulationDecoder(model, 3)
    ids, mask = _prompts()
    with pytest.raises(TypeError, match="Invalid model"):
        PopulationDecoder(nn.Linear(2, 2), 3)
    with pytest.raises(ValueError, match="Invalid input_ids"):
        decode(ids.double())
    with pytest.raises(ValueError, match="Invalid input_ids"):
        decode(ids[0])
    with pytest.raises(ValueError, match="Invalid attention_mask"):
        decode(ids, mask[:, 1:])
    with pytest.raises(ValueError, match="Invalid per-member input_ids"):
        decode(ids.expand(3, 2, 7), population=opt.population(), per_member=True)
    with pytest.raises(ValueError, match="Invalid per_member"):
        decode(ids.expand(3, 2, 7), per_member=True)
    with pytest.raises(ValueError, match="Invalid cuda_graph"):
        PopulationDecoder(model, 3, cuda_graph=True)(ids)
    assert not decode._states  # nothing was allocated by the refused calls


def test_buffers_of_at_most_max_shapes_are_kept() -> None:
    model = _model("llama")
    decode = PopulationDecoder(model, 2, max_shapes=1)
    with torch.no_grad():
        decode(*_prompts(length=5))
        decode(*_prompts(length=6))
    assert len(decode._states) == 1
    decode.clear()
    assert not decode._states


# ---------------------------------------------------------------------------- CUDA graphs
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows_per_member", [1, 2])
def test_cuda_graph_replays_equal_eager_decoding_across_steps(
    dtype: torch.dtype, rows_per_member: int
) -> None:
    dev = torch.device("cuda")
    model = _model("llama", dtype).to(dev)
    opt = EggrollOptimizer(
        model.parameters(), lr=0.3, sigma=0.05, rank=4, pop_size=8, seed=5, capturable=True
    )
    ids, mask = (t.to(dev) for t in _prompts(batch=2))
    ids, mask = ids[:rows_per_member], mask[:rows_per_member]
    graphed = PopulationDecoder(model, 8, eos_token_id=[], cuda_graph=True)
    eager = PopulationDecoder(model, 8, eos_token_id=[], cuda_graph=False)

    def closure(population: Any) -> torch.Tensor:
        return (graphed(ids, mask, population=population) % 7).float().mean(dim=(1, 2))

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step in range(3):
            population = opt.population()
            a = graphed(ids, mask, population=population)
            b = eager(ids, mask, population=population)
            assert torch.equal(a, b), step
            assert torch.equal(graphed(ids, mask), eager(ids, mask))  # the plain model too
            opt.step(closure)
    assert len(graphed._graphs) == 2  # one capture for the population, one for the plain model


@pytest.mark.cuda
@cuda
def test_cuda_graph_refuses_a_population_with_host_counters() -> None:
    dev = torch.device("cuda")
    model = _model("llama", torch.float32).to(dev)
    opt = EggrollOptimizer(model.parameters(), pop_size=4, seed=0)
    ids, mask = (t.to(dev) for t in _prompts())
    with pytest.raises(ValueError, match="capturable=True"):
        PopulationDecoder(model, 3, cuda_graph=True)(ids, mask, population=opt.population())


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (
            lambda: tiny(
                "BartForConditionalGeneration", "BartConfig", vocab_size=64, d_model=32,
                encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48,
                max_position_embeddings=64,
            ),
            "encoder-decoder",
        ),
        (
            lambda: tiny(
                "BloomForCausalLM", "BloomConfig", vocab_size=64, hidden_size=32, n_layer=2,
                n_head=4,
            ),
            "ALiBi",
        ),
        (
            lambda: tiny(
                "MambaForCausalLM", "MambaConfig", vocab_size=64, hidden_size=32, state_size=4,
                num_hidden_layers=2,
            ),
            "linear_attention",
        ),
    ],
    ids=["bart", "bloom", "mamba"],
)  # fmt: skip
def test_models_the_decoder_cannot_serve_are_refused_when_it_is_built(
    make: Any, match: str
) -> None:
    with pytest.raises(TypeError, match=match):
        PopulationDecoder(make(), 4)


@pytest.mark.parametrize(
    "make",
    [
        lambda window: tiny(
            "MistralForCausalLM", "MistralConfig", **_DECODER_CONFIG, sliding_window=window
        ),
        lambda window: tiny(
            "Gemma2ForCausalLM", "Gemma2Config", **_DECODER_CONFIG, head_dim=8,
            sliding_window=window,
        ),
        lambda window: tiny(
            "GPTNeoForCausalLM", "GPTNeoConfig", vocab_size=64, hidden_size=32, num_layers=2,
            num_heads=4, window_size=window, attention_types=[[["global", "local"], 1]],
        ),
    ],
    ids=["mistral", "gemma2", "gpt-neo"],
)  # fmt: skip
def test_an_attention_window_is_served_only_while_it_covers_the_sequence(make: Any) -> None:
    ids, mask = _prompts()  # 7 tokens, the second prompt left-padded
    settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    wide = make(13)  # 7 + 6 tokens: the window covers every position
    with torch.no_grad():
        out = PopulationDecoder(wide, 6, eos_token_id=[], pad_token_id=0)(ids, mask)
        assert torch.equal(out, wide.generate(input_ids=ids, attention_mask=mask, **settings))
        narrow = PopulationDecoder(make(4), 6, eos_token_id=[], pad_token_id=0)
        with pytest.raises(ValueError, match="attention window of 4 tokens"):
            narrow(ids, mask)
