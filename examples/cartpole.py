#!/usr/bin/env python3
"""CartPole-v1 solved with EggrollOptimizer, two ways.

``--mode sequential``: the zero-argument closure. For every population member the optimizer
writes that member's parameters into the policy, calls ``closure()``, which plays one episode of
gymnasium's ``CartPole-v1`` and returns its return (``maximize=True``), and restores the parameters.

``--mode vectorized``: ``closure(population)``. A batched torch re-implementation of the
CartPole-v1 dynamics (:class:`BatchedCartPole`, no gymnasium needed, runs on CUDA too) steps one
environment per member, and ``population.forward(policy, obs, per_member=True)`` picks every
member's action from its own observation in one call.

The task counts as solved when the centre policy (greedy actions) averages a return of at
least 475 over ``--eval-episodes`` fresh episodes (gymnasium's threshold for CartPole-v1).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from _common import (
    INTERRUPTED_EXIT,
    add_common_args,
    fmt,
    progress,
    require_positive,
    resolve_device,
    save_json,
    save_plot,
    torch_threads,
    trim_history,
)
from torch import nn

from torcheggroll import EggrollOptimizer, Population

SOLVED = 475.0
MAX_EPISODE_STEPS = 500


class BatchedCartPole:
    """``n`` independent CartPole-v1 environments stepped together as torch tensors.

    The physics are those of the classic cart-pole (Barto, Sutton and Anderson, 1983) as
    gymnasium's CartPole-v1 sets them up: explicit Euler steps of 0.02 s, a force of +-10 N,
    cart mass 1 kg, pole mass 0.1 kg, pole half-length 0.5 m; an episode ends when the pole
    leans more than 12 degrees or the cart leaves [-2.4, 2.4] (reward 1 per step, the last
    included), or is truncated after 500 steps. States start uniform in [-0.05, 0.05].

    State: ``(n, 4)`` = cart position, cart velocity, pole angle, pole angular velocity.
    """

    gravity = 9.8
    mass_cart = 1.0
    mass_pole = 0.1
    half_length = 0.5
    force_mag = 10.0
    tau = 0.02
    theta_limit = 12 * 2 * math.pi / 360
    x_limit = 2.4

    def __init__(self, n: int, device: torch.device, generator: torch.Generator) -> None:
        self.n = n
        self.device = device
        self.generator = generator
        self.state = torch.zeros(n, 4, device=device, dtype=torch.float64)

    def reset(self) -> torch.Tensor:
        """New episodes for all envs; returns the ``(n, 4)`` float32 observations."""
        u = torch.rand(self.n, 4, generator=self.generator, dtype=torch.float64).to(self.device)
        self.state = u * 0.1 - 0.05
        return self.state.float()

    def step(self, action: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Apply ``(n,)`` actions in {0, 1}; returns the new observations and ``(n,)`` terminated
        flags."""
        x, x_dot, theta, theta_dot = self.state.unbind(-1)
        force = torch.where(action.to(self.device) == 1, self.force_mag, -self.force_mag).to(
            torch.float64
        )
        total_mass = self.mass_cart + self.mass_pole
        pole_ml = self.mass_pole * self.half_length
        cos, sin = torch.cos(theta), torch.sin(theta)
        tmp = (force + pole_ml * theta_dot**2 * sin) / total_mass
        theta_acc = (self.gravity * sin - cos * tmp) / (
            self.half_length * (4.0 / 3.0 - self.mass_pole * cos**2 / total_mass)
        )
        x_acc = tmp - pole_ml * theta_acc * cos / total_mass
        x = x + self.tau * x_dot
        x_dot = x_dot + self.tau * x_acc
        theta = theta + self.tau * theta_dot
        theta_dot = theta_dot + self.tau * theta_acc
        self.state = torch.stack([x, x_dot, theta, theta_dot], dim=-1)
        terminated = (x.abs() > self.x_limit) | (theta.abs() > self.theta_limit)
        return self.state.float(), terminated


def make_policy(hidden: int) -> nn.Module:
    """``(..., 4)`` observation -> ``(..., 2)`` action scores; the action is the argmax."""
    return nn.Sequential(nn.Linear(4, hidden), nn.Tanh(), nn.Linear(hidden, 2))


@torch.no_grad()
def batched_returns(
    policy: nn.Module, env: BatchedCartPole, population: Population | None, path: str
) -> torch.Tensor:
    """Play one episode in each of ``env.n`` envs; ``(n,)`` returns.

    With a population, env ``j`` is driven by member ``j`` (``env.n == len(population)``);
    without, every env is driven by the policy itself.
    """
    obs = env.reset()
    alive = torch.ones(env.n, dtype=torch.bool, device=env.device)
    returns = torch.zeros(env.n, device=env.device)
    for _ in range(MAX_EPISODE_STEPS):
        if population is None:
            scores = policy(obs)
        else:
            scores = population.forward(policy, obs, per_member=True, path=path)  # (pop, 2)
        obs, terminated = env.step(scores.argmax(-1))
        returns += alive.float()  # the step that terminates still earns its reward
        alive &= ~terminated
        if not bool(alive.any()):
            break
    return returns


