"""Cost of a clip step under DDP against one process (run by hand, not in CI).

SimpleConv at MNIST shape (1 x 28 x 28) in wBN, Adam, random data, global batch
``--batch-size``: one process at that batch, then ``--world`` processes (gloo on the CPU,
nccl on GPUs) at ``batch / world`` each, through the same training step as the runs
(:func:`fastclip.pipeline.training.train_epoch` with the run's :class:`Replica`: DDP, buffer
broadcast after backward). Per method, each step is timed alone (a barrier before it, so
the ranks start together) and split into the steps that clip or project and the others:

* ``fastclip``: clips every ``--clip-steps`` steps (the other steps only track);
* ``gouk``: projects after every step.

Also timed: the buffer broadcast of one step and the epoch-end checksum check.
On the CPU each process gets one thread (``--threads``); the machine's other load is not
controlled, so compare the two columns of one run of this script only. Results go to
``benchmarks/results/distributed.md``.

Usage::

    python benchmarks/distributed.py                     # starts the ranks itself
    python benchmarks/distributed.py --steps 60 --world 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from fastclip.pipeline.cli import OneLineErrorParser, int_at_least
from fastclip.pipeline.io import atomic_write_text
from fastclip.pipeline.training import TrainConfig, build_model, make_optimizer, resolve, train_epoch
from fastclip.pipeline.training.distributed import Replica, setup

RESULTS = Path(__file__).resolve().parent / "results" / "distributed.md"
METHODS = ("fastclip", "gouk")


def get_args_parser() -> argparse.ArgumentParser:
    p = OneLineErrorParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int_at_least(2), default=128, help="global batch")
    p.add_argument("--world", type=int_at_least(2), default=2, help="processes of the DDP part")
    p.add_argument("--steps", type=int_at_least(1), default=40, help="timed steps per method")
    p.add_argument("--warmup", type=int_at_least(0), default=3)
    p.add_argument("--clip-steps", type=int_at_least(1), default=10, help="fastclip: clip every N steps")
    p.add_argument("--threads", type=int_at_least(1), default=1, help="CPU threads per process")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)  # a rank's result file
    return p


def _time_method(args: argparse.Namespace, replica: Replica, method_name: str, per_rank: int) -> dict:
    method_args = {"clip_steps": args.clip_steps} if method_name == "fastclip" else {}
    cfg = resolve(
        TrainConfig(
            dataset="mnist",
            model="SimpleConv",
            method=method_name,
            mode="wBN",
            batch_size=per_rank,
            method_args=method_args,
            device=args.device,
        )
    )
    model, method = build_model(cfg, replica.device)
    optimizer = make_optimizer(cfg, model)
    replica.wrap(model)
    g = torch.Generator().manual_seed(replica.rank)
    x, y = torch.rand(per_rank, 1, 28, 28, generator=g), torch.randint(0, 10, (per_rank,), generator=g)
    batch = [(x, y)]
    sizes = [args.batch_size]
    plain, clip, plain_cpu, clip_cpu = [], [], [], []
    for step in range(args.warmup + args.steps):
        replica.barrier()
        if replica.device.type == "cuda":
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        train_epoch(
            model, method, optimizer, batch, replica.device, step=step, replica=replica, global_sizes=sizes
        )
        if replica.device.type == "cuda":
            torch.cuda.synchronize()
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        cpu = replica.sum([cpu])[0]  # CPU seconds of every rank together
        if step >= args.warmup:
            clips = method_name == "gouk" or step % args.clip_steps == 0
            (clip if clips else plain).append(dt)
            (clip_cpu if clips else plain_cpu).append(cpu)
    t0 = time.perf_counter()
    for _ in range(10):
        replica.after_backward(model)
    bcast = (time.perf_counter() - t0) / 10
    t0 = time.perf_counter()
    replica.check_consistent(model, method, epoch=0)
    check = time.perf_counter() - t0
    return {
        "plain_ms": 1e3 * statistics.median(plain) if plain else None,
        "clip_ms": 1e3 * statistics.median(clip),
        "plain_cpu_ms": 1e3 * statistics.median(plain_cpu) if plain_cpu else None,
        "clip_cpu_ms": 1e3 * statistics.median(clip_cpu),
        "n_plain": len(plain),
        "n_clip": len(clip),
        "buffer_broadcast_ms": 1e3 * bcast,
        "checksum_check_ms": 1e3 * check,
    }


def measure(args: argparse.Namespace) -> dict:
    """This process's timings: alone (world size 1) or as a rank of the job it was started in."""
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(args.device == "cpu")
    replica = setup(resolve(TrainConfig(dataset="mnist", device=args.device)), torch.device(args.device))
    try:
        per_rank = args.batch_size // replica.world_size
        return {
            "world_size": replica.world_size,
            "batch_per_process": per_rank,
            **{m: _time_method(args, replica, m, per_rank) for m in METHODS},
        }
    finally:
        replica.close()


