"""Clean and adversarial test accuracy of trained runs (PGD L-inf / L2, Carlini-Wagner L2),
or their certified L2 accuracy (``--attack certify``).

For every run directory ``<model_prefix><method>_<mode>_<seed>`` that matches, load its
best-test checkpoint, attack the (first ``--n-examples``) test images in pixel space
[0, 1], and write ``<run>/attack_<attack>_<params>.csv`` (one row per eps) with the
columns model, dataset, method, mode, seed, checkpoint, attack, eps, params,
n_examples, clean_correct, adv_correct, clean_acc, adv_acc (percent), max_linf,
mean_l2, seconds. A run whose CSV exists is skipped unless ``--force``.

``--attack certify`` measures the trained model's Lipschitz bound L with
:func:`fastclip.lipschitz_report` (the exact norms of its layers as trained, not the clip
target), and counts the images classified correctly with a margin-based certified radius
``margin / (sqrt(2) L)`` above each eps (default 0.02, 0.05, 0.1, 36/255); ``adv_acc``
is then the certified accuracy, ``mean_l2`` the mean certified radius, and the CSV has
the column ``lipschitz``. A model without a bound (e.g. DLA) is a one-line error.

Example (``fastclip-attack``, or ``python experiments/attack.py``)::

    python experiments/attack.py cifar logs/cifar/ResNet18_models/method_ --method fastclip \\
        --mode wBN --attack pgd --model ResNet18 --seed 1 --n-examples 1000
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence

from torch.utils.data import DataLoader

from fastclip import lipschitz
from fastclip.pipeline import attack_options, attacks
from fastclip.pipeline.cli import one_line_os_errors, output_file_problem, parse_args
from fastclip.pipeline.cli.runs import device_or_exit, find_runs_or_exit, load_model_or_exit
from fastclip.pipeline.data import dataset_info, get_datasets
from fastclip.pipeline.io import atomic_write_text, clean_stale_temps

logger = logging.getLogger("attack")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    return attack_options.get_args_parser(add_help=add_help)


@one_line_os_errors
def main(argv: Sequence[str] | argparse.Namespace | None = None) -> int:
    """Attack (or certify) every run ``argv`` selects; exit code 0. Bad input ends the
    process with a one-line error (exit code 2) before the first attack."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = get_args_parser()
    args = parse_args(parser, argv)
    import pandas as pd  # after the arguments: --help and bad flags stay fast

    attack_options.resolve_eps(args)
    # An unavailable device is the user's flag, not the checkpoint's fault: say so first.
    device = device_or_exit(parser, args.device)
    runs = find_runs_or_exit(parser, args, dataset=args.dataset, model=args.model)
    params = attack_options.attack_params(args)
    name = attack_options.attack_file_name(args.attack, params, args.n_examples)
    todo = [r for r in runs if args.force or not (r.path / name).exists()]
    for r in runs:
        if r not in todo:
            logger.info("%s exists; skipped (--force recomputes it)", r.path / name)
    if not todo:
        return 0
    for r in todo:  # every output location before the first attack
        problem = output_file_problem(r.path / name, "result file")
        if problem:
            parser.error(problem)
    for r in todo:  # temps of CSV writes whose writer was killed
        clean_stale_temps(r.path)
    _, test_set, _ = get_datasets(args.dataset, data_dir=args.data_dir, test_subset=args.n_examples)
    batch_size = args.batch_size or attack_options.batch_size_for(device.type)
    loader = DataLoader(test_set, batch_size=batch_size, shuffle=False)

    for run in todo:
        model, cfg = load_model_or_exit(parser, run.path, "best", device, what="the best checkpoint")
        rows = []
        if args.attack == "certify":
            rows = _certify_rows(parser, model, cfg, run, loader, args)
        for eps in args.eps if args.attack in ("pgd", "pgdl2") else [None] if args.attack == "cw" else []:
            start = time.perf_counter()
            if args.attack in ("pgd", "pgdl2"):
                attack = attacks.pgd_attack if args.attack == "pgd" else attacks.pgd_l2_attack
                result = attack(
                    model,
                    loader,
                    eps=eps,
                    n_steps=args.n_steps,
                    step_size=args.step_size,
                    rand_init=args.rand_init,
                    seed=args.attack_seed,
                )
            else:
                result = attacks.cw_attack(
                    model,
                    loader,
                    c=args.cw_c,
                    confidence=args.cw_confidence,
                    max_iter=args.cw_max_iter,
                    binary_search_steps=args.cw_binary_search_steps,
                    learning_rate=args.cw_lr,
                )
            rows.append(
                {
                    "model": cfg.model,
                    "dataset": cfg.dataset,
                    "method": run.method,
                    "mode": run.mode,
                    "seed": run.seed,
                    "checkpoint": "best",
                    **result.as_row(),
                    "seconds": round(time.perf_counter() - start, 3),
                }
            )
            logger.info(
                "%s %s: clean %.2f%%, adversarial %.2f%% (%d examples)",
                run.name,
                result.attack,
                result.clean_acc,
                result.adv_acc,
                result.n_examples,
            )
        atomic_write_text(run.path / name, pd.DataFrame(rows).to_csv(index=False))
        logger.info("wrote %s", run.path / name)
    return 0


def _certify_rows(
    parser: argparse.ArgumentParser, model, cfg, run, loader, args: argparse.Namespace
) -> list[dict]:
    """The certify CSV's rows of one run: its Lipschitz bound measured now, then the
    certified accuracy at every eps."""
    start = time.perf_counter()
    report = lipschitz.lipschitz_report(model, dataset_info(cfg.dataset).input_shape)
    if report.bound is None:
        parser.error(f"cannot certify {run.path}: {report.reason}")
    logger.info("%s: Lipschitz bound %.6g = %s", run.name, report.bound, report.formula)
    rows = []
    for result in attacks.certify(model, loader, report.bound, eps=args.eps):
        rows.append(
            {
                "model": cfg.model,
                "dataset": cfg.dataset,
                "method": run.method,
                "mode": run.mode,
                "seed": run.seed,
                "checkpoint": "best",
                **result.as_row(),
                "lipschitz": report.bound,
                "seconds": round(time.perf_counter() - start, 3),
            }
        )
        logger.info(
            "%s certify eps=%g: clean %.2f%%, certified %.2f%% (%d examples)",
            run.name,
            result.eps,
            result.clean_acc,
            result.adv_acc,
            result.n_examples,
        )
    return rows


if __name__ == "__main__":
    sys.exit(main())
