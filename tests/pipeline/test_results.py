"""fastclip.pipeline.results and experiments/collect_attack_results.py on synthetic per-run CSVs."""

from __future__ import annotations

import doctest
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scriptload import load_script

import fastclip.pipeline.results as results

ROOT = Path(__file__).resolve().parents[2]
METHODS, MODES, SEEDS, EPS = ("fastclip", "orig"), ("wBN", "noBN"), (1, 10, 100), (0.01, 0.02)
MISSING = ("orig", "noBN", 10)  # this run has no attack CSV
CSV_NAME = "attack_pgd_eps0.01+0.02_steps50_n100.csv"


@pytest.fixture
def grid(tmp_path):
    """logs/mnist/SimpleConv_models/method_<method>_<mode>_<seed>/ with one PGD CSV each
    (two eps rows), except MISSING; returns (prefix, {(method, mode, seed, eps): (clean, adv)})."""
    rng = np.random.default_rng(0)
    parent = tmp_path / "logs" / "mnist" / "SimpleConv_models"
    values = {}
    for method in METHODS:
        for mode in MODES:
            for seed in SEEDS:
                run = parent / f"method_{method}_{mode}_{seed}"
                run.mkdir(parents=True)
                (run / "config.json").write_text(
                    json.dumps({"settings": {"model": "SimpleConv", "dataset": "mnist"}})
                )
                (run / "DONE").write_text("")
                if (method, mode, seed) == MISSING:
                    continue
                rows = []
                clean = float(rng.uniform(80, 99))
                for eps in EPS:
                    adv = float(rng.uniform(0, clean))
                    values[method, mode, seed, eps] = (clean, adv)
                    rows.append(
                        {
                            "model": "SimpleConv",
                            "dataset": "mnist",
                            "attack": "pgd",
                            "eps": eps,
                            "params": f"eps={eps:g} n_steps=50 rand_init=True step_size={eps / 10:g}",
                            "n_examples": 100,
                            "clean_acc": clean,
                            "adv_acc": adv,
                        }
                    )
                pd.DataFrame(rows).to_csv(run / CSV_NAME, index=False)
    # unrelated directories next to the runs are ignored
    (parent / "method_notes").mkdir()
    (parent / "other_fastclip_wBN_1").mkdir()
    return f"{parent}/method_", values


def test_find_runs_filters_and_parses(grid):
    prefix, _ = grid
    runs = results.find_runs(prefix)
    assert len(runs) == 12
    assert {(r.method, r.mode, r.seed) for r in runs} == {
        (a, b, c) for a in METHODS for b in MODES for c in SEEDS
    }
    sel = results.find_runs(prefix, method="orig", mode="noBN", seeds=[1, 100])
    assert [(r.method, r.mode, r.seed) for r in sel] == [("orig", "noBN", 1), ("orig", "noBN", 100)]
    assert results.find_runs(prefix, method="gouk") == []
    assert results.find_runs(prefix + "nothing_") == []
    assert "methods fastclip, orig; modes wBN, noBN; seeds 1, 10, 100" in results.describe_runs(prefix)


def test_collect_writes_means_and_stds_of_the_per_run_files(grid, capsys):
    prefix, values = grid
    script = load_script("collect_attack_results")
    assert script.main(script.get_args_parser().parse_args([prefix])) == 0
    out = capsys.readouterr().out
    parent = Path(prefix).parent

    runs = pd.read_csv(parent / "attack_results_runs.csv")
    assert len(runs) == len(values) == 22
    for r in runs.itertuples():
        assert (r.model, r.dataset, r.attack, r.n_examples, r.file) == (
            "SimpleConv",
            "mnist",
            "pgd",
            100,
            CSV_NAME,
        )
        assert (r.clean_acc, r.adv_acc) == pytest.approx(values[r.method, r.mode, r.seed, r.eps], rel=1e-12)

    summary = pd.read_csv(parent / "attack_results_summary.csv")
    assert len(summary) == len(METHODS) * len(MODES) * len(EPS)
    for s in summary.itertuples():
        got = [v for (m, md, _, e), v in values.items() if (m, md, e) == (s.method, s.mode, s.eps)]
        clean, adv = np.array(got).T
        assert s.n_seeds == len(got) == (2 if (s.method, s.mode) == MISSING[:2] else 3)
        # sample standard deviation, ddof = 1
        assert s.clean_acc_mean == pytest.approx(np.mean(clean), rel=1e-12)
        assert s.clean_acc_std == pytest.approx(np.std(clean, ddof=1), rel=1e-9)
        assert s.adv_acc_mean == pytest.approx(np.mean(adv), rel=1e-12)
        assert s.adv_acc_std == pytest.approx(np.std(adv, ddof=1), rel=1e-9)
        assert s.adv_acc_std > 0

    # the summary is printed as a Markdown table and the missing run is listed
    assert "| model" in out and "± " in out
    first = summary.iloc[0]
    assert f"{first.adv_acc_mean:.2f} ± {first.adv_acc_std:.2f}" in out
    assert "Missing or partial results (1)" in out
    assert "method_orig_noBN_10: no attack CSV" in out


def test_malformed_partial_and_unfinished_runs_are_reported_not_dropped_silently(grid, capsys):
    prefix, values = grid
    parent = Path(prefix).parent
    (parent / "method_fastclip_wBN_1" / CSV_NAME).write_text("attack,eps\npgd,0.01\n")  # lacks columns
    (parent / "method_fastclip_wBN_10" / CSV_NAME).write_bytes(b'\x00\xff garbage \n\x01,,"')  # unparseable
    bad = parent / "method_orig_wBN_1" / CSV_NAME
    bad.write_text(bad.read_text().replace(",100,", ",100,oops,", 1))  # bad number
    (parent / "method_orig_wBN_100" / "DONE").unlink()
    extra = parent / "method_fastclip_noBN_1" / "attack_cw_c0.02_conf0.1_iter1000_bs1_n100.csv"
    pd.DataFrame(
        [
            {
                "attack": "cw",
                "eps": "",
                "params": "c=0.02",
                "n_examples": 100,
                "clean_acc": 90.0,
                "adv_acc": 20.0,
            }
        ]
    ).to_csv(extra, index=False)

    table, problems = results.collect_attack_results(results.find_runs(prefix))
    text = "\n".join(map(str, problems))
    assert "method_fastclip_wBN_1/" + CSV_NAME + ": expected columns" in text
    assert "method_fastclip_wBN_10/" + CSV_NAME in text
    assert "method_orig_wBN_1/" + CSV_NAME in text
    assert "method_orig_wBN_100: training not finished" in text
    assert "method_orig_noBN_10: no attack CSV" in text
    # the CW file exists in one run only: the 10 other runs with attack files are told they lack it
    assert text.count("missing attack_cw_c0.02") == 10
    assert "missing attack_pgd" not in text
    assert len(table) == 22 - 6 + 1

    s = results.summarize(table)
    cw = s[s.attack == "cw"]
    assert len(cw) == 1 and cw.n_seeds.item() == 1 and np.isnan(cw.adv_acc_std.item())
    assert "20.00" in results.format_summary(s)
    latex = results.format_summary(s, "latex")
    assert r"\begin{tabular}" in latex and r"$\pm$" in latex


def test_cli_bad_prefix_is_a_one_line_error_with_exit_2(grid):
    prefix, _ = grid
    proc = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "collect_attack_results.py"), prefix, "--method", "gouk"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert "method 'gouk'" in last and "methods fastclip, orig" in last


def test_doctests():
    assert doctest.testmod(results).failed == 0
