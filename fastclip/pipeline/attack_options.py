"""The attack command's options: the parser of ``experiments/attack.py`` (also the
parent of the attack grid's), the eps each attack runs at, and the per-run CSV name
built from an attack's parameters (what a grid checks to skip finished work)."""

from __future__ import annotations

import argparse
from typing import Any

from fastclip.pipeline.attacks import CERTIFY_EPS, CHOICES, CW_DEFAULTS, PGD_DEFAULTS, get_attack
from fastclip.pipeline.cli import (
    OneLineErrorParser,
    int_at_least,
    int_seed,
    nonneg_float,
    path_arg,
    positive_float,
)
from fastclip.pipeline.data import DATASETS
from fastclip.pipeline.methods import available as available_methods
from fastclip.pipeline.methods.base import MODES
from fastclip.pipeline.provenance import CHECKPOINTS

__all__ = [
    "attack_file_name",
    "attack_params",
    "attack_eps",
    "resolve_eps",
    "get_args_parser",
    "BATCH_SIZES",
    "batch_size_for",
]

#: Attack batch size per device type when ``--batch-size`` is not given. On a CPU a small batch's
#: activations stay in cache: one gradient pass of SimpleConv over 1000 MNIST images, 1 thread,
#: takes 0.39 s in batches of 32, 0.69 s in batches of 128 and 1.13 s in one batch. A GPU wants
#: large batches. The attacks are per image (PGD's random start aside), so the size changes the
#: time, not the result.
BATCH_SIZES: dict[str, int] = {"cpu": 32, "default": 128}


def batch_size_for(device_type: str) -> int:
    """The attack batch size on a device of type ``device_type`` (:data:`BATCH_SIZES`).

    >>> batch_size_for("cpu"), batch_size_for("cuda")
    (32, 128)
    """
    return BATCH_SIZES.get(device_type, BATCH_SIZES["default"])


class _DefaultEps(list):
    """``--eps`` when not given: attack.py replaces it by the attack's own default."""


def attack_file_name(
    attack: str, params: dict[str, Any], n_examples: int | None, checkpoint: str = "best"
) -> str:
    """The per-run CSV name, built from the attack and its parameters (and ``_last`` for
    the last checkpoint: the best one's name is that of every CSV written before the choice).

    >>> attack_file_name("pgd", {"eps": [0.02], "n_steps": 50, "step_size": None, "rand_init": True}, 1000)
    'attack_pgd_eps0.02_steps50_n1000.csv'
    >>> attack_file_name("cw", {"c": 0.02, "confidence": 0.1, "max_iter": 1000,
    ...                         "binary_search_steps": 1, "learning_rate": 0.01}, None)
    'attack_cw_c0.02_conf0.1_iter1000_bs1_nall.csv'

    Several eps values are joined with "+"; a step size other than eps/10, no random
    start, or a CW learning rate other than 0.01 add their own parts.
    """
    if attack not in ("certify", "pgdl2"):
        get_attack(attack)
    parts = ["attack", attack]
    if attack in ("certify", "pgd", "pgdl2"):
        eps = params["eps"] if isinstance(params["eps"], (list, tuple)) else [params["eps"]]
        parts.append("eps" + "+".join(f"{e:g}" for e in eps))
    if attack in ("pgd", "pgdl2"):
        parts.append(f"steps{params['n_steps']}")
        if params.get("step_size") is not None:
            parts.append(f"step{params['step_size']:g}")
        if not params.get("rand_init", True):
            parts.append("norand")
    elif attack != "certify":
        parts += [
            f"c{params['c']:g}",
            f"conf{params['confidence']:g}",
            f"iter{params['max_iter']}",
            f"bs{params['binary_search_steps']}",
        ]
        if params.get("learning_rate", CW_DEFAULTS["learning_rate"]) != CW_DEFAULTS["learning_rate"]:
            parts.append(f"lr{params['learning_rate']:g}")
    parts.append(f"n{n_examples}" if n_examples is not None else "nall")
    if checkpoint != "best":
        parts.append(checkpoint)
    return "_".join(parts) + ".csv"


def attack_params(args: argparse.Namespace, attack: str | None = None) -> dict[str, Any]:
    """The parameters of ``attack`` (default ``args.attack``) in ``args`` (attack.py's flags)
    that its CSV is named after (:func:`attack_file_name`).

    Example::

        >>> attack_params(get_args_parser().parse_args(["mnist", "logs/x/method_", "--attack", "cw"]))["max_iter"]
        1000
    """
    attack = attack or args.attack
    if attack in ("pgd", "pgdl2"):
        return {
            "eps": attack_eps(args, attack),
            "n_steps": args.n_steps,
            "step_size": args.step_size,
            "rand_init": args.rand_init,
        }
    if attack == "certify":
        return {"eps": attack_eps(args, attack)}
    return {
        "c": args.cw_c,
        "confidence": args.cw_confidence,
        "max_iter": args.cw_max_iter,
        "binary_search_steps": args.cw_binary_search_steps,
        "learning_rate": args.cw_lr,
    }


