"""One training run: a model, a clipping method, a dataset, and a run directory that never loses work.

:func:`run` trains ``config.model`` on ``config.dataset`` with clipping method
``config.method`` in batch-norm mode ``config.mode`` and writes everything into
:func:`run_dir_for` = ``<logdir>/<dataset>/<model>_models/method_<method>_<mode>_<seed>/``::

    config.json        every setting (resolved), library version, git commit, torch version, device,
                       intra-op thread count, deterministic flags, threads_history (the count
                       each attempt's epochs ran at)
    ckpt_last.pth      state after the last finished epoch (ckpt_prev.pth: the one before)
    ckpt_best.pth      state after the epoch with the best test accuracy
    metrics.csv        one row per epoch: epoch, train_loss, train_acc, test_loss, test_acc, lr,
                       wall_time (seconds spent on that epoch), lsv/<layer> (sigma_1 per layer as
                       the method tracks it, ``method.layer_norms``); accuracies in percent
    events.out.tfevents.*   TensorBoard: train/acc, train/loss, test/acc, test/loss per epoch,
                       train/lsv_<layer> every ``lsv_every`` steps and after each epoch;
                       x-axis = 0-based index of the optimiser step (an epoch's scalars at
                       its last step)
    train.log          the run's log
    DONE               written last; a finished run is skipped unless ``force``
    FAILED             instead of DONE when the loss diverged (JSON: reason, step, epoch,
                       term); a rerun stops with the reason unless ``force``

Training step (the method is a plug-in, :class:`fastclip.pipeline.methods.base.Method`)::

    loss = CE(model(x), y) + method.penalty(model)
    loss.backward(); optimiser.step(); method.after_step(model, step)

and ``method.finish_epoch(model)`` after an epoch's last step (every schedule fires, so
the evaluated and checkpointed model is one the method has just bounded).

Optimiser defaults follow the paper: CIFAR-10 SGD(lr 0.1, momentum 0.9, wd 5e-4),
batch 128, 200 epochs; MNIST / Fashion-MNIST Adam(lr 1e-3, wd 1e-4, eps 1e-7),
batch 128, 120 epochs; StepLR(40, 0.1) for both. Settings left ``None`` in
:class:`TrainConfig` are resolved per dataset and stored resolved in config.json.

Reproducibility and resume: every epoch reseeds torch, numpy, random and the
DataLoader's generator from ``(seed, epoch)``, so an epoch's shuffling and
augmentation do not depend on what ran before it in the process. A checkpoint is
written (atomically, after rotating the previous one to ``ckpt_prev.pth``) after each
epoch; a rerun of the same command resumes after the last good checkpoint, drops
later metrics rows, purges later TensorBoard events, and ends with the same metrics
as an uninterrupted run on the CPU at the same thread count (``threads``, set with
``torch.set_num_threads`` before any work; a resume under another count warns).
Checkpoints carry a SHA-256 of their contents (:mod:`fastclip.pipeline.checkpoint`), checked
before a resume: a damaged one is skipped with one warning line. DONE and the resume
point are decided under the run directory's lock, which also makes it safe to remove
the temp files that killed attempts left (:func:`fastclip.pipeline.io.clean_stale_temps`).

Under torchrun or a multi-task submitit job (:mod:`fastclip.pipeline.training.distributed`) the
same run spans several processes: rank 0 alone decides (lock, skip, resume) and writes
every file above, the others follow its decision; ``--batch-size`` is per process;
config.json adds ``world_size``, ``batch_size_per_process``, ``global_batch_size``,
``backend``, ``launcher`` and ``world_size_history``.

This module decides and dispatches; the parts live beside it: the run directory's checks,
lock and decision in :mod:`~fastclip.pipeline.training.resume`, the attempt (config.json, the
epoch loop, DONE or FAILED) in :mod:`~fastclip.pipeline.training.attempt`, one epoch and its
checkpoint in :mod:`~fastclip.pipeline.training.session`, and what a run sets in its process
in :mod:`~fastclip.pipeline.training.process_settings`.
"""

from __future__ import annotations

import logging
from contextlib import ExitStack
from typing import Any

import torch

from fastclip.pipeline.data import DatasetCorruptError, DatasetNotFoundError, get_datasets
from fastclip.pipeline.training.attempt import _train
from fastclip.pipeline.training.config import LOG, ConfigError, TrainConfig, choose_device, run_dir_for
from fastclip.pipeline.training.defaults import resolve
from fastclip.pipeline.training.distributed import Replica, peer_gone, setup
from fastclip.pipeline.training.process_settings import _deterministic, _log_to, _quiet_unless
from fastclip.pipeline.training.resume import (
    _check_same_settings,
    _check_writable_path,
    _clear_run,
    _decide,
    _run_lock,
    _world_size_warnings,
)

logger = logging.getLogger("fastclip.pipeline.training")


