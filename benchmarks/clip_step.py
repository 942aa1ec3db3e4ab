"""Benchmark: FastClip's clip step on a drifted ResNet18 (wBN), where every wrapper
measures and clips its layer with block Lanczos.

ResNet18 at CIFAR shape, FastClip wBN with its defaults, SGD lr 0.1 as in training,
random data at batch ``--batch-size``: the first clip at step 0, then plain steps up to
the next clip step (``clip_steps`` later, the drift a training run sees), which is
timed, and the plain step before it. Prints and appends to benchmarks/results/clip_step.md:
the clip step, the plain step, their ratio, and the amortised ratio
``1 + (clip - plain) / (plain * clip_steps)``.

Run: ``python benchmarks/clip_step.py [--threads 1] [--batch-size 8]``
"""
from __future__ import annotations

import argparse
import logging
import subprocess
import time
from pathlib import Path

import torch
from torch import nn

from fastclip.cli import OneLineErrorParser
from fastclip.training import TrainConfig, build_model, make_optimizer, resolve

log = logging.getLogger("benchmarks.clip_step")
RESULTS = Path(__file__).parent / "results" / "clip_step.md"


def get_args_parser() -> argparse.ArgumentParser:
    p = OneLineErrorParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--label", default="", help="a note for the results row (e.g. the commit)")
    p.add_argument("--out", type=Path, default=RESULTS)
    return p


def main(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    cfg = resolve(TrainConfig(dataset="cifar", model="ResNet18", method="fastclip", mode="wBN", seed=args.seed,
                              batch_size=args.batch_size, device="cpu"))
    model, method = build_model(cfg, "cpu")
    opt = make_optimizer(cfg, model)
    period = method.config.clip_steps
    g = torch.Generator().manual_seed(args.seed)
    model.train()
    times = {}
    for i in range(period + 1):
        x = torch.rand(args.batch_size, 3, 32, 32, generator=g)
        y = torch.randint(0, 10, (args.batch_size,), generator=g)
        t = time.perf_counter()
        loss = nn.functional.cross_entropy(model(x), y) + method.penalty(model)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        method.after_step(model, i)
        times[i] = time.perf_counter() - t
    clip, plain = times[period], min(times[i] for i in range(period - 5, period))
    amortised = 1 + (clip - plain) / (plain * period)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    row = (f"| {time.strftime('%Y-%m-%d %H:%M')} | {commit} {args.label} | {args.threads} | {args.batch_size} | "
           f"{clip:.2f} s | {plain:.3f} s | {clip / plain:.1f} | {period} | {amortised:.3f} |")
    if not args.out.exists():
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("# FastClip clip step (ResNet18 wBN, CPU)\n\nProduced by `python benchmarks/clip_step.py` "
                            "(see its docstring). *clip*: the clip step a full period after the first clip; *plain*: "
                            "the fastest of the 5 plain steps before it; amortised: 1 + (clip - plain) / "
                            "(plain x period).\n\n| date | code | threads | batch | clip step | plain step | clip / "
                            "plain | period | amortised / plain |\n|---|---|--:|--:|--:|--:|--:|--:|--:|\n")
    with args.out.open("a") as f:
        f.write(row + "\n")
    log.info(row)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
