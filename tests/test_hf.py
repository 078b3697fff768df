"""Hugging Face transformers models, built from tiny configs (no download), through both
population forwards and through one batched ``generate`` of the whole population.

The references are independent of the library's forward code: each member's parameters
(``population.stacked``) copied into a plain copy of the model, run (or asked to ``generate``)
member by member. float64 throughout, so the comparisons are exact to rounding.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from _hf_models import DECODER_CONFIG, built
from torch import nn

from torcheggroll import EggrollOptimizer
from torcheggroll.rows import RowsAttributionError

transformers = pytest.importorskip("transformers")

POP = 4


_DECODER_CONFIG = DECODER_CONFIG
_llama = built("LlamaForCausalLM", "LlamaConfig", **DECODER_CONFIG)
_qwen2 = built("Qwen2ForCausalLM", "Qwen2Config", **DECODER_CONFIG)


def _gpt2() -> nn.Module:
    return transformers.GPT2LMHeadModel(
        transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    )


def _bert() -> nn.Module:
    cfg = transformers.BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=64,
        num_labels=3,
    )
    return transformers.BertForSequenceClassification(cfg)


def _vit() -> nn.Module:
    cfg = transformers.ViTConfig(
        image_size=16,
        patch_size=4,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        num_labels=3,
    )
    return transformers.ViTForImageClassification(cfg)


def _resnet() -> nn.Module:
    cfg = transformers.ResNetConfig(
        num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3
    )
    return transformers.ResNetForImageClassification(cfg)


def _text(batch: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(1, 64, (batch, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding
    return {"input_ids": ids, "attention_mask": mask}


def _images(size: int) -> Callable[[], dict[str, torch.Tensor]]:
    return lambda: {
        "pixel_values": torch.randn(
            2, 3, size, size, generator=torch.Generator().manual_seed(7)
        ).double()
    }


_ONE_LAYER = {**_DECODER_CONFIG, "num_hidden_layers": 1}
_MHA = {k: v for k, v in _ONE_LAYER.items() if k != "num_key_value_heads"}
_ENCODER = dict(vocab_size=64, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48)
# More families people fine-tune, each with what sets it apart: its norms (Gemma's 1 + weight,
# OLMo-2's after the attention), fused or separate projections (Phi-3, GPT-NeoX), a projection
# of the embeddings (OPT, ALBERT, Electra), multi-query attention (GPT-BigCode, Falcon, whose
# layers multiply by the transposed weight), shared layers
# (ALBERT), learned positions offset by the padding index (RoBERTa).
ZOO: list[tuple[str, Callable[[], nn.Module], Callable[[], dict[str, torch.Tensor]]]] = [
    ("mistral", built("MistralForCausalLM", "MistralConfig", **_ONE_LAYER), _text),
    ("qwen3", built("Qwen3ForCausalLM", "Qwen3Config", **_ONE_LAYER, head_dim=8), _text),
    ("gemma", built("GemmaForCausalLM", "GemmaConfig", **_ONE_LAYER, head_dim=8), _text),
    ("olmo2", built("Olmo2ForCausalLM", "Olmo2Config", **_ONE_LAYER), _text),
    ("phi3", built("Phi3ForCausalLM", "Phi3Config", **_ONE_LAYER, pad_token_id=0), _text),
    ("gpt-neox", built("GPTNeoXForCausalLM", "GPTNeoXConfig", **_MHA), _text),
    (
        "opt",
        built(
            "OPTForCausalLM", "OPTConfig", vocab_size=64, hidden_size=32, ffn_dim=48,
            num_hidden_layers=1, num_attention_heads=4, max_position_embeddings=64,
            word_embed_proj_dim=16,
        ),
        _text,
    ),
    (
        "falcon",  # FalconLinear: input @ self.weight.T
        built(
            "FalconForCausalLM", "FalconConfig", vocab_size=64, hidden_size=32,
            num_hidden_layers=1, num_attention_heads=4, bias=True,
        ),
        _text,
    ),
    (
        "gpt-bigcode",
        built(
            "GPTBigCodeForCausalLM", "GPTBigCodeConfig", vocab_size=64, n_embd=32, n_layer=1,
            n_head=4, n_positions=64,
        ),
        _text,
    ),
    (
        "roberta",
        built(
            "RobertaForMaskedLM", "RobertaConfig", **_ENCODER, hidden_size=32,
            max_position_embeddings=72, pad_token_id=1,
        ),
        _text,
    ),
    (
        "distilbert",
        built(
            "DistilBertForMaskedLM", "DistilBertConfig", vocab_size=64, dim=32, hidden_dim=48,
            n_layers=1, n_heads=4, max_position_embeddings=64,
        ),
        _text,
    ),
    (
        "albert",
        built(
            "AlbertForMaskedLM", "AlbertConfig", **{**_ENCODER, "num_hidden_layers": 2},
            embedding_size=16, hidden_size=32, max_position_embeddings=64,
        ),
        _text,
    ),
    (
        "electra",
        built(
            "ElectraForMaskedLM", "ElectraConfig", **_ENCODER, embedding_size=16, hidden_size=32,
            max_position_embeddings=64,
        ),
        _text,
    ),
]  # fmt: skip

MODELS: list[tuple[str, Callable[[], nn.Module], Callable[[], dict[str, torch.Tensor]]]] = [
    ("llama", _llama, _text),
    ("qwen2", _qwen2, _text),
    ("gpt2", _gpt2, _text),
    ("bert", _bert, _text),
    ("vit", _vit, _images(16)),
    ("resnet-eval", _resnet, _images(32)),
    *ZOO,
]
_CAUSAL = ("llama", "qwen2", "gpt2", "mistral", "gemma", "gpt-neox", "opt", "falcon", "gpt-bigcode")
DECODERS = [m for m in MODELS if m[0] in _CAUSAL]


def _setup(
    factory: Callable[[], nn.Module], train: bool = False
) -> tuple[nn.Module, EggrollOptimizer]:
    torch.manual_seed(0)
    model = factory().double().train(train)
    return model, EggrollOptimizer(model.parameters(), sigma=0.05, rank=2, pop_size=POP, seed=1)


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


@pytest.mark.parametrize("case", MODELS, ids=[m[0] for m in MODELS])
def test_logits_of_both_forwards_equal_each_member_in_a_plain_model(case: Any) -> None:
    _, factory, inputs = case
    model, opt = _setup(factory)
    kw = inputs()
    population = opt.population()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # vmap's fallbacks for unbatched kernels, dropped caches
        expected = torch.stack([m(**kw).logits for m in _member_models(population, model)])
        rows = population.forward(model, **kw, path="rows").logits
        vmapped = population.forward(model, **kw, path="lowrank").logits  # no fallback anywhere
    torch.testing.assert_close(rows, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(vmapped, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("case", DECODERS, ids=[m[0] for m in DECODERS])
def test_one_batched_generate_gives_every_member_its_own_greedy_tokens(case: Any) -> None:
    _, factory, inputs = case
    model, opt = _setup(factory)
    kw = inputs()
    population = opt.population()
    settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        with population.rows(model) as rows:
            out = model.generate(
                rows.repeat(kw["input_ids"]),
                attention_mask=rows.repeat(kw["attention_mask"]),
                **settings,
            )
        tokens = rows.split(out)  # (P, B, T)
        for j, member in enumerate(_member_models(population, model)):
            ref = member.generate(**kw, **settings)
            # A member whose rows all end early stops early alone; in the batch it is padded
            # while the others go on.
            assert torch.equal(tokens[j][:, : ref.shape[1]], ref)
            assert bool((tokens[j][:, ref.shape[1] :] == settings["pad_token_id"]).all())
    # Members differ (the perturbations matter), so the test would notice crossed rows.
    assert not all(torch.equal(tokens[0], tokens[j]) for j in range(1, POP))


def test_sampled_generate_with_a_cache_runs_per_member_rows() -> None:
    model, opt = _setup(_gpt2)
    kw = _text()
    population = opt.population()
    torch.manual_seed(3)
    with torch.no_grad(), population.rows(model) as rows:
        out = model.generate(
            rows.repeat(kw["input_ids"]),
            attention_mask=rows.repeat(kw["attention_mask"]),
            max_new_tokens=5,
            do_sample=True,
            top_k=8,
            pad_token_id=0,
            use_cache=True,
        )
    assert out.shape == (POP * 2, 12) and torch.equal(
        rows.split(out)[:, :, :7], kw["input_ids"].expand(POP, 2, 7)
    )


def test_per_member_prompts_and_masks_through_rows() -> None:
    """Per-member inputs with attention masks: transformers' mask code branches on values, which
    a vmapped forward cannot run; the rows forward runs it as plain inference does."""
    model, opt = _setup(_llama)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1, 64, (POP, 2, 6), generator=g)
    mask = torch.ones_like(ids)
    mask[:, 0, :3] = 0
    population = opt.population()
    with torch.no_grad():
        out = population.forward(
            model, input_ids=ids, attention_mask=mask, per_member=True, path="rows"
        ).logits
        members = _member_models(population, model)
        for j in range(POP):
            ref = members[j](input_ids=ids[j], attention_mask=mask[j]).logits
            torch.testing.assert_close(out[j], ref, rtol=0, atol=1e-12)
        with pytest.raises(RuntimeError, match="path='rows'"):
            population.forward(model, input_ids=ids, attention_mask=mask, per_member=True)


def test_the_vmap_forward_drops_a_kv_cache_with_a_warning() -> None:
    model, opt = _setup(_gpt2)
    with torch.no_grad(), pytest.warns(UserWarning, match="KV cache"):
        out = opt.population().forward(model, **_text(), use_cache=True)
    assert out.past_key_values is None and out.logits.shape[0] == POP


def test_resnet_in_training_mode_normalizes_each_member_by_its_own_rows() -> None:
    model, opt = _setup(_resnet, train=True)
    kw = _images(32)()
    population = opt.population()
    with torch.no_grad():
        expected = torch.stack([m(**kw).logits for m in _member_models(population, model)])
        rows = population.forward(model, **kw, path="rows").logits
    torch.testing.assert_close(rows, expected, rtol=0, atol=1e-10)


def _t5() -> nn.Module:
    cfg = transformers.T5Config(
        vocab_size=64,
        d_model=32,
        d_kv=8,
        d_ff=48,
        num_layers=1,
        num_heads=4,
        decoder_start_token_id=0,
    )
    return transformers.T5ForConditionalGeneration(cfg)


def test_t5s_relative_position_table_is_refused_by_rows_not_misattributed() -> None:
    model, opt = _setup(_t5)
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad(), pytest.raises(RowsAttributionError, match="relative_attention_bias"):
        opt.population().forward(model, input_ids=ids, decoder_input_ids=ids[:, :5], path="rows")


@pytest.mark.parametrize("encoder_length", [16, 24])
def test_t5s_table_looked_up_at_a_multiple_of_the_batch_is_refused(encoder_length: int) -> None:
    # POP x 2 prompts = 8 rows: a (16, 16) or (24, 24) position lookup has a first dimension
    # that is a multiple of the batch, but is a table lookup, not rows.
    model, opt = _setup(_t5)
    ids = torch.randint(0, 64, (2, encoder_length))
    with torch.no_grad(), pytest.raises(RowsAttributionError, match="not flattened"):
        opt.population().forward(model, input_ids=ids, decoder_input_ids=ids[:, :8], path="rows")


def test_a_sequence_first_model_is_refused_when_its_length_is_a_multiple_of_the_batch() -> None:
    cfg = transformers.XLNetConfig(vocab_size=64, d_model=32, n_layer=1, n_head=4, d_inner=48)
    model, _ = _setup(lambda: transformers.XLNetLMHeadModel(cfg).eval())
    # Keep the parameters XLNet uses through einsum out: only the embedding lookup then sees the
    # (T, P * B) ids of its sequence-first layout.
    params = [p for n, p in model.named_parameters() if "rel_attn" not in n]
    opt = EggrollOptimizer(params, sigma=0.05, rank=2, pop_size=POP, seed=1)
    ids = torch.randint(3, 64, (2, 16))
    with torch.no_grad(), pytest.raises(RowsAttributionError, match=r"word_embedding.*not flat"):
        opt.population().forward(model, input_ids=ids, path="rows")


def test_a_norm_of_a_parameter_table_is_refused() -> None:
    # DeBERTa-v2 normalizes its relative-position table (a parameter, 2 x 4 buckets = 8 rows,
    # as many as the batch) with the encoder's LayerNorm: with only norm weights optimized
    # (BitFit), that table must not be read as rows.
    cfg = transformers.DebertaV2Config(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=48,
        relative_attention=True,
        position_buckets=4,
        norm_rel_ebd="layer_norm",
        max_relative_positions=16,
    )
    model, _ = _setup(lambda: transformers.DebertaV2ForMaskedLM(cfg).eval())
    norms = [p for n, p in model.named_parameters() if "LayerNorm" in n]
    opt = EggrollOptimizer(norms, sigma=0.5, rank=2, pop_size=POP, seed=1)
    ids = torch.randint(3, 64, (2, 8))
    with torch.no_grad(), pytest.raises(RowsAttributionError, match=r"F\.layer_norm, a parameter"):
        opt.population().forward(model, input_ids=ids, path="rows")


def test_whisper_looks_its_positions_up_by_index_in_both_forwards() -> None:
    # Its decoder reads `embed_positions.weight[position_ids]`: a lookup, as F.embedding.
    cfg = transformers.WhisperConfig(
        vocab_size=64, d_model=32, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=48,
        decoder_ffn_dim=48, num_mel_bins=8, max_source_positions=8, max_target_positions=32,
        decoder_start_token_id=1, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        suppress_tokens=None, begin_suppress_tokens=None,
    )  # fmt: skip
    model, opt = _setup(lambda: transformers.WhisperForConditionalGeneration(cfg).eval())
    g = torch.Generator().manual_seed(3)
    kw = {
        "input_features": torch.randn(2, 8, 16, generator=g).double(),
        "decoder_input_ids": torch.randint(3, 64, (2, 5), generator=g),
    }
    population = opt.population()
    with torch.no_grad():
        expected = torch.stack([m(**kw).logits for m in _member_models(population, model)])
        rows = population.forward(model, **kw, path="rows").logits
        vmapped = population.forward(model, **kw, path="lowrank").logits  # no fallback
    torch.testing.assert_close(rows, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(vmapped, expected, rtol=0, atol=1e-12)


def test_a_mixture_of_experts_model_is_refused_up_front() -> None:
    cfg = transformers.MixtralConfig(**_DECODER_CONFIG, num_local_experts=4)
    model, opt = _setup(lambda: transformers.MixtralForCausalLM(cfg).eval())
    with pytest.raises(RowsAttributionError, match=r"mixture-of-experts.*num_local_experts=4"):
        opt.population().rows(model)


def test_es_lowers_a_language_model_loss_through_rows() -> None:
    model, _ = _setup(_gpt2)
    model.float()
    opt = EggrollOptimizer(model.parameters(), lr=0.5, sigma=0.02, rank=2, pop_size=8, seed=0)
    ids = _text(4)["input_ids"]

    def lm_losses(logits: torch.Tensor) -> torch.Tensor:  # (P, B, T, V) -> (P,)
        logp = logits[:, :, :-1].log_softmax(-1)
        return -logp.gather(-1, ids[None, :, 1:, None].expand(logits.shape[0], -1, -1, 1)).mean(
            dim=(1, 2, 3)
        )

    def closure(population: Any) -> torch.Tensor:
        return lm_losses(population.forward(model, input_ids=ids, path="rows").logits)

    with torch.no_grad():
        start = float(lm_losses(model(input_ids=ids).logits[None]))
        for _ in range(15):
            opt.step(closure)
        assert float(lm_losses(model(input_ids=ids).logits[None])) < start - 0.05
