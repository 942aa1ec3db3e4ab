"""The summary sentences of a mode's results table, made from the numbers the table shows.

Prose written by hand beside a table drifts from it when the table is remade; these sentences
are remade with it. :func:`summary_sentences` reads the per-seed values of one mode
(``fastclip.pipeline.report.report_values``), takes each method's mean over the grid's seeds
as the table rounds it, and says which method has the smallest network bound L, the highest
certified accuracy at each radius, the highest and lowest clean accuracy, which keeps the most
under PGD L-inf, the range of the PGD L2 cost (clean minus attacked accuracy, in points) and
the largest cost of CW (``up to N iterations``: advertorch's early abort may stop sooner).
Methods that tie at the table's rounding are named together.

Example::

    >>> import pandas as pd
    >>> values = pd.DataFrame({
    ...     "mode": "wBN", "method": ["orig", "fastclip", "orig", "fastclip"], "seed": 1,
    ...     "column": ["clean acc (%)", "clean acc (%)", "network bound L", "network bound L"],
    ...     "kind": ["acc", "acc", "bound", "bound"], "attack": None, "eps": None,
    ...     "value": [93.0, 82.0, 143.4, 2.004]})
    >>> for line in summary_sentences(values, "wBN", [1]):
    ...     print(line)
    fastclip has the smallest network bound L (2.004; the largest: orig, 143.4).
    orig has the highest clean accuracy (93.00 %), fastclip the lowest (82.00 %).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from fastclip.pipeline.report import ATTACK_LABELS, BOUND, CLEAN, eps_label
from fastclip.pipeline.results import method_order

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["summary_sentences", "cw_iterations_text"]


def cw_iterations_text(max_iter: int) -> str:
    """How a report describes CW's iteration budget: a cap, since advertorch's early abort
    stops an image's search once it no longer improves.

    >>> cw_iterations_text(100)
    'up to 100 iterations'
    """
    return f"up to {max_iter} iterations"


def _names(methods: Sequence[str]) -> str:
    return methods[0] if len(methods) == 1 else ", ".join(methods[:-1]) + " and " + methods[-1]


def _extreme(means: dict[str, float], digits: int | None, lowest: bool) -> tuple[list[str], float]:
    """The methods with the lowest (or highest) mean as the table rounds it, and that mean."""
    shown = {m: (round(v, digits) if digits is not None else float(f"{v:.4g}")) for m, v in means.items()}
    best = min(shown.values()) if lowest else max(shown.values())
    return [m for m in means if shown[m] == best], best


def summary_sentences(
    values: pd.DataFrame, mode: str, seeds: Sequence[int], cw_max_iter: int | None = None
) -> list[str]:
    """The sentences summarising ``mode``'s table (see the module's description): each claim
    computed from the means over ``seeds`` of ``values`` (``report_values``' long table);
    ``cw_max_iter``: CW's iteration cap, named in its sentence. A claim needs two methods
    with a value; a table with fewer gets no sentences."""
    sub = values[(values["mode"] == mode) & values["seed"].isin(list(seeds))]
    sub = sub[sub["value"].notna()]
    means = sub.groupby(["column", "method"], sort=False)["value"].mean()
    order = method_order(sub["method"])

    def of(column: str) -> dict[str, float]:
        if column not in means.index.get_level_values(0):
            return {}
        col = means.loc[column]
        return {m: float(col[m]) for m in order if m in col.index}

    out = []
    bound = of(BOUND)
    if len(bound) > 1:
        low, v = _extreme(bound, None, lowest=True)
        high, w = _extreme(bound, None, lowest=False)
        out.append(
            f"{_names(low)} {'has' if len(low) == 1 else 'have'} the smallest network bound L ({v:.4g}; "
            f"the largest: {_names(high)}, {w:.4g})."
        )
    columns = list(dict.fromkeys(sub["column"]))
    attack_of = dict(zip(sub["column"], sub["attack"]))
    eps_of = dict(zip(sub["column"], sub["eps"]))
    certified = [c for c in columns if attack_of.get(c) == "certify"]
    for c in certified:
        found = of(c)
        if len(found) > 1:
            top, v = _extreme(found, 2, lowest=False)
            verb = "has" if len(top) == 1 else "have"
            out.append(
                f"{_names(top)} {verb} the highest certified L2 accuracy at eps {eps_label(eps_of[c])} "
                f"({v:.2f} %)."
            )
    clean = of(CLEAN)
    if len(clean) > 1:
        top, v = _extreme(clean, 2, lowest=False)
        low, w = _extreme(clean, 2, lowest=True)
        out.append(
            f"{_names(top)} {'has' if len(top) == 1 else 'have'} the highest clean accuracy ({v:.2f} %), "
            f"{_names(low)} the lowest ({w:.2f} %)."
        )
    for c in (c for c in columns if attack_of.get(c) == "pgd"):
        found = of(c)
        if len(found) > 1:
            top, v = _extreme(found, 2, lowest=False)
            out.append(
                f"Under {ATTACK_LABELS['pgd']} at eps {eps_label(eps_of[c])}, {_names(top)} "
                f"{'keeps' if len(top) == 1 else 'keep'} the most ({v:.2f} %)."
            )
    l2 = [c for c in columns if attack_of.get(c) == "pgdl2"]
    costs = [clean[m] - a for c in l2 for m, a in of(c).items() if m in clean]
    if len(costs) > 1:
        radii = ", ".join(eps_label(eps_of[c]) for c in l2)
        out.append(
            f"{ATTACK_LABELS['pgdl2']} at eps {radii} costs the models {min(costs):.1f}-{max(costs):.1f} "
            "points of clean accuracy."
        )
    for c in (c for c in columns if attack_of.get(c) == "cw"):
        cost = {m: clean[m] - a for m, a in of(c).items() if m in clean}
        if len(cost) > 1:
            top, v = _extreme(cost, 1, lowest=False)
            budget = f" ({cw_iterations_text(cw_max_iter)})" if cw_max_iter is not None else ""
            out.append(f"CW{budget} costs at most {v:.1f} points of clean accuracy ({_names(top)}).")
    return out
