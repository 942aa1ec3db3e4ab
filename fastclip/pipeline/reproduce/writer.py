"""The reproduction report (``reproduction_report.md`` beside the runs) and the figures it shows.

:func:`write_report` writes the Markdown: the command that made it and the date, the settings,
one table per mode (clean, adversarial and certified accuracy, the network bound L, sigma_1 of
every layer; the mode's figures below it), a marked place for the comparison with the paper,
wall time per method, the other figures. :func:`grid_values` reads the numbers it shows from
the chain's CSVs; :func:`clean_vs_certified_paths` and :func:`robustness_paths` name the
figures the plots step draws from them; :func:`report_command` reads back the command a report
was made by.

The report states what its runs are: the training settings are those their config.json record
(:func:`runs_settings`; runs that disagree are said to), the numbers those of each run's best
checkpoint, named with the rule that chose it, a result measured on a checkpoint its run has
since replaced is left out and named (:func:`fastclip.pipeline.provenance.stale_rows`), and the
sentences under each table are made from its numbers
(:func:`fastclip.pipeline.reproduce.summary.summary_sentences`).
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from fastclip.pipeline.io import atomic_write_text
from fastclip.pipeline.jobs import expand
from fastclip.pipeline.methods import MODES, available
from fastclip.pipeline.provenance import describe_kind, of_kind, stale_rows
from fastclip.pipeline.report import BOUND, NOT_APPLICABLE, ROBUSTNESS_ATTACKS, mode_tables, report_values
from fastclip.pipeline.reproduce.settings import STEPS, Settings
from fastclip.pipeline.reproduce.summary import cw_iterations_text, summary_sentences
from fastclip.pipeline.results import method_order, read_config
from fastclip.pipeline.training.metrics import MetricsError, read_metrics

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "REPORT",
    "RESULTS_HEADING",
    "PLOT_EPS",
    "SIGMA_METHOD",
    "KEEP_START",
    "KEEP_END",
    "report_command",
    "GridValues",
    "grid_values",
    "runs_settings",
    "plot_eps",
    "clean_vs_certified_paths",
    "robustness_paths",
    "write_report",
]

REPORT = "reproduction_report.md"
#: The heading of the report's tables (its mean/seed description follows in parentheses); the
#: publish step copies what stands under it into results.md.
RESULTS_HEADING = "## Results per mode"
#: Certified radii the clean-vs-certified figure shows (those of them the grid measured; all of
#: the grid's L2 radii when it measured none of them): the paper's 36/255 and 0.1.
PLOT_EPS = (36 / 255, 0.1)
#: The fastclip run of the first seed gets a figure of its own per mode (sigma_fastclip_<mode>.png).
SIGMA_METHOD = "fastclip"
#: Markers of the hand-written part of a published report, kept when it is published again.
KEEP_START, KEEP_END = "<!-- paper-comparison -->", "<!-- /paper-comparison -->"


def report_command(report: Path) -> str | None:
    """The command a report names on its "Made by" line (:func:`write_report`), or None."""
    for line in report.read_text().splitlines()[:5]:
        m = re.match(r"Made by `(.*)` on ", line)
        if m:
            return m.group(1)
    return None


def _grid_runs_only(df: pd.DataFrame, runs: list) -> pd.DataFrame:
    keep = {(r.method, r.mode, r.seed) for r in runs}
    return df[[k in keep for k in zip(df["method"], df["mode"], df["seed"])]]


class GridValues(NamedTuple):
    """What :func:`grid_values` found: the values, the other numbers of test images, the stale
    results left out (one line each) and the rules that chose the measured checkpoints."""

    values: pd.DataFrame
    other: list[int]
    stale: list[str]
    rules: set[str]
    attacks: pd.DataFrame


def _current(df: pd.DataFrame, runs: list, source: Path, stale: list[str]) -> pd.DataFrame:
    """The rows of ``df`` (read from ``source``) of the runs' best checkpoints as they are now;
    a line per stale (run, file) added to ``stale``."""
    df = of_kind(_grid_runs_only(df, runs), "best")
    mask, reasons = stale_rows(df, runs, source)
    stale += reasons
    return df[~mask]


def grid_values(parent: Path, runs: list, s: Settings) -> GridValues:
    """The report's values of the grid's finished runs (``fastclip.pipeline.report.report_values``),
    of their best checkpoints as they are now (a stale result is left out and named), and the
    other numbers of test images found in attack_results_runs.csv (an earlier run's results
    stay there; the report shows this reproduction's ``--n-examples``)."""
    import pandas as pd

    attacks, other, stale, rules = pd.DataFrame(), [], [], set()
    runs_csv = parent / "attack_results_runs.csv"
    if runs_csv.exists():
        attacks = _current(pd.read_csv(runs_csv), runs, runs_csv, stale)
        rules |= set(attacks["chosen_by"])
        if s.n_examples is not None and (attacks["n_examples"] == s.n_examples).any():
            other = sorted(set(attacks["n_examples"]) - {s.n_examples})
            attacks = attacks[attacks["n_examples"] == s.n_examples]
    norms_csv = parent / "layer_norms_runs.csv"
    norms = None
    if norms_csv.exists():
        norms = _current(pd.read_csv(norms_csv), runs, norms_csv, stale)
        rules |= set(norms["chosen_by"])
    return GridValues(report_values(attacks, norms), other, stale, rules, attacks)


#: The training settings the report states, as config.json names them, and how it words one value.
_RUN_SETTINGS = {
    "epochs": "{} epoch(s)",
    "train_subset": "train subset {}",
    "test_subset": "test subset {}",
    "batch_size": "batch size {}",
    "augment": "augmentation {}",
}
_UNSET = {"train_subset": "all", "test_subset": "all", "batch_size": "default"}


def _recorded(attacks: pd.DataFrame, attack: str, key: str) -> list[str]:
    """The values of ``key`` in the ``params`` of the ``attack`` rows, in increasing order."""
    found = set()
    for params in attacks.loc[attacks["attack"] == attack, "params"].astype(str):
        m = re.search(rf"(?:^|\s){key}=(\S+)", params)
        if m:
            found.add(m.group(1))
    return sorted(found, key=lambda v: (float(v) if re.fullmatch(r"[-+.\deE]+", v) else float("inf"), v))


def _eps_of(attacks: pd.DataFrame, names: tuple[str, ...], fmt: str) -> str:
    eps = sorted(set(attacks.loc[attacks["attack"].isin(names), "eps"].dropna().astype(float)))
    return ", ".join(format(e, fmt) for e in eps)


def attack_settings(attacks: pd.DataFrame, s: Settings) -> tuple[str, int | None]:
    """The report's line on the attacks, as the results it shows record them (their
    ``params``), not as the flags of the command writing it asked; and CW's iteration cap
    (None when CW's results record none, or several). With no results yet, the flags'."""
    if attacks.empty:
        text = (
            f"{', '.join(s.attacks)} asked for (no results yet) on the first {s.n_examples or 'all'} "
            f"test images; PGD L-inf eps {', '.join(f'{e:g}' for e in s.eps)} with {s.pgd_steps} steps; "
            f"CW {cw_iterations_text(s.cw_max_iter)}; L2 eps (certify, pgdl2) "
            f"{', '.join(f'{e:.4g}' for e in s.l2_eps)}"
        )
        return text, None
    names = [a for a in ("pgd", "cw", "pgdl2", "certify") if (attacks["attack"] == a).any()]
    images = sorted(set(attacks["n_examples"].astype(int)))
    parts = [f"{', '.join(names)} on the first {' / '.join(map(str, images))} test images"]
    if "pgd" in names:
        steps = " / ".join(_recorded(attacks, "pgd", "n_steps")) or "?"
        parts.append(f"PGD L-inf eps {_eps_of(attacks, ('pgd',), 'g')} with {steps} steps")
    cw = _recorded(attacks, "cw", "max_iter") if "cw" in names else []
    if cw:
        parts.append(f"CW up to {' / '.join(cw)} iterations")
    if "pgdl2" in names or "certify" in names:
        steps = " / ".join(_recorded(attacks, "pgdl2", "n_steps"))
        parts.append(
            f"L2 eps (certify, pgdl2) {_eps_of(attacks, ('pgdl2', 'certify'), '.4g')}"
            + (f", PGD L2 with {steps} steps" if steps else "")
        )
    return "; ".join(parts), int(cw[0]) if len(cw) == 1 and cw[0].isdigit() else None


def runs_settings(runs: list) -> str:
    """The training settings of ``runs`` as their config.json record them (not the flags of
    the command writing the report), e.g. ``1 epoch(s), train subset 256, ...``; a setting the
    runs disagree on lists each value with its number of runs.

    A report written over a finished grid by a command with other flags (``--epochs 2`` over
    1-epoch runs) states what the runs were trained with."""
    parts = []
    for key, words in _RUN_SETTINGS.items():
        found: dict[str, int] = {}
        for run in runs:
            cfg = read_config(run)
            value = cfg.get(key, _UNSET.get(key)) if cfg else "unknown (no config.json)"
            text = _UNSET.get(key, "none") if value is None else str(value)
            found[text] = found.get(text, 0) + 1
        if len(found) == 1:
            parts.append(words.format(next(iter(found))))
        elif found:
            each = ", ".join(f"{v} in {n} run(s)" for v, n in found.items())
            parts.append(f"{key.replace('_', ' ')} that differ between the runs ({each})")
    return ", ".join(parts)


def plot_eps(s: Settings) -> list[float]:
    found = [e for e in PLOT_EPS if any(abs(e - x) < 1e-9 for x in s.l2_eps)]
    return found or list(s.l2_eps)


def clean_vs_certified_paths(parent: Path, values: pd.DataFrame, s: Settings) -> dict[str, Path]:
    """``clean_vs_certified_<mode>.png`` of every mode with certified accuracy at a radius of
    :func:`plot_eps`, as ``{mode: path}`` (the plots step's first figures)."""
    eps = plot_eps(s)
    cert = values[values["attack"] == "certify"]
    return {
        m: parent / f"clean_vs_certified_{m}.png"
        for m in dict.fromkeys(cert["mode"])
        if any(abs(float(e) - x) < 1e-9 for e in cert.loc[cert["mode"] == m, "eps"] for x in eps)
    }


def robustness_paths(parent: Path, values: pd.DataFrame) -> dict[str, Path]:
    """``robustness_<mode>.png`` of every mode with PGD (L-inf or L2) results, as ``{mode: path}``."""
    attacked = values[values["attack"].isin(ROBUSTNESS_ATTACKS)]
    return {m: parent / f"robustness_{m}.png" for m in dict.fromkeys(attacked["mode"])}


def _figure(parent: Path, name: str, alt: str) -> list[str]:
    return [f"![{alt}]({name})", ""] if (parent / name).exists() else []


def _by_mode_and_method(t: pd.DataFrame) -> pd.DataFrame:
    """Rows in the order of the paper's tables: modes as MODES lists them, methods as registered."""
    order = {m: i for i, m in enumerate([*MODES, *method_order(t["method"].unique())])}
    return t.sort_values(["mode", "method"], key=lambda c: c.map(order))


def write_report(
    parent: Path, runs: list, s: Settings, args: argparse.Namespace, path: Path, command: str
) -> list[str]:
    """The Markdown report: the command that made it and the date, settings (the runs' own,
    :func:`runs_settings`), one table per mode (clean, adversarial and certified accuracy, the
    network bound L, sigma_1 of every layer; its summary sentences and the mode's figures below
    it), a marked place for the comparison with the paper, wall time per method, the remaining
    figures. Returns the stale results it left out, one line each."""
    import pandas as pd

    modes, methods = expand(s.modes, MODES, "mode"), expand(s.methods, available(), "method")
    seeds = list(s.seeds)
    lines = [
        f"# SimpleConv on {args.dataset}: reproduction report",
        "",
        f"Made by `{command}` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
        + (
            ""
            if set(args.steps) == set(STEPS)
            else f" (this report written by a run of its steps {' '.join(args.steps)})"
        )
        + ".",
        "",
        f"- grid: methods {' '.join(methods)}, modes {' '.join(modes)}, seeds "
        f"{' '.join(map(str, seeds))}; {len(runs)} of {len(methods) * len(modes) * len(seeds)} runs finished",
        f"- training (as the runs' config.json record it): {runs_settings(runs) or 'no finished runs'}",
    ]
    values, other, stale, rules, attacks = grid_values(parent, runs, s)
    attack_text, cw_iter = attack_settings(attacks, s)
    lines += [f"- attacks (as the results below record them): {attack_text}", ""]
    if other:
        lines += [
            f"(Attack results on {', '.join(map(str, other))} images from earlier runs are in "
            f"attack_results_runs.csv; this report shows the {s.n_examples}-image ones.)",
            "",
        ]
    if not values.empty:
        tables = mode_tables(values, methods, modes, seeds)
        layers = [c for c in tables[modes[0]].columns if c.startswith("sigma_1 ")]
        if len(seeds) > 1:
            head = f"mean ± std over seeds {' '.join(map(str, seeds))}"
            how = (
                "Each cell: mean ± sample std (ddof = 1) over the seeds; a cell holding fewer seeds than "
                f"the grid's {len(seeds)} says how many (e.g. `({len(seeds) - 1} of {len(seeds)} seeds)`)"
            )
        else:
            head, how = f"seed {seeds[0]}", f"Each cell: the value of seed {seeds[0]}"
        lines += [
            f"{RESULTS_HEADING} ({head})",
            "",
            f"{how}; a value not measured reads `missing`. Accuracies in % on the first "
            f"{s.n_examples or 'all'} test images, the same images for every model. Every number "
            f"measures each run's {describe_kind('best', rules)}.",
            "",
        ]
        if stale:
            lines += [
                "Left out as stale (measured on a checkpoint the run has replaced since; rerun the "
                "attack and norms steps):",
                "",
                *(f"- {reason}" for reason in stale),
                "",
            ]
        for mode in modes:
            lines += [f"### {mode}", "", tables[mode].to_markdown(index=False), ""]
            said = summary_sentences(values, mode, seeds, cw_iter)
            lines += [f"Summary (made from this table): {' '.join(said)}", ""] if said else []
            lines += _figure(parent, f"clean_vs_certified_{mode}.png", f"clean vs certified accuracy, {mode}")
            lines += _figure(parent, f"robustness_{mode}.png", f"accuracy under attack, {mode}")
            lines += _figure(parent, f"sigma_fastclip_{mode}.png", f"sigma_1 curves of fastclip, {mode}")
        lines += [
            "Notes:",
            "",
            "- certified L2: the share of the test images whose logit margin exceeds sqrt(2) L eps, "
            "with L the network's Lipschitz bound measured from the trained layers (attack.py "
            "--attack certify).",
            f"- {BOUND}: that bound, the product of the measured norms of the trained model's layers "
            "(fastclip.lipschitz_report, the input normalisation included).",
        ]
        if cw_iter is not None:
            lines.append(
                f"- CW L2: Carlini-Wagner, {cw_iterations_text(cw_iter)} per image (advertorch's "
                "early abort stops a search that no longer improves)."
            )
        if layers:
            lines.append(
                "- sigma_1 columns: the exact-grade largest singular value of each layer of the trained "
                "model (the checkpoint above, eval mode) at its input size, by compute_trained_SVs.py: "
                "(conv) the convolution alone, (Conv+BN) the convolution composed with its batch norm "
                "(running statistics; in clipBN the clipped one), (linear) the dense layer. "
                f"In noBN there is no batch norm: the block is its convolution, whose sigma_1 is the "
                f"(conv) column, so its (Conv+BN) cells read `{NOT_APPLICABLE}`."
            )
        lines.append("")
    lines += [
        "## Comparison with the paper",
        "",
        KEEP_START,
        "(to be written: what the paper reports for SimpleConv beside the tables above)",
        KEEP_END,
        "",
    ]
    rows = []
    for run in runs:
        metrics = pd.DataFrame(read_metrics(run.path / "metrics.csv"))  # MetricsError: one line
        if metrics.empty:
            raise MetricsError(f"{run.path / 'metrics.csv'} is missing or empty (rerun the train step)")
        rows.append(
            {
                "method": run.method,
                "mode": run.mode,
                # the median epoch: a run paused, or sharing the machine with other work for a
                # while, has a few slow epochs that a mean would carry into the table
                "s_per_epoch": metrics["wall_time"].median(),
                "final_test_acc": metrics["test_acc"].iloc[-1],
            }
        )
    if rows:
        t = (
            pd.DataFrame(rows)
            .groupby(["mode", "method"], sort=False)
            .agg(
                s_per_epoch=("s_per_epoch", "mean"),
                final_test_acc=("final_test_acc", "mean"),
                runs=("s_per_epoch", "size"),
            )
            .reset_index()
        )
        t = _by_mode_and_method(t)
        lines += [
            "## Wall time per method (training, seconds per epoch: each run's median epoch, mean over seeds)",
            "",
            "final_test_acc: training's test accuracy after the last epoch (on each run's test "
            "subset, above), mean over the runs.",
            "",
            t.round(2).to_markdown(index=False),
            "",
        ]
    figures = [p for p in [parent / "layer_norms.png", *sorted(parent.glob("curves_*.png"))] if p.exists()]
    if figures:
        lines += ["## Figures", ""] + [f"![{p.stem}]({p.name})" for p in figures] + [""]
    atomic_write_text(path, "\n".join(lines))
    return stale
