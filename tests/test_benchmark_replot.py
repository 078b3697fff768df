"""``benchmarks/step_graph.py --replot``: a GPU result saved as JSON gives its table back."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("step_graph", ROOT / "benchmarks/step_graph.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_replot_prints_each_saved_configuration(tmp_path: Path, capsys: pytest.CaptureFixture):
    script = _script()
    cells = {m: {"ratio": 0.5 + 0.1 * i, "worst_ratio": 0.4} for i, m in enumerate(script.METHODS)}
    cells["inference"] = {"ms": 0.1837, "ratio": 1.0, "worst_ratio": 1.0}
    saved = {
        "meta": {"device": "Some GPU", "torch": "2.11.0", "triton": "3.6.0"},
        "results": [dict(cells, name="paper-r1"), dict(cells, name="mlp-shared")],
    }
    path = tmp_path / "saved.json"
    path.write_text(json.dumps(saved))
    script.main(["--replot", str(path)])
    out = capsys.readouterr().out
    assert "device: Some GPU; torch 2.11.0; triton 3.6.0" in out
    lines = [line.split() for line in out.splitlines()]
    rows = {line[0]: line for line in lines if line and line[0] in ("paper-r1", "mlp-shared")}
    assert set(rows) == {"paper-r1", "mlp-shared"}
    # inference ms, then (ratio, worst) for forward, step, forward-eager, step-eager
    assert rows["paper-r1"][1:4] == ["0.1837", "0.600", "(>=0.400)"]


def test_replot_refuses_a_json_without_gpu_results(tmp_path: Path):
    path = tmp_path / "cpu.json"
    path.write_text(json.dumps({"meta": {}, "results": {"step_ms": 1.0}}))  # a --preset cpu file
    with pytest.raises(ValueError, match=r"Invalid --replot: .*cpu\.json"):
        _script().main(["--replot", str(path)])
