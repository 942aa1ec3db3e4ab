"""The local backend: worker subprocesses on this machine."""

from __future__ import annotations

import datetime as _dt
import fcntl
import logging
import os
import shlex
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import torch

from fastclip.pipeline.jobs.grid import Grid, Run
from fastclip.pipeline.jobs.manifest import _now, _record_jobs, _update_job
from fastclip.pipeline.jobs.process import _child_env, _log_paths, last_error_line
from fastclip.pipeline.progress import progress as progress_display
from fastclip.pipeline.training.config import LOCK

logger = logging.getLogger(__name__)


def _local_alive(job: dict[str, Any]) -> bool:
    if job.get("returncode") is not None or job.get("host") != socket.gethostname() or not job.get("pid"):
        return False
    try:
        cmdline = Path(f"/proc/{job['pid']}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    # the pid was not reused by another program (the script, also under torchrun)
    script = next((a for a in job["argv"][1:] if a.endswith(".py")), job["argv"][1])
    return script.encode() in cmdline


class Interrupted(Exception):
    """A local dispatch stopped by SIGINT (Ctrl-C) or SIGTERM, its running children
    stopped (terminated, waited for, killed if they would not end): ``signum`` and the
    names of the runs that were stopped part-way."""

    def __init__(self, signum: int, stopped: list[str]) -> None:
        self.signum, self.stopped = signum, stopped
        super().__init__(self.line)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    @property
    def line(self) -> str:
        name = signal.Signals(self.signum).name
        return (
            f"interrupted ({name}); stopped {len(self.stopped)} running run(s)"
            + (
                f" ({', '.join(self.stopped[:3])}{', ...' if len(self.stopped) > 3 else ''})"
                if self.stopped
                else ""
            )
            + "; finished runs and checkpoints are kept: rerun the same command to resume"
        )


def _on_sigterm(signum: int, frame: Any) -> None:
    raise _Signalled(signum)


class _Signalled(BaseException):
    """SIGTERM turned into an exception in the main thread, handled like Ctrl-C."""

    def __init__(self, signum: int) -> None:
        self.signum = signum


def stop_children(procs: Sequence[subprocess.Popen], timeout: float = 30.0) -> None:
    """SIGTERM every child (a torchrun passes it on to its ranks), wait up to ``timeout``
    s for all of them together, then SIGKILL those still running. Another thread may be
    in ``Popen.wait`` on each, so this polls rather than waits."""
    for proc in procs:
        if proc.poll() is None:
            try:
                proc.terminate()
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(p.returncode is None and p.poll() is None for p in procs):
        time.sleep(0.05)
    for proc in procs:
        if proc.returncode is None and proc.poll() is None:
            try:
                proc.kill()
            except ProcessLookupError:
                pass


def _finished_elsewhere(run: Run, stop: threading.Event) -> bool:
    """Whether a run whose process failed was finished by another process: the train.py
    of a second grid over the same run holds its lock while it trains (ours then stops
    at once with "in use"), so wait for that lock before looking for the done file."""
    lock = run.run_dir / LOCK
    if run.kind == "train" and lock.is_file():
        try:
            fd = os.open(lock, os.O_RDONLY)
        except OSError:
            return run.done_file.exists()
        try:
            while not stop.is_set():
                try:
                    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                    fcntl.flock(fd, fcntl.LOCK_UN)
                    break
                except BlockingIOError:
                    time.sleep(0.5)
        finally:
            os.close(fd)
    return run.done_file.exists()


def default_workers() -> int:
    """One local worker per GPU, else one per CPU core this process may use."""
    return torch.cuda.device_count() or len(os.sched_getaffinity(0))


def run_local(
    grid: Grid,
    runs: Sequence[Run],
    workers: int | None = None,
    progress: bool = True,
    nproc_per_node: int = 1,
) -> list[tuple[Run, str]]:
    """Run ``runs`` here, ``workers`` subprocesses at a time (each with ``cpus // workers``
    threads; with GPUs, worker ``i`` gets ``--device cuda:i`` unless the command sets a
    device), a tqdm bar over runs on a terminal, else a log line per finished run. A
    failed run is logged with the last error line of its stderr and the others go on.
    Returns ``[(run, error line)]`` of the failures.

    With ``nproc_per_node`` > 1 each training run is one torchrun of that many processes
    (``python -m torch.distributed.run --standalone``, a free port each): each process
    takes ``cuda:<local rank>`` on GPUs (one run at a time), else ``cpus // (workers *
    nproc_per_node)`` threads."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    if not runs:
        return []
    n_gpus = torch.cuda.device_count()
    cpus = len(os.sched_getaffinity(0))
    if nproc_per_node > 1:
        workers = workers or (1 if n_gpus else max(1, cpus // nproc_per_node))
    workers = workers or default_workers()
    threads = max(1, cpus // (workers * nproc_per_node))
    slots = list(range(workers))
    slot_lock = threading.Lock()
    # The pid makes the log names of two dispatches started in the same second differ.
    stamp = f"{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"

    stop = threading.Event()
    live: dict[int, tuple[Run, subprocess.Popen]] = {}

    def one(run: Run) -> tuple[Run, int, str]:
        with slot_lock:
            slot = slots.pop()
        proc = None
        try:
            if stop.is_set():
                return run, 0, ""
            argv = list(run.argv)
            many = nproc_per_node > 1 and run.kind == "train"
            if n_gpus and "--device" not in argv and not many:
                argv += ["--device", f"cuda:{slot % n_gpus}"]
            # An explicit thread count (recorded in config.json), the same for every run
            # of a dispatch: cpus // workers unless the user passed --threads.
            if run.kind == "train" and "--threads" not in argv:
                argv += ["--threads", str(threads)]
            if many:
                argv[1:1] = [
                    "-m",
                    "torch.distributed.run",
                    "--standalone",
                    f"--nproc_per_node={nproc_per_node}",
                ]
            out, err, _ = _log_paths(run.run_dir, run.log_name, f"local-{stamp}")
            out.parent.mkdir(parents=True, exist_ok=True)
            with open(out, "a") as fo, open(err, "a") as fe:
                fo.write(f"== {_now()} local run on {socket.gethostname()}: {shlex.join(argv)}\n")
                fo.flush()
                # A damaged finished run is resubmitted with its DONE in place: only a done
                # file that appears while the child runs means another process finished it.
                done_before = run.done_file.exists()
                with slot_lock:  # no child starts once the dispatch is stopping
                    if stop.is_set():
                        return run, 0, ""
                    proc = subprocess.Popen(
                        argv, stdout=fo, stderr=fe, stdin=subprocess.DEVNULL, env=_child_env(threads)
                    )
                    live[proc.pid] = (run, proc)
                record_id = uuid.uuid4().hex
                _record_jobs(
                    grid,
                    {
                        run.uid: {
                            "id": record_id,
                            "backend": "local",
                            "pid": proc.pid,
                            "host": socket.gethostname(),
                            "submitted": _now(),
                            "argv": argv,
                            "returncode": None,
                            "stdout": str(out),
                            "stderr": str(err),
                        }
                    },
                )
                rc = proc.wait()
            _update_job(grid, run.uid, record_id, returncode=rc, ended=_now())
            if rc != 0 and not done_before and not stop.is_set() and _finished_elsewhere(run, stop):
                logger.info("%s: finished by another process (%s exists)", run.name, run.done_file.name)
                return run, 0, ""
            return run, rc, "" if rc == 0 else last_error_line(err)
        finally:
            with slot_lock:
                slots.append(slot)
                if proc is not None:
                    live.pop(proc.pid, None)

    failures = []
    # SIGTERM (a kill, a scheduler ending this dispatch) stops the children as Ctrl-C does,
    # rather than leaving them to train on as orphans. Only the main thread may set it.
    main = threading.current_thread() is threading.main_thread()
    old_int = signal.getsignal(signal.SIGINT)
    old_term = signal.signal(signal.SIGTERM, _on_sigterm) if main else None
    try:
        # A bar on a terminal; elsewhere (a log file) one line per finished run.
        with (
            logging_redirect_tqdm(),
            ThreadPoolExecutor(max_workers=workers) as pool,
            progress_display(
                total=len(runs),
                desc=f"{grid.kind} runs",
                unit="run",
                every=0.0,
                disable=not progress,
                log=logger,
            ) as bar,
        ):
            try:
                for fut in as_completed([pool.submit(one, r) for r in runs]):
                    run, rc, why = fut.result()
                    if rc != 0:
                        failures.append((run, why))
                        logger.error("FAILED %s (exit %d): %s", run.name, rc, why)
                    bar.update(1)
                    bar.set_postfix(failed=len(failures))
            except (KeyboardInterrupt, _Signalled) as e:
                signum = e.signum if isinstance(e, _Signalled) else signal.SIGINT
                if main:  # a second Ctrl-C must not cut the cleanup short
                    signal.signal(signal.SIGINT, signal.SIG_IGN)
                    signal.signal(signal.SIGTERM, signal.SIG_IGN)
                with slot_lock:
                    stop.set()
                    stopping = list(live.values())
                pool.shutdown(wait=False, cancel_futures=True)
                stop_children([proc for _, proc in stopping])
                raise Interrupted(int(signum), [r.name for r, _ in stopping]) from None
    finally:
        if main:
            signal.signal(signal.SIGTERM, old_term if old_term is not None else signal.SIG_DFL)
            signal.signal(signal.SIGINT, old_int if old_int is not None else signal.default_int_handler)
    return failures
