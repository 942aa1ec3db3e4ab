"""The reproduction report's numbers: one table per mode, the clean-vs-certified figure, publishing.

:func:`report_values` turns the per-run tables of the chain (``attack_results_runs.csv`` of
collect_attack_results.py, ``layer_norms_runs.csv`` of compute_trained_SVs.py) into one long
table, one value per mode x method x seed x column; :func:`mode_tables` makes of it one table
per mode, a row per method, every cell ``mean ± std`` over the seeds found, labelled when it
holds fewer seeds than the grid asked for and ``missing`` when it holds none.
:func:`plot_clean_vs_certified` draws a mode's clean against certified accuracy,
:func:`plot_robustness` its accuracy under attack against the radius, and
:func:`publish` copies a report and the figures it links into a documentation folder.

Example::

    values = report_values(pd.read_csv("attack_results_runs.csv"), pd.read_csv("layer_norms_runs.csv"))
    tables = mode_tables(values, methods=["orig", "fastclip"], modes=["wBN"], seeds=[1, 10, 100])
    print(tables["wBN"].to_markdown(index=False))
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING

import numpy as np

from fastclip.pipeline.io import atomic_write, atomic_write_text
from fastclip.pipeline.plots import pyplot, save_figure
from fastclip.pipeline.results import method_order, seeds_mark

if TYPE_CHECKING:
    import matplotlib.pyplot as plt
    import pandas as pd

logger = logging.getLogger(__name__)

__all__ = [
    "ATTACK_LABELS",
    "CLEAN",
    "BOUND",
    "MISSING",
    "NOT_APPLICABLE",
    "eps_label",
    "report_values",
    "mode_tables",
    "format_cell",
    "plot_clean_vs_certified",
    "ROBUSTNESS_ATTACKS",
    "plot_robustness",
    "publish_targets",
    "publish",
]

#: Column labels of the attacks, in the tables' order.
ATTACK_LABELS = {"pgd": "PGD Linf", "pgdl2": "PGD L2", "cw": "CW L2", "certify": "certified L2"}
#: Names of the layer kinds compute_trained_SVs.py writes, in the tables' order.
KIND_LABELS = {"conv": "conv", "conv+bn": "Conv+BN", "linear": "linear"}
#: The attacks :func:`plot_robustness` draws against their radius, one panel each.
ROBUSTNESS_ATTACKS = ("pgd", "pgdl2")
CLEAN = "clean acc (%)"
BOUND = "network bound L"
MISSING = "missing"
#: The Conv+BN cell of a mode without BN: that map is the conv itself (its own column).
NOT_APPLICABLE = "n/a (no BN)"
_VALUE_COLUMNS = ["mode", "method", "seed", "column", "kind", "attack", "eps", "value"]


def eps_label(eps: float) -> str:
    """A radius as the tables print it; one of k/255 for an integer k says so.

    >>> eps_label(36 / 255), eps_label(0.1), eps_label(0.02)
    ('0.1412 (36/255)', '0.1', '0.02')
    """
    k = eps * 255
    if abs(k - round(k)) < 1e-9 and not abs(eps - round(eps, 3)) < 1e-12:
        return f"{eps:.4g} ({round(k)}/255)"
    return f"{eps:.4g}"


def report_values(runs_table: pd.DataFrame, layer_runs: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per mode x method x seed x column of the report: ``column`` (its label),
    ``kind`` ("acc" for accuracies, "bound", or a layer kind "conv" / "conv+bn" / "linear"),
    ``attack`` and ``eps`` (empty where none) and ``value``, rows in the columns' order.

    ``runs_table`` is collect_attack_results.py's per-run table (one ``n_examples`` only:
    filter it first). The clean accuracy of a run is that of its first attack row (every
    attack evaluates the same images); the bound L is the certify rows' ``lipschitz``.
    ``layer_runs`` is compute_trained_SVs.py's per-run table: one column per layer,
    ``sigma_1 <layer> (<kind>)``, conv layers first, then Conv+BN, then linear.
    """
    import pandas as pd

    parts = []
    if not runs_table.empty:
        df = runs_table.copy()
        df["eps"] = pd.to_numeric(df["eps"], errors="coerce")
        df["_attack"] = (
            df["attack"].map({a: i for i, a in enumerate(ATTACK_LABELS)}).fillna(len(ATTACK_LABELS))
        )
        df = df.sort_values(["_attack", "eps", "params"], kind="stable", na_position="first")
        df["column"] = [
            ATTACK_LABELS.get(a, a) + ("" if pd.isna(e) else f" {eps_label(e)}")
            for a, e in zip(df["attack"], df["eps"])
        ]
        # one attack and radius run with other parameters too (e.g. an earlier --pgd-steps)
        clash = df.groupby("column")["params"].transform("nunique") > 1
        df.loc[clash, "column"] = df.loc[clash, "column"] + " (" + df.loc[clash, "params"].astype(str) + ")"
        keys = ["mode", "method", "seed"]
        clean = df.groupby(keys, sort=False)["clean_acc"].first().reset_index()
        parts.append(clean.rename(columns={"clean_acc": "value"}).assign(column=CLEAN, kind="acc"))
        adv = df.groupby([*keys, "column"], sort=False).agg(
            value=("adv_acc", "first"), attack=("attack", "first"), eps=("eps", "first")
        )
        parts.append(adv.reset_index().assign(kind="acc"))
        if "lipschitz" in df.columns:
            cert = df[(df["attack"] == "certify") & df["lipschitz"].notna()]
            bound = cert.groupby(keys, sort=False)["lipschitz"].first().reset_index()
            parts.append(bound.rename(columns={"lipschitz": "value"}).assign(column=BOUND, kind="bound"))
    if layer_runs is not None and not layer_runs.empty:
        first_seen = {name: i for i, name in enumerate(dict.fromkeys(layer_runs["layer"]))}
        rank = {k: i for i, k in enumerate(KIND_LABELS)}
        lay = layer_runs.assign(
            _kind=layer_runs["kind"].map(rank).fillna(len(rank)), _first=layer_runs["layer"].map(first_seen)
        ).sort_values(["_kind", "_first"], kind="stable")
        lay = lay.assign(
            column=[f"sigma_1 {n} ({KIND_LABELS.get(k, k)})" for n, k in zip(lay["layer"], lay["kind"])],
            value=lay["sigma1"],
        )
        parts.append(lay[["mode", "method", "seed", "column", "kind", "value"]])
    if not parts:
        return pd.DataFrame(columns=_VALUE_COLUMNS)
    return pd.concat(parts, ignore_index=True).reindex(columns=_VALUE_COLUMNS)


