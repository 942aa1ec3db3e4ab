"""Lipschitz report of a model: every layer's exact sigma_1 and the network's L2 Lipschitz bound.

The model is a trained run (its directory, or its ``ckpt_best.pth`` / ``ckpt_last.pth``;
the architecture and the clipping method's wrapping come from its config.json) or, with
``--torchvision NAME``, an untrained torchvision classifier built locally (``weights=None``,
nothing downloaded). Writes ``lipschitz_report.csv``, ``lipschitz_report.md`` and
``lipschitz_report.png`` (bar chart, log scale) into ``--out-dir`` (default: the run
directory, or ``./lipschitz_<name>`` for a torchvision model) and prints the table. The CSV
of a run names the checkpoint it measured in the columns checkpoint, checkpoint_sha256 and
chosen_by (:mod:`fastclip.pipeline.provenance`), the Markdown in its first line. A run
that ended FAILED (diverged) is an error unless ``--include-failed``; then the model's
name, in every row and the title, ends with ``[FAILED: <reason>]``.

Example::

    python experiments/lipschitz_report.py logs/fashion-mnist/SimpleConv_models/method_fastclip_wBN_1
    python experiments/lipschitz_report.py --torchvision resnet18 --input-shape 3,64,64
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from fastclip.lipschitz import LipschitzReport, lipschitz_report
from fastclip.pipeline.cli import (
    OneLineErrorParser,
    int_at_least,
    int_seed,
    one_line_os_errors,
    output_dir_problem,
    parse_args,
    path_arg,
    real_in,
)
from fastclip.pipeline.cli.runs import checkpoint_id_or_exit, refuse_failed_or_exit
from fastclip.pipeline.data import dataset_info
from fastclip.pipeline.io import atomic_write, atomic_write_text
from fastclip.pipeline.plots import pyplot
from fastclip.pipeline.provenance import CHECKPOINTS, describe_kind
from fastclip.pipeline.training import load_model
from fastclip.pipeline.training.validate import RunFilesError

logger = logging.getLogger("lipschitz_report")


def parse_shape(text: str) -> tuple[int, ...]:
    """``"1,28,28"`` -> ``(1, 28, 28)``; an argparse type."""
    try:
        shape = tuple(int(t) for t in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected positive integers separated by commas (C,H,W), got {text!r}"
        ) from None
    if not shape or any(d < 1 for d in shape):
        raise argparse.ArgumentTypeError(
            f"expected positive integers separated by commas (C,H,W), got {text!r}"
        )
    if any(d > _MAX_SIDE for d in shape) or math.prod(shape) > _MAX_ELEMENTS:
        raise argparse.ArgumentTypeError(
            f"expected at most {_MAX_SIDE} per dimension and {_MAX_ELEMENTS} elements in all, got {text!r}"
        )
    return shape


# An input shape beyond these would not fit in memory as one float64 vector of the extraction.
_MAX_SIDE, _MAX_ELEMENTS = 65_536, 2**28
parse_shape.valid_range = f"C,H,W: 1..{_MAX_SIDE} each, at most {_MAX_ELEMENTS} elements"  # type: ignore[attr-defined]


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = OneLineErrorParser(
        description=__doc__.split("\n\n")[0],
        add_help=add_help,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "source",
        nargs="?",
        type=path_arg,
        default=None,
        help="a run directory, or its ckpt_best.pth / ckpt_last.pth (omit with --torchvision)",
    )
    p.add_argument(
        "--input-shape",
        type=parse_shape,
        default=None,
        help="per-sample input shape C,H,W (default: the run's dataset; 3,224,224 for --torchvision)",
    )
    p.add_argument(
        "--torchvision",
        default=None,
        metavar="NAME",
        help="an untrained torchvision classifier (e.g. resnet18, vgg11_bn, mobilenet_v2)",
    )
    p.add_argument(
        "--num-classes",
        type=int_at_least(1, maximum=1_000_000),
        default=10,
        help="output classes of a --torchvision model",
    )
    p.add_argument(
        "--seed", type=int_seed, default=0, help="seed of a --torchvision model's random initialisation"
    )
    p.add_argument(
        "--checkpoint",
        default=CHECKPOINTS[0],
        choices=CHECKPOINTS,
        help="which checkpoint of a run directory: best (ckpt_best.pth) or last (ckpt_last.pth)",
    )
    p.add_argument("--out-dir", type=path_arg, default=None, help="where the CSV, Markdown and PNG go")
    p.add_argument(
        "--dtype", default="float64", choices=("float64", "float32"), help="precision of the extraction"
    )
    p.add_argument(
        "--tol",
        type=real_in(0, 1.0, open_min=True),
        default=None,
        help="relative tolerance of the extraction",
    )
    p.add_argument("--device", default=None, help="torch device (default: cpu)")
    p.add_argument(
        "--include-failed",
        action="store_true",
        help="report on a run that ended FAILED (diverged) too, its name marked (default: an error)",
    )
    return p


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def load(
    parser: argparse.ArgumentParser, args: argparse.Namespace
) -> tuple[torch.nn.Module, tuple[int, ...], str, Path, dict[str, str]]:
    """(model in eval mode, input shape, name, default output directory, the checkpoint's
    provenance columns - {} for a torchvision model) from the arguments."""
    device = torch.device(args.device or "cpu")
    if args.torchvision is not None:
        if args.source is not None:
            parser.error(f"give a run ({args.source}) or --torchvision {args.torchvision}, not both")
        # Only for --torchvision: the model zoo is slow to import and most reports are of runs.
        import torchvision.models as tvm

        names = tvm.list_models(module=tvm)
        if args.torchvision not in names:
            parser.error(
                f"unknown torchvision classifier {args.torchvision!r}; choose one of {', '.join(names)}"
            )
        if args.num_classes < 1:
            parser.error(f"--num-classes must be >= 1, got {args.num_classes}")
        with torch.random.fork_rng():
            torch.manual_seed(args.seed)
            model = (
                tvm.get_model(args.torchvision, weights=None, num_classes=args.num_classes).to(device).eval()
            )
        return (
            model,
            args.input_shape or (3, 224, 224),
            args.torchvision,
            Path(f"lipschitz_{args.torchvision}"),
            {},
        )
    if args.source is None:
        parser.error("give a run directory or checkpoint, or --torchvision NAME")
    src = Path(args.source)
    which = args.checkpoint
    if src.is_file():
        if src.name not in ("ckpt_best.pth", "ckpt_last.pth"):
            parser.error(f"{src} is not a run's ckpt_best.pth or ckpt_last.pth")
        which, src = src.stem[len("ckpt_") :], src.parent
    if not src.is_dir():
        parser.error(f"no such run directory or checkpoint: {src}")
    if not (src / "config.json").is_file():
        parser.error(f"{src} has no config.json (not a training run)")
    failed = refuse_failed_or_exit(parser, [src], args.include_failed)
    ident = checkpoint_id_or_exit(parser, src, which)
    try:
        model, cfg = load_model(src, which=which, device=device)
    except RunFilesError as e:  # config.json's own fault, not the checkpoint's
        parser.error(str(e))
    except (RuntimeError, ValueError, KeyError, OSError, TypeError) as e:
        parser.error(f"cannot load ckpt_{which}.pth of {src}: {_first_line(e)}")
    shape = args.input_shape or tuple(dataset_info(cfg.dataset).input_shape)
    name = f"{cfg.model} ({cfg.method}, {cfg.mode}, seed {cfg.seed})"
    name += "".join(f" [FAILED: {why}]" for why in failed.values())
    return model, shape, name, src, ident.columns()


def save_report(
    report: LipschitzReport,
    out_dir: str | os.PathLike,
    stem: str = "lipschitz_report",
    checkpoint: dict[str, str] | None = None,
) -> dict[str, Path]:
    """Write ``<stem>.csv``, ``<stem>.md`` and ``<stem>.png`` (bar chart of sigma_1, log scale,
    bars of the layers that enter the bound filled) into ``out_dir``, each atomically;
    ``checkpoint``: the provenance columns of the measured checkpoint, in every CSV row and
    the Markdown's first line."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / f"{stem}.csv", "md": out / f"{stem}.md", "png": out / f"{stem}.png"}
    df = report.to_frame()
    df.insert(0, "model", report.model)
    for i, (column, value) in enumerate((checkpoint or {}).items()):
        df.insert(1 + i, column, value)
    atomic_write_text(paths["csv"], df.to_csv(index=False))
    atomic_write_text(paths["md"], _measured(checkpoint) + report.to_markdown())
    _plot(report, paths["png"])
    return paths


