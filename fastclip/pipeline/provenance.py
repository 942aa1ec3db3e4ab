"""Which checkpoint a result measured, and whether it still is the run's checkpoint.

Every evaluation (attack.py, compute_trained_SVs.py, lipschitz_report.py) measures one
checkpoint of a run, ``ckpt_best.pth`` or ``ckpt_last.pth`` (``--checkpoint``), and writes
into its CSV the columns of :data:`COLUMNS`: ``checkpoint`` (the kind), ``checkpoint_sha256``
(the digest the checkpoint file carries, :mod:`fastclip.pipeline.checkpoint`; computed only
for a file written before digests existed) and ``chosen_by`` (the rule that chose that
checkpoint: the run's recorded ``best_by``, e.g. ``val_acc``; :data:`OLD_RULE` for a run
that recorded none, whose best checkpoint was chosen on the test set; :data:`LAST_RULE` for
the last one).

A result is *stale* (:func:`stale_reason`) when the run's checkpoint of its kind is no longer
the one it measured: its recorded digest differs from the checkpoint's, or, for a CSV written
before digests were recorded, the checkpoint is newer than the CSV. A retrained run
(``train.py --force``) makes every earlier result of it stale.

Example::

    ident = checkpoint_id("logs/mnist/SimpleConv_models/method_fastclip_wBN_1", "best")
    ident.columns()  # {'checkpoint': 'best', 'checkpoint_sha256': '3f2a...', 'chosen_by': 'val_acc'}
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fastclip.pipeline.checkpoint import DIGEST_KEY, CheckpointError, state_digest

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "CHECKPOINTS",
    "COLUMNS",
    "OLD_RULE",
    "LAST_RULE",
    "CheckpointId",
    "checkpoint_id",
    "best_rule",
    "stale_reason",
    "stale_result",
    "stale_rows",
    "of_kind",
    "describe_kind",
]

#: The checkpoints an evaluation can measure (``--checkpoint``); the first is the default.
CHECKPOINTS = ("best", "last")
#: The columns naming the measured checkpoint in every evaluation CSV.
COLUMNS = ("checkpoint", "checkpoint_sha256", "chosen_by")
#: The rule of a run that recorded none: train.py kept the epoch of the best test accuracy.
OLD_RULE = "test_acc (old run)"
#: The rule of ``ckpt_last.pth``.
LAST_RULE = "last epoch"
#: The keys a run may record its best-checkpoint rule under (config.json or the checkpoint).
_RULE_KEYS = ("best_by",)

# (path, inode, size, mtime) -> digest: a grid's many CSVs of one run read its checkpoint once
_DIGESTS: dict[tuple[str, int, int, int], tuple[str, str | None]] = {}


@dataclass(frozen=True)
class CheckpointId:
    """One checkpoint of a run: its kind, its SHA-256 and the rule that chose it."""

    kind: str
    sha256: str
    chosen_by: str

    def columns(self) -> dict[str, str]:
        """The :data:`COLUMNS` of an evaluation CSV's rows."""
        return {"checkpoint": self.kind, "checkpoint_sha256": self.sha256, "chosen_by": self.chosen_by}


def _rule_in(mapping: Any) -> str | None:
    if not isinstance(mapping, dict):
        return None
    for key in _RULE_KEYS:
        value = mapping.get(key)
        if isinstance(value, str) and value:
            return value
    return None


def best_rule(run_dir: str | os.PathLike, ckpt: dict[str, Any] | None = None) -> str:
    """The rule that chose the run's ``ckpt_best.pth``: ``best_by`` as the checkpoint or the
    run's config.json (its top level or its ``settings``) records it, else :data:`OLD_RULE`."""
    found = _rule_in(ckpt) or _rule_in((ckpt or {}).get("config"))
    if found:
        return found
    try:
        cfg = json.loads((Path(run_dir) / "config.json").read_text())
    except (OSError, ValueError):
        cfg = None
    return _rule_in(cfg) or _rule_in(cfg.get("settings") if isinstance(cfg, dict) else None) or OLD_RULE


def _read_digest(path: Path) -> tuple[str, str | None]:
    """(SHA-256, recorded rule or None) of the checkpoint at ``path``: the digest it carries,
    computed only when it carries none. :class:`CheckpointError` when it cannot be read."""
    st = path.stat()
    key = (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns)
    if key in _DIGESTS:
        return _DIGESTS[key]
    try:
        try:  # mmap: only the pages read are loaded (the digest key, not every tensor)
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # a legacy (non-zip) file cannot be mapped
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, bad pickle: the file is damaged
        raise CheckpointError(f"{path} is unreadable ({type(e).__name__})") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} is not a checkpoint (a {type(ckpt).__name__}, not a dict)")
    stored = ckpt.get(DIGEST_KEY)
    digest = stored if isinstance(stored, str) and stored else state_digest(ckpt)
    rule = _rule_in(ckpt) or _rule_in(ckpt.get("config"))
    _DIGESTS[key] = (digest, rule)
    return digest, rule


def checkpoint_id(run_dir: str | os.PathLike, kind: str) -> CheckpointId:
    """The identity of the run's ``ckpt_<kind>.pth``; :class:`CheckpointError` (one line,
    naming the file) when it is missing or unreadable."""
    if kind not in CHECKPOINTS:
        raise ValueError(f"checkpoint must be one of {', '.join(CHECKPOINTS)}, got {kind!r}")
    path = Path(run_dir) / f"ckpt_{kind}.pth"
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    digest, rule = _read_digest(path)
    if kind == "last":
        return CheckpointId(kind, digest, LAST_RULE)
    return CheckpointId(kind, digest, rule or best_rule(run_dir))


