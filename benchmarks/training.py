"""Training cost of every clipping method, as a ratio to ``orig`` (run by hand, not in CI).

1. SimpleConv on Fashion-MNIST: one epoch over the training set (batch 128, Adam as in the
   paper), for each method in wBN mode, with the real data loader.
2. ResNet18 and DLA at CIFAR shape (3 x 32 x 32, batch 128, SGD as in the paper) on random
   data: ``--warmup`` untimed steps, then ``--steps`` timed steps per method (the task asks
   for 20; the default on a CPU is 3, since one ResNet18 step takes seconds there).

Each method is timed between two timings of ``orig`` (the reference of its ratio), and each
timed part uses :func:`fastclip.pipeline.training.train_epoch`, the same step the training
runs use (forward, loss + penalty, backward, optimiser step, ``method.after_step``).
Setup (building the model and ``method.prepare``, e.g. FastClip's initial power
iterations) is timed separately. Results go to ``benchmarks/results/training.md``.

Usage::

    python benchmarks/training.py                      # everything, defaults for the device
    python benchmarks/training.py --steps 20 --models ResNet18 --skip-fmnist
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

from fastclip.pipeline.cli import OneLineErrorParser
from fastclip.pipeline.io import atomic_write_text
from fastclip.pipeline.methods import available
from fastclip.pipeline.training import (
    TrainConfig,
    build_model,
    choose_device,
    make_optimizer,
    resolve,
    train_epoch,
)

logger = logging.getLogger("benchmarks.training")

RESULTS = Path(__file__).resolve().parent / "results" / "training.md"


def get_args_parser() -> argparse.ArgumentParser:
    p = OneLineErrorParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--methods", nargs="+", choices=available(), default=available())
    p.add_argument("--models", nargs="*", choices=["ResNet18", "DLA"], default=["ResNet18", "DLA"])
    p.add_argument(
        "--steps", type=int, default=None, help="timed steps per model and method (cuda 20, cpu 3)"
    )
    p.add_argument("--warmup", type=int, default=1, help="untimed steps before timing")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--skip-fmnist", action="store_true", help="skip the SimpleConv / Fashion-MNIST epoch")
    p.add_argument("--fmnist-subset", type=int, default=None, help="train on the first N images only")
    p.add_argument(
        "--data-dir", default=None, help="Fashion-MNIST root (default: see fastclip.pipeline.data)"
    )
    p.add_argument(
        "--cifar-fastclip-init-delay",
        type=int,
        default=None,
        help="ResNet18/DLA: fastclip's init_delay (default: the method's, 0: clip at the first step)",
    )
    p.add_argument("--device", default="auto")
    p.add_argument("--out", type=Path, default=RESULTS)
    return p


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_method(
    config: TrainConfig, loader: DataLoader, device: torch.device, warmup: int, steps: int | None
) -> dict[str, float]:
    """Seconds for setup (model + ``method.prepare``), for the ``warmup`` steps (FastClip:
    its initial PowerQR and first clip happen there), and per timed step of ``config``'s
    model and method over ``loader`` (``steps=None``: one full pass)."""
    t0 = time.perf_counter()
    model, method = build_model(config, device)
    optimizer = make_optimizer(config, model)
    _sync(device)
    setup = time.perf_counter() - t0
    step, first = 0, float("nan")
    if warmup:
        t0 = time.perf_counter()
        step = train_epoch(model, method, optimizer, loader, device, max_steps=warmup, desc="warm-up")["step"]
        _sync(device)
        first = time.perf_counter() - t0
    t0 = time.perf_counter()
    stats = train_epoch(
        model,
        method,
        optimizer,
        loader,
        device,
        step=step,
        max_steps=steps,
        desc=f"{config.model} {config.method}",
    )
    _sync(device)
    seconds = time.perf_counter() - t0
    return {
        "setup": setup,
        "warmup": first,
        "seconds": seconds,
        "steps": stats["steps"],
        "per_step": seconds / stats["steps"],
        "loss": stats["loss"],
    }


def table(title: str, rows: list[dict], what: str) -> list[str]:
    """Markdown table of one section. ``rows`` alternate orig and the other methods
    (orig, m1, orig, m2, ..., orig) per model; each method's ratio is its seconds per step
    over the mean of the two orig timings around it, so a change in the machine's load
    during the run moves the reference with it."""
    out = [
        f"### {title}",
        "",
        f"| model | method | setup (s) | warm-up (s) | {what} | s / step "
        "| orig s / step before, after | ratio to orig |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for i, r in enumerate(rows):
        if r["method"] == "orig":
            continue
        around = [
            rows[j]["per_step"]
            for j in (i - 1, i + 1)
            if 0 <= j < len(rows) and rows[j]["method"] == "orig" and rows[j]["model"] == r["model"]
        ]
        ratio = r["per_step"] / (sum(around) / len(around)) if around else float("nan")
        warm = "-" if r["warmup"] != r["warmup"] else f"{r['warmup']:.1f}"
        out.append(
            f"| {r['model']} | {r['method']} | {r['setup']:.1f} | {warm} | {r['seconds']:.1f} s for "
            f"{r['steps']} steps | {r['per_step']:.3f} | {', '.join(f'{v:.3f}' for v in around) or '-'} "
            f"| {ratio:.2f} |"
        )
    return out + [""]


def _command_line() -> str:
    """The flags this run was given, without --out (where the results go is not how they were made)."""
    out, skip = [], False
    for a in sys.argv[1:]:
        if skip:
            skip = False
        elif a == "--out":
            skip = True
        elif not a.startswith("--out="):
            out.append(a)
    return " ".join(out)


def main(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    device = choose_device(args.device)
    steps = args.steps if args.steps is not None else (20 if device.type == "cuda" else 3)
    # orig before and after every other method, the reference of its ratio (see table()).
    methods = ["orig"]
    for m in args.methods:
        if m != "orig":
            methods += [m, "orig"]
    load_start = os.getloadavg()[1]
    header = [
        "# Training cost per clipping method",
        "",
        f"Measured {time.strftime('%Y-%m-%d')} on {platform.node()}: {device}"
        + (
            f" ({torch.cuda.get_device_name(device)})"
            if device.type == "cuda"
            else f", {torch.get_num_threads()} torch threads, {platform.processor() or platform.machine()}"
        )
        + f", torch {torch.__version__}. wBN mode, batch {args.batch_size}, each method's default "
        "hyper-parameters unless noted. Produced by `python benchmarks/training.py "
        + _command_line()
        + '`; "ratio to orig" is '
        "seconds per training step divided by the mean of orig's, timed right before and right after "
        "the method (the machine is shared: the two orig timings show how steady it was). Setup "
        "(model + `method.prepare`) and warm-up are not in the ratio.",
        "",
    ]
    sections: list[tuple[str, str, list[dict]]] = []

    def write(done: bool) -> None:
        # Rewritten after every measurement, so a long run interrupted keeps what it measured.
        lines = list(header)
        for title, what, rows in sections:
            lines += table(title, rows, what)
        # Other processes on the machine inflate every time; the load average says how much.
        lines.append(
            f"Load average (5 min) at the start / {'end' if done else 'last row'}: {load_start:.1f} / "
            f"{os.getloadavg()[1]:.1f} on {os.cpu_count()} cores." + ("" if done else " (incomplete run)")
        )
        atomic_write_text(args.out, "\n".join(lines) + "\n")

    if not args.skip_fmnist:
        from fastclip.pipeline.data import get_datasets

        train, _, _ = get_datasets("fashion-mnist", args.data_dir, train_subset=args.fmnist_subset)
        rows: list[dict] = []
        sections.append((f"SimpleConv, Fashion-MNIST, one epoch ({len(train)} images)", "epoch", rows))
        for method in methods:
            cfg = resolve(
                TrainConfig(
                    dataset="fashion-mnist",
                    model="SimpleConv",
                    method=method,
                    batch_size=args.batch_size,
                    device=str(device),
                )
            )
            g = torch.Generator().manual_seed(0)
            loader = DataLoader(train, batch_size=args.batch_size, shuffle=True, generator=g)
            r = time_method(cfg, loader, device, warmup=0, steps=None)
            rows.append({"model": "SimpleConv", "method": method, **r})
            logger.info("SimpleConv %s: %.1f s / epoch (%.4f s / step)", method, r["seconds"], r["per_step"])
            write(done=False)

    if args.models:
        rows = []
        note = "" if steps >= 20 else f" ({steps} timed steps instead of 20: CPU)"
        if args.cifar_fastclip_init_delay is not None:
            note += (
                f"; fastclip with init_delay={args.cifar_fastclip_init_delay}, so no clip falls in the "
                "warm-up or timed steps (the timed steps are its per-step tracking)"
            )
        sections.append(
            (
                f"ResNet18 and DLA at CIFAR shape, random data, {args.warmup} warm-up + {steps} timed "
                f"steps{note}",
                "timed",
                rows,
            )
        )
        for model in args.models:
            g = torch.Generator().manual_seed(0)
            n = args.batch_size * (steps + args.warmup)
            data = TensorDataset(
                torch.rand(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)
            )
            for method in methods:
                extra = {}
                if method == "fastclip" and args.cifar_fastclip_init_delay is not None:
                    extra["init_delay"] = args.cifar_fastclip_init_delay
                cfg = resolve(
                    TrainConfig(
                        dataset="cifar",
                        model=model,
                        method=method,
                        batch_size=args.batch_size,
                        device=str(device),
                        method_args=extra,
                    )
                )
                loader = DataLoader(data, batch_size=args.batch_size, shuffle=False)
                r = time_method(cfg, loader, device, warmup=args.warmup, steps=steps)
                rows.append({"model": model, "method": method, **r})
                logger.info(
                    "%s %s: %.2f s / step (setup %.1f s, warm-up %.1f s)",
                    model,
                    method,
                    r["per_step"],
                    r["setup"],
                    r["warmup"],
                )
                write(done=False)
    write(done=True)
    logger.info("wrote %s", args.out)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
