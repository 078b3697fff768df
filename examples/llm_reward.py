#!/usr/bin/env python3
"""llm_reward: ES fine-tuning of a causal language model on a verifiable reward.

Every step, each member of the population answers every prompt, all of them in ONE batched
``generate`` (``population.rows(model)``: the population as rows of one batch, each member's
rows decoding with its own perturbed weights); a verifier scores the answers and the scores are
the fitness. No gradient flows anywhere in the ES phase. ``--decoder`` decodes with
``PopulationDecoder`` instead (a static KV cache of the answer's length; on CUDA the prefill and
the decode step are CUDA graphs replayed every generation): the same greedy tokens, faster.

The task is addition: ``"a+b="`` -> ``"c"``; the reward of a member is the share of prompts it
answers exactly (greedy decoding).

By default (no download) the script builds a tiny byte-level Llama, pre-trains it briefly by
backprop on addition strings (so that it answers some sums right), then fine-tunes it with ES on
the exact-match reward::

    python examples/llm_reward.py --plot reward.png

With ``--model`` it loads a local checkpoint or a hub id through ``from_pretrained`` (tokenizer
included) and skips the pre-training; the prompts then ask in words (``"What is 23 + 58?
Answer with the number only."``, through the chat template when the tokenizer has one) and the
verifier takes the first integer of the answer::

    pip install -e ".[hf]"
    python examples/llm_reward.py --model Qwen/Qwen2.5-0.5B-Instruct --digits 2 --device cuda \\
        --pop-size 64 --steps 200 --sigma 0.001 --lr 0.0005

(A real instruct model of 0.5B parameters already solves most 1-digit sums; use ``--digits 2``
or 3 for a reward that starts low, as in the Countdown-style arithmetic tasks of ES fine-tuning
work.)
"""

from __future__ import annotations

import argparse
import random
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from _common import (
    INTERRUPTED_EXIT,
    progress,
    require_positive,
    resolve_device,
    save_json,
    save_plot,
    torch_threads,
    trim_history,
)

from torcheggroll import EggrollOptimizer, Population, PopulationDecoder

NEWLINE = 10


def _need_transformers() -> Any:
    try:
        import transformers
    except ModuleNotFoundError:
        raise SystemExit(
            'llm_reward needs Hugging Face transformers: pip install -e ".[hf]"'
        ) from None
    return transformers


