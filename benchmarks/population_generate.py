"""A whole population decoding with one batched ``generate``, against plain ``generate``.

In one process, interleaved (each trial times every method in turn):

* ``plain``: ``model.generate`` of the same ``P x B`` prompt rows with the unperturbed model;
* ``rows``: the population as rows of one batch (``with population.rows(model)``): one
  ``generate`` in which member ``p``'s rows use its perturbed weights;
* ``sequential`` (CPU preset): what a zero-argument closure does, member by member (the optimizer
  perturbs the weights in place, ``generate`` runs on that member's ``B`` prompts).

Also the population forward without generate (``--preset cpu``): tiny GPT-2, Llama and BERT
configurations through ``path="rows"`` and the vmap forward against plain inference of the same
rows.

Greedy decoding with a KV cache, a fixed number of new tokens, Llama configurations built from
a config (random weights, no download). ``--preset h200`` times bf16 Llama (hidden 2048, 16
layers) at 256 x 1 and 64 x 4 rows, ranks 1 and 4, and reports the bytes a decode step must
read (weights plus every member's factors) beside each throughput. ``--preset cpu-host`` times
a 16-layer Llama of hidden size 32 on the CPU, whose arithmetic is negligible: the host's cost
of a decode step (plain, rows with the default ``watch="all"``, every operation seen by a
torch-function mode, and rows with ``watch="owned"``), the cost that bounds a GPU decode of a
deep model when nothing is captured; the ``h200`` preset times both ways too.

Examples::

    python benchmarks/population_generate.py --preset cpu --json out.json --plot out.png
    python benchmarks/population_generate.py --preset cpu-host --trials 5
    python benchmarks/population_generate.py --preset h200
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from torcheggroll import EggrollOptimizer


def llama(
    hidden: int, layers: int, intermediate: int, vocab: int, device: Any, dtype: torch.dtype
) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        num_key_value_heads=max(1, hidden // 64),
        max_position_embeddings=512,
    )
    return LlamaForCausalLM(cfg).to(device, dtype).eval()


def timed(fn: Any, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3


def decode(cfg: dict[str, Any], device: torch.device, trials: int) -> dict[str, Any]:
    """ms per ``generate`` of each method (median and all trials)."""
    torch.manual_seed(0)
    dtype = getattr(torch, cfg["dtype"])
    model = llama(cfg["hidden"], cfg["layers"], cfg["intermediate"], cfg["vocab"], device, dtype)
    opt = EggrollOptimizer(
        model.parameters(),
        sigma=1e-3,
        rank=cfg["rank"],
        pop_size=cfg["pop"],
        seed=0,
        capturable=device.type == "cuda",
    )
    prompts = torch.randint(1, cfg["vocab"], (cfg["prompts"], cfg["prompt_len"]), device=device)
    settings = dict(
        max_new_tokens=cfg["new_tokens"],
        min_new_tokens=cfg["new_tokens"],
        do_sample=False,
        pad_token_id=0,
        use_cache=True,
    )
    batch = prompts.repeat(cfg["pop"], 1)

    def plain() -> Any:
        return model.generate(batch, attention_mask=torch.ones_like(batch), **settings)

    def rows(watch: str = "all") -> Any:
        population = opt.population()
        with population.rows(model, watch=watch) as r:
            ids = r.repeat(prompts)
            return model.generate(ids, attention_mask=torch.ones_like(ids), **settings)

    def sequential() -> Any:
        return opt.evaluate(
            lambda: float(
                model.generate(prompts, attention_mask=torch.ones_like(prompts), **settings)[0, -1]
            )
        )

    methods = {"plain": plain, "rows": rows}
    if cfg.get("compare_watch"):
        # watch="owned": only operations that take an owned tensor are seen.
        methods["rows_owned"] = lambda: rows("owned")
    if cfg.get("sequential"):
        methods["sequential"] = sequential
    times: dict[str, list[float]] = {m: [] for m in methods}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for fn in methods.values():
            fn()  # warm up
        for _ in range(trials):
            for name, fn in methods.items():
                times[name].append(timed(fn, device))
    rows_total = cfg["pop"] * cfg["prompts"]
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    # Every member's factors, N * r * (m + n) elements per matrix (the bound's count; antithetic
    # pairs share a draw, so a kernel that reads each draw once moves half of it).
    factors = sum(
        cfg["pop"] * cfg["rank"] * sum(p.shape) * p.element_size()
        for p in model.parameters()
        if p.dim() == 2 and min(p.shape) > cfg["rank"]
    )
    res: dict[str, Any] = {
        "ms_trials": times,
        "bytes_per_step": {"weights": weights, "factors": factors},
    }
    for m in methods:
        res[m] = statistics.median(times[m])
        tokens = rows_total * cfg["new_tokens"]
        res[f"{m}_tokens_per_s"] = tokens / (res[m] / 1e3)
    res["rows_vs_plain"] = statistics.median(
        p / r for p, r in zip(times["plain"], times["rows"], strict=True)
    )
    res["rows_vs_plain_worst"] = min(
        p / r for p, r in zip(times["plain"], times["rows"], strict=True)
    )
    if "rows_owned" in methods:
        res["rows_owned_vs_plain"] = statistics.median(
            p / r for p, r in zip(times["plain"], times["rows_owned"], strict=True)
        )
    if "sequential" in methods:
        res["speedup_over_sequential"] = res["sequential"] / res["rows"]
    return res


def forward_small(trials: int) -> list[dict[str, Any]]:
    """Tiny HF models: population forward (rows and vmap) against plain inference of the rows."""
    import transformers as tf

    models = {
        "gpt2": lambda: tf.GPT2LMHeadModel(
            tf.GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=64)
        ),
        "llama": lambda: tf.LlamaForCausalLM(
            tf.LlamaConfig(
                vocab_size=256,
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=4,
                max_position_embeddings=64,
            )
        ),
        "bert": lambda: tf.BertForSequenceClassification(
            tf.BertConfig(
                vocab_size=256,
                hidden_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                intermediate_size=128,
                max_position_embeddings=64,
            )
        ),
    }
    out = []
    for name, make in models.items():
        torch.manual_seed(0)
        model = make().eval()
        pop, batch, seq = 16, 4, 16
        opt = EggrollOptimizer(model.parameters(), sigma=1e-3, rank=4, pop_size=pop, seed=0)
        ids = torch.randint(1, 256, (batch, seq))
        flat = ids.repeat(pop, 1)
        methods = {
            "plain": lambda model=model, flat=flat: model(input_ids=flat, use_cache=False),
            "rows": lambda model=model, opt=opt, ids=ids: opt.population().forward(
                model, input_ids=ids, use_cache=False, path="rows"
            ),
            "vmap": lambda model=model, opt=opt, ids=ids: opt.population().forward(
                model, input_ids=ids, use_cache=False
            ),
        }
        times: dict[str, list[float]] = {m: [] for m in methods}
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for fn in methods.values():
                fn()
            for _ in range(trials):
                for m, fn in methods.items():
                    times[m].append(
                        statistics.median(timed(fn, torch.device("cpu")) for _ in range(5))
                    )
        row = {"model": name, "rows": pop * batch, "ms_trials": times}
        for m in ("rows", "vmap"):
            ratios = [t / p for t, p in zip(times[m], times["plain"], strict=True)]
            row[f"{m}_over_plain"] = statistics.median(ratios)
            row[f"{m}_over_plain_worst"] = max(ratios)
        out.append(row)
    return out


def configs(preset: str) -> list[dict[str, Any]]:
    if preset == "cpu-host":
        # Arithmetic too small to matter: what a decode step costs the host (Python and
        # dispatch), which is what bounds the GPU decode of a model with many layers.
        return [
            dict(
                name=f"host-16layers-r{rank}",
                hidden=32,
                layers=16,
                intermediate=64,
                vocab=256,
                pop=16,
                prompts=1,
                prompt_len=8,
                new_tokens=32,
                rank=rank,
                dtype="float32",
                compare_watch=True,
            )
            for rank in (1, 4)
        ]
    if preset == "cpu":
        return [
            dict(
                name="llama256-cpu",
                hidden=256,
                layers=4,
                intermediate=688,
                vocab=256,
                pop=32,
                prompts=2,
                prompt_len=16,
                new_tokens=32,
                rank=4,
                dtype="float32",
                sequential=True,
            )
        ]
    big = dict(
        hidden=2048,
        layers=16,
        intermediate=5632,
        vocab=32000,
        prompt_len=64,
        new_tokens=128,
        dtype="bfloat16",
    )
    return [
        dict(big, name="256x1-r1", pop=256, prompts=1, rank=1, compare_watch=True),
        dict(big, name="256x1-r4", pop=256, prompts=1, rank=4, compare_watch=True),
        dict(big, name="64x4-r4", pop=64, prompts=4, rank=4, compare_watch=True),
    ]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--preset", choices=["cpu", "cpu-host", "h200"], default="cpu")
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--plot", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.preset == "h200" else "cpu")
    name = (
        torch.cuda.get_device_name()
        if device.type == "cuda"
        else f"{platform.processor() or platform.machine()} CPU, {args.threads} thread(s)"
    )
    meta = {
        "script": "benchmarks/population_generate.py",
        "argv": sys.argv[1:] if argv is None else argv,
        "device": name,
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }
    print(f"device: {name}; torch {torch.__version__}")
    results: dict[str, Any] = {"decode": [], "forward": []}
    for cfg in configs(args.preset):
        res = dict(cfg, **decode(cfg, device, args.trials))
        results["decode"].append(res)
        line = (
            f"{cfg['name']:<14} plain {res['plain']:9.1f} ms "
            f"({res['plain_tokens_per_s']:9.0f} tok/s)  "
            f"rows {res['rows']:9.1f} ms ({res['rows_tokens_per_s']:9.0f} tok/s)  "
            f"throughput vs plain {res['rows_vs_plain']:.3f} "
            f"(worst {res['rows_vs_plain_worst']:.3f})"
        )
        if "rows_owned" in res:
            step = {m: res[m] / cfg["new_tokens"] for m in ("plain", "rows", "rows_owned")}
            line += (
                f"  per decode step: plain {step['plain']:.2f} ms, rows {step['rows']:.2f} ms, "
                f"rows with watch='owned' {step['rows_owned']:.2f} ms "
                f"(throughput vs plain {res['rows_owned_vs_plain']:.3f})"
            )
        if "sequential" in res:
            line += (
                f"  sequential {res['sequential']:.0f} ms, "
                f"rows {res['speedup_over_sequential']:.1f}x faster"
            )
        b = res["bytes_per_step"]
        line += (
            f"  bytes/step: weights {b['weights'] / 2**30:.2f} GiB, "
            f"factors {b['factors'] / 2**30:.2f} GiB"
        )
        print(line, flush=True)
    if args.preset == "cpu":
        results["forward"] = forward_small(args.trials)
        for row in results["forward"]:
            print(
                f"forward {row['model']:<6} {row['rows']} rows: "
                f"rows path {row['rows_over_plain']:.2f}x plain "
                f"(worst {row['rows_over_plain_worst']:.2f}), "
                f"vmap path {row['vmap_over_plain']:.2f}x "
                f"(worst {row['vmap_over_plain_worst']:.2f})",
                flush=True,
            )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6.5, 3.5), dpi=120)
        dec = results["decode"]
        names = [r["name"] for r in dec]
        ax.bar(
            [i - 0.2 for i in range(len(dec))],
            [r["plain_tokens_per_s"] for r in dec],
            0.4,
            label="plain generate",
        )
        ax.bar(
            [i + 0.2 for i in range(len(dec))],
            [r["rows_tokens_per_s"] for r in dec],
            0.4,
            label="population (rows)",
        )
        ax.set_xticks(range(len(dec)), names)
        ax.set_ylabel("generated tokens / s")
        ax.set_title(f"{name}, torch {torch.__version__}", fontsize=8)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(args.plot)


if __name__ == "__main__":
    main()
