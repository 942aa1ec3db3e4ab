"""Clean and adversarial test accuracy of trained runs (PGD L-inf / L2, Carlini-Wagner L2),
or their certified L2 accuracy (``--attack certify``).

For every run directory ``<model_prefix><method>_<mode>_<seed>`` that matches, load its
checkpoint ``--checkpoint`` (``best``, the default: ``ckpt_best.pth``; ``last``:
``ckpt_last.pth``), attack the (first ``--n-examples``) test images in pixel space
[0, 1], and write ``<run>/attack_<attack>_<params>.csv`` (``..._last.csv`` for the last
checkpoint; one row per eps) with the columns model, dataset, method, mode, seed,
checkpoint, checkpoint_sha256, chosen_by (:mod:`fastclip.pipeline.provenance`: which
checkpoint, its SHA-256, the rule that chose it), attack, eps, params, n_examples,
clean_correct, adv_correct, clean_acc, adv_acc (percent), max_linf, mean_l2, seconds. A
run whose CSV exists is skipped unless ``--force``, or unless the CSV is stale (it measured
a checkpoint the run has since replaced, e.g. by ``train.py --force``): that one is
recomputed, with a warning. Runs are labelled
(method, mode, seed) by their config.json, not their directory name. A run that ended
FAILED (diverged) is an error unless ``--include-failed``; then its CSV has the column
``failed`` (the reason) on every row.

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
from fastclip.pipeline.cli.runs import (
    checkpoint_id_or_exit,
    device_or_exit,
    failure_of,
    find_runs_or_exit,
    load_model_or_exit,
    stale_result,
    warn,
)
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
    runs = find_runs_or_exit(
        parser,
        args,
        include_failed=args.include_failed,
        dataset=args.dataset,
        model=args.model,
        checkpoint=args.checkpoint,
    )
    params = attack_options.attack_params(args)
    name = attack_options.attack_file_name(args.attack, params, args.n_examples, args.checkpoint)
    todo = []
    for r in runs:
        if args.force or not (r.path / name).exists():
            todo.append(r)
        elif (stale := stale_result(r.path, r.path / name)) is not None:
            warn(parser, f"{stale}; recomputing it")
            todo.append(r)
        else:
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
        ident = checkpoint_id_or_exit(parser, run.path, args.checkpoint)
        model, cfg = load_model_or_exit(
            parser, run.path, args.checkpoint, device, what=f"the {args.checkpoint} checkpoint"
        )
        rows = []
        if args.attack == "certify":
            rows = _certify_rows(parser, model, cfg, run, loader, args, ident.columns())
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
                    **ident.columns(),
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
        failed = failure_of(run)
        frame = pd.DataFrame(rows) if failed is None else pd.DataFrame(rows).assign(failed=failed)
        atomic_write_text(run.path / name, frame.to_csv(index=False))
        logger.info("wrote %s", run.path / name)
    return 0


def _certify_rows(
    parser: argparse.ArgumentParser, model, cfg, run, loader, args: argparse.Namespace, ident: dict
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
                **ident,
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
