"""``make demo``: the main job on the built-in default, no download needed.

Trains SimpleConv on the full Fashion-MNIST (Debian's ``dataset-fashion-mnist``, found
offline) with FastClip in wBN mode for a few epochs (no augmentation, as the
Fashion-MNIST reproduction) through the same training run as
``experiments/train.py``, then prints the test accuracy and the exact sigma_1 of every
clipped layer (dense SVD / weight SVD, float64) at initialisation and after training.

Usage: ``python -m fastclip.pipeline.demo [--epochs 2] [--logdir runs/demo] [--method fastclip]``
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import time
from collections.abc import Iterator, Sequence

import torch

from fastclip.exact import exact_top
from fastclip.pipeline.cli import OneLineErrorParser, int_at_least, int_seed, parse_args, path_arg
from fastclip.pipeline.methods import MODES, available
from fastclip.pipeline.methods.base import record_input_shapes
from fastclip.pipeline.training import ConfigError, TrainConfig, build_model, load_model, resolve, run
from fastclip.spectral import unwrap
from fastclip.wrapper import SpectralNorm

log = logging.getLogger("fastclip.pipeline.demo")


def get_args_parser() -> argparse.ArgumentParser:
    p = OneLineErrorParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int_at_least(1, maximum=100_000), default=2)
    p.add_argument("--method", choices=available(), default="fastclip")
    p.add_argument("--mode", choices=MODES, default="wBN")
    p.add_argument("--seed", type=int_seed, default=1)
    p.add_argument("--logdir", type=path_arg, default="runs/demo")
    p.add_argument("--train-subset", type=int_at_least(1), default=None)
    p.add_argument("--test-subset", type=int_at_least(1), default=None)
    p.add_argument("--force", action="store_true", help="retrain even if the run finished before")
    return p


def clipped_layer_norms(
    model: torch.nn.Module, input_shape: tuple[int, ...]
) -> dict[str, tuple[float, float]]:
    """{wrapper name: (exact sigma_1, clip target)} for every clipping SpectralNorm in the model."""
    shapes = record_input_shapes(model, input_shape)
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, SpectralNorm) and m.clip_flag:
            out[name] = (float(exact_top(m, shapes[name], k=1)[0]), m.clip)
    return out


@contextlib.contextmanager
def _rebuilding() -> Iterator[None]:
    """Quiet the wrappers' "clipping to ..." line while the model is built again (its
    initial weights, the trained checkpoint): the training run logged each one already."""
    wrapper_log = logging.getLogger("fastclip.wrapper")
    level = wrapper_log.level
    wrapper_log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        wrapper_log.setLevel(level)


def main(argv: Sequence[str] | argparse.Namespace | None = None) -> int:
    args = parse_args(get_args_parser(), argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    config = TrainConfig(
        dataset="fashion-mnist",
        model="SimpleConv",
        method=args.method,
        mode=args.mode,
        seed=args.seed,
        epochs=args.epochs,
        logdir=args.logdir,
        train_subset=args.train_subset,
        test_subset=args.test_subset,
        force=args.force,
        augment="none",
    )
    t0 = time.time()
    try:
        summary = run(config)
        with _rebuilding():
            initial, _ = build_model(resolve(config), "cpu")
    except ConfigError as e:
        print(f"demo: error: {e}", file=sys.stderr)
        return 2
    with _rebuilding():
        model, cfg = load_model(summary["run_dir"], which="last")
    shape = (1, 28, 28)
    before = {}
    shapes = record_input_shapes(initial, shape)
    for name, m in initial.named_modules():
        if isinstance(m, SpectralNorm) and m.clip_flag:
            before[name] = float(exact_top(m, shapes[name], k=1)[0])
    after = clipped_layer_norms(model, shape)
    final = summary["final"]
    lines = [
        "",
        f"FastClip demo: SimpleConv on Fashion-MNIST, method {cfg.method}, mode {cfg.mode}, "
        f"{summary['epochs']} epochs, {time.time() - t0:.0f} s",
        f"  run directory: {summary['run_dir']}",
        f"  test accuracy: {final.get('test_acc', float('nan')):.2f} %  (best {summary['best_test_acc']:.2f} %)",
        "  exact sigma_1 of each clipped layer (float64, the true operator at its input size):",
        f"    {'layer':<28}{'at init':>10}{'trained':>10}{'clip':>8}",
    ]
    for name, (sigma, c) in after.items():
        kind = type(unwrap(dict(model.named_modules())[name])).__name__
        lines.append(
            f"    {name + ' (' + kind + ')':<28}{before.get(name, float('nan')):>10.4f}{sigma:>10.4f}{c:>8.2f}"
        )
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