def _ranks(args: argparse.Namespace, argv: list[str]) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        procs = []
        for r in range(args.world):
            env = dict(os.environ, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(args.world))
            env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS=str(args.threads))
            out = Path(tmp) / f"rank{r}.json"
            procs.append(subprocess.Popen([sys.executable, __file__, *argv, "--out", str(out)], env=env))
        if any(p.wait() for p in procs):
            raise SystemExit("a rank failed")
        return json.loads((Path(tmp) / "rank0.json").read_text())


def report(args: argparse.Namespace, one: dict, many: dict) -> str:
    dev = "CPU, gloo" if args.device == "cpu" else f"{torch.cuda.get_device_name(0)}, nccl"
    lines = [
        "# Clip-step cost under DDP vs one process",
        "",
        f"`python benchmarks/distributed.py --batch-size {args.batch_size} --world {args.world} "
        f"--steps {args.steps} --clip-steps {args.clip_steps} --threads {args.threads} --device {args.device}`",
        "",
        f"{platform.node()}, {os.cpu_count()} CPUs, {dev}, {args.threads} thread(s) per process, torch "
        f"{torch.__version__}, {time.strftime('%Y-%m-%d')}. SimpleConv wBN at 1x28x28, Adam, global batch "
        f"{args.batch_size}: 1 process at {args.batch_size} vs {args.world} processes at "
        f"{args.batch_size // args.world} each. Median per step of the wall time (rank 0, after a "
        "barrier) and of the CPU time of all ranks together (`time.process_time`, summed over ranks: "
        "what the step costs in compute, little affected by other load). Load average when it ended: "
        f"{os.getloadavg()[0]:.1f} (other jobs share these cores: the wall times are the noisier).",
        "",
        "| method | step | wall, 1 process (ms) | wall, DDP (ms) | DDP / 1 | CPU, 1 process (ms) "
        "| CPU, DDP all ranks (ms) | DDP / 1 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m in METHODS:
        kinds = [("clip", "clip")] if m == "gouk" else [("plain (track only)", "plain"), ("clip", "clip")]
        for label, key in kinds:
            a, b = one[m][f"{key}_ms"], many[m][f"{key}_ms"]
            ca, cb = one[m][f"{key}_cpu_ms"], many[m][f"{key}_cpu_ms"]
            label = "projection (every step)" if m == "gouk" else label
            lines.append(
                f"| {m} | {label} | {a:.1f} | {b:.1f} | {b / a:.2f} | {ca:.1f} | {cb:.1f} | {cb / ca:.2f} |"
            )
    lines += [
        "",
        "Consistency machinery under DDP (rank 0): "
        + "; ".join(
            f"{m}: buffer broadcast {many[m]['buffer_broadcast_ms']:.2f} ms per step, epoch-end checksum check "
            f"{many[m]['checksum_check_ms']:.1f} ms"
            for m in METHODS
        )
        + ".",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = get_args_parser().parse_args(argv)
    if args.out:
        Path(args.out).write_text(json.dumps(measure(args)) if dist.is_available() else "{}")
        return 0
    one = measure(args)
    many = _ranks(args, argv)
    text = report(args, one, many)
    atomic_write_text(RESULTS, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