def format_cell(values: Sequence[float], expected: int, kind: str = "acc") -> str:
    """``mean ± std`` (sample std, ddof = 1) of one cell's per-seed ``values``; fewer than the
    ``expected`` seeds says so (:func:`fastclip.pipeline.results.seeds_mark`, the mark of
    every table), none is :data:`MISSING`. Accuracies get 2 decimals, the bound
    and the norms 4 significant digits.

    >>> format_cell([97.0, 97.2, 97.4], 3), format_cell([97.0, 97.2], 3), format_cell([2.5], 3, "bound")
    ('97.20 ± 0.20', '97.10 ± 0.14 (2 of 3 seeds)', '2.5 (1 of 3 seeds)')
    >>> format_cell([], 3), format_cell([1.0], 1)
    ('missing', '1.00')
    """
    v = np.asarray([x for x in values if x == x], dtype=np.float64)  # NaN: not measured
    if len(v) == 0:
        return MISSING
    mean = f"{v.mean():.2f}" if kind == "acc" else f"{v.mean():.4g}"
    if len(v) > 1:
        std = v.std(ddof=1)
        mean += f" ± {std:.2f}" if kind == "acc" else f" ± {std:.2g}"
    return mean + seeds_mark(len(v), expected)


def mode_tables(
    values: pd.DataFrame, methods: Sequence[str], modes: Sequence[str], seeds: Sequence[int]
) -> dict[str, pd.DataFrame]:
    """One table of strings per mode: a row per method (``methods`` in the registry's order),
    the columns of ``values`` (:func:`report_values`) in its order, each cell
    :func:`format_cell` over the values of ``seeds`` found. A Conv+BN column of mode noBN
    reads :data:`NOT_APPLICABLE` (there is no BN: the block is its conv)."""
    import pandas as pd

    values = values[values["seed"].isin(list(seeds))]
    columns = list(dict.fromkeys(values["column"]))
    kinds = dict(zip(values["column"], values["kind"]))
    cells = {key: g["value"].tolist() for key, g in values.groupby(["mode", "method", "column"], sort=False)}
    tables = {}
    for mode in modes:
        rows = []
        for method in method_order(methods):
            row = {"method": method}
            for c in columns:
                found = cells.get((mode, method, c), [])
                if not found and mode == "noBN" and kinds[c] == "conv+bn":
                    row[c] = NOT_APPLICABLE
                else:
                    row[c] = format_cell(found, len(seeds), "acc" if kinds[c] == "acc" else "value")
            rows.append(row)
        tables[mode] = pd.DataFrame(rows, columns=["method", *columns])
    return tables


