"""fastclip.pipeline.report: the per-mode tables of the reproduction report on a hand-made grid (a
missing seed, a missing cell, a mode without BN), the clean-vs-certified figure, publishing."""

from __future__ import annotations

import doctest

import numpy as np
import pandas as pd
import pytest

import fastclip.pipeline.report
from fastclip.pipeline.report import (
    BOUND,
    CLEAN,
    MISSING,
    NOT_APPLICABLE,
    format_cell,
    mode_tables,
    plot_clean_vs_certified,
    plot_robustness,
    publish,
    publish_targets,
    report_values,
)

SEEDS = [1, 10, 100]
CERT = 36 / 255


def attack_rows(method: str, mode: str, seed: int, clean: float, cw: bool = True) -> list[dict]:
    """The rows collect_attack_results.py writes for one run: PGD at 0.02, CW, certify at two radii."""
    base = {"model": "SimpleConv", "dataset": "mnist", "mode": mode, "method": method, "seed": seed}
    base.update(n_examples=1000, clean_acc=clean)
    rows = [dict(base, attack="pgd", eps=0.02, params="eps=0.02 steps=50", adv_acc=clean - 10)]
    if cw:
        rows.append(dict(base, attack="cw", eps=np.nan, params="c=0.02", adv_acc=clean - 20))
    for e, drop in ((0.1, 30), (CERT, 40)):
        rows.append(
            dict(base, attack="certify", eps=e, params=f"eps={e}", adv_acc=clean - drop, lipschitz=seed + 0.5)
        )
    return rows


@pytest.fixture
def grid():
    """orig and fastclip in wBN and noBN, seeds 1 10 100, except: fastclip noBN has no seed 100
    at all, and orig wBN seed 10 has no CW result."""
    rows, layers = [], []
    for mode in ("wBN", "noBN"):
        for method in ("fastclip", "orig"):  # not the registry's order
            for seed in SEEDS:
                if (method, mode, seed) == ("fastclip", "noBN", 100):
                    continue
                clean = 90 + seed / 100 + (mode == "noBN")
                rows += attack_rows(method, mode, seed, clean, cw=(method, mode, seed) != ("orig", "wBN", 10))
                names = [("conv1", "conv+bn"), ("conv1.conv", "conv"), ("fc1", "linear")]
                for layer, kind in names if mode == "wBN" else names[1:]:
                    layers.append(
                        dict(
                            method=method,
                            mode=mode,
                            seed=seed,
                            layer=layer,
                            kind=kind,
                            sigma1=1 + seed / 1000,
                        )
                    )
    return pd.DataFrame(rows), pd.DataFrame(layers)


def test_tables_one_per_mode_with_counted_seeds_and_missing_cells(grid):
    runs, layers = grid
    values = report_values(runs, layers)
    tables = mode_tables(values, ["fastclip", "orig", "gouk"], ["wBN", "noBN"], SEEDS)
    assert list(tables) == ["wBN", "noBN"]
    expected_columns = [
        "method",
        CLEAN,
        "PGD Linf 0.02",
        "CW L2",
        "certified L2 0.1",
        "certified L2 0.1412 (36/255)",
        BOUND,
        "sigma_1 conv1.conv (conv)",
        "sigma_1 conv1 (Conv+BN)",
        "sigma_1 fc1 (linear)",
    ]
    for t in tables.values():
        assert list(t.columns) == expected_columns
        assert list(t["method"]) == ["orig", "fastclip", "gouk"]  # the registry's order
    wbn = tables["wBN"].set_index("method")
    clean = np.array([90.01, 90.10, 91.00])
    assert wbn.loc["orig", CLEAN] == f"{clean.mean():.2f} ± {clean.std(ddof=1):.2f}" == "90.37 ± 0.55"
    assert wbn.loc["orig", "certified L2 0.1412 (36/255)"] == f"{clean.mean() - 40:.2f} ± 0.55"
    # orig wBN seed 10 lost its CW result: that cell averages seeds 1 and 100 and says so
    cw = np.array([90.01, 91.00]) - 20
    assert wbn.loc["orig", "CW L2"] == f"{cw.mean():.2f} ± {cw.std(ddof=1):.2f} (2 of 3 seeds)"
    assert wbn.loc["fastclip", "CW L2"].endswith("± 0.55")
    bound = np.array([1.5, 10.5, 100.5])
    assert wbn.loc["fastclip", BOUND] == f"{bound.mean():.4g} ± {bound.std(ddof=1):.2g}" == "37.5 ± 55"
    assert wbn.loc["fastclip", "sigma_1 conv1 (Conv+BN)"] == "1.037 ± 0.055"
    # gouk is in the grid but has no result: every cell says so
    assert set(wbn.loc["gouk"]) == {MISSING}

    nobn = tables["noBN"].set_index("method")
    # fastclip noBN seed 100 is missing everywhere: every cell is labelled
    assert all(c.endswith("(2 of 3 seeds)") for c in nobn.loc["fastclip"].drop("sigma_1 conv1 (Conv+BN)"))
    assert nobn.loc["fastclip", CLEAN] == "91.06 ± 0.06 (2 of 3 seeds)"
    # no BN in noBN: the Conv+BN map is the conv, not a missing measurement
    assert nobn.loc["orig", "sigma_1 conv1 (Conv+BN)"] == NOT_APPLICABLE
    assert nobn.loc["gouk", "sigma_1 conv1 (Conv+BN)"] == NOT_APPLICABLE
    assert nobn.loc["gouk", CLEAN] == MISSING


