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
from torcheggroll import EggrollOptimizer, PopulationDecoder


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
    with torch.device(device):  # initialized where it runs (a GPU's init takes no CPU time)
        return LlamaForCausalLM(cfg).to(dtype).eval()


def timed(fn: Any, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3


def decode(cfg: dict[str, Any], device: torch.device, trials: int) -> dict[str, Any]:
    """ms per decode of each method (median and all trials), interleaved."""
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
    # The static-cache decoder (CUDA graphs on CUDA), the same for the plain model and the rows.
    decoder = PopulationDecoder(model, cfg["new_tokens"], eos_token_id=[], pad_token_id=0)
    owned = PopulationDecoder(
        model, cfg["new_tokens"], eos_token_id=[], pad_token_id=0, watch="owned"
    )

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

    methods: dict[str, Any] = {
        "plain": plain,
        "decoder_plain": lambda: decoder(batch),
        "decoder_rows": lambda: decoder(prompts, population=opt.population()),
    }
    if cfg.get("hf_rows", True):
        methods["rows"] = rows
    if cfg.get("compare_watch"):
        # watch="owned": only operations that take an owned tensor are seen.
        if "rows" in methods:
            methods["rows_owned"] = lambda: rows("owned")
        if device.type == "cpu":  # on CUDA the graphs replay no Python: the same as "all"
            methods["decoder_rows_owned"] = lambda: owned(prompts, population=opt.population())
    if cfg.get("sequential"):
        methods["sequential"] = sequential
    times: dict[str, list[float]] = {m: [] for m in methods}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first = {m: timed(fn, device) for m, fn in methods.items()}  # warm-up (and captures)
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
    # A decode step of the static cache reads all of its slots (keys and values, every layer).
    mc = model.config
    kv_dim = mc.num_key_value_heads * (mc.hidden_size // mc.num_attention_heads)
    slots = cfg["prompt_len"] + cfg["new_tokens"]
    kv = rows_total * slots * mc.num_hidden_layers * 2 * kv_dim * torch.finfo(dtype).bits // 8
    res: dict[str, Any] = {
        "ms_trials": times,
        "ms_first_call": first,
        "bytes_per_step": {"weights": weights, "factors": factors, "kv_cache": kv},
    }
    tokens = rows_total * cfg["new_tokens"]
    for m in methods:
        res[m] = statistics.median(times[m])
        res[f"{m}_tokens_per_s"] = tokens / (res[m] / 1e3)

    def ratio(num: str, den: str) -> tuple[float, float]:
        rs = [a / b for a, b in zip(times[num], times[den], strict=True)]
        return statistics.median(rs), min(rs)

    # Throughput of the second over the first (time of the first over the second).
    pairs = {"rows_vs_plain": ("plain", "rows"), "decoder_rows_vs_plain": ("plain", "decoder_rows")}
    pairs["decoder_rows_vs_decoder_plain"] = ("decoder_plain", "decoder_rows")
    pairs["decoder_plain_vs_plain"] = ("plain", "decoder_plain")
    pairs["rows_owned_vs_plain"] = ("plain", "rows_owned")
    pairs["decoder_rows_owned_vs_plain"] = ("plain", "decoder_rows_owned")
    for key, (num, den) in pairs.items():
        if num in times and den in times:
            res[key], res[f"{key}_worst"] = ratio(num, den)
    if "sequential" in methods:
        res["speedup_over_sequential"] = res["sequential"] / res["rows"]
        res["decoder_speedup_over_sequential"] = res["sequential"] / res["decoder_rows"]
        if "decoder_rows_owned" in res:
            res["decoder_owned_speedup_over_sequential"] = (
                res["sequential"] / res["decoder_rows_owned"]
            )
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


def summary(cfg: dict[str, Any], res: dict[str, Any]) -> str:
    """One configuration's line: each method's time and throughput, then the ratios."""
    cells = [
        f"{m} {res[m]:.1f} ms ({res[f'{m}_tokens_per_s']:.0f} tok/s)" for m in res["ms_trials"]
    ]
    ratios = [
        f"{k} {res[k]:.3f} (worst {res[k + '_worst']:.3f})"
        for k in (
            "decoder_rows_vs_decoder_plain",
            "decoder_rows_vs_plain",
            "decoder_plain_vs_plain",
            "rows_vs_plain",
            "rows_owned_vs_plain",
            "decoder_rows_owned_vs_plain",
        )
        if k in res
    ]
    speedups = [
        f"{k} {res[k]:.1f}x"
        for k in (
            "speedup_over_sequential",
            "decoder_speedup_over_sequential",
            "decoder_owned_speedup_over_sequential",
        )
        if k in res
    ]
    b = res["bytes_per_step"]
    moved = (
        f"bytes/step: weights {b['weights'] / 2**30:.2f} GiB, factors {b['factors'] / 2**30:.2f}"
        f" GiB, KV cache (static, read whole) {b['kv_cache'] / 2**30:.2f} GiB"
    )
    return "\n  ".join([cfg["name"], "; ".join(cells), "; ".join(ratios + speedups), moved])


def configs(preset: str, hf_rows: bool = False) -> list[dict[str, Any]]:
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
    # generate inside the rows (host-bound: 0.31 of plain generate, results/
    # population_generate_h200.txt) only with --hf-rows: it takes most of the call's time.
    return [
        dict(big, name="256x1-r1", pop=256, prompts=1, rank=1, hf_rows=hf_rows),
        dict(big, name="256x1-r4", pop=256, prompts=1, rank=4, hf_rows=hf_rows),
        dict(big, name="64x4-r4", pop=64, prompts=4, rank=4, hf_rows=hf_rows),
    ]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--preset", choices=["cpu", "cpu-host", "h200"], default="cpu")
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--hf-rows", action="store_true", help="h200: also time generate inside the rows"
    )
    p.add_argument("--configs", default=None, help="comma-separated names to run (default: all)")
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
    for cfg in configs(args.preset, args.hf_rows):
        if args.configs and cfg["name"] not in args.configs.split(","):
            continue
        res = dict(cfg, **decode(cfg, device, args.trials))
        results["decode"].append(res)
        print(summary(cfg, res), flush=True)
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

        fig, ax = plt.subplots(figsize=(7, 3.6), dpi=120)
        dec = results["decode"]
        names = [r["name"] for r in dec]
        labels = {
            "plain": "plain generate",
            "rows": "generate in the rows",
            "decoder_plain": "PopulationDecoder, plain model",
            "decoder_rows": "PopulationDecoder, population",
        }
        shown = [m for m in labels if all(f"{m}_tokens_per_s" in r for r in dec)]
        width = 0.8 / len(shown)
        for k, m in enumerate(shown):
            ax.bar(
                [i - 0.4 + width * (k + 0.5) for i in range(len(dec))],
                [r[f"{m}_tokens_per_s"] for r in dec],
                width,
                label=labels[m],
            )
        ax.set_xticks(range(len(dec)), names)
        ax.set_ylabel("generated tokens / s")
        ax.set_title(f"{name}, torch {torch.__version__}", fontsize=8)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(args.plot)


if __name__ == "__main__":
    main()
