"""The grid manifest's writes: one flock'd read-modify-write per job record (see
:mod:`fastclip.pipeline.jobs`)."""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import logging
import threading
import uuid
from collections.abc import Iterator
from typing import Any

from fastclip.pipeline.io import atomic_write_json, clean_stale_temps
from fastclip.pipeline.jobs.grid import Grid, GridError, load_manifest

logger = logging.getLogger(__name__)

# Threads of one process share the lock below; processes (two grids over the same runs
# launched at once, a status call) share the flock of the grid's lock file. An flock is
# held by an open file description, so threads would exclude each other too, but the
# threading lock keeps a process's own writers from queueing on the kernel.
_manifest_lock = threading.Lock()


@contextlib.contextmanager
def _locked_manifest(grid: Grid) -> Iterator[None]:
    """Exclusive access to the grid's manifest for one read-modify-write."""
    grid.dir.mkdir(parents=True, exist_ok=True)
    with _manifest_lock, open(grid.dir / "manifest.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _now() -> str:
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


def _record_jobs(grid: Grid, records: dict[str, dict[str, Any]]) -> None:
    """Add one job record per run uid to the grid's manifest (and every run of the grid).
    A record without an ``id`` gets one (:func:`_update_job` finds a record by it)."""
    with _locked_manifest(grid):
        # Temps of manifest writes killed part-way (their writer is gone).
        clean_stale_temps(grid.dir)
        m = load_manifest(grid.manifest_path)
        m["kind"] = grid.kind
        m.setdefault("created", _now())
        for run in grid.runs:
            entry = m["runs"].setdefault(run.uid, {"jobs": []})
            entry["run"] = run.to_json()
            if run.uid in records:
                records[run.uid].setdefault("id", uuid.uuid4().hex)
                entry["jobs"].append(records[run.uid])
        atomic_write_json(grid.manifest_path, m)


def _update_job(grid: Grid, uid: str, record_id: str, **changes: Any) -> None:
    """Update the job record ``record_id`` of run ``uid``: by id, not position, since
    another process may have appended its own record since this one was written."""
    with _locked_manifest(grid):
        m = load_manifest(grid.manifest_path)
        jobs = m["runs"].get(uid, {}).get("jobs", [])
        job = next((j for j in jobs if j.get("id") == record_id), None)
        if job is None:
            logger.warning("%s: no job record %s of %s to update", grid.manifest_path, record_id, uid)
            return
        job.update(changes)
        atomic_write_json(grid.manifest_path, m)


def _latest_jobs(grid: Grid) -> dict[str, dict[str, Any]]:
    """The most recent job of each run of the grid, over every manifest in its home
    (a run dispatched by another, overlapping grid counts)."""
    wanted = {r.uid for r in grid.runs}
    latest: dict[str, dict[str, Any]] = {}
    paths = sorted(grid.home.glob("*/manifest.json")) if grid.home.is_dir() else []
    for path in paths:
        try:
            m = load_manifest(path)
        except GridError as e:
            logger.warning("ignoring %s", e)
            continue
        for uid, entry in m["runs"].items():
            if uid in wanted and entry.get("jobs"):
                job = entry["jobs"][-1]
                if uid not in latest or job.get("submitted", "") >= latest[uid].get("submitted", ""):
                    latest[uid] = job
    return latest
