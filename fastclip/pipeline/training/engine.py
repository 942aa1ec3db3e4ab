"""The training step and the evaluation pass (in the manner of DeiT's engine.py)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from fastclip.pipeline.progress import progress
from fastclip.pipeline.training.distributed import Replica
from fastclip.pipeline.training.validate import Diverged, Interrupted


def train_epoch(
    model: nn.Module,
    method: Any,
    optimizer: torch.optim.Optimizer,
    loader: Any,
    device: torch.device | str,
    *,
    step: int = 0,
    writer: Any = None,
    lsv_every: int = 0,
    max_steps: int | None = None,
    desc: str = "train",
    replica: Replica | None = None,
    global_sizes: list[int] | None = None,
) -> dict[str, Any]:
    """One pass of training steps over ``loader`` (at most ``max_steps``)::

        loss = CE(model(x), y) + method.penalty(model)
        loss.backward(); optimizer.step(); method.after_step(model, step); step += 1

    ``step`` is the 0-based index of the next step in the whole run. After each step
    whose index is a multiple of ``lsv_every``, ``method.layer_norms`` go to ``writer``
    as ``train/lsv_<layer>`` at that index (the convention of FastClip's wrapper).
    Returns ``{"loss": mean CE per example, "acc": percent, "step": the index of the
    next step after the pass, "steps": steps taken}``.

    Under several processes (``replica`` of world size > 1) the forward runs through its
    DDP module, ``global_sizes[i]`` is the size of the global batch of step i (each rank's
    mean loss is weighted so that the gradient is the global batch's mean), the buffers
    are broadcast from rank 0 after each backward, and the returned loss and accuracy are
    over every rank's samples. ``model`` is the plain module (the methods see its names).

    Example::

        >>> stats = train_epoch(model, method, torch.optim.SGD(model.parameters(), lr=0.1), loader, "cpu")
        >>> stats["steps"] == len(loader)
        True
    """
    model.train()
    net = replica.ddp if replica is not None and replica.ddp is not None else model
    loss_sum, correct, seen, first = 0.0, 0, 0, step
    # A bar on a terminal; in a log, a line a minute (the run logs one line per epoch).
    bar = progress(
        loader,
        desc=desc,
        unit="step",
        every=60.0,
        leave=False,
        dynamic_ncols=True,
        total=len(loader) if max_steps is None else min(len(loader), max_steps),
        disable=replica is not None and not replica.is_main,
    )
    try:
        for x, y in bar:
            if max_steps is not None and step - first >= max_steps:
                break
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            out = net(x)
            # An empty share (a last global batch smaller than the world size) still
            # takes part in the step: DDP all-reduces on every rank.
            ce = nn.functional.cross_entropy(out, y) if y.numel() else out.sum() * 0.0
            penalty = torch.as_tensor(method.penalty(model), device=ce.device)
            # Both terms in one transfer, checked before the step: a non-finite loss would
            # turn every weight into NaN, and that model must never be checkpointed. Under
            # several processes the check sums over ranks, so that all of them stop at the
            # same step (one rank alone would leave the others waiting in DDP's all-reduce).
            ce_value, penalty_value = torch.stack([ce.detach(), penalty.detach().to(ce.dtype)]).tolist()
            ce_all, penalty_all = (
                replica.sum([ce_value, penalty_value]) if replica else (ce_value, penalty_value)
            )
            if not math.isfinite(ce_all):
                raise Diverged("the cross-entropy loss", ce_all, step)
            if not math.isfinite(penalty_all):
                raise Diverged(f"the {getattr(method, 'name', 'method')} penalty", penalty_all, step)
            scale = (
                replica.loss_scale(y.numel(), global_sizes[step - first]) if global_sizes and replica else 1.0
            )
            loss = (ce if scale == 1.0 else ce * scale) + penalty
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if replica is not None:
                replica.after_backward(model)
            optimizer.step()
            method.after_step(model, step)
            loss_sum += ce_value * y.numel()
            correct += int((out.argmax(1) == y).sum()) if y.numel() else 0
            seen += y.numel()
            if writer is not None and lsv_every and step % lsv_every == 0:
                for name, value in method.layer_norms(model).items():
                    writer.add_scalar(f"train/lsv_{name}", value, step)
            step += 1
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{100.0 * correct / seen:.2f}")
    except KeyboardInterrupt:
        raise Interrupted(step=step) from None  # which step: the caller adds the epoch
    finally:
        bar.close()
    if replica is not None:
        loss_sum, correct, seen = replica.sum([loss_sum, correct, seen])
        correct, seen = int(correct), int(seen)
    return {
        "loss": loss_sum / max(seen, 1),
        "acc": 100.0 * correct / max(seen, 1),
        "step": step,
        "steps": step - first,
    }


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: DataLoader, device: torch.device | str, replica: Replica | None = None
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy (percent) of ``model`` in eval mode over ``loader``
    (over every rank's loader when ``replica`` is given: the sums are all-reduced).

    Example::

        >>> loss, acc = evaluate(model, DataLoader(test_set, batch_size=256), "cpu")
    """
    was_training = model.training
    model.eval()
    loss_sum, correct, seen = 0.0, 0, 0
    try:
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            out = model(x)
            loss_sum += float(nn.functional.cross_entropy(out, y, reduction="sum"))
            correct += int((out.argmax(1) == y).sum())
            seen += y.numel()
    finally:
        model.train(was_training)
    if replica is not None:
        loss_sum, correct, seen = replica.sum([loss_sum, correct, seen])
    return loss_sum / max(seen, 1), 100.0 * correct / max(seen, 1)