def test_a_seed_outside_the_grid_is_not_averaged(grid):
    runs, layers = grid
    extra = pd.DataFrame(attack_rows("orig", "wBN", 7, 10.0))
    values = report_values(pd.concat([runs, extra], ignore_index=True), layers)
    wbn = mode_tables(values, ["orig"], ["wBN"], SEEDS)["wBN"]
    assert wbn.loc[0, CLEAN] == "90.37 ± 0.55"


def test_format_cell_single_seed_grid_and_nan():
    assert format_cell([97.123], 1) == "97.12"  # a one-seed grid: no std, nothing missing
    assert format_cell([float("nan"), 97.0], 2) == "97.00 (1 of 2 seeds)"
    assert format_cell([1.23456, 1.23466], 2, "bound") == "1.235 ± 7.1e-05"


def test_clean_vs_certified_plot(grid, tmp_path):
    import matplotlib.image

    runs, layers = grid
    values = report_values(runs, layers)
    out = tmp_path / "clean_vs_certified_wBN.png"
    fig = plot_clean_vs_certified(values, "wBN", out, [CERT, 0.1])
    image = matplotlib.image.imread(out)
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 600  # two panels side by side
    first = fig.axes[0]
    assert "36/255" in first.get_ylabel() and first.get_legend() is None
    # one point per method, at its means over seeds; orig first (the registry's order)
    points = [tuple(line.get_xydata()[0]) for line in first.lines if len(line.get_xydata()) == 1]
    clean = np.mean([90.01, 90.10, 91.00])
    assert points[0] == pytest.approx((clean, clean - 40))
    assert [t.get_text() for t in first.texts] == ["orig", "fastclip"]
    # in a grid of three seeds, fastclip noBN (two) is labelled so; a seed outside the grid is left out
    nobn = plot_clean_vs_certified(values, "noBN", tmp_path / "noBN.png", [CERT], seeds=[*SEEDS, 5])
    assert [t.get_text() for t in nobn.axes[0].texts] == ["orig (3 of 4 seeds)", "fastclip (2 of 4 seeds)"]
    fig = plot_clean_vs_certified(values, "wBN", tmp_path / "one.png", [CERT], seeds=[1])
    assert [t.get_text() for t in fig.axes[0].texts] == ["orig", "fastclip"]
    assert fig.axes[0].lines[0].get_xydata()[0] == pytest.approx((90.01, 90.01 - 40))
    # nothing certified at that radius, or no such mode: no figure
    assert plot_clean_vs_certified(values, "wBN", tmp_path / "none.png", [0.5]) is None
    assert plot_clean_vs_certified(values, "clipBN", tmp_path / "none.png", [CERT]) is None
    assert not (tmp_path / "none.png").exists()


