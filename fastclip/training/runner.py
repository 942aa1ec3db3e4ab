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

Training step (the method is a plug-in, :class:`fastclip.methods.base.Method`)::

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
Checkpoints carry a SHA-256 of their contents (:mod:`fastclip.checkpoint`), checked
before a resume: a damaged one is skipped with one warning line. DONE and the resume
point are decided under the run directory's lock, which also makes it safe to remove
the temp files that killed attempts left (:func:`fastclip.io.clean_stale_temps`).

Under torchrun or a multi-task submitit job (:mod:`fastclip.training.distributed`) the
same run spans several processes: rank 0 alone decides (lock, skip, resume) and writes
every file above, the others follow its decision; ``--batch-size`` is per process;
config.json adds ``world_size``, ``batch_size_per_process``, ``global_batch_size``,
``backend``, ``launcher`` and ``world_size_history``.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import os
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastclip.cli import output_dir_problem
from fastclip.data import DatasetCorruptError, DatasetNotFoundError, get_datasets
from fastclip.io import atomic_write_json, clean_stale_temps
from fastclip.training.config import (
    CKPT_BEST,
    CKPT_LAST,
    CKPT_PREV,
    CONFIG,
    DONE,
    FAILED,
    LOCK,
    LOG,
    METRICS,
    ConfigError,
    TrainConfig,
    _conflicts,
    choose_device,
    run_dir_for,
)
from fastclip.training.defaults import resolve
from fastclip.training.distributed import NullWriter, Replica, setup
from fastclip.training.engine import evaluate, train_epoch
from fastclip.training.metrics import _exact_norms, _summary, _write_metrics
from fastclip.training.model import build_model, make_optimizer
from fastclip.training.state import (
    _find_resume_checkpoint,
    _metadata,
    _rng_state,
    _save_checkpoint,
    _seed_all,
    _set_rng_state,
    epoch_seeds,
)
from fastclip.training.validate import (
    Diverged,
    RunFailed,
    RunFilesError,
    check_finite,
    checkpoint_settings,
    finished_rows,
    read_failed,
    read_settings,
    resume_rows,
    write_failed,
)

logger = logging.getLogger("fastclip.training")


def _check_writable_path(run_dir: Path) -> None:
    for parent in [run_dir, *run_dir.parents]:
        if os.path.exists(parent) and not os.path.isdir(parent):  # no raise on a too long name
            raise ConfigError(f"logdir path {str(parent)!r} exists and is not a directory")
    problem = output_dir_problem(run_dir, "logdir")
    if problem:
        raise ConfigError(problem)


