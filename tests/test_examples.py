"""Smoke tests for the examples: tiny settings, and each must learn (beat chance / lower its loss).

The examples are imported from examples/ and their ``main(argv)`` is called in-process.
"""

from __future__ import annotations

import importlib.util
import math
import re
import sys
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
    r = classifier.main(["--steps", "15", "--pop-size", "32", "--n-per-class", "10", "--quiet", "--plot", str(png)])
    # The held-out set has 200 examples (20 per class). A classifier at chance (10%) gets
    # Binomial(200, 0.1) right: mean 20, sd 4.2, so 40% (80 right) is 14 sd above chance.
    assert r["final_test_acc"] > 0.4
    assert r["final_loss"] < r["initial_loss"] - 0.5
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------ nano_egg
# A larger step than the default suits these few tiny generations.
TINY_LM = ["--lr", "1.0", "--epochs", "6", "--pop-size", "32", "--batch-size", "4", "--chunk", "2", "--seq-len", "32",
           "--hidden-dim", "16", "--valid-windows", "32", "--quiet"]


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


def test_shipped_minipile_sample():
    corpus = _load("corpus", EXAMPLES / "nano_egg" / "corpus.py")
    data = corpus.load_corpus(str(ROOT / "examples" / "nano_egg" / "data" / "minipile_valid_1000.npy"))
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
    r = cartpole.main(["--mode", "vectorized", "--steps", "8", "--pop-size", "16", "--lr", "0.5",
                       "--eval-episodes", "4", "--quiet"])
    assert r["best_eval_return"] >= 150


def test_cartpole_sequential_learns(cartpole):
    pytest.importorskip("gymnasium")
    r = cartpole.main(["--mode", "sequential", "--steps", "8", "--pop-size", "16", "--lr", "0.5",
                       "--eval-episodes", "4", "--quiet"])
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
