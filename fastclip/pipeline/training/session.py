"""The epochs of one attempt: the model, method, optimiser and scheduler they share, one
epoch trained, evaluated and written to TensorBoard, and its checkpoint.

:func:`_open_session` builds (or restores from a checkpoint) what the epochs share;
:func:`_run_epoch` trains and evaluates one epoch, seeded from ``(seed, epoch)``, and
returns its metrics.csv row; :func:`_checkpoint_epoch` saves the state after it.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastclip.pipeline.training.config import TrainConfig
from fastclip.pipeline.training.distributed import Replica
from fastclip.pipeline.training.engine import evaluate, train_epoch
from fastclip.pipeline.training.metrics import _exact_norms
from fastclip.pipeline.training.model import build_model, make_optimizer
from fastclip.pipeline.training.state import (
    _rng_state,
    _save_checkpoint,
    _seed_all,
    _set_rng_state,
    epoch_seeds,
)
from fastclip.pipeline.training.validate import Diverged, check_finite


@dataclasses.dataclass
class _Session:
    """What the epochs of one attempt share: the model and its method, the optimiser and
    scheduler, the TensorBoard writer, the step counter and the best test accuracy."""

    cfg: TrainConfig
    device: torch.device
    run_dir: Path
    writer: Any
    model: nn.Module
    method: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    step: int
    best_acc: float
    replica: Replica = dataclasses.field(default_factory=Replica)

    @property
    def writes_own_lsv(self) -> bool:
        return bool(getattr(self.method, "writes_layer_norms", self.cfg.method == "fastclip"))


def _open_session(
    cfg: TrainConfig,
    device: torch.device,
    run_dir: Path,
    writer: Any,
    ckpt: dict[str, Any] | None,
    replica: Replica | None = None,
) -> _Session:
    """The model, method, optimiser and scheduler of the run, restored from ``ckpt`` if
    given, the model wrapped by the replica for the training forward (DDP)."""
    replica = replica or Replica(device=device)
    model, method = build_model(cfg, device, writer=writer)
    optimizer = make_optimizer(cfg, model)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.lr_step, gamma=cfg.lr_gamma)
    if ckpt:
        model.load_state_dict(ckpt["model"], strict=True)
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        method.load_state_dict(ckpt["method"])
        _set_rng_state(ckpt["rng"])
    replica.wrap(model)
    return _Session(
        cfg=cfg,
        device=device,
        run_dir=run_dir,
        writer=writer,
        model=model,
        method=method,
        optimizer=optimizer,
        scheduler=scheduler,
        step=int(ckpt["global_step"]) if ckpt else 0,
        best_acc=float(ckpt["best_acc"]) if ckpt else -1.0,
        replica=replica,
    )


def _run_epoch(
    s: _Session,
    epoch: int,
    train_set: Any,
    test_loader: Any,
    generator: torch.Generator,
) -> dict[str, Any]:
    """Train epoch ``epoch`` (seeded from ``(seed, epoch)``), bound and evaluate the model:
    its metrics.csv row."""
    cfg = s.cfg
    t0 = time.perf_counter()
    seeds = epoch_seeds(cfg.seed, epoch)
    _seed_all(seeds)
    generator.manual_seed(seeds["loader"])
    train_loader, global_sizes = s.replica.train_loader(train_set, cfg, generator, epoch)
    lr = s.optimizer.param_groups[0]["lr"]
    stats = train_epoch(
        s.model,
        s.method,
        s.optimizer,
        train_loader,
        s.device,
        step=s.step,
        writer=None if s.writes_own_lsv else s.writer,
        lsv_every=cfg.lsv_every,
        desc=f"epoch {epoch}/{cfg.epochs}",
        replica=s.replica,
        global_sizes=global_sizes,
    )
    s.step = stats["step"]
    s.scheduler.step()
    s.method.finish_epoch(s.model)
    check_finite(s.model, s.step - 1)  # never checkpoint a model that holds a NaN
    test_loss, test_acc = evaluate(s.model, test_loader, s.device, replica=s.replica)
    if not math.isfinite(test_loss):
        # A model finite in every weight can still overflow in eval mode (running
        # statistics): the run has diverged as surely as with a NaN training loss.
        raise Diverged("the test loss", test_loss, s.step - 1)
    norms = s.method.layer_norms(s.model)
    row: dict[str, Any] = {
        "epoch": epoch,
        "train_loss": stats["loss"],
        "train_acc": stats["acc"],
        "test_loss": test_loss,
        "test_acc": test_acc,
        "lr": float(lr),
        "wall_time": time.perf_counter() - t0,
    }
    row.update({f"lsv/{k}": float(v) for k, v in norms.items()})
    if cfg.exact_norms:
        row.update(_exact_norms(s.model, cfg))
    _write_scalars(s, row, norms)
    return row


def _write_scalars(s: _Session, row: dict[str, Any], norms: dict[str, float]) -> None:
    """An epoch's TensorBoard scalars, at the index of its last step, flushed."""
    last = s.step - 1
    for key in ("train_loss", "train_acc", "test_loss", "test_acc"):
        split, what = key.split("_")
        s.writer.add_scalar(f"{split}/{what}", row[key], last)
    s.writer.add_scalar("train/lr", row["lr"], last)
    if not s.writes_own_lsv and not (s.cfg.lsv_every and last % s.cfg.lsv_every == 0):
        for name, value in norms.items():
            s.writer.add_scalar(f"train/lsv_{name}", value, last)
    s.writer.flush()


def _checkpoint_epoch(s: _Session, epoch: int, test_acc: float, rows: list[dict[str, Any]]) -> bool:
    """Save the state after ``epoch`` (and as the best one if ``test_acc`` is) with the
    metrics history ``rows`` (metrics.csv is rebuilt from it); whether it was the best."""
    is_best = test_acc > s.best_acc
    s.best_acc = max(s.best_acc, test_acc)
    state = {
        "model": s.model.state_dict(),
        "optimizer": s.optimizer.state_dict(),
        "scheduler": s.scheduler.state_dict(),
        "method": s.method.state_dict(),
        "epoch": epoch,
        "global_step": s.step,
        "best_acc": s.best_acc,
        "rng": _rng_state(),
        "config": s.cfg.identity(),
        "threads": torch.get_num_threads(),
        "metrics": [dict(r) for r in rows],
        "world_size": s.replica.world_size,
    }
    if s.replica.is_main:
        _save_checkpoint(s.run_dir, state, best=is_best)
    s.replica.barrier()  # no rank runs ahead of a checkpoint it could be resumed from
    return is_best
