"""Adversarial robustness of a trained model: PGD (L-inf and L2), Carlini-Wagner (L2),
and certified robustness from a Lipschitz bound (:func:`certify`).

Both attacks are advertorch's (``LinfPGDAttack``, ``CarliniWagnerL2Attack``; imported
through :mod:`fastclip.pipeline._advertorch_compat`). They work in pixel space: inputs are
images in [0, 1] and every adversarial image is clamped to [0, 1]. Our models
normalise their input in their first layer, so ``eps`` is in pixel units (the
published pipeline attacked normalised inputs, where it was not).

Accuracies are percentages of the attacked examples:
``clean_acc = 100 * #{argmax f(x) = y} / n`` and
``adv_acc = 100 * #{argmax f(x_adv) = y} / n``.

The command-line parser of ``experiments/attack.py`` and the per-run CSV names are in
:mod:`fastclip.pipeline.attack_options`.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fastclip.pipeline._advertorch_compat import import_advertorch_attacks
from fastclip.pipeline.progress import progress

logger = logging.getLogger(__name__)

__all__ = [
    "ATTACKS",
    "AttackResult",
    "available",
    "get_attack",
    "pgd_attack",
    "pgd_l2_attack",
    "cw_attack",
    "certify",
    "certified_radius",
    "PGD_DEFAULTS",
    "CW_DEFAULTS",
    "CERTIFY_EPS",
    "CHOICES",
]

#: The authors' settings (PGD L-inf, 50 steps of eps/10 from a random start).
PGD_DEFAULTS: dict[str, Any] = {"eps": 0.02, "n_steps": 50, "step_size": None, "rand_init": True}
#: The authors' settings (CW L2, one binary-search step, so c stays at its initial value).
CW_DEFAULTS: dict[str, Any] = {
    "c": 0.02,
    "confidence": 0.1,
    "max_iter": 1000,
    "binary_search_steps": 1,
    "learning_rate": 0.01,
}

#: L2 radii of the certified accuracy (and the default eps of PGD-L2): 36/255 is the
#: field's usual CIFAR-10 radius.
CERTIFY_EPS: tuple[float, ...] = (0.02, 0.05, 0.1, 36 / 255)

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class AttackResult:
    """Counts of one attack on ``n_examples`` examples.

    ``max_linf`` and ``mean_l2`` measure the perturbation x_adv - x actually made
    (max over examples of its L-inf norm; mean over examples of its L2 norm).
    """

    attack: str
    params: dict[str, Any]
    n_examples: int = 0
    clean_correct: int = 0
    adv_correct: int = 0
    max_linf: float = 0.0
    mean_l2: float = 0.0
    eps: float | None = None

    @property
    def clean_acc(self) -> float:
        return 100.0 * self.clean_correct / self.n_examples if self.n_examples else math.nan

    @property
    def adv_acc(self) -> float:
        return 100.0 * self.adv_correct / self.n_examples if self.n_examples else math.nan

    def as_row(self) -> dict[str, Any]:
        """One CSV row: attack, eps, params (sorted ``k=v`` pairs), counts and accuracies."""
        return {
            "attack": self.attack,
            "eps": "" if self.eps is None else self.eps,
            "params": format_params(self.params),
            "n_examples": self.n_examples,
            "clean_correct": self.clean_correct,
            "adv_correct": self.adv_correct,
            "clean_acc": self.clean_acc,
            "adv_acc": self.adv_acc,
            "max_linf": self.max_linf,
            "mean_l2": self.mean_l2,
        }


def format_params(params: dict[str, Any]) -> str:
    """``{"eps": 0.02, "n_steps": 50}`` -> ``"eps=0.02 n_steps=50"`` (keys sorted), the
    canonical spelling used in CSVs and to group results."""
    return " ".join(
        f"{k}={params[k]:g}" if isinstance(params[k], float) else f"{k}={params[k]}" for k in sorted(params)
    )


def _batches(
    data: Batches | tuple[torch.Tensor, torch.Tensor], batch_size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (x, y) batches from a DataLoader-like iterable or from one (x, y) pair of tensors."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        x, y = data
        if len(x) != len(y):
            raise ValueError(f"expected as many labels as images, got {len(x)} images and {len(y)} labels")
        for i in range(0, len(x), batch_size):
            yield x[i : i + batch_size], y[i : i + batch_size]
    else:
        yield from data


def _run(
    model: nn.Module,
    data: Batches | tuple[torch.Tensor, torch.Tensor],
    perturb: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    result: AttackResult,
    n_examples: int | None,
    batch_size: int,
    desc: str,
) -> AttackResult:
    """Apply ``perturb`` batch by batch to the first ``n_examples`` examples and count."""
    params = list(model.parameters())
    device = params[0].device if params else torch.device("cpu")
    was_training = model.training
    requires_grad = [p.requires_grad for p in params]
    # The attacks need input gradients only; parameter gradients would cost a
    # backward pass through the weights and leave .grad on the model.
    model.eval()
    model.requires_grad_(False)
    l2_sum = 0.0
    if isinstance(data, (tuple, list)):
        total = len(data[0])
    else:
        total = len(data.dataset) if hasattr(getattr(data, "dataset", None), "__len__") else None
    if n_examples is not None:
        total = n_examples if total is None else min(total, n_examples)
    try:
        # A bar on a terminal; in a log, a line every 30 s.
        with progress(total=total, desc=desc, unit="img", every=30.0, leave=False, log=logger) as bar:
            for x, y in _batches(data, batch_size):
                if n_examples is not None:
                    x, y = x[: n_examples - result.n_examples], y[: n_examples - result.n_examples]
                    if len(x) == 0:
                        break
                x, y = x.to(device), y.to(device)
                if x.min() < 0 or x.max() > 1:
                    raise ValueError(
                        f"expected pixels in [0, 1] (normalisation belongs inside the model), "
                        f"got values in [{x.min().item():.3g}, {x.max().item():.3g}]"
                    )
                with torch.no_grad():
                    clean_pred = model(x).argmax(1)
                x_adv = perturb(x, y).detach()
                with torch.no_grad():
                    adv_pred = model(x_adv).argmax(1)
                delta = (x_adv - x).flatten(1)
                result.n_examples += len(x)
                result.clean_correct += int((clean_pred == y).sum())
                result.adv_correct += int((adv_pred == y).sum())
                result.max_linf = max(result.max_linf, float(delta.abs().max()) if delta.numel() else 0.0)
                l2_sum += float(delta.norm(dim=1).sum())
                bar.update(len(x))
                if n_examples is not None and result.n_examples >= n_examples:
                    break
    finally:
        model.train(was_training)
        for p, r in zip(params, requires_grad):
            p.requires_grad_(r)
    result.mean_l2 = l2_sum / result.n_examples if result.n_examples else math.nan
    if n_examples is not None and result.n_examples < n_examples:
        logger.warning("asked for %d examples, the data held only %d", n_examples, result.n_examples)
    logger.info(
        "%s %s: clean %.2f%%, adversarial %.2f%% on %d examples",
        result.attack,
        format_params(result.params),
        result.clean_acc,
        result.adv_acc,
        result.n_examples,
    )
    return result


def pgd_attack(
    model: nn.Module,
    data: Batches | tuple[torch.Tensor, torch.Tensor],
    eps: float = 0.02,
    n_steps: int = 50,
    step_size: float | None = None,
    rand_init: bool = True,
    *,
    n_examples: int | None = None,
    batch_size: int = 128,
    seed: int | None = 0,
) -> AttackResult:
    """Untargeted L-inf PGD (Madry et al. 2018) with advertorch's ``LinfPGDAttack``.

    From x_0 = x + U(-eps, eps) (``rand_init``; else x_0 = x), clamped to [0, 1],
    take ``n_steps`` steps
        x_{t+1} = clamp_[0,1]( x + clamp_[-eps,eps]( x_t + a * sign(grad_x CE(f(x_t), y)) - x ) )
    with a = ``step_size`` (default eps / 10). eps = 0 leaves every image unchanged.

    ``data`` is a DataLoader (or any iterable of (x, y) batches) or one (x, y) pair of
    tensors; ``n_examples`` stops after that many examples. ``seed`` makes the random
    start reproducible without touching the caller's RNG state (None: global RNG).

    Example::

        r = pgd_attack(model, (x_test, y_test), eps=0.02)
        print(r.clean_acc, r.adv_acc)
    """
    return _pgd("pgd", model, data, eps, n_steps, step_size, rand_init, n_examples, batch_size, seed)


def pgd_l2_attack(
    model: nn.Module,
    data: Batches | tuple[torch.Tensor, torch.Tensor],
    eps: float = 0.1,
    n_steps: int = 50,
    step_size: float | None = None,
    rand_init: bool = True,
    *,
    n_examples: int | None = None,
    batch_size: int = 128,
    seed: int | None = 0,
) -> AttackResult:
    """Untargeted L2 PGD with advertorch's ``L2PGDAttack``: steps of length a = ``step_size``
    (default eps / 10) along the normalised gradient of the cross-entropy, projected on
    the L2 ball of radius ``eps`` around x and on [0, 1] (random start in the ball with
    ``rand_init``). The empirical counterpart of :func:`certify` at the same eps.

    Example::

        r = pgd_l2_attack(model, (x_test, y_test), eps=0.1)
    """
    return _pgd("pgdl2", model, data, eps, n_steps, step_size, rand_init, n_examples, batch_size, seed)


def _pgd(
    kind: str,
    model: nn.Module,
    data: Batches | tuple[torch.Tensor, torch.Tensor],
    eps: float,
    n_steps: int,
    step_size: float | None,
    rand_init: bool,
    n_examples: int | None,
    batch_size: int,
    seed: int | None,
) -> AttackResult:
    """PGD in the L-inf (``kind="pgd"``) or L2 (``"pgdl2"``) ball, pixels kept in [0, 1]."""
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if n_steps < 0:
        raise ValueError(f"n_steps must be >= 0, got {n_steps}")
    step = eps / 10 if step_size is None else float(step_size)
    if step < 0:
        raise ValueError(f"step_size must be >= 0, got {step_size}")
    attacks = import_advertorch_attacks()
    cls = attacks.LinfPGDAttack if kind == "pgd" else attacks.L2PGDAttack
    adversary = cls(
        model,
        loss_fn=nn.CrossEntropyLoss(reduction="sum"),
        eps=float(eps),
        nb_iter=int(n_steps),
        eps_iter=step,
        rand_init=bool(rand_init),
        clip_min=0.0,
        clip_max=1.0,
        targeted=False,
    )
    params = {"eps": float(eps), "n_steps": int(n_steps), "step_size": step, "rand_init": bool(rand_init)}
    result = AttackResult(attack=kind, params=params, eps=float(eps))
    label = f"{'PGD' if kind == 'pgd' else 'PGD-L2'} eps={eps:g}"
    with torch.random.fork_rng() if seed is not None else contextlib.nullcontext():
        if seed is not None:
            torch.manual_seed(seed)
        return _run(model, data, adversary.perturb, result, n_examples, batch_size, label)


def certified_radius(logits: torch.Tensor, y: torch.Tensor, lipschitz: float) -> torch.Tensor:
    """``margin / (sqrt(2) L)`` per example, 0 where the prediction is wrong.

    ``margin = f_y(x) - max_{j != y} f_j(x)``; each difference ``f_y - f_j`` is at most
    ``sqrt(2) L``-Lipschitz in L2 when ``f`` is ``L``-Lipschitz, so no perturbation of
    L2 norm below the radius can change the prediction (Tsuzuku et al. 2018).

    >>> certified_radius(torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0]]), torch.tensor([0, 0]), 1.0).tolist()
    [1.414213562373095, 0.0]
    """
    if not lipschitz > 0 or not math.isfinite(lipschitz):
        raise ValueError(f"the Lipschitz bound must be a positive finite number, got {lipschitz}")
    logits = logits.double()
    true = logits.gather(1, y.view(-1, 1)).squeeze(1)
    others = logits.scatter(1, y.view(-1, 1), float("-inf")).max(1).values
    return ((true - others) / (math.sqrt(2.0) * lipschitz)).clamp_min(0.0)


def certify(
    model: nn.Module,
    data: Batches | tuple[torch.Tensor, torch.Tensor],
    lipschitz: float,
    eps: Iterable[float] = CERTIFY_EPS,
    *,
    n_examples: int | None = None,
    batch_size: int = 128,
) -> list[AttackResult]:
    """Certified accuracy at each L2 radius in ``eps``: the percentage of the (first
    ``n_examples``) examples that are classified correctly with a
    :func:`certified_radius` above eps, for a model whose logits are ``lipschitz``-Lipschitz
    (e.g. :func:`fastclip.lipschitz_report`'s bound). One :class:`AttackResult` per eps
    (attack "certify"; ``adv_correct`` counts the certified examples; ``mean_l2`` is the
    mean certified radius over all examples, ``max_linf`` is NaN). The certificate holds
    for every perturbation in the L2 ball, inside [0, 1] or not.

    Example::

        L = fastclip.lipschitz_report(model, (1, 28, 28)).bound
        rows = certify(model, (x_test, y_test), L, eps=(0.02, 0.1))
    """
    eps = [float(e) for e in eps]
    if any(not e >= 0 for e in eps):
        raise ValueError(f"eps must be >= 0, got {eps}")
    params = list(model.parameters())
    device = params[0].device if params else torch.device("cpu")
    was_training = model.training
    model.eval()
    radii, correct = [], 0
    try:
        with torch.no_grad():
            for x, y in _batches(data, batch_size):
                if n_examples is not None:
                    left = n_examples - sum(len(r) for r in radii)
                    if left <= 0:
                        break
                    x, y = x[:left], y[:left]
                x, y = x.to(device), y.to(device)
                if x.min() < 0 or x.max() > 1:
                    raise ValueError(
                        f"expected pixels in [0, 1] (normalisation belongs inside the model), "
                        f"got values in [{x.min().item():.3g}, {x.max().item():.3g}]"
                    )
                logits = model(x)
                correct += int((logits.argmax(1) == y).sum())
                radii.append(certified_radius(logits, y, lipschitz).cpu())
    finally:
        model.train(was_training)
    r = torch.cat(radii) if radii else torch.zeros(0, dtype=torch.float64)
    out = []
    for e in eps:
        res = AttackResult(
            attack="certify",
            params={"eps": e, "bound": "lipschitz_report"},
            n_examples=len(r),
            clean_correct=correct,
            adv_correct=int((r > e).sum()),
            max_linf=math.nan,
            mean_l2=float(r.mean()) if len(r) else math.nan,
            eps=e,
        )
        logger.info(
            "certify eps=%g (L=%.4g): clean %.2f%%, certified %.2f%% on %d examples",
            e,
            lipschitz,
            res.clean_acc,
            res.adv_acc,
            res.n_examples,
        )
        out.append(res)
    return out


def cw_attack(
    model: nn.Module,
    data: Batches | tuple[torch.Tensor, torch.Tensor],
    c: float = 0.02,
    confidence: float = 0.1,
    max_iter: int = 1000,
    binary_search_steps: int = 1,
    learning_rate: float = 0.01,
    *,
    n_examples: int | None = None,
    batch_size: int = 128,
    num_classes: int | None = None,
) -> AttackResult:
    """Untargeted Carlini-Wagner L2 attack with advertorch's ``CarliniWagnerL2Attack``.

    For each image, Adam (``learning_rate``) minimises over w, x' = (tanh(w) + 1) / 2:
        ||x' - x||_2^2 + c * max(Z(x')_y - max_{j != y} Z(x')_j + confidence, 0)
    (Z the logits) for ``max_iter`` iterations, with ``binary_search_steps`` rounds of
    binary search on c (one round: c stays at its initial value). The smallest
    successful x' is kept; an image with no success stays unchanged.

    Example::

        r = cw_attack(model, (x_test, y_test), c=0.02, max_iter=100)
    """
    if c <= 0:
        raise ValueError(f"c must be > 0, got {c}")
    if max_iter < 1 or binary_search_steps < 1:
        raise ValueError(
            f"max_iter and binary_search_steps must be >= 1, got {max_iter} and {binary_search_steps}"
        )
    attacks = import_advertorch_attacks()
    params = {
        "c": float(c),
        "confidence": float(confidence),
        "max_iter": int(max_iter),
        "binary_search_steps": int(binary_search_steps),
        "learning_rate": float(learning_rate),
    }
    result = AttackResult(attack="cw", params=params)
    adversary: list[Any] = []

    def perturb(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if not adversary:  # the number of classes is the width of the model's output
            k = num_classes
            if k is None:
                with torch.no_grad():
                    k = model(x[:1]).shape[1]
            adversary.append(
                attacks.CarliniWagnerL2Attack(
                    model,
                    num_classes=int(k),
                    confidence=float(confidence),
                    targeted=False,
                    learning_rate=float(learning_rate),
                    binary_search_steps=int(binary_search_steps),
                    max_iterations=int(max_iter),
                    abort_early=True,
                    initial_const=float(c),
                    clip_min=0.0,
                    clip_max=1.0,
                )
            )
        return adversary[0].perturb(x, y)

    return _run(model, data, perturb, result, n_examples, batch_size, f"CW c={c:g}")


ATTACKS: dict[str, Callable[..., AttackResult]] = {"pgd": pgd_attack, "cw": cw_attack}
#: What ``experiments/attack.py --attack`` accepts: the grid's attacks (``ATTACKS``, what
#: ``batch_attack_submit.py --attack all`` runs), PGD-L2 and the certificate.
CHOICES = (*ATTACKS, "pgdl2", "certify")


def available(grid: bool = False) -> list[str]:
    """The registered attacks (pgd, cw); with ``grid``, everything a grid of attack.py
    runs can dispatch (:data:`CHOICES`: also pgdl2 and certify)."""
    return list(CHOICES) if grid else list(ATTACKS)


def get_attack(name: str) -> Callable[..., AttackResult]:
    """The attack function registered under ``name`` ("pgd" or "cw")."""
    try:
        return ATTACKS[name]
    except KeyError:
        raise ValueError(f"unknown attack {name!r}; choose one of {', '.join(ATTACKS)}") from None
