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

Example::

    python experiments/attack.py cifar logs/cifar/ResNet18_models/method_ --method fastclip \\
        --mode wBN --attack pgd --model ResNet18 --seed 1 --n-examples 1000
"""
from __future__ import annotations

import argparse
import logging
import sys
import time

import pandas as pd
import torch
from torch.utils.data import DataLoader

from fastclip import attacks
from fastclip.io import atomic_write_text, clean_stale_temps
from fastclip.results import check_runs, describe_runs, find_runs

logger = logging.getLogger("attack")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    return attacks.get_args_parser(add_help=add_help)


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if isinstance(args.eps, attacks._DefaultEps):  # not given: the attack's own default
        args.eps = [attacks.PGD_DEFAULTS["eps"]] if args.attack == "pgd" else list(attacks.CERTIFY_EPS)
    bad_eps = [e for e in args.eps if not e > 0]
    if bad_eps:
        parser.error(f"--eps must be > 0, got {bad_eps[0]:g}")
    for flag, value in (("--n-steps", args.n_steps), ("--batch-size", args.batch_size),
                        ("--cw-max-iter", args.cw_max_iter), ("--cw-binary-search-steps", args.cw_binary_search_steps)):
        if value < 1:
            parser.error(f"{flag} must be >= 1, got {value}")
    if args.n_examples is not None and args.n_examples < 1:
        parser.error(f"--n-examples must be >= 1, got {args.n_examples}")
    for flag, value in (("--step-size", args.step_size), ("--cw-c", args.cw_c), ("--cw-lr", args.cw_lr)):
        if value is not None and not value > 0:
            parser.error(f"{flag} must be > 0, got {value:g}")


def _params(args: argparse.Namespace) -> dict:
    if args.attack in ("pgd", "pgdl2"):
        return {"eps": list(args.eps), "n_steps": args.n_steps, "step_size": args.step_size,
                "rand_init": args.rand_init}
    if args.attack == "certify":
        return {"eps": list(args.eps)}
    return {"c": args.cw_c, "confidence": args.cw_confidence, "max_iter": args.cw_max_iter,
            "binary_search_steps": args.cw_binary_search_steps, "learning_rate": args.cw_lr}


def main(args: argparse.Namespace) -> int:
    parser = get_args_parser()
    _check_args(parser, args)
    from fastclip.training import ConfigError, choose_device

    try:
        # An unavailable device is the user's flag, not the checkpoint's fault: say so first.
        device = choose_device(args.device or "auto")
    except ConfigError as e:
        parser.error(str(e))
    runs = find_runs(args.model_prefix, args.method, args.mode, args.seed)
    if not runs:
        parser.error(f"no run matches {args.model_prefix}<method>_<mode>_<seed> with method {args.method!r}, "
                     f"mode {args.mode!r}, seeds {args.seed or 'all'}: {describe_runs(args.model_prefix)}")
    # Check every run before attacking any, so a bad one fails in seconds, not after hours.
    problem = check_runs(runs, dataset=args.dataset, model=args.model)
    if problem:
        parser.error(problem)

    from fastclip.cli import output_file_problem
    from fastclip.data import get_datasets
    from fastclip.training import load_model

    params = _params(args)
    name = attacks.attack_file_name(args.attack, params, args.n_examples)
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
    loader = DataLoader(test_set, batch_size=args.batch_size, shuffle=False)

    for run in todo:
        try:
            model, cfg = load_model(run.path, which="best", device=device)
        except (RuntimeError, ValueError, KeyError, OSError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            parser.error(f"cannot load the best checkpoint of {run.path}: {first}")
        rows = []
        if args.attack == "certify":
            rows = _certify_rows(parser, model, cfg, run, loader, args)
        for eps in (args.eps if args.attack in ("pgd", "pgdl2") else [None] if args.attack == "cw" else []):
            start = time.perf_counter()
            if args.attack in ("pgd", "pgdl2"):
                attack = attacks.pgd_attack if args.attack == "pgd" else attacks.pgd_l2_attack
                result = attack(model, loader, eps=eps, n_steps=args.n_steps, step_size=args.step_size,
                                rand_init=args.rand_init, seed=args.attack_seed)
            else:
                result = attacks.cw_attack(model, loader, c=args.cw_c, confidence=args.cw_confidence,
                                           max_iter=args.cw_max_iter, binary_search_steps=args.cw_binary_search_steps,
                                           learning_rate=args.cw_lr)
            rows.append({"model": cfg.model, "dataset": cfg.dataset, "method": run.method, "mode": run.mode,
                         "seed": run.seed, "checkpoint": "best", **result.as_row(),
                         "seconds": round(time.perf_counter() - start, 3)})
            logger.info("%s %s: clean %.2f%%, adversarial %.2f%% (%d examples)", run.name, result.attack,
                        result.clean_acc, result.adv_acc, result.n_examples)
        atomic_write_text(run.path / name, pd.DataFrame(rows).to_csv(index=False))
        logger.info("wrote %s", run.path / name)
    return 0


def _certify_rows(parser: argparse.ArgumentParser, model, cfg, run, loader, args: argparse.Namespace) -> list[dict]:
    """The certify CSV's rows of one run: its Lipschitz bound measured now, then the
    certified accuracy at every eps."""
    from fastclip.data import dataset_info
    from fastclip.lipschitz import lipschitz_report

    start = time.perf_counter()
    report = lipschitz_report(model, dataset_info(cfg.dataset).input_shape)
    if report.bound is None:
        parser.error(f"cannot certify {run.path}: {report.reason}")
    logger.info("%s: Lipschitz bound %.6g = %s", run.name, report.bound, report.formula)
    rows = []
    for result in attacks.certify(model, loader, report.bound, eps=args.eps):
        rows.append({"model": cfg.model, "dataset": cfg.dataset, "method": run.method, "mode": run.mode,
                     "seed": run.seed, "checkpoint": "best", **result.as_row(), "lipschitz": report.bound,
                     "seconds": round(time.perf_counter() - start, 3)})
        logger.info("%s certify eps=%g: clean %.2f%%, certified %.2f%% (%d examples)", run.name, result.eps,
                    result.clean_acc, result.adv_acc, result.n_examples)
    return rows


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.exit(main(get_args_parser().parse_args()))
