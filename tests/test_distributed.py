"""Population sharding over torch.distributed: two gloo processes on the CPU.

The module-scoped fixture launches this file as a script twice (rank 0 and rank 1, joined
through a ``file://`` rendezvous); every rank runs all the scenarios of :func:`run_rank` and
saves what it saw, and the tests compare that with single-process runs made here. One launch
serves every test, since starting a process that imports torch.optim takes seconds.
"""

from __future__ import annotations

import datetime
import functools
import itertools
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import torcheggroll.distributed as tdist
from torcheggroll import EggrollOptimizer

try:
    from torcheggroll.compat import TorchEggrollES
except ImportError:  # the original-style API is optional here
    TorchEggrollES = None  # type: ignore[assignment,misc]

ROOT = Path(__file__).resolve().parents[1]
PATH = "materialized"  # the reference forward, so the comparison does not depend on lowrank.py
TIMEOUT_S = 120


# ---------------------------------------------------------------------- shared workload
def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))


def make_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(16, 5, generator=g), torch.randn(16, 3, generator=g)


def make_opt(
    model: nn.Module, pop_size: int, seed: int | None = 7, **kwargs: Any
) -> EggrollOptimizer:
    return EggrollOptimizer(
        model.parameters(), lr=0.1, sigma=0.05, rank=2, pop_size=pop_size, seed=seed, **kwargs
    )


def pop_closure(model: nn.Module, calls: list[list[int]] | None = None) -> Any:
    x, y = make_data()

    def closure(pop: Any) -> torch.Tensor:
        if calls is not None:
            calls.append(pop.members.tolist())
        out = pop.forward(model, x, path=PATH)  # (members, 16, 3)
        return ((out - y) ** 2).mean(dim=(1, 2))

    return closure


def seq_closure(model: nn.Module) -> Any:
    x, y = make_data()
    return lambda: ((model(x) - y) ** 2).mean()


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()


def train(
    model: nn.Module, opt: EggrollOptimizer, closure: Any, steps: int
) -> dict[str, list[Any]]:
    rec: dict[str, list[Any]] = {"params": [], "losses": [], "means": []}
    for _ in range(steps):
        mean = opt.step(closure)
        rec["params"].append(flat(model))
        assert opt.last_losses is not None
        rec["losses"].append(opt.last_losses.clone())
        rec["means"].append(mean.clone())
    return rec


def capture(fn: Any) -> dict[str, Any]:
    """Run ``fn``; describe what it raised (or that it did not)."""
    try:
        fn()
    except Exception as exc:
        cause = exc.__cause__
        return {
            "type": type(exc).__name__,
            "message": str(exc),
            "is_value_error": isinstance(exc, ValueError),
            "ranks": getattr(exc, "ranks", None),
            "cause": None if cause is None else type(cause).__name__,
        }
    return {"type": None}


# ---------------------------------------------------------------------- the ranks
def compat_run() -> dict[str, Any]:
    """The original-style API: a vectorized step, then the prepare/apply (async) API."""
    assert TorchEggrollES is not None
    model = make_model()
    es = TorchEggrollES(model, pop_size=6, sigma=0.05, lr=0.1, rank=2, seed=7)
    x, y = make_data()
    means = [es.step(x, lambda out, t: ((out - t) ** 2).mean(), y) for _ in range(2)]
    members = es.get_stacked_params()
    n = next(iter(members.values())).shape[0]
    fitness = torch.stack(
        [
            -(
                (torch.func.functional_call(model, {k: v[i] for k, v in members.items()}, (x,)) - y)
                ** 2
            ).mean()
            for i in range(n)
        ]
    )
    means.append(es.apply_fitness_scores(fitness))
    return {"params": flat(model), "means": means, "local_members": n}


