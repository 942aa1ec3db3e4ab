"""The local backend: worker subprocesses on this machine."""

from __future__ import annotations

import datetime as _dt
import logging
import os
import shlex
import socket
import subprocess
import threading
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

    def one(run: Run) -> tuple[Run, int, str]:
        with slot_lock:
            slot = slots.pop()
        try:
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
                proc = subprocess.Popen(
                    argv, stdout=fo, stderr=fe, stdin=subprocess.DEVNULL, env=_child_env(threads)
                )
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
            return run, rc, "" if rc == 0 else last_error_line(err)
        finally:
            with slot_lock:
                slots.append(slot)

    failures = []
    # A bar on a terminal; elsewhere (a log file) one line per finished run.
    with (
        logging_redirect_tqdm(),
        ThreadPoolExecutor(max_workers=workers) as pool,
        progress_display(
            total=len(runs), desc=f"{grid.kind} runs", unit="run", every=0.0, disable=not progress, log=logger
        ) as bar,
    ):
        for fut in as_completed([pool.submit(one, r) for r in runs]):
            run, rc, why = fut.result()
            if rc != 0:
                failures.append((run, why))
                logger.error("FAILED %s (exit %d): %s", run.name, rc, why)
            bar.update(1)
            bar.set_postfix(failed=len(failures))
    return failures
