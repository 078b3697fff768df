"""Train a small regression MLP with EGGROLL on several processes, sharding the population.

Every rank holds the whole model and evaluates its share of the population; only the losses
travel between ranks (see docs/distributed.md). Run it on the CPU with gloo:

    torchrun --nproc_per_node=2 examples/distributed_train.py --steps 60 --checkpoint ckpt.pt
    torchrun --nproc_per_node=2 examples/distributed_train.py --steps 120 --checkpoint ckpt.pt \\
        --resume

or on GPUs (one per process, NCCL) with ``--device cuda``. Without torchrun it runs as a single
process, and gives the same result: the final line prints a fingerprint of the parameters, which
is the same for any number of processes and for a run resumed from a checkpoint (on the CPU).
To see how close runs on different numbers of GPUs are, record and compare them:

    torchrun --nproc_per_node=1 examples/distributed_train.py --device cuda --record w1.pt
    torchrun --nproc_per_node=2 examples/distributed_train.py --device cuda --record w2.pt
    python examples/distributed_train.py --compare w1.pt w2.pt
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

try:
    import torcheggroll
except ImportError:  # a source checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import torcheggroll

from torcheggroll import EggrollOptimizer
from torcheggroll.distributed import params_fingerprint


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--steps", type=int, default=60, help="train until this many steps in total")
    p.add_argument("--pop-size", type=int, default=64)
    p.add_argument(
        "--batch", type=int, default=128, help="examples per step, shared by all members"
    )
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--sigma", type=float, default=0.05)
    p.add_argument("--rank", type=int, default=4, help="rank of the perturbations")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (NCCL, one GPU per process)")
    p.add_argument("--path", default="auto", choices=["auto", "lowrank", "materialized"])
    p.add_argument("--checkpoint", type=Path, default=None, help="written by rank 0")
    p.add_argument("--checkpoint-every", type=int, default=20)
    p.add_argument(
        "--resume", action="store_true", help="continue from --checkpoint when it exists"
    )
    p.add_argument("--timeout", type=float, default=300.0, help="collective timeout in seconds")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument(
        "--record",
        type=Path,
        default=None,
        help="rank 0 saves every step's losses and the final parameters here",
    )
    p.add_argument(
        "--compare",
        type=Path,
        nargs=2,
        default=None,
        metavar=("A", "B"),
        help="instead of training: the largest differences between two --record files",
    )
    return p.parse_args()


def compare(a_path: Path, b_path: Path) -> None:
    """Print how far apart two recorded runs are (0 everywhere: bit-identical)."""
    a, b = torch.load(a_path), torch.load(b_path)
    steps = min(len(a["losses"]), len(b["losses"]))
    for i in range(steps):
        la, lb = a["losses"][i], b["losses"][i]
        rel = ((la - lb).abs() / lb.abs().clamp_min(1e-30)).max().item()
        print(
            f"step {a['start'] + i + 1:4d}  max |loss diff| {(la - lb).abs().max().item():.3e}  "
            f"max rel {rel:.3e}"
        )
    d = (a["params"] - b["params"]).abs().max().item()
    print(
        f"final parameters: max |diff| {d:.3e}, "
        f"bit-identical: {torch.equal(a['params'], b['params'])}"
    )


def setup(args: argparse.Namespace) -> tuple[int, int, torch.device]:
    """Join the process group when launched by torchrun; ``(rank, world_size, device)``."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device(args.device)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if args.device == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device(args.device)
        backend = "gloo"
    # A finite timeout turns a rank that hangs into an error on the others instead of a stall.
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=args.timeout))
    return dist.get_rank(), dist.get_world_size(), device


def batch(
    step: int, size: int, teacher: nn.Module, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch of ``step``: a function of the step only, so every rank (and a resumed run)
    sees the same data."""
    g = torch.Generator().manual_seed(10_000 + step)
    x = torch.randn(size, 16, generator=g)
    with torch.no_grad():
        y = teacher(x)
    return x.to(device), y.to(device)


def mse_closure(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, path: str
) -> Callable[[torcheggroll.Population], torch.Tensor]:
    """The closure of one step: the mean squared error of every local member on ``(x, y)``."""

    def closure(population: torcheggroll.Population) -> torch.Tensor:
        out = population.forward(model, x, path=path)  # (local members, batch, 1)
        return ((out - y) ** 2).mean(dim=(1, 2))

    return closure


def main() -> None:
    args = parse_args()
    if args.compare:
        compare(*args.compare)
        return
    rank, world, device = setup(args)
    say = print if rank == 0 else (lambda *a, **k: None)

    # Same seed on every rank: every replica starts from the same parameters (the optimizer
    # checks this at its first step).
    torch.manual_seed(args.seed)
    teacher = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 1))
    model = nn.Sequential(
        nn.Linear(16, args.width),
        nn.Tanh(),
        nn.Linear(args.width, args.width),
        nn.Tanh(),
        nn.Linear(args.width, 1),
    ).to(device)
    opt = EggrollOptimizer(
        model.parameters(),
        lr=args.lr,
        sigma=args.sigma,
        rank=args.rank,
        pop_size=args.pop_size,
        seed=args.seed,
    )
    start = 0
    if args.resume and args.checkpoint is not None and args.checkpoint.exists():
        ckpt = torch.load(args.checkpoint, map_location=device)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        start = int(ckpt["step"])
        say(f"resumed at step {start} (checkpoint written by {ckpt['world_size']} process(es))")
    elif args.resume:  # e.g. the first attempt under `torchrun --max-restarts`
        say(f"--resume: no checkpoint at {args.checkpoint}, starting from scratch")
    say(
        f"{world} process(es), population {args.pop_size}, {args.device}; this rank evaluates "
        f"{len(opt.population())} members"
    )

    def save(step: int) -> None:
        if args.checkpoint is None:
            return
        if rank == 0:  # one writer; write then rename, so a crash never leaves half a file
            tmp = args.checkpoint.with_suffix(".tmp")
            torch.save(
                {
                    "model": model.state_dict(),
                    "optimizer": opt.state_dict(),
                    "step": step,
                    "world_size": world,
                },
                tmp,
            )
            os.replace(tmp, args.checkpoint)
        if world > 1:
            dist.barrier()  # nobody runs ahead of a checkpoint that may still be needed

    recorded: list[torch.Tensor] = []
    t0 = time.perf_counter()
    for step in range(start, args.steps):
        x, y = batch(step, args.batch, teacher, device)

        loss = opt.step(mse_closure(model, x, y, args.path))
        if args.record is not None and opt.last_losses is not None:
            recorded.append(opt.last_losses.double().cpu())  # all members', from every rank
        if (step + 1) % args.log_every == 0:
            say(
                f"step {step + 1:4d}  mean population loss {loss.item():.5f}  "
                f"{time.perf_counter() - t0:.1f} s"
            )
        if (step + 1) % args.checkpoint_every == 0 or step + 1 == args.steps:
            save(step + 1)

    with torch.no_grad():
        x, y = batch(-1, 1024, teacher, device)
        test = ((model(x) - y) ** 2).mean().item()
    lo, hi = params_fingerprint(model.parameters())
    say(f"done: {args.steps} steps, held-out loss {test:.5f}, parameter fingerprint {lo:x}-{hi:x}")
    if args.record is not None and rank == 0:
        flat = torch.cat([p.detach().double().cpu().reshape(-1) for p in model.parameters()])
        torch.save({"start": start, "losses": recorded, "params": flat}, args.record)
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