def describe_kind(kind: str, rules: set[str] | list[str] | tuple[str, ...] = ()) -> str:
    """How a table names the checkpoint its numbers measured.

    >>> describe_kind("best", ["val_acc"])
    'best checkpoint (ckpt_best.pth, chosen by val_acc)'
    >>> describe_kind("best", ["val_acc", "test_acc (old run)"])
    'best checkpoint (ckpt_best.pth, chosen by test_acc (old run) in some runs, val_acc in others)'
    >>> describe_kind("last")
    'last checkpoint (ckpt_last.pth, the last epoch)'
    """
    if kind == "last":
        return "last checkpoint (ckpt_last.pth, the last epoch)"
    found = sorted({r for r in rules if isinstance(r, str) and r})
    if not found:
        how = ""
    elif len(found) == 1:
        how = f", chosen by {found[0]}"
    else:
        how = f", chosen by {found[0]} in some runs, {', '.join(found[1:])} in others"
    return f"{kind} checkpoint (ckpt_{kind}.pth{how})"


def stale_reason(run_dir: str | os.PathLike, csv: str | os.PathLike, rows: pd.DataFrame) -> str | None:
    """Why the result ``rows`` (read from the file ``csv`` of the run at ``run_dir``) no longer
    measure the run's checkpoint, as one line naming the run and the file, or None when they
    do. Rows without a ``checkpoint`` column measured ``best`` (the only kind evaluated before
    the column); rows without a digest are stale when the checkpoint is newer than the file.
    Where the run has no such checkpoint, or the file is gone, nothing says otherwise: None."""
    run_dir, csv = Path(run_dir), Path(csv)
    kinds = rows["checkpoint"].dropna().astype(str).unique().tolist() if "checkpoint" in rows else []
    kind = kinds[0] if len(kinds) == 1 else "best" if not kinds else None
    if kind is None:
        return f"{csv.name} of run {run_dir} mixes checkpoints {', '.join(sorted(kinds))}"
    path = run_dir / f"ckpt_{kind}.pth"
    if not path.is_file():  # deleted to save space, or copied without: nothing to compare with
        return None
    digests = rows["checkpoint_sha256"].dropna().astype(str).unique() if "checkpoint_sha256" in rows else []
    if len(digests) == 0:
        if csv.is_file() and path.stat().st_mtime_ns > csv.stat().st_mtime_ns:
            return (
                f"{csv.name} of run {run_dir} records no checkpoint digest and is older than its "
                f"ckpt_{kind}.pth (retrained since)"
            )
        return None
    try:
        now = checkpoint_id(run_dir, kind).sha256
    except CheckpointError as e:
        return f"{csv.name} of run {run_dir}: its checkpoint cannot be read ({e})"
    if len(digests) > 1 or digests[0] != now:
        return (
            f"{csv.name} of run {run_dir} measured ckpt_{kind}.pth {digests[0][:12]}, the run's is now "
            f"{now[:12]} (retrained since)"
        )
    return None


def of_kind(table: pd.DataFrame, kind: str) -> pd.DataFrame:
    """The rows of a result table that measured the ``kind`` checkpoint, the provenance
    columns filled in: a row written before they existed measured ``best``, chosen by
    :data:`OLD_RULE`."""
    import pandas as pd

    table = table.copy()
    kinds = table["checkpoint"] if "checkpoint" in table.columns else pd.Series("best", index=table.index)
    table["checkpoint"] = kinds.fillna("best").astype(str)
    table = table[table["checkpoint"] == kind]
    rules = table["chosen_by"] if "chosen_by" in table.columns else pd.Series(None, index=table.index)
    fill = [LAST_RULE if k == "last" else OLD_RULE for k in table["checkpoint"]]
    table["chosen_by"] = rules.where(rules.notna(), pd.Series(fill, index=table.index, dtype=object))
    return table


def stale_rows(
    table: pd.DataFrame, runs: Sequence[Any], source: str | os.PathLike | None = None
) -> tuple[np.ndarray, list[str]]:
    """Which rows of a collected table (columns method, mode, seed, and ``file`` for attack
    results) no longer measure their run's checkpoint, as a boolean mask, and one line per
    stale (run, file) (:func:`stale_reason`). ``runs``: the runs (``results.Run``) the rows
    belong to, by method, mode and seed; a row of another run is kept. ``source``: the file
    the rows were read from, for rows without a ``file`` of their own (e.g. layer norms)."""
    mask = np.zeros(len(table), dtype=bool)
    reasons: list[str] = []
    if table.empty:
        return mask, reasons
    by_key = {(r.method, r.mode, int(r.seed)): r for r in runs}
    position = {label: i for i, label in enumerate(table.index)}
    keys = ["method", "mode", "seed", *(["file"] if "file" in table.columns else [])]
    for key, group in table.groupby(keys, sort=False, dropna=False):
        run = by_key.get((key[0], key[1], int(key[2])))
        if run is None:
            continue
        csv = run.path / key[3] if len(key) > 3 else Path(source or run.path / "-")
        reason = stale_reason(run.path, csv, group)
        if reason is not None:
            reasons.append(reason)
            mask[[position[i] for i in group.index]] = True
    return mask, reasons


def stale_result(run_dir: str | os.PathLike, csv: str | os.PathLike) -> str | None:
    """Why the result file ``csv`` of the run no longer stands for the run's checkpoint (one
    line: :func:`stale_reason`; an unreadable file says so), or
    None when it still does."""
    import pandas as pd

    try:
        rows = pd.read_csv(csv)
    except (OSError, ValueError, pd.errors.ParserError, UnicodeDecodeError) as e:
        return f"{Path(csv).name} of run {run_dir} is unreadable ({type(e).__name__})"
    return stale_reason(run_dir, csv, rows)
