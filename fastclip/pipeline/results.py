"""Finding trained runs, measuring them, and tabulating the measurements.

A run directory is ``<prefix><method>_<mode>_<seed>`` (e.g. prefix
``logs/cifar/ResNet18_models/method_`` and run ``method_fastclip_wBN_1``). Each
attack writes one CSV per run (``attack_<attack>_<params>.csv``, one row per eps);
:func:`collect_attack_results` gathers them into

* ``runs``: one row per run x attack setting (model, dataset, mode, method, seed,
  attack, eps, params, n_examples, clean_acc, adv_acc, ...), and
* ``summary``: mean and standard deviation over seeds per model x dataset x attack
  x params (eps included) x n_examples x mode x method, with the number of seeds.
  The standard deviation is the sample one, ddof = 1 (empty for a single seed).

Runs without any attack CSV, CSVs that do not parse or lack columns, and attack
files present in some runs but not in others are returned as :class:`Problem` s,
never dropped silently.
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
import torch
from torch import nn

from fastclip.analysis.discovery import canonical_layer_name, outermost_name
from fastclip.linalg.operator import unwrap
from fastclip.pipeline.methods import available
from fastclip.pipeline.methods.base import MODES, record_input_shapes
from fastclip.pipeline.models.layers import ConvBN
from fastclip.spectral import singular_values

if TYPE_CHECKING:
    import pandas as pd

logger = logging.getLogger(__name__)

__all__ = [
    "Run",
    "Problem",
    "find_runs",
    "runs_parent",
    "check_runs",
    "describe_runs",
    "read_config",
    "ATTACK_COLUMNS",
    "collect_attack_results",
    "summarize",
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
    """A run (or one of its files) that could not be used, and why."""

    path: Path
    reason: str

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


def describe_runs(prefix: str | os.PathLike) -> str:
    """What :func:`find_runs` sees under ``prefix`` without filters, for error messages."""
    runs = find_runs(prefix)
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
    return df


def collect_attack_results(runs: Sequence[Run]) -> tuple[pd.DataFrame, list[Problem]]:
    """Every per-run attack CSV of ``runs`` as one table, and the problems met.

    Identifying columns come first: model, dataset, mode, method, seed, file, then
    the CSV's own columns. A run whose training has no ``DONE`` marker is kept but
    reported, since its checkpoint may not be final.
    """
    import pandas as pd

    frames, problems = [], []
    files_of: dict[Run, set[str]] = {}
    for run in runs:
        files = sorted(run.path.glob("attack_*.csv"))
        if not files:
            problems.append(Problem(run.path, "no attack CSV (attack not run, or not finished)"))
            continue
        if not (run.path / "DONE").exists():
            problems.append(Problem(run.path, "training not finished (no DONE file); results kept"))
        files_of[run] = {f.name for f in files}
        model, dataset = _model_and_dataset(run)
        for f in files:
            try:
                df = _read_attack_csv(f)
            except ValueError as e:
                problems.append(Problem(f, str(e)))
                continue
            df = df.drop(
                columns=[c for c in ("model", "dataset", "mode", "method", "seed", "file") if c in df.columns]
            )
            df.insert(0, "file", f.name)
            for i, (k, v) in enumerate(
                [
                    ("model", model),
                    ("dataset", dataset),
                    ("mode", run.mode),
                    ("method", run.method),
                    ("seed", run.seed),
                ]
            ):
                df.insert(i, k, v)
            frames.append(df)
    # a setting measured on some runs only would make its mean over fewer seeds
    all_files = set().union(*files_of.values()) if files_of else set()
    for run, names in files_of.items():
        for name in sorted(all_files - names):
            problems.append(Problem(run.path, f"missing {name} (present in other runs)"))
    table = (
        pd.concat(frames, ignore_index=True)
        if frames
        else pd.DataFrame(columns=["model", "dataset", "mode", "method", "seed", "file", *ATTACK_COLUMNS])
    )
    for p in problems:
        logger.warning("%s", p)
    return table, problems


def summarize(runs_table: pd.DataFrame) -> pd.DataFrame:
    """Mean and sample std (ddof = 1) of clean_acc and adv_acc over seeds.

    One row per model x dataset x attack x params x eps x n_examples x mode x method,
    with ``n_seeds`` and the ``seeds`` (space-separated) it averages.
    """
    import pandas as pd

    if runs_table.empty:
        return pd.DataFrame(
            columns=[
                *_KEYS,
                "n_seeds",
                "seeds",
                "clean_acc_mean",
                "clean_acc_std",
                "adv_acc_mean",
                "adv_acc_std",
            ]
        )
    g = runs_table.groupby(_KEYS, dropna=False, sort=True)
    out = g.agg(
        n_seeds=("seed", "nunique"),
        seeds=("seed", lambda s: " ".join(map(str, sorted(s)))),
        clean_acc_mean=("clean_acc", "mean"),
        clean_acc_std=("clean_acc", lambda s: s.std(ddof=1)),
        adv_acc_mean=("adv_acc", "mean"),
        adv_acc_std=("adv_acc", lambda s: s.std(ddof=1)),
    )
    return _sort_rows(out.reset_index(), ["model", "dataset", "attack", "eps", "params", "n_examples"])


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
    accuracy as mean +- std, seeds."""
    import pandas as pd

    if fmt not in ("markdown", "latex"):
        raise ValueError(f"unknown table format {fmt!r}; choose one of markdown, latex")
    sep = " ± " if fmt == "markdown" else r" $\pm$ "
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
                _pm(m, s, sep) for m, s in zip(summary["clean_acc_mean"], summary["clean_acc_std"])
            ],
            "adv acc (%)": [_pm(m, s, sep) for m, s in zip(summary["adv_acc_mean"], summary["adv_acc_std"])],
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
    certify: certified) accuracy as mean +- std over seeds. Settings of one attack and eps
    that differ in other parameters get their parameters appended to the column name."""
    import pandas as pd

    keys = ["model", "dataset", "n_examples", "mode", "method"]
    if summary.empty:
        return pd.DataFrame(columns=[*keys, "clean acc (%)"])
    sep = r" $\pm$ " if fmt == "latex" else " ± "
    df = summary.copy()
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
        row["clean acc (%)"] = _pm(first["clean_acc_mean"], first["clean_acc_std"], sep)
        for r in g.itertuples():
            row[r.label_] = _pm(r.adv_acc_mean, r.adv_acc_std, sep)
        rows.append(row)
    out = pd.DataFrame(rows, columns=[*keys, "clean acc (%)", *labels]).fillna("")
    return _sort_rows(out, ["model", "dataset", "n_examples"])


def summarize_layer_norms(per_seed: pd.DataFrame) -> pd.DataFrame:
    """Mean and sample std (ddof = 1) of ``sigma1`` over seeds per model x dataset x
    method x mode x layer, keeping the layers' first-seen order; with ``n_seeds``."""
    keys = ["model", "dataset", "method", "mode", "layer", "kind", "input_shape"]
    order = {name: i for i, name in enumerate(dict.fromkeys(per_seed["layer"]))}
    out = (
        per_seed.groupby(keys, sort=False)
        .agg(
            sigma1_mean=("sigma1", "mean"),
            sigma1_std=("sigma1", lambda s: s.std(ddof=1)),
            n_seeds=("seed", "nunique"),
            clip=("clip", "first"),
        )
        .reset_index()
    )
    out["_order"] = out["layer"].map(order)
    return _sort_rows(out, ["model", "dataset"], ["_order"]).drop(columns="_order")


