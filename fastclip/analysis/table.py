"""The rows and the files of a Lipschitz report (:func:`fastclip.lipschitz_report`).

:class:`LayerNorm` is one measured layer, :class:`LipschitzReport` the table with the
network bound (``to_markdown`` needs nothing beyond the library; ``to_frame`` needs pandas;
the ``fastclip-lipschitz`` command writes the files).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["LayerNorm", "LipschitzReport"]


@dataclass
class LayerNorm:
    """One row of the report: ``layer`` (wrapper-free name), ``kind`` (conv, linear, bn,
    conv+bn, normalize, avgpool, maxpool, activation), ``input_shape`` (per sample),
    ``sigma1`` (exact operator norm, or the Lipschitz constant of a max pool /
    activation) and ``bound``: where it enters the network bound ("product",
    "block <name>: branch" / "shortcut", "in <composition>" when its composition enters
    instead, "-" when no network bound is given)."""

    layer: str
    kind: str
    input_shape: tuple[int, ...]
    sigma1: float
    bound: str = "-"

    def as_row(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "kind": self.kind,
            "input_shape": "x".join(map(str, self.input_shape)),
            "sigma1": self.sigma1,
            "bound": self.bound,
        }


@dataclass
class LipschitzReport:
    """Every layer's sigma_1 and the network's Lipschitz upper bound (``bound``; None
    with a one-line ``reason`` when the architecture has no bound rule here).
    ``formula`` spells the bound out in layer names."""

    model: str
    input_shape: tuple[int, ...]
    rows: list[LayerNorm] = field(default_factory=list)
    bound: float | None = None
    reason: str | None = None
    formula: str = ""

    def to_frame(self):
        # Lazy, as matplotlib below: `import fastclip` loads this module, and only the
        # report writers need pandas and matplotlib, which take longer to import than torch.
        import pandas as pd

        return pd.DataFrame(
            [r.as_row() for r in self.rows], columns=["layer", "kind", "input_shape", "sigma1", "bound"]
        )

    def summary_line(self) -> str:
        shape = "x".join(map(str, self.input_shape))
        if self.bound is None:
            return f"{self.model} at {shape}: no network bound ({self.reason})"
        return f"{self.model} at {shape}: Lipschitz upper bound (L2) {self.bound:.6g}"

    def to_markdown(self) -> str:
        head = ["layer", "kind", "input_shape", "sigma1", "bound"]
        table = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        for r in self.rows:
            row = r.as_row()
            row["sigma1"] = f"{r.sigma1:.6g}"
            table.append("| " + " | ".join(str(row[h]) for h in head) + " |")
        lines = [
            f"# Lipschitz report: {self.model}",
            "",
            self.summary_line() + ("" if self.bound is None else f" = {self.formula}"),
            "",
            *table,
            "",
        ]
        return "\n".join(lines)