# -- the run ------------------------------------------------------------------------------------
@contextmanager
def _run_lock(run_dir: Path) -> Iterator[None]:
    """An exclusive lock on the run directory (released by the OS if the process dies)."""
    with open(run_dir / LOCK, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"run directory {str(run_dir)!r} is in use by another process") from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class _QuietFileHandler(logging.FileHandler):
    # A full disk must end the run with one line, not a "--- Logging error ---" traceback
    # per record: the log file is where the failure would be written, so it fails quietly.
    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 (logging's name)
        pass


@contextmanager
def _log_to(path: Path) -> Iterator[None]:
    """Send the library's log records to ``path`` (and, as usual, to the root handlers)."""
    pkg = logging.getLogger("fastclip")
    handler = _QuietFileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    old_level = pkg.level
    if pkg.getEffectiveLevel() > logging.INFO:
        pkg.setLevel(logging.INFO)
    pkg.addHandler(handler)
    try:
        yield
    finally:
        pkg.removeHandler(handler)
        pkg.setLevel(old_level)
        handler.close()


@contextmanager
def _deterministic(device: torch.device) -> Iterator[None]:
    # Only on the CPU: CUDA would need CUBLAS_WORKSPACE_CONFIG and loses speed.
    before = torch.are_deterministic_algorithms_enabled()
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


def _clear_run(run_dir: Path) -> None:
    for p in run_dir.iterdir():
        if p.name in (
            CONFIG,
            METRICS,
            DONE,
            FAILED,
            LOG,
            CKPT_LAST,
            CKPT_PREV,
            CKPT_BEST,
        ) or p.name.startswith("events.out.tfevents."):
            p.unlink()


def run(config: TrainConfig) -> dict[str, Any]:
    """Train (or resume, or skip if finished) the run described by ``config``; return
    ``{"run_dir", "skipped", "epochs", "final": last metrics row, "best_test_acc"}``.

    Raises :class:`ConfigError` - before writing anything - for unknown names, bad
    values, a logdir that is not a directory, a run directory in use, or an existing
    run with other settings (unless ``config.force``, which starts afresh);
    :class:`~fastclip.training.validate.RunFailed` when the loss diverges (FAILED is
    written) or diverged before; :class:`fastclip.io.WriteError` (an ``OSError``) when
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
    finally:
        replica.close()


@contextmanager
def _quiet_unless(main: bool) -> Iterator[None]:
    """Ranks other than 0 log warnings and errors only (rank 0 speaks for the run)."""
    pkg = logging.getLogger("fastclip")
    old = pkg.level
    if not main:
        pkg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        pkg.setLevel(old)


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


def _world_size_warnings(decision: dict[str, Any], cfg: TrainConfig, replica: Replica) -> list[str]:
    ckpt = decision.get("ckpt")
    old = int(ckpt.get("world_size", 1)) if ckpt else replica.world_size
    if old == replica.world_size:
        return []
    return [
        f"resuming after epoch {ckpt['epoch']}, which ran on {old} process(es), on {replica.world_size}: "
        f"the global batch changes from {old * cfg.batch_size} to {replica.world_size * cfg.batch_size} "
        f"(--batch-size is per process)"
    ]


def _check_same_settings(run_dir: Path, identity: dict[str, Any]) -> None:
    if not (run_dir / CONFIG).is_file():
        # config.json gone (a finished run would be skipped unchecked): its checkpoint says
        # what the run computed.
        found = checkpoint_settings(run_dir) if run_dir.is_dir() else None
        conflicts = _conflicts(found[1], identity) if found else []
        if conflicts:
            raise ConfigError(
                f"{run_dir} has no {CONFIG}, and its {found[0]} was written by a run with other "
                f"settings ({'; '.join(conflicts)}); use --force to start afresh or another --logdir"
            )
        return
    try:
        conflicts = _conflicts(read_settings(run_dir), identity)
    except (RunFilesError, TypeError, AttributeError) as e:
        why = (
            str(e)
            if isinstance(e, RunFilesError)
            else f"{run_dir / CONFIG} is not a run config of this library"
        )
        raise ConfigError(f"{why}; use --force to start afresh or another --logdir") from None
    if conflicts:
        raise ConfigError(
            f"{run_dir} holds a run with other settings ({'; '.join(conflicts)}); "
            f"use --force to start afresh or another --logdir"
        )


def _decide(run_dir: Path, cfg: TrainConfig, identity: dict[str, Any]) -> dict[str, Any]:
    """Under the run lock: skip (DONE), resume (a usable checkpoint) or start afresh.
    Also removes the debris of killed attempts, which only a lock holder may do."""
    removed = clean_stale_temps(
        run_dir, owned=(CONFIG, METRICS, DONE, FAILED, CKPT_LAST, CKPT_PREV, CKPT_BEST)
    )
    (run_dir / (CKPT_PREV + ".link")).unlink(missing_ok=True)
    out: dict[str, Any] = {"skip": False, "ckpt": None, "warnings": [], "history": []}
    if removed:
        out["warnings"].append(
            f"removed {len(removed)} temp file(s) left by interrupted writes: "
            f"{', '.join(p.name for p in removed)}"
        )
    if cfg.force:
        return out
    _check_same_settings(run_dir, identity)  # again: the config may have changed before the lock
    failed = read_failed(run_dir)
    if failed:
        raise RunFailed(f"{run_dir} ended before: {failed} ({FAILED}); use --force to start over")
    if (run_dir / DONE).exists():
        logger.info("%s finished already (DONE); skipping (use --force to retrain)", run_dir)
        rows, warnings = finished_rows(run_dir)
        for line in warnings:
            logger.warning(line)
        return {**out, "skip": True, "summary": _summary_of_done(run_dir, rows)}
    ckpt, warnings = _find_resume_checkpoint(run_dir, identity)
    out["ckpt"], out["warnings"] = ckpt, out["warnings"] + warnings
    if ckpt is not None:
        try:
            out["history"] = list(json.loads((run_dir / CONFIG).read_text()).get("threads_history") or [])
        except (OSError, ValueError, AttributeError):
            out["history"] = []
        old = ckpt.get("threads")
        if old is not None and old != cfg.threads:
            out["warnings"].append(
                f"resuming after epoch {ckpt['epoch']}, which ran with {old} CPU thread(s), with {cfg.threads}: "
                f"later epochs may differ in the last bits from an uninterrupted run (--threads {old} matches it)"
            )
    return out


def _summary_of_done(run_dir: Path, rows: list[dict[str, Any]]) -> dict[str, Any]:
    if rows:
        return _summary(run_dir, rows, skipped=True)
    try:
        done = json.loads((run_dir / DONE).read_text())
        return {
            "run_dir": str(run_dir),
            "skipped": True,
            **{k: done[k] for k in ("epochs", "final", "best_test_acc")},
        }
    except (OSError, ValueError, KeyError, TypeError):
        return _summary(run_dir, [], skipped=True)


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
                except Diverged as e:
                    _fail(run_dir, e, epoch, main)
                replica.check_consistent(s.model, s.method, epoch)
                rows.append(row)
                if main:
                    _write_metrics(run_dir / METRICS, rows)
                is_best = _checkpoint_epoch(s, epoch, row["test_acc"], rows)
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
