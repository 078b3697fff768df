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


def test_pairs_cancel_a_clock_that_drifts_over_a_trial(monkeypatch: pytest.MonkeyPatch) -> None:
    """A card that slows by 2 % per timing: timed once per trial, the later methods read slower
    than they are; alternated with inference (in turns first and second), the drift cancels."""
    script = _script()
    cost = {m: 1.0 + 0.25 * i for i, m in enumerate(script.METHODS)}  # true ms at full clock
    clock = [1.0]

    def fake_time(fn, rep=100):  # type: ignore[no-untyped-def]
        clock[0] *= 1.02
        return cost[fn] * clock[0]

    monkeypatch.setattr(script, "runners", lambda cfg, device: {m: m for m in script.METHODS})
    monkeypatch.setattr(script, "time_ms", fake_time)
    once = script.measure_gpu({}, None, trials=3)
    clock[0] = 1.0
    paired = script.measure_gpu({}, None, trials=3, pairs=4)
    for i, m in enumerate(script.METHODS[1:], start=1):
        truth = cost["inference"] / cost[m]
        # Timed i timings after inference: i steps of drift. Paired, in alternating order: one
        # step against the method and one for it, which the median of the pairs averages.
        assert once[m]["ratio"] == pytest.approx(truth / 1.02**i, rel=1e-9)
        assert paired[m]["ratio"] == pytest.approx(truth * (1.02 + 1 / 1.02) / 2, rel=1e-9)
        assert abs(paired[m]["ratio"] / truth - 1) < 2e-4
        assert len(paired["pair_ratios"][m]) == 3 and len(paired["pair_ratios"][m][0]) == 4
    assert paired["pairs"] == 4 and "pair_ratios" not in once
