"""The rows and the files of a Lipschitz report (:func:`fastclip.lipschitz_report`).

:class:`LayerNorm` is one measured layer, :class:`LipschitzReport` the table with the
network bound; ``save`` writes it as CSV, Markdown and a bar chart of sigma_1.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastclip.io import atomic_write_text

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
        df = self.to_frame()
        df["sigma1"] = [f"{v:.6g}" for v in df["sigma1"]]
        lines = [
            f"# Lipschitz report: {self.model}",
            "",
            self.summary_line() + ("" if self.bound is None else f" = {self.formula}"),
            "",
            df.to_markdown(index=False),
            "",
        ]
        return "\n".join(lines)

    def save(self, out_dir: str | os.PathLike, stem: str = "lipschitz_report") -> dict[str, Path]:
        """Write ``<stem>.csv``, ``<stem>.md`` and ``<stem>.png`` (bar chart of sigma_1,
        log scale, bars of the layers that enter the bound filled) into ``out_dir``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"csv": out / f"{stem}.csv", "md": out / f"{stem}.md", "png": out / f"{stem}.png"}
        df = self.to_frame()
        df.insert(0, "model", self.model)
        atomic_write_text(paths["csv"], df.to_csv(index=False))
        atomic_write_text(paths["md"], self.to_markdown())
        self._plot(paths["png"])
        return paths

    def _plot(self, path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = [r for r in self.rows if r.sigma1 > 0]
        labels = [f"{r.layer} ({r.kind})" for r in rows]
        longest = max((len(t) for t in labels), default=10)
        fig, ax = plt.subplots(figsize=(max(4.0, 0.3 * len(rows) + 1.5), 3.0 + 0.065 * longest))
        used = [not (r.bound == "-" or r.bound.startswith("in ")) for r in rows]
        ax.bar(
            range(len(rows)),
            [r.sigma1 for r in rows],
            color=["tab:blue" if u else "white" for u in used],
            edgecolor="tab:blue",
        )
        ax.set_yscale("log")
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels(labels, rotation=90, fontsize=7)
        ax.set_ylabel("sigma_1 (log scale)")
        title = self.summary_line()
        ax.set_title(title if len(title) < 90 else title[:87] + "...", fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
