"""Small helpers shared by the examples: device choice, progress bar, plots.

Examples are run from the repository root as ``python examples/...``; this module makes
``import torcheggroll`` work there even when the package is not installed.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]

try:
    import torcheggroll  # noqa: F401
except ImportError:  # running from a source checkout without `pip install -e .`
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> CUDA when present, else CPU; anything else is passed to ``torch.device``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def progress(
    iterable: Iterable[Any], *, total: int | None = None, desc: str = "", quiet: bool = False
) -> Any:
    """A tqdm bar over ``iterable`` (disabled with ``quiet``)."""
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, disable=quiet, dynamic_ncols=True, leave=True)


def save_plot(
    path: str | Path,
    series: dict[str, tuple[Sequence[float], Sequence[float]]],
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    hline: tuple[float, str] | None = None,
) -> Path:
    """Write a PNG line plot: ``series`` maps a label to ``(x values, y values)``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for label, (xs, ys) in series.items():
        ax.plot(list(xs), list(ys), label=label, linewidth=1.8)
    if hline is not None:
        ax.axhline(hline[0], color="grey", linestyle="--", linewidth=1.0, label=hline[1])
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


# The exit status of a run stopped by Ctrl-C (128 + SIGINT), after it has written its results.
INTERRUPTED_EXIT = 130


def _threads(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def add_common_args(parser: Any, *, path_help: str | None = None) -> None:
    """The options every example shares: --device, --path, --threads, --plot, --json, --quiet."""
    parser.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, ...")
    parser.add_argument(
        "--threads",
        type=_threads,
        default=1,
        help="CPU threads for torch (default 1, the fastest for these small models on a shared "
        "2-core machine: docs/examples.md); 0 keeps torch's default (one per core)",
    )
    parser.add_argument(
        "--path",
        choices=["auto", "lowrank", "materialized"],
        default="auto",
        help=path_help or "population.forward path (see docs/examples.md)",
    )
    parser.add_argument("--plot", default=None, help="save a PNG training curve here")
    parser.add_argument("--json", default=None, help="save the result and history here")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or per-step lines")


def require_positive(parser: Any, args: Any, names: Sequence[str]) -> None:
    """Exit with an argparse error naming the first of ``names`` that is below 1."""
    for name in names:
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")


def save_json(path: str | Path, result: dict[str, Any]) -> None:
    """Write ``result`` as indented JSON, creating the folder."""
    import json

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` intra-op CPU threads (0: torch's default) and restore the number."""
    before = torch.get_num_threads()
    if n > 0:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def trim_history(history: dict[str, list[Any]]) -> None:
    """Cut every list of ``history`` to the shortest one (a run interrupted between two appends)."""
    n = min(len(v) for v in history.values())
    for v in history.values():
        del v[n:]


def fmt(value: float | None, spec: str = ".3f") -> str:
    """``value`` formatted with ``spec``, or ``-`` when there is none (a run stopped before
    step 1)."""
    return "-" if value is None else format(value, spec)


class CapturedStep:
    """One generation per call: ``opt.step(closure)`` eagerly for ``warmup`` calls (on a side
    stream, as CUDA-graph capture asks), then captured once in a CUDA graph and replayed by every
    later call, each replay with the next generation's noise.

    ``opt`` must be ``capturable`` with its parameters on the CUDA ``device``, and the closure
    must read its inputs from tensors that stay in place (copy new data into them between
    calls). The capture itself runs nothing, so every call is one step. ``loss`` is the last
    step's mean loss (a device tensor).
    """

    def __init__(self, opt: Any, closure: Any, device: torch.device | str, warmup: int = 2) -> None:
        if not opt.capturable:
            raise ValueError("Invalid opt: CapturedStep needs EggrollOptimizer(capturable=True)")
        if warmup < 1:
            raise ValueError(f"Invalid warmup: {warmup} (capture needs at least one eager step)")
        self.opt, self.closure, self.warmup = opt, closure, warmup
        self.device = torch.device(device)
        self.stream = torch.cuda.Stream(device=self.device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.loss: torch.Tensor | None = None
        self.calls = 0

    @torch.no_grad()
    def __call__(self) -> None:
        with torch.cuda.device(self.device):
            if self.graph is not None:
                self.graph.replay()
                return
            self.stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.stream):
                self.loss = self.opt.step(self.closure)
            torch.cuda.current_stream().wait_stream(self.stream)
            self.calls += 1
            if self.calls == self.warmup:
                self.graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(self.graph):
                    self.loss = self.opt.step(self.closure)