def _measured(checkpoint: dict[str, str] | None) -> str:
    """The line naming the measured checkpoint above the Markdown table ("" for none)."""
    if not checkpoint:
        return ""
    kind = describe_kind(checkpoint["checkpoint"], [checkpoint["chosen_by"]])
    return f"Measured: the {kind}, SHA-256 {checkpoint['checkpoint_sha256']}.\n\n"


def _plot(report: LipschitzReport, path: Path) -> None:
    plt = pyplot()
    rows = [r for r in report.rows if r.sigma1 > 0]
    labels = [f"{r.layer} ({r.kind})" for r in rows]
    longest = max((len(t) for t in labels), default=10)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.3 * len(rows) + 1.5), 3.0 + 0.065 * longest))
    used = [not (r.bound == "-" or r.bound.startswith("in ")) for r in rows]
    ax.bar(
        range(len(rows)),
        [r.sigma1 for r in rows],
        color=["tab:blue" if u else "white" for u in used],
        edgecolor="tab:blue",
    )
    ax.set_yscale("log")
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(labels, rotation=90, fontsize=7)
    ax.set_ylabel("sigma_1 (log scale)")
    title = report.summary_line()
    ax.set_title(title if len(title) < 90 else title[:87] + "...", fontsize=8)
    fig.tight_layout()
    # the PNG goes through the same atomic write as the tables
    atomic_write(path, lambda f: fig.savefig(f, dpi=120, format="png"))
    plt.close(fig)


@one_line_os_errors
def main(argv: Sequence[str] | argparse.Namespace | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    parser = get_args_parser()
    args = parse_args(parser, argv)
    if args.out_dir is not None:  # before the model is loaded and measured, not after
        problem = output_dir_problem(args.out_dir, "--out-dir")
        if problem:
            parser.error(problem)
    model, shape, name, default_out, ident = load(parser, args)
    problem = output_dir_problem(args.out_dir or default_out, "--out-dir")
    if problem:
        parser.error(problem)
    try:
        report = lipschitz_report(model, shape, dtype=getattr(torch, args.dtype), tol=args.tol, name=name)
    except ValueError as e:
        parser.error(_first_line(e))
    paths = save_report(report, args.out_dir or default_out, checkpoint=ident)
    print(_measured(ident) + report.to_markdown())
    print(f"-> {paths['csv']}, {paths['md']}, {paths['png']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
