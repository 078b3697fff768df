"""The README's code blocks run as written."""

from __future__ import annotations

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def _block_containing(text: str) -> str:
    (block,) = [b for b in _python_blocks() if text in b]
    return block


def test_drop_in_example() -> None:
    torch.manual_seed(0)
    namespace: dict = {}
    exec(compile(_block_containing("Before: backprop"), "README.md", "exec"), namespace)
    model, x, y = namespace["model"], namespace["x"], namespace["y"]
    with torch.no_grad():
        final = float(((model(x) - y) ** 2).mean())
        baseline = float(((y - y.mean()) ** 2).mean())  # predicting the mean
    # 300 ES steps must beat the best constant predictor clearly.
    assert final < 0.5 * baseline, (final, baseline)
    assert namespace["opt"].generation == 300


def test_original_api_snippet(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    x, y = torch.randn(16, 4), torch.randn(16, 2)

    def score(params: dict) -> float:
        out = torch.func.functional_call(model, params, (x,))
        return -float(((out - y) ** 2).mean())

    namespace = {"model": model, "x": x, "y": y, "score": score, "torch": torch}
    monkeypatch.chdir(tmp_path)  # the snippet saves es.pt
    exec(compile(_block_containing("TorchEggrollES(model"), "README.md", "exec"), namespace)
    assert (tmp_path / "es.pt").exists()
    assert namespace["es"].optimizer.generation == 2


def test_quick_start_installs_cpu_torch_first() -> None:
    # A bare `torch` requirement pulls the multi-GB CUDA build on Linux: the Quick start installs
    # the CPU build before anything that depends on torch, and runs the tests as CI does.
    section = README.read_text().split("## Quick start", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    commands = [
        c for c in block.replace("\\\n", " ").splitlines() if c.strip() and not c.startswith("#")
    ]
    assert len(commands) == 2
    setup, tests = commands
    cpu = setup.index("pip install torch --index-url https://download.pytorch.org/whl/cpu")
    assert cpu < setup.index("pip install -e") < setup.index("python examples/nano_classifier.py")
    assert tests.strip().endswith("python -m pytest -q")
    ci = (README.parent / ".ci" / "run").read_text()
    assert "\npython -m pytest -q\n" in ci


def test_population_generate_snippet() -> None:
    transformers = __import__("pytest").importorskip("transformers")
    from torcheggroll import EggrollOptimizer

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    population = EggrollOptimizer(model.parameters(), pop_size=4, seed=0).population()
    prompt_ids = torch.randint(3, 32, (2, 5))
    mask = torch.ones_like(prompt_ids)
    namespace = {"population": population, "model": model, "prompt_ids": prompt_ids, "mask": mask}
    with torch.no_grad():
        exec(
            compile(_block_containing("population.rows(model) as rows"), "README.md", "exec"),
            namespace,
        )
    assert namespace["tokens"].shape[:2] == (4, 2)


def test_capture_snippet_is_the_recipe_of_the_docs() -> None:
    # The README's CUDA graph lines are the recipe of docs/capture.md, which runs as a test on
    # CUDA (tests/test_capture.py): check that the README still names the same calls.
    block = _block_containing("capturable=True")
    for call in (
        "torch.cuda.CUDAGraph()",
        "torch.cuda.graph(graph)",
        "opt.step(closure)",
        "graph.replay()",
    ):
        assert call in block
