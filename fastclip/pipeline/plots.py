"""PNG figures of trained runs: layer-wise spectral norms and training curves.

Matplotlib with the Agg backend (no display needed); figures are written atomically.

Example::

    from fastclip.pipeline.plots import plot_layer_norms, plot_curves
    plot_layer_norms(summary, "layer_norms.png")          # summary from summarize_layer_norms
    plot_curves({"fastclip": read_event_scalars(run)}, "curves.png")
"""

from __future__ import annotations

import io
import logging
import math
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from fastclip.pipeline.io import atomic_write
from fastclip.pipeline.results import method_order

if TYPE_CHECKING:
    import matplotlib.pyplot as plt
    import pandas as pd

logger = logging.getLogger(__name__)

__all__ = ["plot_layer_norms", "plot_curves", "save_figure", "pyplot", "LSV_PREFIX"]

#: TensorBoard tag prefix of the per-layer sigma_1 curves.
LSV_PREFIX = "train/lsv_"


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (no display needed). Imported on first
    use, not with this module: pyplot costs about 0.4 s and is an optional dependency
    (``fastclip[experiments]``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _log_axis(ax: plt.Axes) -> None:
    """Log-scale y with plain numbers (0.8, 1, 2) instead of 8x10^-1; minor ticks are
    labelled only when the axis spans less than a decade (else they would overlap)."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    ax.set_yscale("log")
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_major_formatter(plain)
    lo, hi = ax.get_ylim()
    if hi / lo < 10:
        ax.yaxis.set_minor_formatter(plain)
    elif hi / lo < 1000:  # label 2 and 5 of each decade only
        ax.yaxis.set_minor_formatter(
            FuncFormatter(
                lambda v, _: (
                    f"{v:g}" if v > 0 and round(v / 10 ** math.floor(math.log10(v))) in (2, 5) else ""
                )
            )
        )
    else:
        ax.yaxis.set_minor_formatter(NullFormatter())
    ax.tick_params(axis="y", which="minor", labelsize=7)


def save_figure(fig: plt.Figure, path: str | os.PathLike, dpi: int = 120) -> None:
    """Render ``fig`` to PNG in memory, write it atomically to ``path`` and close it."""
    plt = pyplot()

    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    finally:
        plt.close(fig)
    atomic_write(path, lambda f: f.write(buf.getvalue()))


def plot_layer_norms(
    summary: pd.DataFrame, path: str | os.PathLike, *, title: str | None = None
) -> plt.Figure:
    """Grouped bar chart of sigma_1 per layer (x) and method (bars), log scale.

    ``summary`` has columns layer, method, mode, sigma1_mean, sigma1_std and clip (as
    :func:`fastclip.pipeline.results.summarize_layer_norms` returns). One panel per mode; error
    bars are the std over seeds; each clip value is a dashed horizontal line.
    Returns the (closed) figure, whose artists hold the plotted numbers.
    """
    plt = pyplot()

    if summary.empty:
        raise ValueError("expected at least one layer in the summary, got an empty table")
    modes = list(dict.fromkeys(summary["mode"]))
    methods = method_order(summary["method"])
    layers = list(dict.fromkeys(summary["layer"]))
    kinds = dict(zip(summary["layer"], summary["kind"])) if "kind" in summary else {}
    labels = [f"{name} ({kinds[name]})" if name in kinds else name for name in layers]
    width = max(6.0, 0.35 * len(layers) * max(1, len(methods)) ** 0.5 + 2)
    fig, axes = plt.subplots(len(modes), 1, figsize=(width, 3.6 * len(modes)), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    bar = 0.8 / len(methods)
    for ax, mode in zip(axes[:, 0], modes):
        sub = summary[summary["mode"] == mode]
        x = np.arange(len(layers))
        for j, method in enumerate(methods):
            rows = sub[sub["method"] == method].set_index("layer").reindex(layers)
            if rows["sigma1_mean"].isna().all():
                continue
            std = rows["sigma1_std"].fillna(0.0).to_numpy()
            ax.bar(
                x - 0.4 + bar * (j + 0.5),
                rows["sigma1_mean"].to_numpy(),
                bar,
                yerr=std,
                label=method,
                color=colors[j % len(colors)],
                capsize=1.5,
                error_kw={"lw": 0.7},
            )
        for c in sorted(set(sub["clip"].dropna())):
            ax.axhline(c, color="k", ls="--", lw=1, label=f"clip = {c:g}")
        _log_axis(ax)
        ax.set_xticks(x, labels, rotation=90, fontsize=7 if len(layers) > 20 else 9)
        ax.set_xlim(-0.6, len(layers) - 0.4)
        ax.set_ylabel(r"$\sigma_1$ (mean $\pm$ std over seeds)")
        ax.set_title(f"{title + ' - ' if title else ''}mode {mode}", fontsize=10)
        ax.grid(axis="y", which="both", alpha=0.3)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.005, 1.0), borderaxespad=0)
    fig.tight_layout()
    save_figure(fig, path)
    logger.info("wrote %s", path)
    return fig


def plot_curves(
    runs: Mapping[str, Mapping[str, tuple[np.ndarray, np.ndarray]]],
    path: str | os.PathLike,
    *,
    clip: Mapping[str, float | None] | None = None,
    acc_tags: Sequence[str] = ("train/acc", "test/acc"),
) -> plt.Figure:
    """Training curves, one row per run: accuracy (left) and per-layer sigma_1 (right).

    ``runs`` maps a label to ``{tag: (steps, values)}`` (from
    :func:`fastclip.pipeline.results.read_event_scalars`). The right panel draws every tag that
    starts with ``train/lsv_`` on a log scale, with the run's clip value (``clip[label]``)
    as a dashed line. A run without such tags gets a note instead of a panel.
    Returns the (closed) figure, whose artists hold the plotted numbers.
    """
    plt = pyplot()

    if not runs:
        raise ValueError("expected at least one run to plot, got none")
    fig, axes = plt.subplots(len(runs), 2, figsize=(12, 3.4 * len(runs)), squeeze=False)
    # one colour per layer name across all runs, so rows compare at a glance
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    all_layers = sorted({t for scalars in runs.values() for t in scalars if t.startswith(LSV_PREFIX)})
    color = {t: palette[i % len(palette)] for i, t in enumerate(all_layers)}
    for (label, scalars), (ax_acc, ax_sv) in zip(runs.items(), axes):
        found = [t for t in acc_tags if t in scalars]
        for tag in found:
            steps, values = scalars[tag]
            ax_acc.plot(steps, values, marker="o" if len(steps) < 30 else None, ms=3, label=tag)
        if found:
            ax_acc.legend(fontsize=8)
        else:
            ax_acc.text(
                0.5,
                0.5,
                f"no {' / '.join(acc_tags)} scalars",
                ha="center",
                va="center",
                transform=ax_acc.transAxes,
            )
        ax_acc.set_title(f"{label}: accuracy", fontsize=10)
        ax_acc.set_xlabel("step")
        ax_acc.grid(alpha=0.3)

        lsv = sorted(t for t in scalars if t.startswith(LSV_PREFIX))
        for tag in lsv:
            steps, values = scalars[tag]
            ax_sv.plot(steps, values, lw=1, label=tag[len(LSV_PREFIX) :], color=color[tag])
        c = (clip or {}).get(label)
        if c is not None and lsv:
            ax_sv.axhline(c, color="k", ls="--", lw=1, label=f"clip = {c:g}")
        if lsv:
            positive = all((scalars[t][1] > 0).all() for t in lsv)
            if positive:
                _log_axis(ax_sv)
            ax_sv.legend(fontsize=7, ncol=max(1, math.ceil(len(lsv) / 12)))
        else:
            ax_sv.text(
                0.5, 0.5, f"no {LSV_PREFIX}* scalars", ha="center", va="center", transform=ax_sv.transAxes
            )
        ax_sv.set_title(f"{label}: per-layer $\\sigma_1$", fontsize=10)
        ax_sv.set_xlabel("step")
        ax_sv.grid(alpha=0.3, which="both")
    fig.tight_layout()
    save_figure(fig, path)
    logger.info("wrote %s", path)
    return fig


def plot_epochs(
    metrics: pd.DataFrame,
    path: str | os.PathLike,
    *,
    reference: pd.DataFrame | None = None,
    reference_label: str = "reference",
    title: str | None = None,
) -> plt.Figure:
    """Two panels per epoch of one run's ``metrics.csv``: test (and train) accuracy, and the
    ``exact/<layer>`` sigma_1 columns (``--exact-norms``), log scale. ``reference``, a
    frame with ``epoch`` and some of ``test_acc`` / ``train_acc``, is drawn beside (e.g. the
    epochs another code printed).

    Example::

        plot_epochs(pd.read_csv("metrics.csv"), "epochs.png")
    """
    plt = pyplot()

    fig, (acc, sig) = plt.subplots(1, 2, figsize=(11, 4))
    for col, style in (("test_acc", "-"), ("train_acc", ":")):
        acc.plot(
            metrics["epoch"], metrics[col], style, marker=".", color="C0", label=f"ours, {col.split('_')[0]}"
        )
        if reference is not None and col in reference:
            acc.plot(
                reference["epoch"],
                reference[col],
                style,
                marker="x",
                color="C3",
                label=f"{reference_label}, {col.split('_')[0]}",
            )
    acc.set_xlabel("epoch")
    acc.set_ylabel("accuracy (%)")
    acc.legend(fontsize=8)
    acc.grid(alpha=0.3)
    exact = [c for c in metrics.columns if c.startswith("exact/")]
    for i, col in enumerate(exact):
        sig.plot(metrics["epoch"], metrics[col], marker=".", color=f"C{i}", label=col.split("/", 1)[1])
    sig.set_yscale("log")
    sig.set_xlabel("epoch")
    sig.set_ylabel("exact sigma_1 after the epoch")
    if exact:
        sig.legend(fontsize=8)
    sig.grid(alpha=0.3, which="both")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path)
    return fig