def attack_eps(args: argparse.Namespace, attack: str) -> list[float]:
    """The eps values ``attack`` runs at: ``--eps`` when given, else the attack's own
    default (PGD's eps for pgd, :data:`CERTIFY_EPS` (L2) for pgdl2 and certify)."""
    if isinstance(args.eps, _DefaultEps):
        return [PGD_DEFAULTS["eps"]] if attack == "pgd" else list(CERTIFY_EPS)
    return list(args.eps)


def resolve_eps(args: argparse.Namespace) -> None:
    """``--eps`` not given: the attack's own default (:func:`attack_eps`)."""
    args.eps = attack_eps(args, args.attack)


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """Arguments of ``experiments/attack.py`` (and of the attack dispatcher, as a parent).

    Example::

        python experiments/attack.py cifar logs/cifar/ResNet18_models/method_ \\
            --method fastclip --mode wBN --attack pgd --model ResNet18 --seed 1
    """
    # The checked types reject a bad value at parse time, in attack.py and in the
    # dispatcher that takes this parser as a parent, before any run is dispatched.
    p = OneLineErrorParser(
        prog="attack.py",
        description="Clean and adversarial test accuracy of trained runs "
        "(one CSV per run, named after the attack and its parameters).",
        add_help=add_help,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("dataset", choices=DATASETS, help="dataset the runs were trained on")
    p.add_argument(
        "model_prefix",
        type=path_arg,
        help="common part of the run directories up to the method name, "
        "e.g. logs/cifar/ResNet18_models/method_",
    )
    p.add_argument(
        "--method",
        default="all",
        choices=(*available_methods(), "all"),
        help="method name, or 'all' for every method found",
    )
    p.add_argument("--mode", default="all", choices=(*MODES, "all"), help="batch-norm mode, or 'all'")
    p.add_argument(
        "--attack",
        default="pgd",
        choices=CHOICES,
        help="attack, or 'certify': certified L2 accuracy from the model's Lipschitz bound "
        "(fastclip.lipschitz_report on the trained weights)",
    )
    p.add_argument(
        "--model",
        default=None,
        help="expected model name (e.g. ResNet18); a run trained with another model is an error",
    )
    p.add_argument(
        "--seed",
        type=int_seed,
        nargs="+",
        default=None,
        help="seeds to attack (default: every seed found)",
    )
    g = p.add_argument_group("PGD (L-inf, L2) and certify")
    g.add_argument(
        "--eps",
        type=positive_float,
        nargs="+",
        default=_DefaultEps([PGD_DEFAULTS["eps"]]),
        help="perturbation bound(s) in pixel units; one CSV row per value (default: "
        f"{PGD_DEFAULTS['eps']:g} for pgd, {' '.join(f'{e:.4g}' for e in CERTIFY_EPS)} (L2) for pgdl2 "
        "and certify)",
    )
    g.add_argument("--n-steps", type=int_at_least(1), default=PGD_DEFAULTS["n_steps"], help="PGD steps")
    g.add_argument("--step-size", type=positive_float, default=None, help="PGD step size (default: eps / 10)")
    g.add_argument(
        "--no-rand-init", dest="rand_init", action="store_false", help="start PGD at x, not x + U(-eps, eps)"
    )
    g = p.add_argument_group("Carlini-Wagner (L2)")
    g.add_argument("--cw-c", type=positive_float, default=CW_DEFAULTS["c"], help="CW constant c")
    g.add_argument(
        "--cw-confidence", type=nonneg_float, default=CW_DEFAULTS["confidence"], help="CW confidence (kappa)"
    )
    g.add_argument(
        "--cw-max-iter", type=int_at_least(1), default=CW_DEFAULTS["max_iter"], help="CW Adam iterations"
    )
    g.add_argument(
        "--cw-binary-search-steps",
        type=int_at_least(1),
        default=CW_DEFAULTS["binary_search_steps"],
        help="CW binary-search steps on c",
    )
    g.add_argument(
        "--cw-lr", type=positive_float, default=CW_DEFAULTS["learning_rate"], help="CW Adam learning rate"
    )
    g = p.add_argument_group("evaluation")
    g.add_argument(
        "--n-examples",
        type=int_at_least(1),
        default=None,
        help="attack the first N test images (default: the whole test set)",
    )
    g.add_argument(
        "--batch-size",
        type=int_at_least(1),
        default=None,
        help="attack batch size (default: 32 on a CPU, 128 on other devices; see BATCH_SIZES)",
    )
    g.add_argument("--attack-seed", type=int_seed, default=0, help="seed of PGD's random start")
    g.add_argument(
        "--data-dir", type=path_arg, default=None, help="dataset root (default: the data module's default)"
    )
    g.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    g.add_argument(
        "--checkpoint",
        default=CHECKPOINTS[0],
        choices=CHECKPOINTS,
        help="which checkpoint of each run to evaluate: best (ckpt_best.pth) or last (ckpt_last.pth)",
    )
    g.add_argument(
        "--force",
        action="store_true",
        help="recompute runs whose CSV already exists (one that measured a checkpoint since "
        "replaced is recomputed anyway)",
    )
    g.add_argument(
        "--include-failed",
        action="store_true",
        help="attack runs that ended FAILED (diverged) too, their rows marked in the column 'failed' "
        "(default: such a run is an error)",
    )
    return p