def test_robustness_plot(grid, tmp_path):
    import matplotlib.image

    runs, layers = grid
    # PGD L2 at two radii for orig wBN
    pgd = runs[(runs["attack"] == "pgd") & (runs["method"] == "orig") & (runs["mode"] == "wBN")]
    l2 = [
        dict(r, attack="pgdl2", eps=e, params=f"eps={e}", adv_acc=r["clean_acc"] - d)
        for r in pgd.to_dict("records")
        for e, d in ((0.1, 5), (CERT, 8))
    ]
    values = report_values(pd.concat([runs, pd.DataFrame(l2)], ignore_index=True), layers)
    out = tmp_path / "robustness_wBN.png"
    fig = plot_robustness(values, "wBN", out, title="t")
    image = matplotlib.image.imread(out)
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 600  # two panels side by side
    linf, l2_ax = fig.axes[:2]
    assert "PGD Linf" in linf.get_xlabel() and "PGD L2" in l2_ax.get_xlabel()
    assert "mode wBN, PGD Linf" in linf.get_title() and l2_ax.get_legend() is not None
    lines = {c.get_label(): c.lines[0].get_xydata() for c in linf.containers}
    assert list(lines) == ["orig", "fastclip"]  # the registry's order
    clean = np.mean([90.01, 90.10, 91.00])
    assert lines["orig"] == pytest.approx(np.array([[0.0, clean], [0.02, clean - 10]]))
    # the std over seeds as error bars: PGD at 0.02 is clean - 10 for every seed
    assert linf.containers[0].has_yerr
    l2_lines = {c.get_label(): c.lines[0].get_xydata() for c in l2_ax.containers}
    assert list(l2_lines) == ["orig"]
    assert l2_lines["orig"] == pytest.approx(np.array([[0.0, clean], [0.1, clean - 5], [CERT, clean - 8]]))
    # only the grid's seeds; a mode without PGD draws nothing
    one = plot_robustness(values, "wBN", tmp_path / "one.png", seeds=[1])
    assert one.axes[0].containers[0].lines[0].get_xydata()[1] == pytest.approx((0.02, 80.01))
    no_pgd = values[values["attack"] != "pgd"]
    assert plot_robustness(no_pgd, "noBN", tmp_path / "none.png") is None
    assert plot_robustness(values, "clipBN", tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()


def test_publish_copies_the_figures_and_rewrites_the_links(tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "a.png").write_bytes(b"\x89PNG fake a")
    (runs / "curves_wBN.png").write_bytes(b"\x89PNG fake b")
    report = runs / "reproduction_report.md"
    report.write_text(
        "# r\n\n![A](a.png)\n![gone](missing.png)\n![curves](curves_wBN.png)\n"
        "<!-- keep -->\nplaceholder\n<!-- /keep -->\nend\n"
    )
    docs = tmp_path / "docs"
    targets = publish_targets(report, docs, "reproduce_mnist")
    assert targets == {
        report: docs / "reproduce_mnist.md",
        runs / "a.png": docs / "img" / "reproduce_mnist_a.png",
        runs / "curves_wBN.png": docs / "img" / "reproduce_mnist_curves_wBN.png",
    }
    written = publish(report, docs, "reproduce_mnist", keep=("<!-- keep -->", "<!-- /keep -->"))
    assert written[-1] == docs / "reproduce_mnist.md" and set(written) == set(targets.values())
    assert (docs / "img" / "reproduce_mnist_curves_wBN.png").read_bytes() == b"\x89PNG fake b"
    text = (docs / "reproduce_mnist.md").read_text()
    assert (
        "![A](img/reproduce_mnist_a.png)" in text and "![curves](img/reproduce_mnist_curves_wBN.png)" in text
    )
    assert "![gone](missing.png)" in text  # not there: left as it was
    for link in ("img/reproduce_mnist_a.png", "img/reproduce_mnist_curves_wBN.png"):
        assert (docs / link).is_file()  # the links resolve from the copy's folder
    # prose written between the markers of the published copy survives the next publish
    (docs / "reproduce_mnist.md").write_text(text.replace("placeholder", "the paper says X"))
    report.write_text(report.read_text().replace("end", "new end"))
    publish(report, docs, "reproduce_mnist", keep=("<!-- keep -->", "<!-- /keep -->"))
    text = (docs / "reproduce_mnist.md").read_text()
    assert "the paper says X" in text and "placeholder" not in text and "new end" in text


def test_doctests():
    result = doctest.testmod(fastclip.pipeline.report)
    assert result.failed == 0 and result.attempted == 3