def run(config: TrainConfig) -> dict[str, Any]:
    """Train (or resume, or skip if finished) the run described by ``config``; return
    ``{"run_dir", "skipped", "epochs", "final": last metrics row, "best_test_acc"}``.

    Raises :class:`ConfigError` - before writing anything - for unknown names, bad
    values, a logdir that is not a directory, a run directory in use, or an existing
    run with other settings (unless ``config.force``, which starts afresh);
    :class:`~fastclip.pipeline.training.validate.RunFailed` when the loss diverges (FAILED is
    written) or diverged before; :class:`fastclip.pipeline.io.WriteError` (an ``OSError``) when
    the OS refuses a write part-way, with every earlier file intact.

    Example::

        >>> out = run(TrainConfig(dataset="mnist", model="SimpleConv", method="fastclip", epochs=2,
        ...                       train_subset=256, test_subset=128, logdir="/tmp/logs"))
        >>> out["final"]["test_acc"]        # percent
    """
    cfg = resolve(config)
    replica = setup(cfg, choose_device(cfg.device))
    try:
        if not replica.distributed:
            return _run_on(cfg, replica)
        # Rank 0 decides (settings, lock, skip or resume); every rank learns its outcome,
        # so that a refused run stops every process with the same line.
        with _quiet_unless(replica.is_main):
            return _run_on(cfg, replica)
    except RuntimeError as e:
        gone = peer_gone(e, replica)
        if gone is None:
            raise
        replica.owns_group = False  # the group is broken: destroying it could wait on the dead rank
        raise gone from None
    finally:
        replica.close()


def _run_on(cfg: TrainConfig, replica: Replica) -> dict[str, Any]:
    device = replica.device
    run_dir = run_dir_for(cfg)
    identity = cfg.identity()
    error = None
    if replica.is_main:
        try:
            _check_writable_path(run_dir)
            if not cfg.force:
                _check_same_settings(run_dir, identity)  # reads only: a refused run damages nothing
        except ConfigError as e:
            error = str(e)
    error = replica.share(error)
    if error:
        raise ConfigError(error)

    # The thread count is chosen before any work: CPU kernels split reductions by it, so
    # it decides the last bits of every metric.
    threads_before = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        with ExitStack() as stack:
            if not replica.is_main:
                decision = _follow(cfg, replica)
                if decision["skip"]:
                    return decision["summary"]
                train_set, test_set = _datasets(cfg, replica)
                stack.enter_context(_deterministic(device))
                return _train(cfg, device, run_dir, train_set, test_set, decision["ckpt"], None, replica)
            # Decide DONE / resume under the run directory's lock: another process may be
            # finishing or clearing this run right now.
            decision = None
            try:
                if run_dir.is_dir():
                    stack.enter_context(_run_lock(run_dir))
                    decision = _decide(run_dir, cfg, identity)
                if decision is None or not decision["skip"]:
                    train_set, test_set = _datasets(cfg, None)
                if decision is None:
                    try:
                        run_dir.mkdir(parents=True, exist_ok=True)
                    except OSError as e:
                        raise ConfigError(
                            f"cannot create run directory {str(run_dir)!r}: {e.strerror}"
                        ) from None
                    stack.enter_context(_run_lock(run_dir))
                    decision = _decide(run_dir, cfg, identity)
            except ConfigError as e:
                replica.share({"error": str(e)})
                raise
            decision["warnings"] += _world_size_warnings(decision, cfg, replica)
            replica.share({k: decision.get(k) for k in ("skip", "summary", "ckpt")})
            if decision["skip"]:
                return decision["summary"]
            _datasets_everywhere(replica, None)
            if cfg.force:
                _clear_run(run_dir)
            stack.enter_context(_log_to(run_dir / LOG))
            for line in decision["warnings"]:
                logger.warning(line)
            stack.enter_context(_deterministic(device))
            return _train(
                cfg, device, run_dir, train_set, test_set, decision["ckpt"], decision["history"], replica
            )
    finally:
        torch.set_num_threads(threads_before)


def _datasets(cfg: TrainConfig, replica: Replica | None) -> tuple[Any, Any]:
    """The training and test sets; ranks other than 0 (``replica``) report to rank 0
    whether they found them, so that all stop if one cannot."""
    error, sets = None, (None, None)
    try:
        train_set, test_set, _ = get_datasets(
            cfg.dataset,
            cfg.data_dir,
            download=cfg.download,
            train_subset=cfg.train_subset,
            test_subset=cfg.test_subset,
            augment=cfg.augment,
        )
        sets = (train_set, test_set)
    except (DatasetNotFoundError, DatasetCorruptError) as e:
        error = str(e).splitlines()[0]
    if replica is not None:
        _datasets_everywhere(replica, error)
    if error:
        raise ConfigError(error)
    return sets


def _datasets_everywhere(replica: Replica, error: str | None) -> None:
    """Every rank's dataset outcome; the first rank that failed stops all of them."""
    errors = [e for e in replica.gather(error) if e]
    if errors:
        raise ConfigError(errors[0])


def _follow(cfg: TrainConfig, replica: Replica) -> dict[str, Any]:
    """On ranks other than 0: rank 0's decision (skip, or the checkpoint to resume from)."""
    decision = replica.share(None)
    if decision.get("error"):
        raise ConfigError(decision["error"])
    return decision
