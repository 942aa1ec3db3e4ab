"""Benchmark: the operator norm a spectral-norm parametrization leaves, ours beside torch's.

For each layer (random init, seed 0): register ``fastclip.parametrizations.spectral_norm``
on one copy and ``torch.nn.utils.parametrizations.spectral_norm`` on another with the same
weight, train both for a few SGD steps that push the norm up (the vectors must follow the
weight), then run training forwards at the final weight (one power iteration each), and
measure sigma_1 of each normalised layer as an explicit float64 matrix at the layer's input
size. Ours should read 1; torch's normalises the reshaped kernel, not the layer.

Run: ``python benchmarks/parametrization.py [--steps 5] [--forwards 150]`` (a few seconds on one
CPU thread); the table goes to benchmarks/results/parametrization.md.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrizations as torch_parametrizations

from fastclip.exact import explicit_matrix
from fastclip.parametrizations import spectral_norm
from fastclip.pipeline.cli import OneLineErrorParser

log = logging.getLogger("benchmarks.parametrization")

LAYERS: list[tuple[str, Callable[[], nn.Module], tuple[int, ...]]] = [
    ("Conv2d 4->6 3x3, zero padding 1", lambda: nn.Conv2d(4, 6, 3, padding=1), (4, 8, 8)),
    ("Conv2d 4->6 3x3, stride 2", lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1), (4, 9, 9)),
    ("Conv2d 4->6 3x3, dilation 2", lambda: nn.Conv2d(4, 6, 3, dilation=2, padding=2), (4, 8, 8)),
    ("Conv2d 4->6 3x3, groups 2", lambda: nn.Conv2d(4, 6, 3, groups=2, padding=1), (4, 8, 8)),
    (
        "ConvTranspose2d 4->6 3x3, stride 2",
        lambda: nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1),
        (4, 5, 5),
    ),
    (
        "Conv1d 3->5 k5, reflect padding",
        lambda: nn.Conv1d(3, 5, 5, padding=2, padding_mode="reflect"),
        (3, 20),
    ),
    (
        "Conv3d 2->3 3x3x3, circular padding",
        lambda: nn.Conv3d(2, 3, 3, padding=1, padding_mode="circular"),
        (2, 4, 4, 4),
    ),
    ("Conv2d 64->64 3x3, zero padding 1", lambda: nn.Conv2d(64, 64, 3, padding=1), (64, 8, 8)),
    ("Linear 7->5", lambda: nn.Linear(7, 5), (7,)),
]


def get_args_parser() -> argparse.ArgumentParser:
    p = OneLineErrorParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=5, help="SGD steps before the measurement (default 5)")
    p.add_argument("--forwards", type=int, default=150, help="training forwards at the final weight")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "parametrization.md"))
    return p


def train(layer: nn.Module, shape: tuple[int, ...], steps: int, forwards: int) -> None:
    g = torch.Generator().manual_seed(1)
    opt = torch.optim.SGD(layer.parameters(), lr=0.05)
    for _ in range(steps):
        loss = -layer(torch.randn((8, *shape), generator=g)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        for _ in range(forwards):
            layer(torch.randn((1, *shape), generator=g))


def operator_norm(layer: nn.Module, make: Callable[[], nn.Module], shape: tuple[int, ...]) -> float:
    plain = make()
    with torch.no_grad():
        plain.weight.copy_(layer.weight.detach())
    return float(torch.linalg.matrix_norm(explicit_matrix(plain, shape), 2))


def row(label: str, make: Callable[[], nn.Module], shape: tuple[int, ...], args: argparse.Namespace) -> str:
    torch.manual_seed(0)
    ours = spectral_norm(make(), input_shape=shape)
    theirs = make()
    with torch.no_grad():
        theirs.weight.copy_(ours.parametrizations.weight.original)
    theirs = torch_parametrizations.spectral_norm(theirs)
    for layer in (ours, theirs):
        train(layer, shape, args.steps, args.forwards)
    a, b = operator_norm(ours, make, shape), operator_norm(theirs, make, shape)
    log.info("%s: fastclip %.6f, torch %.6f", label, a, b)
    return f"| {label} | {'x'.join(map(str, shape))} | {a:.6f} | {b:.4f} |"


def main(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    rows = [row(*layer, args) for layer in LAYERS]
    text = "\n".join(
        [
            "# sigma_1 of the normalised layer: fastclip.parametrizations vs torch",
            "",
            f"`python benchmarks/parametrization.py --steps {args.steps} --forwards {args.forwards}` "
            f"(CPU, {args.threads} thread): {args.steps} SGD steps, then {args.forwards} training forwards; "
            "sigma_1 of each normalised layer as an explicit float64 matrix at its input size.",
            "",
            "| layer | input | fastclip.parametrizations.spectral_norm | torch.nn.utils.parametrizations."
            "spectral_norm |",
            "|---|---|---|---|",
            *rows,
            "",
        ]
    )
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main(get_args_parser().parse_args())