# ---------------------------------------------------------------------------- tasks
class ByteTask:
    """``"a+b="`` -> ``"{a+b:0Nd}"`` for a tiny byte-level model (token = byte)."""

    def __init__(self, digits: int) -> None:
        hi = 10**digits
        self.pairs = [(a, b) for a in range(hi) for b in range(hi)]
        self.width = digits + 1  # sums have at most digits + 1 digits
        self.prompts = torch.tensor([list(f"{a}+{b}=".encode()) for a, b in self._prompt_pairs()])
        self.answers = torch.tensor(
            [list(f"{a + b:0{self.width}d}".encode()) for a, b in self._prompt_pairs()]
        )

    def _prompt_pairs(self) -> list[tuple[int, int]]:
        # Prompts of one length (every operand with the same number of characters).
        n = len(str(max(a for a, _ in self.pairs)))
        return [(a, b) for a, b in self.pairs if len(str(a)) == n == len(str(b))] or self.pairs

    def text(self, a: int, b: int) -> str:
        return f"{a}+{b}={a + b:0{self.width}d}\n"

    def generate(self, model: Any, ids: torch.Tensor) -> torch.Tensor:
        return model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=self.width,
            do_sample=False,
            pad_token_id=0,
        )

    def rewards(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(..., prompts, length)`` generated tokens -> ``(...)`` share answered exactly."""
        start = self.prompts.shape[1]
        got = tokens[..., start : start + self.width]
        return (got == self.answers.to(tokens.device)).all(-1).float().mean(-1)


class TextTask:
    """Addition asked in words, for a real tokenizer; the verifier reads the first integer."""

    def __init__(self, tokenizer: Any, digits: int, prompts: int, seed: int) -> None:
        rng = random.Random(seed)
        lo, hi = 10 ** (digits - 1) if digits > 1 else 0, 10**digits - 1
        self.pairs = [(rng.randint(lo, hi), rng.randint(lo, hi)) for _ in range(prompts)]
        self.tokenizer = tokenizer
        texts = [self._prompt(a, b) for a, b in self.pairs]
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        batch = tokenizer(texts, return_tensors="pt", padding=True)
        self.prompts, self.mask = batch["input_ids"], batch["attention_mask"]
        self.max_new_tokens = digits + 8

    def _prompt(self, a: int, b: int) -> str:
        question = f"What is {a} + {b}? Answer with the number only."
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(  # type: ignore[no-any-return]
                [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
            )
        return f"{question}\nAnswer: "

    def rewards(self, tokens: torch.Tensor) -> torch.Tensor:
        lead = tokens.shape[:-2]
        flat = tokens.reshape(-1, tokens.shape[-1])[:, self.prompts.shape[1] :]
        texts = self.tokenizer.batch_decode(flat, skip_special_tokens=True)
        scores = []
        for i, text in enumerate(texts):
            a, b = self.pairs[i % len(self.pairs)]
            m = re.search(r"-?\d+", text)
            scores.append(float(m is not None and int(m.group()) == a + b))
        return torch.tensor(scores).reshape(*lead, len(self.pairs)).mean(-1)


# ---------------------------------------------------------------------------- models
def tiny_model(hidden: int, layers: int, device: torch.device) -> Any:
    tf = _need_transformers()
    cfg = tf.LlamaConfig(
        vocab_size=256,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        bos_token_id=None,
        eos_token_id=NEWLINE,
        pad_token_id=0,
    )
    return tf.LlamaForCausalLM(cfg).to(device)


def pretrain(model: Any, task: ByteTask, steps: int, seed: int, device: torch.device) -> float:
    """Brief backprop on addition strings; returns the last loss."""
    rng = random.Random(seed)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        batch = torch.tensor(
            [list(task.text(*rng.choice(task.pairs)).encode()) for _ in range(64)], device=device
        )
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return float(loss.detach())


# ---------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--model",
        default=None,
        help="a local checkpoint or hub id (from_pretrained); default: a tiny model built here",
    )
    p.add_argument("--digits", type=int, default=1, help="digits of each operand")
    p.add_argument("--prompts", type=int, default=64, help="--model: prompts per step")
    p.add_argument("--hidden", type=int, default=64, help="tiny model: hidden size")
    p.add_argument("--layers", type=int, default=2, help="tiny model: layers")
    p.add_argument(
        "--pretrain-steps", type=int, default=150, help="tiny model: backprop steps before ES"
    )
    p.add_argument("--steps", type=int, default=150, help="ES steps")
    p.add_argument("--pop-size", type=int, default=32)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--lr", type=float, default=0.3)
    p.add_argument("--sigma", type=float, default=0.02)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, ...")
    p.add_argument(
        "--decoder",
        action="store_true",
        help="decode with PopulationDecoder (a static KV cache, and on CUDA CUDA graphs replayed "
        "every step) instead of generate inside population.rows: the same greedy tokens, "
        "always the full answer length",
    )
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument(
        "--threads", type=int, default=1, help="CPU threads for torch (0: torch's default)"
    )
    p.add_argument("--plot", default=None, help="write the reward curve to this PNG")
    p.add_argument("--json", default=None, help="write the run's numbers to this JSON file")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    require_positive(p, args, ["digits", "steps", "pop_size", "hidden", "layers", "prompts"])
    if args.pretrain_steps < 0:
        p.error(f"--pretrain-steps must be >= 0, got {args.pretrain_steps}")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Fine-tune, print the summary, write ``--plot``/``--json``; Ctrl-C stops early and still
    writes them."""
    args = parse_args(argv)
    with torch_threads(args.threads):
        return run(args)


def run(args: argparse.Namespace) -> dict[str, Any]:
    tf = _need_transformers()
    device = resolve_device(args.device)
    torch.manual_seed(args.seed)
    warnings.filterwarnings("ignore", module="transformers")
    started = time.perf_counter()
    task: ByteTask | TextTask
    if args.model is None:
        task = ByteTask(args.digits)
        model = tiny_model(args.hidden, args.layers, device)
        pre_loss = pretrain(model, task, args.pretrain_steps, args.seed, device)
        prompts, mask = task.prompts.to(device), None
    else:
        tokenizer = tf.AutoTokenizer.from_pretrained(args.model)
        model = (
            tf.AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype))
            .to(device)
            .eval()
        )
        task = TextTask(tokenizer, args.digits, args.prompts, args.seed)
        prompts, mask = task.prompts.to(device), task.mask.to(device)
        pre_loss = float("nan")
    pretrain_seconds = time.perf_counter() - started
    opt = EggrollOptimizer(
        model.parameters(),
        lr=args.lr,
        sigma=args.sigma,
        rank=args.rank,
        pop_size=args.pop_size,
        seed=args.seed,
        maximize=True,
        shaping="centered_rank",
        # Device counters let the decoder's CUDA graphs follow the generation.
        capturable=args.decoder and device.type == "cuda",
    )

    new_tokens = task.width if isinstance(task, ByteTask) else task.max_new_tokens
    pad = 0 if isinstance(task, ByteTask) else task.tokenizer.pad_token_id
    decoder = PopulationDecoder(model, new_tokens, pad_token_id=pad) if args.decoder else None

    def decode(model_rows: torch.Tensor, attention: torch.Tensor | None) -> torch.Tensor:
        if isinstance(task, ByteTask):
            return task.generate(model, model_rows)
        return model.generate(
            model_rows,
            attention_mask=attention,
            max_new_tokens=task.max_new_tokens,
            do_sample=False,
            pad_token_id=task.tokenizer.pad_token_id,
        )

    def closure(population: Population) -> torch.Tensor:
        # The whole population answers every prompt in one batched decode.
        if decoder is not None:
            out = decoder(prompts, attention_mask=mask, population=population)  # (P, B, L + T)
            return task.rewards(out.cpu()).to(device)  # (P,) the members' fitness
        with population.rows(model) as rows:
            out = decode(rows.repeat(prompts), None if mask is None else rows.repeat(mask))
        return task.rewards(rows.split(out).cpu()).to(device)

    @torch.no_grad()
    def centre_reward() -> float:
        out = decode(prompts, mask) if decoder is None else decoder(prompts, attention_mask=mask)
        return float(task.rewards(out[None].cpu()))

    history: dict[str, list[float]] = {
        "step": [0],
        "reward": [centre_reward()],
        "population_reward": [float("nan")],
    }
    es_start = time.perf_counter()
    interrupted = False
    bar = progress(range(1, args.steps + 1), total=args.steps, desc="llm_reward", quiet=args.quiet)
    try:
        with torch.no_grad():
            for step in bar:
                mean = float(opt.step(closure))
                history["step"].append(step)
                history["population_reward"].append(mean)
                history["reward"].append(centre_reward())
                if not args.quiet:
                    bar.set_postfix(reward=f"{history['reward'][-1]:.2f}", population=f"{mean:.2f}")
    except KeyboardInterrupt:
        interrupted = True
        trim_history(history)
    bar.close()
    elapsed = time.perf_counter() - es_start
    result = {
        "interrupted": interrupted,
        "steps_done": history["step"][-1],
        "initial_reward": history["reward"][0],
        "final_reward": history["reward"][-1],
        "best_reward": max(history["reward"]),
        "pretrain_loss": pre_loss,
        "pretrain_seconds": pretrain_seconds,
        "es_seconds": elapsed,
        "device": str(device),
        "args": vars(args),
        "history": history,
    }
    stopped = f" (interrupted after step {result['steps_done']})" if interrupted else ""
    print(
        f"llm_reward summary{stopped}: "
        f"{'tiny byte-level Llama' if args.model is None else args.model}, "
        f"pop {args.pop_size} x {prompts.shape[0]} prompts in one decode per step; "
        "exact-match reward "
        f"{result['initial_reward']:.2f} -> {result['final_reward']:.2f} "
        f"(best {result['best_reward']:.2f}) in "
        f"{result['steps_done']} ES steps, {elapsed:.0f}s on {device} "
        f"(pre-training {pretrain_seconds:.0f}s)"
    )
    if args.plot:
        save_plot(
            args.plot,
            {
                "centre (greedy)": (history["step"], history["reward"]),
                "population mean": (history["step"][1:], history["population_reward"][1:]),
            },
            title=f"llm_reward: ES on exact-match reward, pop {args.pop_size}",
            xlabel="ES step",
            ylabel="share of sums answered exactly",
        )
    if args.json:
        save_json(args.json, result)
    return result


if __name__ == "__main__":
    sys.exit(INTERRUPTED_EXIT if main()["interrupted"] else 0)