def run_rank(rank: int, out: Path) -> dict[str, Any]:
    """Everything one of the two ranks does; the results are compared in the tests."""
    res: dict[str, Any] = {}
    # Uneven shares: 3 antithetic pairs over 2 ranks; population closure and sequential closure.
    model = make_model()
    opt = make_opt(model, 6)
    calls: list[list[int]] = []
    res["train"] = train(model, opt, pop_closure(model, calls), 3)
    res["train_calls"] = calls
    model = make_model()
    res["sequential"] = train(model, make_opt(model, 6), seq_closure(model), 2)
    model = make_model()
    opt = make_opt(model, 6)
    opt.compute_grad(pop_closure(model))
    res["grad"] = torch.cat([p.grad.reshape(-1) for p in model.parameters()])

    # seed=None: every rank takes rank 0's seed even though their global RNGs differ.
    model = make_model()
    torch.manual_seed(100 + rank)
    res["own_seed"] = make_opt(model, 6, seed=None, process_group=False).seed
    torch.manual_seed(100 + rank)
    res["agreed_seed"] = make_opt(model, 6, seed=None).seed

    # Checkpoint after 2 steps (rank 0 writes), then 2 more steps uninterrupted.
    model = make_model()
    opt = make_opt(model, 8)
    closure = pop_closure(model)
    train(model, opt, closure, 2)
    if rank == 0:
        torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, out / "ckpt.pt")
    torch.distributed.barrier()
    res["uninterrupted"] = train(model, opt, closure, 2)["params"]

    # 1 pair over 2 ranks: rank 1 has no members and its closure is not called.
    model = make_model()
    calls = []
    res["empty"] = train(model, make_opt(model, 2), pop_closure(model, calls), 2)
    res["empty_calls"] = calls

    # Resume a checkpoint written by a single process (world size 1 -> 2), through an explicitly
    # passed process group.
    model = make_model()
    opt = EggrollOptimizer(
        model.parameters(),
        lr=0.1,
        sigma=0.05,
        rank=2,
        pop_size=8,
        seed=7,
        process_group=torch.distributed.group.WORLD,
    )
    ckpt = torch.load(out / "ckpt_single.pt")
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    res["resumed"] = train(model, opt, pop_closure(model), 2)["params"]

    # Rank 1 returns one loss too many: every rank raises, nothing changes, training goes on.
    model = make_model()
    opt = make_opt(model, 6)
    good = pop_closure(model)

    def too_many(pop: Any) -> torch.Tensor:
        losses = good(pop)
        return torch.cat([losses, losses[:1]]) if rank == 1 else losses

    before = flat(model)
    res["wrong_count"] = capture(lambda: opt.step(too_many))
    res["wrong_count_unchanged"] = bool(torch.equal(before, flat(model))) and opt.generation == 0
    res["after_error"] = train(model, opt, good, 1)["params"][0]

    # The same through the sequential closure: rank 1 returns a vector instead of a scalar.
    model = make_model()
    opt = make_opt(model, 6)
    x, y = make_data()
    res["seq_wrong"] = capture(
        lambda: opt.step(lambda: ((model(x) - y) ** 2).mean(dim=1 if rank == 1 else (0, 1)))
    )
    res["seq_wrong_unchanged"] = bool(torch.equal(flat(model), flat(make_model())))

    # Rank 0's closure raises something else (the others evaluate this optimizer's model).
    current = pop_closure(model)

    def boom(pop: Any) -> torch.Tensor:
        if rank == 0:
            raise RuntimeError("boom on purpose")
        return current(pop)

    res["raises"] = capture(lambda: opt.step(boom))

    if TorchEggrollES is not None:
        res["compat"] = compat_run()

    # A subgroup: rank 0 alone in it trains as a single process; rank 1 may not use it.
    solo = torch.distributed.new_group([0])
    model = make_model()
    if rank == 0:
        opt = EggrollOptimizer(
            model.parameters(), lr=0.1, sigma=0.05, rank=2, pop_size=6, seed=7, process_group=solo
        )
        res["subgroup"] = train(model, opt, pop_closure(model), 2)
    else:
        res["subgroup"] = capture(
            lambda: EggrollOptimizer(model.parameters(), pop_size=6, process_group=solo)
        )

    # Disagreements are caught before they silently diverge the replicas.
    model = make_model()
    if rank == 1:
        with torch.no_grad():
            model[0].weight[0, 0] += 1e-3
    res["params_differ"] = capture(lambda: make_opt(model, 6).step(pop_closure(model)))
    model = make_model()
    res["seed_differs"] = capture(lambda: make_opt(model, 6, seed=rank).step(pop_closure(model)))
    for key, value in (("sigma", 0.05 * (1 + rank)), ("shaping", ("zscore", "raw")[rank])):
        model = make_model()
        opt = make_opt(model, 6)
        opt.param_groups[0][key] = value
        before = flat(model)
        res[f"{key}_differs"] = capture(functools.partial(opt.step, pop_closure(model)))
        res[f"{key}_differs_unchanged"] = bool(torch.equal(before, flat(model)))

    # process_group=False opts out: each process evaluates the whole population by itself.
    model = make_model()
    opt = EggrollOptimizer(
        model.parameters(), lr=0.1, sigma=0.05, rank=2, pop_size=6, seed=7, process_group=False
    )
    calls = []
    res["opt_out"] = train(model, opt, pop_closure(model, calls), 2)
    res["opt_out_calls"] = calls
    return res


def worker_main(out: Path, rendezvous: Path) -> None:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo",
        init_method=f"file://{rendezvous}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        torch.save(run_rank(rank, out), out / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


