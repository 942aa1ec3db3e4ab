"""One attempt at a run, once it is decided: config.json, the TensorBoard writer, the epoch
loop from the resume point, metrics.csv and a checkpoint after each epoch, then DONE
(or FAILED when the loss diverges).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import torch

from fastclip.pipeline.io import atomic_write_json
from fastclip.pipeline.training.config import CONFIG, DONE, FAILED, METRICS, TrainConfig
from fastclip.pipeline.training.distributed import NullWriter, Replica
from fastclip.pipeline.training.metrics import _summary, _write_metrics
from fastclip.pipeline.training.session import _checkpoint_epoch, _open_session, _run_epoch
from fastclip.pipeline.training.state import _metadata
from fastclip.pipeline.training.validate import Diverged, Interrupted, RunFailed, resume_rows, write_failed

logger = logging.getLogger("fastclip.pipeline.training")


def _write_run_config(
    cfg: TrainConfig,
    device: torch.device,
    run_dir: Path,
    start_epoch: int,
    resumed: bool,
    history: list[dict[str, Any]] | None,
    replica: Replica | None = None,
) -> None:
    """config.json: the resolved settings, the metadata, which epochs ran at which
    thread count and on how many processes over every attempt of the run."""
    replica = replica or Replica(device=device)
    meta = _metadata(device)
    history = list(history or []) if resumed else []
    if not history or history[-1].get("threads") != cfg.threads:
        history.append({"from_epoch": start_epoch + 1, "threads": cfg.threads})
    meta["threads_history"] = history
    meta.update(replica.describe(cfg.batch_size))
    worlds = _world_size_history(run_dir) if resumed else []
    if resumed and not worlds:
        worlds = [{"from_epoch": 1, "world_size": 1}]  # a run of a version before processes
    if not worlds or worlds[-1].get("world_size") != replica.world_size:
        worlds.append({"from_epoch": start_epoch + 1, "world_size": replica.world_size})
    meta["world_size_history"] = worlds
    atomic_write_json(run_dir / CONFIG, {"settings": dataclasses.asdict(cfg), **meta})


def _world_size_history(run_dir: Path) -> list[dict[str, Any]]:
    try:
        worlds = json.loads((run_dir / CONFIG).read_text()).get("world_size_history")
    except (OSError, ValueError, AttributeError):
        return []
    return list(worlds) if isinstance(worlds, list) else []


def _fail(run_dir: Path, error: Diverged, epoch: int, main: bool = True) -> None:
    """End a diverged run: the FAILED marker (written by rank 0; every rank sees the same
    summed loss, so all stop at the same step), one log line, :class:`RunFailed`."""
    error.epoch = epoch
    if main:
        write_failed(run_dir, error)
    raise RunFailed(f"{run_dir}: {error.reason}; wrote {FAILED} (rerun with --force to start over)") from None


def _train(
    cfg: TrainConfig,
    device: torch.device,
    run_dir: Path,
    train_set: Any,
    test_set: Any,
    ckpt: dict[str, Any] | None,
    history: list[dict[str, Any]] | None = None,
    replica: Replica | None = None,
) -> dict[str, Any]:
    from torch.utils.tensorboard import SummaryWriter
    from tqdm.contrib.logging import logging_redirect_tqdm

    replica = replica or Replica(device=device)
    main = replica.is_main
    start_epoch = int(ckpt["epoch"]) if ckpt else 0
    if main:
        _write_run_config(cfg, device, run_dir, start_epoch, bool(ckpt), history, replica)
    logger.info("run %s on %s: %s", run_dir, device, json.dumps(cfg.identity(), sort_keys=True))
    if replica.distributed:
        logger.info(
            "%d processes (%s, %s), batch %d per process, %d in all",
            replica.world_size,
            replica.launcher,
            replica.backend,
            cfg.batch_size,
            cfg.batch_size * replica.world_size,
        )
    if ckpt:
        logger.info(
            "resuming after epoch %d (step %d, best test acc %.2f)",
            start_epoch,
            int(ckpt["global_step"]),
            float(ckpt["best_acc"]),
        )
    # torch's writer (the tensorboard package's event writer), not tensorboardX: its
    # flush() waits for the queue to drain, so an epoch's scalars are on disk before its
    # checkpoint; tensorboardX 2.6's flush() returns with events still queued, and a kill
    # right after the checkpoint lost them.
    # TensorBoard steps are 0-based step indices: an epoch's scalars sit at the index of
    # its last step, so events of a killed attempt after the checkpoint all have
    # index >= global_step, and TensorBoard drops them (purge_step).
    purge = int(ckpt["global_step"]) if ckpt else 0
    writer = (
        SummaryWriter(str(run_dir), purge_step=purge if ckpt or any(run_dir.glob("events.out.*")) else None)
        if main
        else NullWriter()
    )
    try:
        s = _open_session(cfg, device, run_dir, writer, ckpt, replica)
        if main:
            rows, warnings = resume_rows(run_dir / METRICS, ckpt)
            for line in warnings:
                logger.warning(line)
            _write_metrics(run_dir / METRICS, rows)
        rows = replica.share(rows if main else None)
        generator = torch.Generator()
        test_loader = replica.test_loader(test_set, cfg)
        # Console log lines go through tqdm.write so they don't break the bar; only a root
        # logger that already has console handlers is redirected (never add one to it).
        root = logging.getLogger()
        with logging_redirect_tqdm(loggers=[root] if root.handlers else []):
            for epoch in range(start_epoch + 1, cfg.epochs + 1):
                try:
                    row = _run_epoch(s, epoch, train_set, test_loader, generator)
                    replica.check_consistent(s.model, s.method, epoch)
                    rows.append(row)
                    if main:
                        _write_metrics(run_dir / METRICS, rows)
                    is_best = _checkpoint_epoch(s, epoch, row["test_acc"], rows)
                except Diverged as e:
                    _fail(run_dir, e, epoch, main)
                except KeyboardInterrupt as e:
                    # Every write is atomic: the checkpoint of the epoch before is whole.
                    step = getattr(e, "step", None)
                    raise Interrupted(epoch, s.step if step is None else step, epoch - 1) from None
                logger.info(
                    "epoch %d/%d: train loss %.4f acc %.2f | test loss %.4f acc %.2f%s | %.1f s",
                    epoch,
                    cfg.epochs,
                    row["train_loss"],
                    row["train_acc"],
                    row["test_loss"],
                    row["test_acc"],
                    " (best)" if is_best else "",
                    row["wall_time"],
                )
    finally:
        writer.close()
    summary = _summary(run_dir, rows, skipped=False)
    if main:
        atomic_write_json(
            run_dir / DONE,
            {
                "epochs": summary["epochs"],
                "best_test_acc": summary["best_test_acc"],
                "final": summary["final"],
            },
        )
    replica.barrier()
    logger.info(
        "finished %s: test acc %.2f (best %.2f)",
        run_dir,
        summary["final"].get("test_acc", float("nan")),
        summary["best_test_acc"],
    )
    return summary
