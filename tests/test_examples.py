"""Smoke tests for the examples: tiny settings, and each must learn (beat chance / lower its loss).

The examples are imported from examples/ and their ``main(argv)`` is called in-process.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("tqdm")
pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def _load(name: str, path: Path):
    for p in (str(path.parent), str(EXAMPLES)):
        if p not in sys.path:
            sys.path.insert(0, p)
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def classifier():
    return _load("nano_classifier", EXAMPLES / "nano_classifier.py")


@pytest.fixture(scope="module")
def nano_egg():
    return _load("nano_egg_train", EXAMPLES / "nano_egg" / "train.py")


@pytest.fixture(scope="module")
def cartpole():
    return _load("cartpole_example", EXAMPLES / "cartpole.py")


# ------------------------------------------------------------------ nano_classifier
def test_classifier_learns_and_plots(classifier, tmp_path):
    png = tmp_path / "curve.png"
    r = classifier.main(
        ["--steps", "15", "--pop-size", "32", "--n-per-class", "10", "--quiet", "--plot", str(png)]
    )
    # The held-out set has 200 examples (20 per class). A classifier at chance (10%) gets
    # Binomial(200, 0.1) right: mean 20, sd 4.2, so 40% (80 right) is 14 sd above chance.
    assert r["final_test_acc"] > 0.4
    assert r["final_loss"] < r["initial_loss"] - 0.5
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_classifier_refuses_a_cuda_graph_off_cuda(classifier, capsys):
    with pytest.raises(SystemExit):
        classifier.parse_args(["--cuda-graph", "--device", "cpu"])
    assert "--cuda-graph needs a CUDA device, got --device cpu" in capsys.readouterr().err


def test_captured_step_refuses_what_it_cannot_capture(classifier):
    from _common import CapturedStep  # the examples' folder is on sys.path once one is loaded

    from torcheggroll import EggrollOptimizer

    w = torch.nn.Parameter(torch.zeros(3, 2))
    with pytest.raises(ValueError, match=r"Invalid opt: CapturedStep needs .*capturable=True"):
        CapturedStep(EggrollOptimizer([w], pop_size=4, seed=0), lambda p: None, "cuda")
    opt = EggrollOptimizer([w], pop_size=4, seed=0, capturable=True)
    with pytest.raises(ValueError, match=r"Invalid warmup: 0"):
        CapturedStep(opt, lambda p: None, "cuda", warmup=0)


@pytest.mark.cuda
def test_classifier_with_a_captured_step_trains_like_eager_steps(classifier):
    """--cuda-graph: two eager steps, then one CUDA graph replayed for the other ten; the same
    seed without it gives the same losses to float32 round-off (the noise does not depend on
    capture; the capturable update takes its own kernels, so the bits may differ)."""
    if not torch.cuda.is_available():
        pytest.skip("CUDA is not available")
    base = ["--steps", "12", "--pop-size", "32", "--n-per-class", "10", "--quiet"]
    eager = classifier.main([*base, "--device", "cuda"])
    graph = classifier.main([*base, "--device", "cuda", "--cuda-graph"])
    assert graph["steps_done"] == eager["steps_done"] == 12
    torch.testing.assert_close(
        torch.tensor(graph["history"]["loss"]),
        torch.tensor(eager["history"]["loss"]),
        rtol=1e-4,
        atol=1e-5,
    )
    assert graph["final_loss"] < graph["initial_loss"] - 0.3


# ------------------------------------------------------------------ nano_egg
# A larger step than the default suits these few tiny generations.
TINY_LM = [
    "--lr",
    "1.0",
    "--epochs",
    "6",
    "--pop-size",
    "32",
    "--batch-size",
    "4",
    "--chunk",
    "2",
    "--seq-len",
    "32",
    "--hidden-dim",
    "16",
    "--valid-windows",
    "32",
    "--quiet",
]


@pytest.mark.parametrize("mode", ["float", "int"])
def test_nano_egg_learns(nano_egg, mode, tmp_path):
    r = nano_egg.main([*TINY_LM, "--mode", mode, "--plot", str(tmp_path / "lm.png")])
    # Uniform prediction over 256 bytes costs exactly 8 bits per byte. Validation is the centre
    # model on a fixed set of 32 x 32 bytes, so "down" is a deterministic comparison; the margin
    # (0.5 bit) is far above its float round-off.
    assert r["best_valid_bpb"] < min(8.0, r["initial_valid_bpb"]) - 0.5
    assert math.isfinite(r["final_train_bpb"])
    assert (tmp_path / "lm.png").exists()


def test_nano_egg_reads_npy(nano_egg, tmp_path):
    # 10 documents of a 3-byte cycle: the last one is the validation split and easy to predict.
    docs = [b"abc" * (30 + 5 * i) for i in range(10)]
    data = np.concatenate([np.frombuffer(b"\0" + d, dtype=np.uint8) for d in docs])
    path = tmp_path / "tiny.npy"
    np.save(path, data)
    r = nano_egg.main([*TINY_LM, "--data", str(path), "--seq-len", "16", "--valid-windows", "8"])
    assert r["best_valid_bpb"] < r["initial_valid_bpb"] - 0.5


def test_nano_egg_missing_data_file_names_the_argument(nano_egg, tmp_path, capsys):
    missing = tmp_path / "no_such_corpus.npy"
    with pytest.raises(SystemExit) as exc:
        nano_egg.main(["--data", str(missing), "--quiet"])
    assert exc.value.code == 2  # an argparse usage error, before any work
    err = capsys.readouterr().err
    assert "--data" in err and str(missing) in err and nano_egg.SAMPLE_DATA in err


def test_nano_egg_fan_in_groups_and_learns(nano_egg, tmp_path):
    args = nano_egg.parse_args([*TINY_LM, "--sigma-scaling", "fan_in", "--sigma", "0.3"])
    model = nano_egg.build_model("float", 16, 1)
    kinds = {g["sigma_scaling"]: g["params"] for g in nano_egg.param_groups(model, args)}
    assert set(kinds) == {"none", "fan_in"}
    assert [p is model.embed.weight for p in kinds["none"]] == [True]  # the embedding keeps sigma
    assert sum(p.numel() for g in kinds.values() for p in g) == sum(
        p.numel() for p in model.parameters()
    )
    r = nano_egg.main(
        [
            *TINY_LM,
            "--sigma-scaling",
            "fan_in",
            "--sigma",
            "0.3",
            "--json",
            str(tmp_path / "r.json"),
        ]
    )
    assert r["best_valid_bpb"] < min(8.0, r["initial_valid_bpb"]) - 0.5
    assert json.loads((tmp_path / "r.json").read_text())["args"]["sigma_scaling"] == "fan_in"


def test_nano_egg_int_mode_refuses_fan_in(nano_egg, capsys):
    with pytest.raises(SystemExit) as exc:
        nano_egg.parse_args(["--mode", "int", "--sigma-scaling", "fan_in"])
    assert exc.value.code == 2 and "--sigma-scaling" in capsys.readouterr().err


def test_nano_egg_time_limit_stops_cleanly(nano_egg, monkeypatch, tmp_path):
    # A fake clock that advances 1 s per reading: the stop is deterministic.
    ticks = iter(range(10**6))
    monkeypatch.setattr(nano_egg, "clock", lambda: float(next(ticks)))
    png, js = tmp_path / "lm.png", tmp_path / "lm.json"
    r = nano_egg.main(
        [*TINY_LM, "--epochs", "1000", "--time-limit", "20", "--plot", str(png), "--json", str(js)]
    )
    assert r["stopped_by_time_limit"] is True and r["interrupted"] is False
    assert 1 <= r["epochs_done"] < 1000
    saved = json.loads(js.read_text())
    assert saved["history"]["epoch"] == list(range(1, r["epochs_done"] + 1))
    assert len({len(v) for v in saved["history"].values()}) == 1
    # It stopped before an epoch that would have ended past the limit, not after it.
    assert saved["history"]["seconds"][-1] <= 20
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_nano_egg_cosine_schedule_by_epochs_and_by_time(nano_egg):
    args = nano_egg.parse_args(["--lr-schedule", "cosine", "--epochs", "11", "--lr-final", "0.1"])
    f = [nano_egg.lr_factor(args, e, 0.0) for e in range(1, 12)]
    assert f[0] == 1.0 and f[-1] == pytest.approx(0.1)
    assert f[5] == pytest.approx(0.55)  # halfway: the mean of the two ends
    assert all(f[i] > f[i + 1] for i in range(len(f) - 1))
    # With a time limit, progress is the larger of the two shares: time here.
    args.time_limit = 100.0
    assert nano_egg.lr_factor(args, 1, 50.0) == pytest.approx(0.55)
    assert nano_egg.lr_factor(args, 1, 250.0) == pytest.approx(0.1)
    constant = nano_egg.parse_args(["--epochs", "11"])
    assert nano_egg.lr_factor(constant, 11, 1e9) == 1.0


def test_nano_egg_cosine_schedule_sets_the_optimizer_lr(nano_egg, monkeypatch):
    seen = []
    real_step = nano_egg.EggrollOptimizer.step

    def step(self, closure):  # type: ignore[no-untyped-def]
        seen.append(self.param_groups[0]["lr"])
        return real_step(self, closure)

    monkeypatch.setattr(nano_egg.EggrollOptimizer, "step", step)
    r = nano_egg.main([*TINY_LM, "--epochs", "5", "--lr-schedule", "cosine", "--lr-final", "0.2"])
    assert seen == pytest.approx([1.0 * f for f in r["history"]["lr_factor"]])
    assert seen[0] == 1.0 and seen[-1] == pytest.approx(0.2)  # the last epoch at --lr-final
    assert seen[2] == pytest.approx(0.6)  # halfway


def test_nano_egg_rejects_lr_final_outside_0_1(nano_egg, capsys):
    with pytest.raises(SystemExit):
        nano_egg.parse_args(["--lr-final", "1.5"])
    err = capsys.readouterr().err
    assert "--lr-final" in err and "1.5" in err


def test_nano_egg_progress_lines(nano_egg, capsys):
    nano_egg.main([*[a for a in TINY_LM if a != "--quiet"], "--epochs", "5", "--log-every", "2"])
    out = capsys.readouterr().out
    epochs = [
        int(m)
        for m in re.findall(
            r"^epoch +(\d+) \| train [\d.]+ bpb \| valid [\d.]+ bpb \| .* s$", out, re.M
        )
    ]
    assert epochs == [1, 2, 4, 5]  # every 2nd, the first and the last
    assert "nano_egg summary" in out


@pytest.mark.parametrize("mode", ["float", "int"])
def test_nano_egg_preset(nano_egg, mode, tmp_path):
    args = nano_egg.parse_args(["--preset", "h200", "--mode", mode])
    for key, value in nano_egg.PRESETS["h200"][mode].items():
        assert getattr(args, key) == value, key
    assert Path(args.data).is_file() or (ROOT / args.data).is_file()
    # Explicit flags win over the preset; a tiny run of the preset's remaining settings on the CPU.
    tiny = [
        "--hidden-dim",
        "16",
        "--n-layers",
        "1",
        "--pop-size",
        "8",
        "--batch-size",
        "2",
        "--chunk",
        "2",
        "--seq-len",
        "16",
        "--valid-windows",
        "4",
        "--epochs",
        "2",
        "--device",
        "cpu",
        "--quiet",
    ]
    data = str(ROOT / nano_egg.SAMPLE_DATA)
    r = nano_egg.main(["--preset", "h200", "--mode", mode, *tiny, "--data", data])
    assert r["epochs_done"] == 2 and r["args"]["pop_size"] == 8 and r["args"]["lr"] == args.lr
    assert math.isfinite(r["final_valid_bpb"])
    assert torch.get_float32_matmul_precision() == "highest"  # --tf32 is undone afterwards


def test_shipped_minipile_sample():
    corpus = _load("corpus", EXAMPLES / "nano_egg" / "corpus.py")
    data = corpus.load_corpus(
        str(ROOT / "examples" / "nano_egg" / "data" / "minipile_valid_1000.npy")
    )
    assert data.dtype == np.uint8 and data.shape == (2_777_886,)
    assert data[0] == 0 and int((data == 0).sum()) == 500  # 500 documents, a 0 before each
    train, valid = corpus.split_documents(data, max_docs=1000)
    assert (int((train == 0).sum()), int((valid == 0).sum())) == (450, 50)


@pytest.mark.parametrize("doc", ["README.md", "docs/examples.md", "examples/nano_egg/train.py"])
def test_documented_data_paths_exist(doc):
    # Every `--data PATH` in the docs is a path from the repository root that exists.
    paths = re.findall(r"--data (\S+\.npy)", (ROOT / doc).read_text())
    assert paths
    for path in paths:
        assert (ROOT / path).is_file(), f"{doc}: --data {path} does not exist"


def test_split_documents():
    corpus = _load("corpus", EXAMPLES / "nano_egg" / "corpus.py")
    docs = [bytes([65 + i]) * (i + 3) for i in range(20)]
    data = np.concatenate([np.frombuffer(b"\0" + d, dtype=np.uint8) for d in docs])
    train, valid = corpus.split_documents(data, max_docs=10)
    assert int((train == 0).sum()) == 9 and int((valid == 0).sum()) == 1
    assert train[0] == 0 and valid[0] == 0
    assert bytes(valid[1:]) == docs[9]
    with pytest.raises(ValueError, match="valid_fraction"):
        corpus.split_documents(data, valid_fraction=1.5)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 300), st.integers(0, 2**31 - 1))
def test_int_matmul_is_exact_int32(k, seed):
    mingru = _load("mingru", EXAMPLES / "nano_egg" / "mingru.py")
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-127, 128, (5, k), generator=g, dtype=torch.int32)
    w = torch.randint(-127, 128, (7, k), generator=g).float()
    exact = x.to(torch.int64) @ w.to(torch.int64).T
    assert torch.equal(mingru.int_matmul(x, w).to(torch.int64), exact)


def test_int_matmul_rejects_inexact_width():
    mingru = _load("mingru", EXAMPLES / "nano_egg" / "mingru.py")
    k = mingru.MAX_EXACT_K + 1
    with pytest.raises(ValueError, match="inner dimension"):
        mingru.int_matmul(torch.zeros(1, k, dtype=torch.int32), torch.zeros(1, k))


# ------------------------------------------------------------------ CartPole
def test_cartpole_vectorized_learns(cartpole):
    # An untrained or random policy lasts about 10-40 steps (a uniformly random one averages
    # about 22); 150 is far outside that. Seed 0 reaches 500 within 4 steps here.
    r = cartpole.main(
        [
            "--mode",
            "vectorized",
            "--steps",
            "8",
            "--pop-size",
            "16",
            "--lr",
            "0.5",
            "--eval-episodes",
            "4",
            "--quiet",
        ]
    )
    assert r["best_eval_return"] >= 150


def test_cartpole_sequential_learns(cartpole):
    pytest.importorskip("gymnasium")
    r = cartpole.main(
        [
            "--mode",
            "sequential",
            "--steps",
            "8",
            "--pop-size",
            "16",
            "--lr",
            "0.5",
            "--eval-episodes",
            "4",
            "--quiet",
        ]
    )
    assert r["best_eval_return"] >= 150


def test_batched_cartpole_matches_gymnasium(cartpole):
    gym = pytest.importorskip("gymnasium")
    env = gym.make("CartPole-v1").unwrapped
    env.reset(seed=0)
    batched = cartpole.BatchedCartPole(1, torch.device("cpu"), torch.Generator().manual_seed(0))
    batched.reset()
    env.state = batched.state[0].numpy().copy()
    rng = np.random.default_rng(0)
    for _ in range(200):
        action = int(rng.integers(0, 2))
        obs, _, terminated, _, _ = env.step(action)
        b_obs, b_term = batched.step(torch.tensor([action]))
        np.testing.assert_allclose(b_obs[0].numpy(), obs, rtol=1e-5, atol=1e-6)
        assert bool(b_term[0]) == terminated
        if terminated:
            break


def test_cartpole_without_gymnasium_says_how_to_install(cartpole, monkeypatch):
    monkeypatch.setitem(sys.modules, "gymnasium", None)  # `import gymnasium` now fails
    with pytest.raises(SystemExit) as exc:
        cartpole.main(["--mode", "sequential", "--steps", "1", "--quiet"])
    assert 'pip install -e ".[rl]"' in str(exc.value.code)


# ------------------------------------------------------------------ all examples
def _interrupt_after(module, monkeypatch, n_steps):
    """Make the example's optimizer raise KeyboardInterrupt (as Ctrl-C does) in step
    ``n_steps + 1``."""
    base = module.EggrollOptimizer

    class Interrupted(base):
        calls = 0

        def step(self, closure):
            type(self).calls += 1
            if type(self).calls > n_steps:
                raise KeyboardInterrupt
            return super().step(closure)

    monkeypatch.setattr(module, "EggrollOptimizer", Interrupted)


def _main(module, argv):
    try:
        return module.main(argv)
    except KeyboardInterrupt:  # fail this test rather than stop the whole session
        pytest.fail("KeyboardInterrupt escaped main(): the run did not stop cleanly")


INTERRUPT_CASES = {
    "nano_classifier": (
        ["--steps", "50", "--pop-size", "8", "--n-per-class", "4"],
        "step",
        [0, 1, 2, 3],
    ),
    "nano_egg": ([*TINY_LM, "--epochs", "50"], "epoch", [1, 2, 3]),
    "cartpole": (
        [
            "--mode",
            "vectorized",
            "--steps",
            "50",
            "--pop-size",
            "8",
            "--eval-episodes",
            "2",
            "--no-stop",
        ],
        "step",
        [1, 2, 3],
    ),
}


@pytest.mark.parametrize("name", list(INTERRUPT_CASES))
def test_interrupted_run_still_writes_plot_and_json(name, request, monkeypatch, tmp_path):
    module = request.getfixturevalue(
        {"nano_classifier": "classifier", "nano_egg": "nano_egg"}.get(name, name)
    )
    argv, key, steps = INTERRUPT_CASES[name]
    _interrupt_after(module, monkeypatch, 3)
    png, js = tmp_path / "curve.png", tmp_path / "run.json"
    r = _main(module, [*argv, "--quiet", "--plot", str(png), "--json", str(js)])
    assert r["interrupted"] is True
    saved = json.loads(js.read_text())
    assert saved["interrupted"] is True
    assert saved["history"][key] == steps
    assert len({len(v) for v in saved["history"].values()}) == 1
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_run_interrupted_before_its_first_step(nano_egg, cartpole, monkeypatch, tmp_path):
    for module, argv in ((nano_egg, TINY_LM), (cartpole, ["--steps", "5", "--pop-size", "8"])):
        _interrupt_after(module, monkeypatch, 0)
        r = _main(
            module,
            [
                *argv,
                "--quiet",
                "--plot",
                str(tmp_path / "c.png"),
                "--json",
                str(tmp_path / "r.json"),
            ],
        )
        assert (
            r["interrupted"] is True
            and r["history"]["step" if module is cartpole else "epoch"] == []
        )
        assert json.loads((tmp_path / "r.json").read_text())["interrupted"] is True
        assert (tmp_path / "c.png").exists()


def test_ctrl_c_writes_results_and_exits_130(tmp_path):
    # The real thing: SIGINT to a running example, once its progress bar is up.
    js = tmp_path / "run.json"
    proc = subprocess.Popen(
        [
            sys.executable,
            str(EXAMPLES / "nano_classifier.py"),
            "--steps",
            "1000000",
            "--json",
            str(js),
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    assert proc.stderr is not None
    seen = b""
    deadline = time.monotonic() + 120
    # The tqdm bar, on stderr, once a step has finished: the training loop, which turns Ctrl-C
    # into an early stop, is running then (a signal while the bar is first drawn would land
    # before it).
    while (
        not re.search(rb"nano_classifier:.*?\b[1-9]\d*/1000000", seen)
        and time.monotonic() < deadline
    ):
        chunk = proc.stderr.read1(4096)
        if not chunk:
            break
        seen += chunk
    proc.send_signal(signal.SIGINT)
    proc.stderr.read()
    assert proc.wait(timeout=60) == 130, seen.decode(errors="replace")[-2000:]
    assert json.loads(js.read_text())["interrupted"] is True


def test_threads_option(classifier, monkeypatch):
    seen = []
    base = classifier.EggrollOptimizer

    class Recording(base):
        def step(self, closure):
            seen.append(torch.get_num_threads())
            return super().step(closure)

    monkeypatch.setattr(classifier, "EggrollOptimizer", Recording)
    argv = ["--steps", "2", "--pop-size", "8", "--n-per-class", "4", "--quiet"]
    torch.set_num_threads(2)
    classifier.main(argv)  # default: one thread while training, the caller's number afterwards
    assert seen == [1, 1] and torch.get_num_threads() == 2
    torch.set_num_threads(1)
    classifier.main([*argv, "--threads", "2"])
    assert seen[2:] == [2, 2] and torch.get_num_threads() == 1
    with pytest.raises(SystemExit):
        classifier.parse_args(["--threads", "-1"])
