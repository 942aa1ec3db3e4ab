"""Finding trained runs and tabulating their measurements.

A run directory is ``<prefix><method>_<mode>_<seed>`` (e.g. prefix
``logs/cifar/ResNet18_models/method_`` and run ``method_fastclip_wBN_1``). Each
attack writes one CSV per run (``attack_<attack>_<params>.csv``, one row per eps);
:func:`collect_attack_results` gathers them into

* ``runs``: one row per run x attack setting (model, dataset, mode, method, seed,
  attack, eps, params, n_examples, clean_acc, adv_acc, ...), and
* ``summary``: mean and standard deviation over seeds per model x dataset x attack
  x params (eps included) x n_examples x mode x method, with the number of seeds
  (a cell over fewer seeds than the grid's is marked ``(2 of 3 seeds)`` in every table).
  The standard deviation is the sample one, ddof = 1 (empty for a single seed).

A run is labelled by its config.json (:func:`identify`), not its directory name. Runs
without any attack CSV, CSVs that do not parse, lack columns or hold an accuracy
outside [0, 100], and attack files present in some runs but not in others are returned
as :class:`Problem` s, never dropped silently; a (run, setting) row found twice is
counted once, with a note. The layer norms' measurement lives in
:mod:`fastclip.pipeline.layer_norms` (re-exported here).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fastclip.analysis.discovery import canonical_layer_name
from fastclip.pipeline.layer_norms import measure_layer_norms
from fastclip.pipeline.methods import available
from fastclip.pipeline.methods.base import MODES

if TYPE_CHECKING:
    import pandas as pd

logger = logging.getLogger(__name__)

__all__ = [
    "Run",
    "Problem",
    "find_runs",
    "runs_parent",
    "check_runs",
    "identify",
    "describe_runs",
    "read_config",
    "ATTACK_COLUMNS",
    "collect_attack_results",
    "summarize",
    "seeds_mark",
    "format_summary",
    "wide_summary",
    "summarize_layer_norms",
    "measure_layer_norms",
    "method_order",
    "canonical_layer_name",
    "read_event_scalars",
]

_RUN_RE = re.compile(rf"^(?P<method>.+)_(?P<mode>{'|'.join(MODES)})_(?P<seed>-?\d+)$")

#: Columns every per-run attack CSV must have.
ATTACK_COLUMNS = ("attack", "eps", "params", "n_examples", "clean_acc", "adv_acc")
_KEYS = ["model", "dataset", "attack", "params", "eps", "n_examples", "mode", "method"]


@dataclass(frozen=True)
class Run:
    """One run directory and what its name says."""

    path: Path
    method: str
    mode: str
    seed: int

    @property
    def name(self) -> str:
        return self.path.name


@dataclass(frozen=True)
class Problem:
    """A run (or one of its files) that could not be used, and why; ``note``: the data
    was used and this only says how (e.g. a duplicated row counted once)."""

    path: Path
    reason: str
    note: bool = False

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


def runs_parent(prefix: str | os.PathLike) -> Path:
    """The directory holding the runs of ``prefix`` (where collected tables go).

    >>> str(runs_parent("logs/cifar/ResNet18_models/method_"))
    'logs/cifar/ResNet18_models'
    """
    return _split_prefix(prefix)[0]


def _split_prefix(prefix: str | os.PathLike) -> tuple[Path, str]:
    prefix = os.fspath(prefix)
    if prefix.endswith(os.sep) or Path(prefix).is_dir():
        return Path(prefix), ""
    return Path(prefix).parent, Path(prefix).name


def find_runs(
    prefix: str | os.PathLike, method: str = "all", mode: str = "all", seeds: Iterable[int] | None = None
) -> list[Run]:
    """Run directories ``<prefix><method>_<mode>_<seed>``, sorted by method, mode, seed.

    ``method`` / ``mode`` filter ("all" keeps every one); ``seeds`` keeps those seeds.

    Example::

        find_runs("logs/cifar/ResNet18_models/method_", method="fastclip", mode="wBN")
        # [Run(path=.../method_fastclip_wBN_1, method='fastclip', mode='wBN', seed=1), ...]
    """
    parent, stem = _split_prefix(prefix)
    if not parent.is_dir():
        return []
    keep_seeds = None if seeds is None else set(seeds)
    runs = []
    for d in parent.iterdir():
        if not d.is_dir() or not d.name.startswith(stem):
            continue
        m = _RUN_RE.match(d.name[len(stem) :])
        if m is None:
            continue
        run = Run(d, m["method"], m["mode"], int(m["seed"]))
        if method != "all" and run.method != method or mode != "all" and run.mode != mode:
            continue
        if keep_seeds is not None and run.seed not in keep_seeds:
            continue
        runs.append(run)
    return sorted(runs, key=lambda r: (r.method, MODES.index(r.mode), r.seed))


def describe_runs(prefix: str | os.PathLike, runs: Sequence[Run] | None = None) -> str:
    """What :func:`find_runs` sees under ``prefix`` without filters (or ``runs``: those
    runs as labelled, e.g. by :func:`identify`), for error messages."""
    runs = find_runs(prefix) if runs is None else runs
    if not runs:
        parent, stem = _split_prefix(prefix)
        return f"no directory {parent}/{stem}<method>_<mode>_<seed> exists"
    methods = sorted({r.method for r in runs})
    modes = sorted({r.mode for r in runs}, key=MODES.index)
    seeds = sorted({r.seed for r in runs})
    return (
        f"found {len(runs)} runs with methods {', '.join(methods)}; modes {', '.join(modes)}; "
        f"seeds {', '.join(map(str, seeds))}"
    )


def read_config(run: Run | Path) -> dict:
    """The settings of the run's ``config.json`` (its ``"settings"`` entry, where
    train.py keeps them; {} when the file is missing or unreadable)."""
    path = (run.path if isinstance(run, Run) else Path(run)) / "config.json"
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(cfg, dict):
        return {}
    settings = cfg.get("settings", cfg)
    return settings if isinstance(settings, dict) else {}


def identify(run: Run) -> tuple[Run, str | None]:
    """``run`` labelled by its config.json's method, mode and seed (the directory name
    fills in what the config lacks), and one line naming the disagreement when the
    name says otherwise (None when they agree).

    A directory renamed or copied by hand keeps the config of the run it holds, so the
    config, not the name, says what was trained."""
    cfg = read_config(run)
    method, mode, seed = cfg.get("method"), cfg.get("mode"), cfg.get("seed")
    said = {
        "method": method if isinstance(method, str) and method else run.method,
        "mode": mode if isinstance(mode, str) and mode else run.mode,
        "seed": seed if isinstance(seed, int) and not isinstance(seed, bool) else run.seed,
    }
    named = {"method": run.method, "mode": run.mode, "seed": run.seed}
    differ = [k for k in named if said[k] != named[k]]
    if not differ:
        return run, None
    note = (
        f"run directory {run.path} is named {', '.join(f'{k} {named[k]}' for k in differ)} but its "
        f"config.json says {', '.join(f'{k} {said[k]}' for k in differ)}; labelled by config.json"
    )
    return Run(run.path, said["method"], said["mode"], said["seed"]), note


def check_runs(
    runs: Sequence[Run], dataset: str | None = None, model: str | None = None, checkpoint: str = "best"
) -> str | None:
    """The first reason ``runs`` cannot be evaluated, as one line, or None.

    Each run needs a readable config.json whose dataset (and model, when given)
    match, and a ``ckpt_<checkpoint>.pth``.
    """
    for run in runs:
        cfg = read_config(run)
        if not cfg:
            return f"run {run.path} has no readable config.json (not a training run, or not started)"
        if dataset is not None and cfg.get("dataset") != dataset:
            return f"run {run.path} was trained on dataset {cfg.get('dataset')!r}, not {dataset!r}"
        if model is not None and cfg.get("model") != model:
            return f"run {run.path} holds a checkpoint of model {cfg.get('model')!r}, not {model!r}"
        if not (run.path / f"ckpt_{checkpoint}.pth").is_file():
            return f"run {run.path} has no checkpoint ckpt_{checkpoint}.pth (training not finished?)"
    return None


def _model_and_dataset(run: Run) -> tuple[str, str]:
    """From config.json, else from the layout ``<dataset>/<model>_models/<run>``."""
    cfg = read_config(run)
    model, dataset = cfg.get("model"), cfg.get("dataset")
    parent = run.path.parent.name
    if model is None:
        model = parent[: -len("_models")] if parent.endswith("_models") else parent
    if dataset is None:
        dataset = run.path.parent.parent.name
    return str(model), str(dataset)


def _read_attack_csv(path: Path) -> pd.DataFrame:
    """The rows of one attack CSV, checked; a ValueError names the first fault (and its
    row: data rows count from 1, the file's line is one more for the header)."""
    import pandas as pd

    try:
        df = pd.read_csv(path)
    except (OSError, ValueError, pd.errors.ParserError, UnicodeDecodeError) as e:
        raise ValueError(
            f"unreadable CSV ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from None
    missing = [c for c in ATTACK_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"expected columns {', '.join(ATTACK_COLUMNS)}; missing {', '.join(missing)}")
    if df.empty:
        raise ValueError("no rows")
    for c in ("clean_acc", "adv_acc", "n_examples"):
        values = pd.to_numeric(df[c], errors="coerce")
        if values.isna().any():
            raise ValueError(f"non-numeric or empty {c!r} values: {df[c][values.isna()].tolist()}")
        df[c] = values
    for c in ("clean_acc", "adv_acc"):  # percentages: anything else is another unit or a bug
        bad = ~df[c].between(0, 100)
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            raise ValueError(
                f"{c} {df[c].iloc[i]:g} in row {i + 1} (line {i + 2}) is outside [0, 100]; file skipped"
            )
    return df


#: Columns that identify one (run, attack setting) row of the collected table.
_SETTING = ["attack", "params", "eps", "n_examples"]
_ROW_KEYS = ["model", "dataset", "mode", "method", "seed", *_SETTING]
_SUMMARY_COLUMNS = [*_KEYS, "n_seeds", "seeds", "clean_acc_mean", "clean_acc_std", "adv_acc_mean"]
_SUMMARY_COLUMNS += ["adv_acc_std", "expected_seeds", "seeds_note"]


def _written_at(df: pd.DataFrame, path: Path) -> np.ndarray:
    """When each row was written: its ``timestamp`` (or ``time``) column where the CSV
    has one that parses, else the file's modification time, in seconds since the epoch."""
    import pandas as pd

    when = np.full(len(df), path.stat().st_mtime, dtype=np.float64)
    for c in ("timestamp", "time"):
        if c in df.columns:
            if pd.api.types.is_numeric_dtype(df[c]):  # seconds since the epoch (time.time())
                seconds = df[c].astype(np.float64)
            else:  # a date and time, ISO 8601 or the like; naive ones taken as UTC
                parsed = pd.to_datetime(df[c], errors="coerce", utc=True, format="mixed")
                seconds = (parsed - pd.Timestamp(0, tz="UTC")).dt.total_seconds()
            ok = seconds.notna().to_numpy()
            when[ok] = seconds.to_numpy()[ok]
            break
    return when


def _settings(df: pd.DataFrame) -> set[tuple[str, ...]]:
    return set(map(tuple, df[_SETTING].astype(str).to_numpy()))


def _drop_duplicates(table: pd.DataFrame) -> tuple[pd.DataFrame, list[Problem]]:
    """``table`` with each (run, setting) once: the newest row (written last, then the
    later file / row), and a note per setting found more than once. Averaging both
    copies would count one seed twice (its mean weighted, its std too small)."""
    import pandas as pd

    ordered = table.sort_values(["_time", "_order"], kind="stable")
    repeated = ordered.duplicated(_ROW_KEYS, keep=False)
    notes = []
    for _, g in ordered[repeated].groupby(_ROW_KEYS, dropna=False, sort=False):
        rows = g.to_dict("records")
        newest = rows[-1]
        where = [
            f"{'' if r['_run'] == newest['_run'] else r['_run'] + '/'}{r['file']} row {r['_row']}"
            for r in rows
        ]
        eps = "" if pd.isna(newest["eps"]) else f" eps {newest['eps']:g}"
        notes.append(
            Problem(
                Path(newest["_run"]),
                f"{newest['attack']}{eps} ({newest['params']}, {newest['n_examples']} examples) of seed "
                f"{newest['seed']} appears {len(rows)} times ({', '.join(where)}); counted once, "
                f"the newest: {where[-1]}",
                note=True,
            )
        )
    kept = ordered[~ordered.duplicated(_ROW_KEYS, keep="last")].sort_values("_order", kind="stable")
    return kept, notes


def collect_attack_results(runs: Sequence[Run]) -> tuple[pd.DataFrame, list[Problem]]:
    """Every per-run attack CSV of ``runs`` as one table, and the problems met.

    Identifying columns come first: model, dataset, mode, method, seed, file, then
    the CSV's own columns. A run whose training has no ``DONE`` marker (or a ``FAILED``
    one) is kept but reported, since its checkpoint may not be final; a file with an accuracy outside
    [0, 100] is skipped and reported. A (run, setting) row found twice (e.g. the same
    eps in two CSVs of a run) is counted once, the newest (:func:`_written_at`), and
    reported as a note (``Problem.note``).
    """
    import pandas as pd

    frames, problems = [], []
    settings_of: dict[Run, set] = {}
    file_settings: dict[str, set] = {}
    for run in runs:
        files = sorted(run.path.glob("attack_*.csv"))
        if not files:
            problems.append(Problem(run.path, "no attack CSV (attack not run, or not finished)"))
            continue
        if (run.path / "FAILED").exists():  # attacked with --include-failed
            problems.append(Problem(run.path, "training FAILED (see its FAILED file); results kept"))
        elif not (run.path / "DONE").exists():
            problems.append(Problem(run.path, "training not finished (no DONE file); results kept"))
        settings_of[run] = set()
        model, dataset = _model_and_dataset(run)
        for f in files:
            file_settings.setdefault(f.name, set())
            try:
                df = _read_attack_csv(f)
            except ValueError as e:
                problems.append(Problem(f, str(e)))
                continue
            file_settings[f.name] |= _settings(df)
            settings_of[run] |= _settings(df)
            df = df.drop(
                columns=[c for c in ("model", "dataset", "mode", "method", "seed", "file") if c in df.columns]
            )
            df.insert(0, "file", f.name)
            ident = {
                "model": model,
                "dataset": dataset,
                "mode": run.mode,
                "method": run.method,
                "seed": run.seed,
            }
            for i, (k, v) in enumerate(ident.items()):
                df.insert(i, k, v)
            frames.append(
                df.assign(
                    _run=str(run.path),
                    _row=np.arange(1, len(df) + 1),
                    _time=_written_at(df, f),
                    _order=len(frames) * 1_000_000 + np.arange(len(df)),
                )
            )
    # a setting measured on some runs only would make its mean over fewer seeds; a file
    # whose settings the run has from other files (a rerun of one eps) misses nothing
    for run, have in settings_of.items():
        names = {f.name for f in run.path.glob("attack_*.csv")}
        for name in sorted(set(file_settings) - names):
            if not file_settings[name] or not file_settings[name] <= have:
                problems.append(Problem(run.path, f"missing {name} (present in other runs)"))
    if frames:
        table, notes = _drop_duplicates(pd.concat(frames, ignore_index=True))
        table = table.drop(columns=["_run", "_row", "_time", "_order"]).reset_index(drop=True)
        problems += notes
    else:
        table = pd.DataFrame(columns=["model", "dataset", "mode", "method", "seed", "file", *ATTACK_COLUMNS])
    for p in problems:
        logger.warning("%s", p)
    return table, problems


def summarize(runs_table: pd.DataFrame, expected_seeds: int | None = None) -> pd.DataFrame:
    """Mean and sample std (ddof = 1) of clean_acc and adv_acc over seeds.

    One row per model x dataset x attack x params x eps x n_examples x mode x method,
    with ``n_seeds`` and the ``seeds`` (space-separated) it averages, ``expected_seeds``
    (the grid's number of seeds: ``expected_seeds``, default the seeds in ``runs_table``)
    and ``seeds_note``, :func:`seeds_mark` of a row over fewer seeds ("" otherwise).
    """
    import pandas as pd

    if runs_table.empty:
        return pd.DataFrame(columns=_SUMMARY_COLUMNS)
    g = runs_table.groupby(_KEYS, dropna=False, sort=True)
    out = g.agg(
        n_seeds=("seed", "nunique"),
        seeds=("seed", lambda s: " ".join(map(str, sorted(s)))),
        clean_acc_mean=("clean_acc", "mean"),
        clean_acc_std=("clean_acc", lambda s: s.std(ddof=1)),
        adv_acc_mean=("adv_acc", "mean"),
        adv_acc_std=("adv_acc", lambda s: s.std(ddof=1)),
    ).reset_index()
    expected = runs_table["seed"].nunique() if expected_seeds is None else int(expected_seeds)
    out["expected_seeds"] = expected
    out["seeds_note"] = [seeds_mark(n, expected).strip() for n in out["n_seeds"]]
    return _sort_rows(out, ["model", "dataset", "attack", "eps", "params", "n_examples"])


def seeds_mark(n_seeds: int, expected: int | None) -> str:
    """The mark of a value over fewer seeds than the grid's, as the report writes it
    (:func:`fastclip.pipeline.report.format_cell`); "" for a full cell.

    >>> seeds_mark(2, 3), seeds_mark(3, 3), seeds_mark(2, None)
    (' (2 of 3 seeds)', '', '')
    """
    if expected is None or expected != expected or int(n_seeds) >= int(expected):
        return ""
    return f" ({int(n_seeds)} of {int(expected)} seeds)"


def _marks(summary: pd.DataFrame) -> list[str]:
    """:func:`seeds_mark` of each summary row (none in a summary written before the column)."""
    expected = summary["expected_seeds"] if "expected_seeds" in summary.columns else [None] * len(summary)
    return [seeds_mark(n, e) for n, e in zip(summary["n_seeds"], expected)]


def method_order(methods: Iterable[str]) -> list[str]:
    """Distinct ``methods`` in the registry's order (orig first), unknown names after,
    in the order found.

    >>> method_order(["gouk", "fastclip", "orig", "mine", "gouk"])
    ['orig', 'fastclip', 'gouk', 'mine']
    """
    known = available()
    found = list(dict.fromkeys(methods))
    return sorted(found, key=lambda m: (known.index(m) if m in known else len(known), found.index(m)))


def _sort_rows(df: pd.DataFrame, first: Sequence[str], last: Sequence[str] = ()) -> pd.DataFrame:
    """Sort by ``first`` columns, then mode (MODES order), method (registry order), ``last``."""
    rank_mode = {m: i for i, m in enumerate(MODES)}
    rank_method = {m: i for i, m in enumerate(method_order(df["method"]))}
    out = df.assign(_mode=df["mode"].map(rank_mode).fillna(len(MODES)), _method=df["method"].map(rank_method))
    return (
        out.sort_values([*first, "_mode", "_method", *last], kind="stable")
        .drop(columns=["_mode", "_method"])
        .reset_index(drop=True)
    )


def _pm(mean: float, std: float, sep: str) -> str:
    return f"{mean:.2f}" if not np.isfinite(std) else f"{mean:.2f}{sep}{std:.2f}"


def format_summary(summary: pd.DataFrame, fmt: str = "markdown") -> str:
    """The summary as a Markdown (``fmt="markdown"``) or LaTeX (``"latex"``) table:
    model, dataset, attack, eps, examples, mode, method, clean and adversarial
    accuracy as mean +- std (marked ``(2 of 3 seeds)`` when over fewer seeds than the
    grid's, :func:`seeds_mark`), seeds."""
    import pandas as pd

    if fmt not in ("markdown", "latex"):
        raise ValueError(f"unknown table format {fmt!r}; choose one of markdown, latex")
    sep = " ± " if fmt == "markdown" else r" $\pm$ "
    marks = _marks(summary)
    rows = pd.DataFrame(
        {
            "model": summary["model"],
            "dataset": summary["dataset"],
            "attack": summary["attack"],
            "setting": summary["params"],
            "examples": summary["n_examples"],
            "mode": summary["mode"],
            "method": summary["method"],
            "clean acc (%)": [
                _pm(m, s, sep) + k
                for m, s, k in zip(summary["clean_acc_mean"], summary["clean_acc_std"], marks)
            ],
            "adv acc (%)": [
                _pm(m, s, sep) + k for m, s, k in zip(summary["adv_acc_mean"], summary["adv_acc_std"], marks)
            ],
            "seeds": summary["n_seeds"],
        }
    )
    if fmt == "markdown":
        return rows.to_markdown(index=False)
    return rows.to_latex(index=False, escape=False).replace("_", r"\_")


_ATTACK_LABELS = {"pgd": "PGD Linf", "pgdl2": "PGD L2", "cw": "CW L2", "certify": "certified L2"}


def wide_summary(summary: pd.DataFrame, fmt: str = "markdown") -> pd.DataFrame:
    """The summary side by side: one row per model x dataset x examples x mode x method,
    the clean accuracy, then one column per attack setting (``PGD Linf 0.02``,
    ``PGD L2 0.1``, ``CW L2``, ``certified L2 0.1``, ...) holding the adversarial (for
    certify: certified) accuracy as mean +- std over seeds, each cell over fewer seeds than
    the grid's marked (:func:`seeds_mark`). Settings of one attack and eps
    that differ in other parameters get their parameters appended to the column name."""
    import pandas as pd

    keys = ["model", "dataset", "n_examples", "mode", "method"]
    if summary.empty:
        return pd.DataFrame(columns=[*keys, "clean acc (%)"])
    sep = r" $\pm$ " if fmt == "latex" else " ± "
    df = summary.copy()
    df["mark_"] = _marks(df)
    eps = pd.to_numeric(df["eps"], errors="coerce")
    df["label_"] = [
        _ATTACK_LABELS.get(a, a) + ("" if pd.isna(e) else f" {e:.4g}") for a, e in zip(df["attack"], eps)
    ]
    clash = df.groupby(["label_"])["params"].transform("nunique") > 1
    df.loc[clash, "label_"] = df.loc[clash, "label_"] + " (" + df.loc[clash, "params"].astype(str) + ")"
    df["_eps"] = eps.fillna(-1.0)
    order = {a: i for i, a in enumerate(_ATTACK_LABELS)}
    df["_attack"] = df["attack"].map(order).fillna(len(order))
    labels = list(dict.fromkeys(df.sort_values(["_attack", "_eps", "label_"], kind="stable")["label_"]))
    rows = []
    for key, g in df.groupby(keys, sort=False, dropna=False):
        row = dict(zip(keys, key))
        first = g.iloc[0]
        row["clean acc (%)"] = _pm(first["clean_acc_mean"], first["clean_acc_std"], sep) + first["mark_"]
        for r in g.itertuples():
            row[r.label_] = _pm(r.adv_acc_mean, r.adv_acc_std, sep) + r.mark_
        rows.append(row)
    out = pd.DataFrame(rows, columns=[*keys, "clean acc (%)", *labels]).fillna("")
    return _sort_rows(out, ["model", "dataset", "n_examples"])


def summarize_layer_norms(per_seed: pd.DataFrame) -> pd.DataFrame:
    """Mean and sample std (ddof = 1) of ``sigma1`` over seeds per model x dataset x
    method x mode x layer, keeping the layers' first-seen order; with ``n_seeds``, and
    ``failed_seeds`` (space-separated) when ``per_seed`` has a ``failed`` column (the
    failure of a run measured with ``--include-failed``, empty for the others)."""
    keys = ["model", "dataset", "method", "mode", "layer", "kind", "input_shape"]
    order = {name: i for i, name in enumerate(dict.fromkeys(per_seed["layer"]))}
    agg = {
        "sigma1_mean": ("sigma1", "mean"),
        "sigma1_std": ("sigma1", lambda s: s.std(ddof=1)),
        "n_seeds": ("seed", "nunique"),
        "clip": ("clip", "first"),
    }
    if "failed" in per_seed.columns:
        failed = per_seed["failed"].fillna("").astype(str).str.len() > 0
        per_seed = per_seed.assign(_failed=per_seed["seed"].where(failed))
        agg["failed_seeds"] = ("_failed", lambda s: " ".join(str(int(x)) for x in sorted(set(s.dropna()))))
    out = per_seed.groupby(keys, sort=False).agg(**agg).reset_index()
    out["_order"] = out["layer"].map(order)
    return _sort_rows(out, ["model", "dataset"], ["_order"]).drop(columns="_order")


# -- TensorBoard scalars -----------------------------------------------------------------


def read_event_scalars(run_dir: str | os.PathLike) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Every scalar tag of the TensorBoard event files in ``run_dir`` (not its
    subdirectories), as ``{tag: (steps, values)}`` sorted by step, read with
    tensorboard's EventAccumulator (no sample limit). A step logged twice (a resumed
    run) keeps its last value.

    Example::

        curves = read_event_scalars("logs/mnist/SimpleConv_models/method_fastclip_wBN_1")
        steps, acc = curves["test/acc"]
    """
    # Lazy: tensorboard's event reader pulls in most of tensorboard, needed only here.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(os.fspath(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    out = {}
    for tag in acc.Tags().get("scalars", []):
        by_step = {}
        for ev in sorted(acc.Scalars(tag), key=lambda e: e.wall_time):
            by_step[ev.step] = ev.value
        steps = np.array(sorted(by_step), dtype=np.int64)
        out[tag] = (steps, np.array([by_step[s] for s in steps], dtype=np.float64))
    return out