# ---------------------------------------------------------------------- the launcher
def launch(world: int, out: Path) -> list[dict[str, Any]]:
    env = {**os.environ, "WORLD_SIZE": str(world), "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    if sys.platform.startswith("linux") and Path("/sys/class/net/lo").exists():
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    rendezvous = out / "rendezvous"
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, str(out), str(rendezvous)],
            env={**env, "RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(world)
    ]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=TIMEOUT_S)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"a rank hung for {TIMEOUT_S} s:\n{logs}")
    for r, p in enumerate(procs):
        assert p.returncode == 0, f"rank {r} failed:\n{logs[r]}"
    return [torch.load(out / f"rank{r}.pt") for r in range(world)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("dist")
    # A checkpoint written by a single process after 2 steps, for the ranks to resume.
    model = make_model()
    opt = make_opt(model, 8)
    train(model, opt, pop_closure(model), 2)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, out / "ckpt_single.pt")
    return {"two": launch(2, out), "out": out}


def single(pop_size: int, steps: int, sequential: bool = False) -> dict[str, list[Any]]:
    assert not torch.distributed.is_initialized()
    model = make_model()
    closure = seq_closure(model) if sequential else pop_closure(model)
    return train(model, make_opt(model, pop_size), closure, steps)


def assert_same_run(got: dict[str, list[Any]], ref: dict[str, list[Any]]) -> None:
    for key in ("params", "losses", "means"):
        assert len(got[key]) == len(ref[key])
        for a, b in zip(got[key], ref[key], strict=True):
            assert a.dtype == b.dtype
            assert torch.equal(a, b), f"{key} differ from the single-process run"


# ---------------------------------------------------------------------- the tests
@pytest.mark.parametrize("antithetic", [True, False])
def test_shard_bounds_cover_population_in_whole_pairs(antithetic: bool) -> None:
    unit = 2 if antithetic else 1
    for pop_size in range(2, 40, unit):
        for world in range(1, 8):
            bounds = [tdist.shard_bounds(pop_size, antithetic, r, world) for r in range(world)]
            assert bounds[0][0] == 0 and bounds[-1][1] == pop_size
            assert all(a[1] == b[0] for a, b in itertools.pairwise(bounds))
            assert all(start % unit == 0 and stop % unit == 0 for start, stop in bounds)
            sizes = [stop - start for start, stop in bounds]
            assert max(sizes) - min(sizes) <= unit
            assert sizes == sorted(sizes, reverse=True)  # the first ranks take the extra draws


def test_single_process_is_untouched() -> None:
    assert tdist.resolve_group(None) is None
    assert tdist.world_info(None) == (0, 1)
    losses = torch.arange(4.0)
    model = make_model()
    pop = make_opt(model, 4).population()
    assert tdist.gather_losses(losses, pop, None) is losses
    assert tdist.agree_on_seed(123, None) == 123


def test_fingerprint_detects_a_changed_element() -> None:
    model = make_model()
    ref = tdist.params_fingerprint(model.parameters())
    assert tdist.params_fingerprint(make_model().parameters()) == ref
    with torch.no_grad():
        model[2].bias[1] = -model[2].bias[1]
    assert tdist.params_fingerprint(model.parameters()) != ref
    swapped = list(make_model().parameters())
    swapped[1], swapped[3] = swapped[3], swapped[1]
    assert tdist.params_fingerprint(swapped) != ref


def test_ranks_stay_identical_and_match_single_process(runs: dict[str, Any]) -> None:
    r0, r1 = runs["two"]
    for key in ("train", "sequential"):
        for a, b in zip(r0[key]["params"], r1[key]["params"], strict=True):
            assert torch.equal(a, b)
    assert_same_run(r0["train"], single(6, 3))
    assert_same_run(r1["train"], single(6, 3))
    assert_same_run(r0["sequential"], single(6, 2, sequential=True))
    # 3 pairs over 2 ranks: rank 0 evaluates members 0..3, rank 1 members 4..5, every step.
    assert r0["train_calls"] == [[0, 1, 2, 3]] * 3
    assert r1["train_calls"] == [[4, 5]] * 3


def test_subgroup(runs: dict[str, Any]) -> None:
    r0, r1 = runs["two"]
    assert_same_run(r0["subgroup"], single(6, 2))
    assert r1["subgroup"]["type"] == "ValueError"
    assert "Invalid process_group" in r1["subgroup"]["message"]


def test_compute_grad_matches_single_process(runs: dict[str, Any]) -> None:
    model = make_model()
    make_opt(model, 6).compute_grad(pop_closure(model))
    ref = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    for res in runs["two"]:
        assert torch.equal(res["grad"], ref)