# -- layer-wise spectral norms of a trained model --------------------------------------

_LINEAR_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def measure_layer_norms(
    model: nn.Module,
    input_shape: Sequence[int],
    *,
    dtype: torch.dtype = torch.float64,
    tol: float | None = None,
    progress: bool = True,
) -> list[dict]:
    """sigma_1 of every conv, linear and Conv+BN composition of ``model`` at its true input size.

    Input sizes come from one eval-mode forward pass at the per-sample ``input_shape``
    (:func:`fastclip.pipeline.methods.base.record_input_shapes`). Each layer is measured as the
    model computes it in eval mode: through its SpectralNorm wrapper if it has one,
    with its parametrisation (e.g. Miyato's spectral_norm) applied, BN with its
    running statistics. The value is :func:`fastclip.spectral.singular_values` with
    k = 1, which iterates to convergence (exact to about 1e-6 relative), in ``dtype``.
    A ConvBN whose ``bn`` is the identity (noBN) is the conv itself and is listed once.

    Returns one dict per layer, in definition order: ``layer`` (wrapper-free name),
    ``kind`` ("conv", "linear" or "conv+bn"), ``input_shape`` ("CxHxW"), ``sigma1``.

    Example::

        rows = measure_layer_norms(model, (3, 32, 32))
        # [{'layer': 'conv1', 'kind': 'conv+bn', 'input_shape': '3x32x32', 'sigma1': 4.2}, ...]
    """
    from tqdm.auto import tqdm

    modules = dict(model.named_modules())
    shapes = record_input_shapes(model, tuple(input_shape))
    todo = []
    for name, mod in modules.items():
        if isinstance(mod, ConvBN):
            if isinstance(unwrap(mod.bn), nn.Identity):
                continue
            kind = "conv+bn"
        elif isinstance(mod, _LINEAR_TYPES):
            kind = "linear" if isinstance(mod, nn.Linear) else "conv"
        else:
            continue
        outer = outermost_name(name, modules)
        if outer not in shapes:
            logger.warning("layer %s is not used in the forward pass; skipped", name)
            continue
        todo.append((canonical_layer_name(name, modules), kind, outer))
    rows = []
    for layer, kind, outer in tqdm(todo, desc="layers", disable=not progress or None, leave=False):
        shape = shapes[outer]
        sigma = singular_values(modules[outer], shape, k=1, dtype=dtype, tol=tol)
        rows.append(
            {
                "layer": layer,
                "kind": kind,
                "input_shape": "x".join(map(str, shape)),
                "sigma1": float(sigma[0]),
            }
        )
        logger.info(
            "%s (%s, input %s): sigma_1 = %.6g", layer, kind, rows[-1]["input_shape"], rows[-1]["sigma1"]
        )
    return rows


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