def _of_mode(values: pd.DataFrame, mode: str, seeds: Sequence[int] | None) -> pd.DataFrame:
    """The rows of ``values`` of ``mode``, of the grid's ``seeds`` only where given."""
    sub = values[values["mode"] == mode]
    return sub if seeds is None else sub[sub["seed"].isin(list(seeds))]


def _save_panels(fig: plt.Figure, axes: np.ndarray, path: str | os.PathLike) -> plt.Figure:
    """The methods' legend right of the last panel, then the figure written to ``path``."""
    axes[0, -1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    fig.tight_layout()
    save_figure(fig, path)
    logger.info("wrote %s", path)
    return fig


def plot_clean_vs_certified(
    values: pd.DataFrame,
    mode: str,
    path: str | os.PathLike,
    eps: Sequence[float],
    *,
    title: str | None = None,
    seeds: Sequence[int] | None = None,
) -> plt.Figure | None:
    """Clean (x) against certified accuracy (y) of every method of ``mode``, one panel per
    certified radius of ``eps`` found in ``values`` (:func:`report_values`); points are the
    means over seeds with the seeds' std as error bars, labelled by method (and by the number
    of seeds when it is fewer than the grid's ``seeds``, whose values alone are used). Returns
    the (closed) figure, or None, writing nothing, when the mode has no certified accuracy at
    those radii."""
    plt = pyplot()
    sub = _of_mode(values, mode, seeds)
    cert = sub[(sub["attack"] == "certify")]
    found = [e for e in eps if np.isclose(cert["eps"].astype(float), e, rtol=0, atol=1e-9).any()]
    if not found:
        return None
    clean = sub[sub["column"] == CLEAN].groupby("method")["value"].agg(["mean", "std", "count"])
    methods = method_order(sub["method"])
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, axes = plt.subplots(1, len(found), figsize=(4.6 * len(found), 4.2), squeeze=False)
    for ax, e in zip(axes[0], found):
        at = cert[np.isclose(cert["eps"].astype(float), e, rtol=0, atol=1e-9)]
        y = at.groupby("method")["value"].agg(["mean", "std", "count"])
        for j, m in enumerate(methods):
            if m not in y.index or m not in clean.index:
                continue
            xm, xs = clean.loc[m, "mean"], clean.loc[m, "std"]
            ym, ys = y.loc[m, "mean"], y.loc[m, "std"]
            ax.errorbar(
                xm,
                ym,
                xerr=0.0 if math.isnan(xs) else xs,
                yerr=0.0 if math.isnan(ys) else ys,
                fmt="o",
                color=colors[j % len(colors)],
                capsize=3,
                label=m,
            )
            n = min(int(y.loc[m, "count"]), int(clean.loc[m, "count"]))
            label = m if seeds is None or n >= len(seeds) else f"{m} ({n} of {len(seeds)} seeds)"
            ax.annotate(label, (xm, ym), textcoords="offset points", xytext=(5, 4), fontsize=8)
        ax.margins(0.15)  # room for the labels of the outermost points
        ax.set_xlabel("clean accuracy (%)")
        ax.set_ylabel(f"certified L2 accuracy at eps {eps_label(e)} (%)")
        ax.set_title(f"{title + ' - ' if title else ''}mode {mode}, eps {eps_label(e)}", fontsize=10)
        ax.grid(alpha=0.3)
    return _save_panels(fig, axes, path)


def plot_robustness(
    values: pd.DataFrame,
    mode: str,
    path: str | os.PathLike,
    *,
    title: str | None = None,
    seeds: Sequence[int] | None = None,
) -> plt.Figure | None:
    """Accuracy (y) of every method of ``mode`` under each attack of :data:`ROBUSTNESS_ATTACKS`
    found in ``values`` (:func:`report_values`) against the attack's radius (x; at 0 the clean
    accuracy), one panel per attack: a line per method through its means over seeds (only the
    grid's ``seeds`` where given), the seeds' std as error bars. Returns the (closed) figure, or
    None, writing nothing, when the mode has none of those attacks."""
    import pandas as pd

    plt = pyplot()
    sub = _of_mode(values, mode, seeds)
    attacks = [a for a in ROBUSTNESS_ATTACKS if (sub["attack"] == a).any()]
    if not attacks:
        return None
    clean = sub[sub["column"] == CLEAN].assign(eps=0.0)
    methods = method_order(sub["method"])
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, axes = plt.subplots(1, len(attacks), figsize=(4.6 * len(attacks), 4.2), squeeze=False)
    for ax, attack in zip(axes[0], attacks):
        attacked = sub[sub["attack"] == attack]
        at = pd.concat([clean[clean["method"].isin(attacked["method"])], attacked])
        # one value per run and radius: of a radius also run with other parameters (its own
        # table column), the first in the table's order
        at = at.assign(eps=at["eps"].astype(float)).drop_duplicates(["method", "seed", "eps"])
        stats = at.groupby(["method", "eps"])["value"].agg(["mean", "std"])
        for j, m in enumerate(methods):
            if m not in stats.index.get_level_values("method"):
                continue
            st = stats.loc[m]
            ax.errorbar(
                st.index.to_numpy(),
                st["mean"].to_numpy(),
                yerr=st["std"].fillna(0.0).to_numpy(),
                marker="o",
                color=colors[j % len(colors)],
                capsize=3,
                label=m,
            )
        ax.set_xlabel(f"{ATTACK_LABELS[attack]} radius eps (0: clean)")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(f"{title + ' - ' if title else ''}mode {mode}, {ATTACK_LABELS[attack]}", fontsize=10)
        ax.grid(alpha=0.3)
    return _save_panels(fig, axes, path)


_IMAGE_LINK = re.compile(r"!\[([^\]]*)\]\(([^)\s]+\.png)\)")


def publish_targets(report: str | os.PathLike, dest: str | os.PathLike, name: str) -> dict[Path, Path]:
    """What :func:`publish` writes: ``{source: target}`` for the report (``<dest>/<name>.md``)
    and every PNG it links by a name beside it (``<dest>/img/<name>_<png>``); links to files
    that are not there are left out (and left as they are)."""
    report, dest = Path(report), Path(dest)
    targets = {report: dest / f"{name}.md"}
    for _, link in _IMAGE_LINK.findall(report.read_text()):
        src = report.parent / link
        if "/" not in link and src.is_file():
            targets[src] = dest / "img" / f"{name}_{link}"
    return targets


def publish(
    report: str | os.PathLike, dest: str | os.PathLike, name: str, keep: tuple[str, str] | None = None
) -> list[Path]:
    """Copy ``report`` and the PNGs it links into ``dest`` (see :func:`publish_targets`), the
    links rewritten to the copies (``img/<name>_<png>``), each file written atomically.
    ``keep = (start, end)``: the text between these two markers in an earlier copy of the
    report (e.g. prose written there by hand) replaces that between them in the new one.
    Returns the files written, the report last."""
    report = Path(report)
    targets = publish_targets(report, dest, name)
    images = {src.name: dst for src, dst in targets.items() if src != report}
    written = []
    for src, dst in targets.items():
        if src != report:
            data = src.read_bytes()

            def copy(f: IO[bytes], data: bytes = data) -> None:
                f.write(data)

            atomic_write(dst, copy)
            written.append(dst)

    def relink(m: re.Match) -> str:
        dst = images.get(m.group(2))
        return m.group(0) if dst is None else f"![{m.group(1)}](img/{dst.name})"

    text = _IMAGE_LINK.sub(relink, report.read_text())
    if keep is not None and targets[report].is_file():
        start, end = keep
        earlier = targets[report].read_text()
        if all(start in t and end in t.split(start, 1)[1] for t in (earlier, text)):
            kept = earlier.split(start, 1)[1].split(end, 1)[0]
            head, rest = text.split(start, 1)
            text = head + start + kept + end + rest.split(end, 1)[1]
    atomic_write_text(targets[report], text)
    written.append(targets[report])
    return written