def test_rank_without_members(runs: dict[str, Any]) -> None:
    r0, r1 = runs["two"]
    assert r0["empty_calls"] == [[0, 1]] * 2 and r1["empty_calls"] == []
    ref = single(2, 2)
    for res in (r0, r1):
        assert_same_run(res["empty"], ref)


def test_seed_none_agrees_on_rank_zero_seed(runs: dict[str, Any]) -> None:
    r0, r1 = runs["two"]
    assert r0["own_seed"] != r1["own_seed"]
    assert r0["agreed_seed"] == r1["agreed_seed"] == r0["own_seed"]


def test_checkpoint_resumes_on_any_world_size(runs: dict[str, Any]) -> None:
    ref = single(8, 4)["params"][2:]
    for res in runs["two"]:
        assert all(torch.equal(a, b) for a, b in zip(res["uninterrupted"], ref, strict=True))
    for res in runs["two"]:  # world size 1 -> 2
        assert all(torch.equal(a, b) for a, b in zip(res["resumed"], ref, strict=True))
    # World size 2 -> 1: this process.
    model = make_model()
    opt = make_opt(model, 8)
    ckpt = torch.load(runs["out"] / "ckpt.pt")
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    resumed = train(model, opt, pop_closure(model), 2)["params"]
    assert all(torch.equal(a, b) for a, b in zip(resumed, ref, strict=True))


def test_wrong_count_raises_on_every_rank(runs: dict[str, Any]) -> None:
    first = single(6, 1)["params"][0]
    for res in runs["two"]:
        err = res["wrong_count"]
        assert err["type"] == "RankValueError" and err["is_value_error"]
        assert err["ranks"] == [1]
        assert "rank 1 of 2 (members 4..5 of 6)" in err["message"]
        assert "1-D tensor of 2 losses" in err["message"] and "(3,)" in err["message"]
        assert res["wrong_count_unchanged"]
        assert torch.equal(res["after_error"], first)  # the step can simply be retried
        seq = res["seq_wrong"]
        assert seq["type"] == "RankValueError" and seq["ranks"] == [1]
        assert "must return a scalar loss" in seq["message"]
        assert res["seq_wrong_unchanged"]
    r0, r1 = runs["two"]
    assert r0["wrong_count"]["message"] == r1["wrong_count"]["message"]
    assert r0["wrong_count"]["cause"] is None and r1["wrong_count"]["cause"] == "ValueError"


def test_closure_exception_raises_on_every_rank(runs: dict[str, Any]) -> None:
    r0, r1 = runs["two"]
    for res in (r0, r1):
        err = res["raises"]
        assert err["type"] == "RankError" and not err["is_value_error"]
        assert err["ranks"] == [0]
        assert (
            "rank 0 of 2 (members 0..3 of 6) raised RuntimeError: boom on purpose" in err["message"]
        )
    assert r0["raises"]["cause"] == "RuntimeError" and r1["raises"]["cause"] is None


@pytest.mark.skipif(TorchEggrollES is None, reason="torcheggroll.compat is not there")
def test_torch_eggroll_es_shards_too(runs: dict[str, Any]) -> None:
    ref = compat_run()
    assert ref["local_members"] == 6
    r0, r1 = runs["two"]
    assert (r0["compat"]["local_members"], r1["compat"]["local_members"]) == (4, 2)
    for res in (r0, r1):
        assert torch.equal(res["compat"]["params"], ref["params"])
        assert res["compat"]["means"] == ref["means"]


def test_disagreeing_ranks_are_caught(runs: dict[str, Any]) -> None:
    for res in runs["two"]:
        assert res["params_differ"]["type"] == "RankError"
        assert "different parameters" in res["params_differ"]["message"]
        assert res["params_differ"]["ranks"] == [1]
        assert res["seed_differs"]["type"] == "RankError"
        assert "disagree on seed (rank 0: 0, rank 1: 1)" in res["seed_differs"]["message"]
        for key in ("sigma", "shaping"):
            assert res[f"{key}_differs"]["type"] == "RankError", key
            assert "disagree on the param groups' settings" in res[f"{key}_differs"]["message"]
            assert res[f"{key}_differs_unchanged"]


if __name__ == "__main__":
    worker_main(Path(sys.argv[1]), Path(sys.argv[2]))


def test_process_group_false_opts_out(runs: dict[str, Any]) -> None:
    ref = single(6, 2)
    for res in runs["two"]:
        assert res["opt_out_calls"] == [[0, 1, 2, 3, 4, 5]] * 2
        assert_same_run(res["opt_out"], ref)