def gym_return(policy: nn.Module, env: Any, seed: int, device: torch.device) -> float:
    """One greedy episode of a gymnasium env; its return."""
    obs, _ = env.reset(seed=seed)
    total = 0.0
    with torch.no_grad():
        while True:
            action = int(policy(torch.as_tensor(obs, dtype=torch.float32, device=device)).argmax())
            obs, reward, terminated, truncated, _ = env.step(action)
            total += float(reward)
            if terminated or truncated:
                return total


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="CartPole-v1 with EggrollOptimizer")
    p.add_argument("--mode", choices=["sequential", "vectorized"], default="vectorized")
    p.add_argument("--steps", type=int, default=100, help="most ES steps; stops once solved")
    p.add_argument("--pop-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.25)
    p.add_argument("--sigma", type=float, default=0.1)
    p.add_argument("--rank", type=int, default=2)
    p.add_argument("--hidden", type=int, default=16)
    p.add_argument("--shaping", choices=["zscore", "centered_rank"], default="zscore")
    p.add_argument("--eval-episodes", type=int, default=10)
    p.add_argument("--no-stop", action="store_true", help="keep training after solving")
    p.add_argument("--seed", type=int, default=0)
    add_common_args(p, path_help="population.forward path (vectorized mode; see docs/examples.md)")
    args = p.parse_args(argv)
    require_positive(p, args, ("steps", "pop_size", "hidden", "eval_episodes"))
    return args


def import_gymnasium() -> Any:
    """The gymnasium module, or an exit with the command that installs it."""
    try:
        import gymnasium
    except ModuleNotFoundError as exc:
        if exc.name != "gymnasium":
            raise
        raise SystemExit(
            "cartpole --mode sequential needs gymnasium, which is not installed. Install it with\n"
            '    pip install -e ".[rl]"\n'
            "from the repository root, or use --mode vectorized, which does not need it."
        ) from exc
    return gymnasium


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train, print the summary, write ``--plot``/``--json``; Ctrl-C stops early and still writes
    them."""
    args = parse_args(argv)
    with torch_threads(args.threads):
        return run(args)


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = resolve_device(args.device) if args.mode == "vectorized" else torch.device("cpu")
    path = args.path
    torch.manual_seed(args.seed)
    policy = make_policy(args.hidden).to(device)
    opt = EggrollOptimizer(
        policy.parameters(),
        lr=args.lr,
        sigma=args.sigma,
        rank=args.rank,
        pop_size=args.pop_size,
        seed=args.seed,
        maximize=True,
        shaping=args.shaping,
    )

    if args.mode == "sequential":
        gym = import_gymnasium()
        env = gym.make("CartPole-v1")
        eval_env = gym.make("CartPole-v1")
        episode_seed = [0]

        def closure() -> float:
            # All members of a generation start from the same state (common random numbers).
            return gym_return(policy, env, episode_seed[0], device)

        def evaluate(step: int) -> float:
            seeds = range(10_000 + 100 * step, 10_000 + 100 * step + args.eval_episodes)
            return sum(gym_return(policy, eval_env, s, device) for s in seeds) / args.eval_episodes
    else:
        env_gen = torch.Generator().manual_seed(args.seed)
        envs = BatchedCartPole(args.pop_size, device, env_gen)
        eval_envs = BatchedCartPole(
            args.eval_episodes, device, torch.Generator().manual_seed(args.seed + 1)
        )

        def closure(population: Population) -> torch.Tensor:  # type: ignore[misc]
            return batched_returns(policy, envs, population, path)

        def evaluate(step: int) -> float:
            return float(batched_returns(policy, eval_envs, None, path).mean())

    history: dict[str, list[float]] = {"step": [], "mean_return": [], "eval_return": []}
    solved_at: int | None = None
    start = time.perf_counter()
    interrupted = False
    bar = progress(
        range(1, args.steps + 1), total=args.steps, desc=f"cartpole[{args.mode}]", quiet=args.quiet
    )
    try:
        for step in bar:
            if args.mode == "sequential":
                episode_seed[0] = step
            mean_return = float(opt.step(closure))
            eval_return = evaluate(step)
            history["step"].append(step)
            history["mean_return"].append(mean_return)
            history["eval_return"].append(eval_return)
            if not args.quiet:
                bar.set_postfix(pop_mean=f"{mean_return:.0f}", eval=f"{eval_return:.0f}")
            if solved_at is None and eval_return >= SOLVED:
                solved_at = step
                if not args.no_stop:
                    break
    except KeyboardInterrupt:
        interrupted = True
        trim_history(history)
    bar.close()
    elapsed = time.perf_counter() - start

    done = len(history["step"])
    result: dict[str, Any] = {
        "mode": args.mode,
        "interrupted": interrupted,
        "solved_at_step": solved_at,
        # None when the run was stopped before its first step ended.
        "final_eval_return": history["eval_return"][-1] if done else None,
        "best_eval_return": max(history["eval_return"]) if done else None,
        "first_mean_return": history["mean_return"][0] if done else None,
        "episodes": done * args.pop_size,
        "seconds": elapsed,
        "device": str(device),
        "args": vars(args),
        "history": history,
    }
    solved = (
        f"solved (eval return >= {SOLVED:.0f}) at step {solved_at}" if solved_at else "not solved"
    )
    stopped = " (interrupted)" if interrupted else ""
    print(
        f"cartpole summary{stopped}: mode={args.mode} pop={args.pop_size} {solved}; "
        "final eval return "
        f"{fmt(result['final_eval_return'], '.1f')} after {done} steps "
        f"({result['episodes']} training episodes) in {elapsed:.1f}s on {device}"
    )
    if args.plot:
        save_plot(
            args.plot,
            {
                "population mean return": (history["step"], history["mean_return"]),
                f"centre policy, mean of {args.eval_episodes} episodes": (
                    history["step"],
                    history["eval_return"],
                ),
            },
            title=f"CartPole-v1, EggrollOptimizer ({args.mode}), pop {args.pop_size}",
            xlabel="ES step",
            ylabel="return",
            hline=(SOLVED, "solved (475)"),
        )
    if args.json:
        save_json(args.json, result)
    return result


if __name__ == "__main__":
    sys.exit(INTERRUPTED_EXIT if main()["interrupted"] else 0)
