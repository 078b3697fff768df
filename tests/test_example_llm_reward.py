"""examples/llm_reward.py: ES fine-tuning of a causal LM on an exact-match reward, the whole
population decoding in one batch. Tiny settings; the reward must rise."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("tqdm")
pytest.importorskip("matplotlib")
transformers = pytest.importorskip("transformers")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(scope="module")
def llm_reward():
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    spec = importlib.util.spec_from_file_location("llm_reward_example", EXAMPLES / "llm_reward.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_reward_rises(llm_reward, tmp_path):
    png, js = tmp_path / "reward.png", tmp_path / "reward.json"
    res = llm_reward.main(["--steps", "30", "--quiet", "--plot", str(png), "--json", str(js)])
    assert res["steps_done"] == 30 and png.exists() and js.exists()
    # 150 backprop steps leave the tiny model answering about 60% of the sums; 30 ES steps on
    # the reward alone add clearly more than what one noisy evaluation could (1/100 a sum).
    assert res["best_reward"] >= res["initial_reward"] + 0.1, res["history"]["reward"]


def test_the_decoder_gives_the_same_run_as_generate(llm_reward):
    """--decoder (PopulationDecoder) decodes the same greedy tokens as generate in the rows, so
    the seeded runs' rewards (the centre's and the population's, step by step) are equal."""
    common = ["--steps", "4", "--pretrain-steps", "60", "--pop-size", "8", "--quiet"]
    plain, fast = llm_reward.main(common), llm_reward.main([*common, "--decoder"])
    assert fast["history"]["reward"] == plain["history"]["reward"]
    assert fast["history"]["population_reward"][1:] == plain["history"]["population_reward"][1:]


@pytest.mark.parametrize("decoder", [False, True], ids=["generate", "decoder"])
def test_a_local_checkpoint_with_its_own_tokenizer(llm_reward, tmp_path, decoder):
    """--model loads through from_pretrained (a checkpoint written here: a tiny Llama and a
    word-level tokenizer, no download) and asks in words, through the text verifier."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = [
        "<pad>",
        "<eos>",
        "<unk>",
        "What",
        "is",
        "+",
        "?",
        "Answer",
        "with",
        "the",
        "number",
        "only",
        ".",
        ":",
        "\n",
        *[str(d) for d in range(10)],
    ]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.Punctuation(),
        ]
    )
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )
    cfg = transformers.LlamaConfig(
        vocab_size=len(words),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        bos_token_id=None,
        eos_token_id=1,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "ckpt")
    fast.save_pretrained(tmp_path / "ckpt")
    res = llm_reward.main(
        [
            "--model",
            str(tmp_path / "ckpt"),
            "--steps",
            "2",
            "--pop-size",
            "4",
            "--prompts",
            "3",
            "--quiet",
            *(["--decoder"] if decoder else []),
        ]
    )
    assert res["steps_done"] == 2
    assert 0.0 <= res["initial_reward"] <= 1.0 and 0.0 <= res["final_reward"] <= 1.0


def test_without_transformers_it_says_what_to_install(llm_reward, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import fails
    with pytest.raises(SystemExit, match=r'pip install -e "\.\[hf\]"'):
        llm_reward.main(["--steps", "1", "--quiet"])
