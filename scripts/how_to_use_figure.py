"""The figure of docs/reproduction.md's notebook comparison: our `make how-to-use` run
beside the first ten epochs that the published how_to_use notebook printed.

Usage: python scripts/how_to_use_figure.py logs/how-to-use/mnist/SimpleConv_models/method_fastclip_wBN_1 \
           docs/img/how_to_use.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from fastclip.pipeline.cli import OneLineErrorParser
from fastclip.pipeline.plots import plot_epochs

#: Epochs 1-10 as printed by the published notebook (ConvModel on MNIST, seed 1).
NOTEBOOK = pd.DataFrame(
    {
        "epoch": range(1, 11),
        "train_acc": [87.025, 92.2467, 93.5233, 93.9667, 94.6583, 94.8483, 95.19, 95.2383, 95.4767, 95.5717],
        "train_loss": [0.4081, 0.2464, 0.2051, 0.1877, 0.1681, 0.1606, 0.1516, 0.1470, 0.1406, 0.1373],
        "test_acc": [92.27, 93.01, 93.26, 93.47, 94.66, 94.91, 94.74, 94.51, 94.83, 92.43],
    }
)


def get_args_parser() -> argparse.ArgumentParser:
    p = OneLineErrorParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("out", type=Path)
    return p


def main(args: argparse.Namespace) -> None:
    metrics_path = args.run_dir / "metrics.csv"
    if not metrics_path.is_file():
        get_args_parser().error(f"no metrics.csv in {args.run_dir}")
    metrics = pd.read_csv(metrics_path)
    plot_epochs(
        metrics,
        args.out,
        reference=NOTEBOOK,
        reference_label="notebook",
        title=f"how_to_use on MNIST: {len(metrics)} epochs by our pipeline vs the notebook's printed epochs",
    )


if __name__ == "__main__":
    main(get_args_parser().parse_args())
