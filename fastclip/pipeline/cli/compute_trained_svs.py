"""Layer-wise spectral norms of trained models: sigma_1 of every conv, linear and Conv+BN layer.

For each matching run ``<model_prefix><method>_<mode>_<seed>`` its checkpoint
``--checkpoint`` (``best``, the default, or ``last``) is loaded and each layer's sigma_1
is computed at the layer's true input size (from a forward pass) with
``fastclip.spectral.singular_values`` (iterated to convergence, in float64 by default), on
the map the model computes in eval mode. Results go to the runs' parent directory:

* ``layer_norms_runs.csv``: one row per run x layer (model, dataset, method, mode, seed,
  checkpoint, checkpoint_sha256, chosen_by - which checkpoint, its SHA-256, the rule that
  chose it, :mod:`fastclip.pipeline.provenance` - layer, kind, input_shape, sigma1, clip);
  rows of the runs measured now replace their earlier rows, other runs' rows are kept, so
  methods can be measured one at a time;
* ``layer_norms.csv``: mean and sample std (ddof=1) over seeds per method x mode x layer;
* ``layer_norms.png``: bar chart, layers x methods, log scale, the clip value as a line.

Runs are labelled (method, mode, seed) by their config.json, not their directory name. A
run that ended FAILED (diverged) is an error unless ``--include-failed``; then its rows
carry the reason in the column ``failed``, the summary names its seeds in
``failed_seeds`` and the printed table in a column "FAILED seeds".

Example::

    python experiments/compute_trained_SVs.py cifar fastclip logs/cifar/ResNet18_models/method_ --seed 1
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from fastclip.pipeline.cli import (
    OneLineErrorParser,
    int_seed,
    one_line_os_errors,
    output_dir_problem,
    parse_args,
    path_arg,
    real_in,
)
from fastclip.pipeline.cli.runs import (
    checkpoint_id_or_exit,
    device_or_exit,
    failure_of,
    find_runs_or_exit,
    load_model_or_exit,
)
from fastclip.pipeline.data import DATASETS, dataset_info
from fastclip.pipeline.io import atomic_write_text, clean_stale_temps
from fastclip.pipeline.methods.base import MODES
from fastclip.pipeline.plots import plot_layer_norms
from fastclip.pipeline.provenance import CHECKPOINTS
from fastclip.pipeline.results import measure_layer_norms, runs_parent, summarize_layer_norms

if TYPE_CHECKING:
    import pandas as pd

logger = logging.getLogger("compute_trained_SVs")

RUNS_CSV, SUMMARY_CSV, FIGURE = "layer_norms_runs.csv", "layer_norms.csv", "layer_norms.png"
_RUN_KEYS = ["model", "dataset", "method", "mode", "seed"]


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = OneLineErrorParser(
        prog="compute_trained_SVs.py",
        description=__doc__.split("\n\n")[0],
        add_help=add_help,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("dataset", choices=DATASETS, help="dataset the runs were trained on")
    p.add_argument("method", help="method name, or 'all' for every method found")
    p.add_argument(
        "model_prefix",
        type=path_arg,
        help="common part of the run directories up to the method name, "
        "e.g. logs/cifar/ResNet18_models/method_",
    )
    p.add_argument("--seed", type=int_seed, nargs="+", default=None, help="seeds (default: every seed found)")
    p.add_argument("--mode", default="all", choices=(*MODES, "all"), help="batch-norm mode, or 'all'")
    p.add_argument("--model", default=None, help="expected model name; a run of another model is an error")
    p.add_argument(
        "--checkpoint",
        default=CHECKPOINTS[0],
        choices=CHECKPOINTS,
        help="which checkpoint to measure: best (ckpt_best.pth) or last (ckpt_last.pth)",
    )
    p.add_argument(
        "--dtype", default="float64", choices=("float64", "float32"), help="precision of the extraction"
    )
    p.add_argument(
        "--tol",
        type=real_in(0, 1.0, open_min=True),
        default=None,
        help="relative tolerance of the extraction (library default)",
    )
    p.add_argument(
        "--out-dir",
        type=path_arg,
        default=None,
        help="where the CSVs and the PNG go (default: the runs' parent directory)",
    )
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument(
        "--include-failed",
        action="store_true",
        help="measure runs that ended FAILED (diverged) too, marked in the tables (default: an error)",
    )
    return p


def _merge(path, new: pd.DataFrame) -> pd.DataFrame:
    """Rows of ``path`` for runs not in ``new``, followed by ``new``."""
    import pandas as pd

    try:
        old = pd.read_csv(path)
    except FileNotFoundError:
        return new
    except (ValueError, pd.errors.ParserError) as e:
        logger.warning("could not read %s (%s); it is replaced", path, e)
        return new
    if not set(_RUN_KEYS) <= set(old.columns):
        logger.warning("%s lacks the columns %s; it is replaced", path, _RUN_KEYS)
        return new
    measured = set(map(tuple, new[_RUN_KEYS].astype(str).to_numpy()))
    keep = [tuple(r) not in measured for r in old[_RUN_KEYS].astype(str).to_numpy()]
    return pd.concat([old[keep], new], ignore_index=True)


@one_line_os_errors
def main(argv: Sequence[str] | argparse.Namespace | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = get_args_parser()
    args = parse_args(parser, argv)
    import pandas as pd  # after the arguments: --help and bad flags stay fast

    if args.tol is not None and not args.tol > 0:
        parser.error(f"--tol must be > 0, got {args.tol:g}")
    out_dir = args.out_dir or runs_parent(args.model_prefix)
    problem = output_dir_problem(out_dir, "--out-dir")  # before measuring, not after
    if problem:
        parser.error(problem)
    runs = find_runs_or_exit(
        parser,
        args,
        include_failed=args.include_failed,
        dataset=args.dataset,
        model=args.model,
        checkpoint=args.checkpoint,
    )
    device = device_or_exit(parser, args.device)
    dtype = getattr(torch, args.dtype)
    rows = []
    for run in runs:
        ident = checkpoint_id_or_exit(parser, run.path, args.checkpoint)
        model, cfg = load_model_or_exit(parser, run.path, args.checkpoint, device)
        logger.info("measuring %s", run.path)
        failed = failure_of(run)
        for r in measure_layer_norms(model, dataset_info(cfg.dataset).input_shape, dtype=dtype, tol=args.tol):
            rows.append(
                {
                    "model": cfg.model,
                    "dataset": cfg.dataset,
                    "method": run.method,
                    "mode": run.mode,
                    "seed": run.seed,
                    **ident.columns(),
                    **r,
                    "clip": cfg.clip if cfg.method != "orig" else float("nan"),
                    **({} if failed is None else {"failed": failed}),
                }
            )

    clean_stale_temps(out_dir)  # temps of earlier writes whose writer was killed
    per_seed = _merge(f"{out_dir}/{RUNS_CSV}", pd.DataFrame(rows))
    summary = summarize_layer_norms(per_seed)
    atomic_write_text(f"{out_dir}/{RUNS_CSV}", per_seed.to_csv(index=False))
    atomic_write_text(f"{out_dir}/{SUMMARY_CSV}", summary.to_csv(index=False))
    names = sorted({f"{m} ({d})" for m, d in zip(summary["model"], summary["dataset"])})
    plot_layer_norms(summary, f"{out_dir}/{FIGURE}", title=", ".join(names))

    table = summary.assign(
        sigma1=[
            f"{m:.4g}" if pd.isna(s) else f"{m:.4g} ± {s:.2g}"
            for m, s in zip(summary["sigma1_mean"], summary["sigma1_std"])
        ]
    )
    columns = ["model", "method", "mode", "layer", "kind", "input_shape", "sigma1", "n_seeds"]
    if "failed_seeds" in table.columns and (table["failed_seeds"] != "").any():
        table = table.assign(**{"FAILED seeds": table["failed_seeds"]})
        columns.append("FAILED seeds")
    print(table[columns].to_markdown(index=False))
    print(f"\n{len(runs)} runs measured -> {out_dir}/{SUMMARY_CSV}, {out_dir}/{RUNS_CSV}, {out_dir}/{FIGURE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
