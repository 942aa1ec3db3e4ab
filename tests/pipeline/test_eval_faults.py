"""Evaluation faults (issues 38 and 42): a run that ended FAILED is refused by attack.py,
compute_trained_SVs.py and lipschitz_report.py unless ``--include-failed`` (then marked); a
run is labelled by its config.json, not its directory name; collect_attack_results.py
rejects accuracies outside [0, 100], counts a duplicated (run, setting) row once (the
newest) and marks every cell over fewer seeds than the grid's."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scriptload import load_script

from fastclip.pipeline import results
from fastclip.pipeline.training.validate import Diverged, write_failed

PGD = "attack_pgd_eps0.02+0.05_steps50_n100.csv"
RERUN = "attack_pgd_eps0.05_steps50_n100.csv"  # `--eps 0.05` run after `--eps 0.02 0.05`


def pgd_rows(adv: dict[float, float], clean: float) -> list[dict]:
    return [
        {
            "model": "SimpleConv",
            "dataset": "mnist",
            "attack": "pgd",
            "eps": eps,
            "params": f"eps={eps:g} n_steps=50 rand_init=True step_size={eps / 10:g}",
            "n_examples": 100,
            "clean_acc": clean,
            "adv_acc": a,
        }
        for eps, a in adv.items()
    ]


def make_run(parent: Path, name: str, method: str = "fastclip", mode: str = "wBN", seed: int = 1) -> Path:
    run = parent / name
    run.mkdir(parents=True)
    settings = {"model": "SimpleConv", "dataset": "mnist", "method": method, "mode": mode, "seed": seed}
    (run / "config.json").write_text(json.dumps({"settings": settings}))
    (run / "DONE").write_text("")
    return run


# adversarial accuracy at eps 0.05 per seed; seed 1 measured twice, RERUN last
ADV = {1: 60.0, 2: 66.0, 3: 69.0}
ADV_RERUN = 62.0
CLEAN = {1: 97.0, 2: 98.5, 3: 96.0}


@pytest.fixture
def grid(tmp_path):
    """Three seeds of fastclip/wBN with the PGD CSV; seed 1 also has RERUN (newer)."""
    parent = tmp_path / "logs" / "mnist" / "SimpleConv_models"
    for seed in (1, 2, 3):
        run = make_run(parent, f"method_fastclip_wBN_{seed}", seed=seed)
        pd.DataFrame(pgd_rows({0.02: 80.0 + seed, 0.05: ADV[seed]}, CLEAN[seed])).to_csv(
            run / PGD, index=False
        )
    first = parent / "method_fastclip_wBN_1"
    pd.DataFrame(pgd_rows({0.05: ADV_RERUN}, CLEAN[1])).to_csv(first / RERUN, index=False)
    now = time.time()
    os.utime(first / PGD, (now - 100, now - 100))
    os.utime(first / RERUN, (now, now))
    return f"{parent}/method_"


def collect(prefix: str, capsys, *flags: str) -> tuple[str, str]:
    script = load_script("collect_attack_results")
    assert script.main(script.get_args_parser().parse_args([prefix, *flags])) == 0
    got = capsys.readouterr()
    return got.out, got.err


def test_a_setting_in_two_csvs_of_a_run_is_counted_once_the_newest_with_a_warning(grid, capsys):
    out, err = collect(grid, capsys)
    parent = Path(grid).parent
    summary = pd.read_csv(parent / "attack_results_summary.csv")
    at = summary[summary.eps == 0.05].iloc[0]
    seeds = [ADV_RERUN, ADV[2], ADV[3]]
    # averaging both copies gave seeds "1 1 2 3", a mean of 64.25 and std 3.862
    assert at.seeds == "1 2 3" and at.n_seeds == 3
    assert at.adv_acc_mean == pytest.approx(np.mean(seeds), rel=1e-12)
    assert at.adv_acc_std == pytest.approx(np.std(seeds, ddof=1), rel=1e-9)  # 3.512
    assert at.clean_acc_std == pytest.approx(np.std(list(CLEAN.values()), ddof=1), rel=1e-9)
    runs = pd.read_csv(parent / "attack_results_runs.csv")
    assert len(runs) == 6 and runs[(runs.seed == 1) & (runs.eps == 0.05)].file.tolist() == [RERUN]
    warning = [line for line in err.splitlines() if "warning:" in line]
    assert len(warning) == 1
    assert "method_fastclip_wBN_1" in warning[0] and "pgd eps 0.05" in warning[0]
    assert (
        f"{PGD} row 2, {RERUN} row 1" in warning[0]
        and f"counted once, the newest: {RERUN} row 1" in warning[0]
    )
    # the rerun's setting is in every run's first CSV: no run misses anything
    assert "missing attack_pgd_eps0.05_" not in out and "Missing or partial" not in out


def test_a_timestamp_column_decides_which_copy_is_newest(grid, capsys):
    first = Path(grid + "fastclip_wBN_1")
    rerun = pd.read_csv(first / RERUN).assign(timestamp="2020-01-02T03:04:05Z")  # older than PGD's mtime
    rerun.to_csv(first / RERUN, index=False)
    future = time.time() + 1000
    os.utime(first / RERUN, (future, future))
    _, err = collect(grid, capsys)
    summary = pd.read_csv(Path(grid).parent / "attack_results_summary.csv")
    at = summary[summary.eps == 0.05].iloc[0]
    assert at.adv_acc_mean == pytest.approx(np.mean([ADV[1], ADV[2], ADV[3]]), rel=1e-12)
    assert f"counted once, the newest: {PGD} row 2" in err


@pytest.mark.parametrize(("column", "value"), [("adv_acc", 250.0), ("clean_acc", -5.0)])
def test_accuracies_outside_0_100_are_rejected_naming_file_and_row(grid, capsys, column, value):
    path = Path(grid + "fastclip_wBN_2") / PGD
    df = pd.read_csv(path)
    df.loc[1, column] = value
    df.to_csv(path, index=False)
    out, _ = collect(grid, capsys)
    line = next(line for line in out.splitlines() if "outside [0, 100]" in line)
    assert line == f"- {path}: {column} {value:g} in row 2 (line 3) is outside [0, 100]; file skipped"
    summary = pd.read_csv(Path(grid).parent / "attack_results_summary.csv")
    assert summary.seeds.tolist() == ["1 3", "1 3"] and 250.0 not in summary.adv_acc_mean.tolist()


def test_cells_over_fewer_seeds_are_marked_in_every_table(grid, capsys):
    (Path(grid + "fastclip_wBN_3") / PGD).unlink()  # seed 3 left without results
    out, _ = collect(grid, capsys)
    parent = Path(grid).parent
    clean = [CLEAN[1], CLEAN[2]]
    adv = [ADV_RERUN, ADV[2]]
    mark = "(2 of 3 seeds)"
    cell = f"{np.mean(adv):.2f} ± {np.std(adv, ddof=1):.2f} {mark}"
    clean_cell = f"{np.mean(clean):.2f} ± {np.std(clean, ddof=1):.2f} {mark}"
    wide = pd.read_csv(parent / "attack_results_wide.csv")
    assert wide["PGD Linf 0.05"].tolist() == [cell] and wide["clean acc (%)"].tolist() == [clean_cell]
    assert wide["PGD Linf 0.02"].tolist() == [f"81.50 ± 0.71 {mark}"]
    summary = pd.read_csv(parent / "attack_results_summary.csv")
    assert summary.seeds_note.tolist() == [mark, mark] and summary.expected_seeds.tolist() == [3, 3]
    assert cell in out and f"| {clean_cell}" in out  # Markdown: summary and wide table
    latex, _ = collect(grid, capsys, "--latex")
    assert cell.replace(" ± ", r" $\pm$ ") in latex and latex.count(mark) == 4 + 3


def test_full_cells_carry_no_mark(grid, capsys):
    out, _ = collect(grid, capsys)
    wide = pd.read_csv(Path(grid).parent / "attack_results_wide.csv")
    assert "seeds)" not in "".join(wide.astype(str).to_numpy().ravel()) and "seeds)" not in out
    assert results.seeds_mark(2, 3) == " (2 of 3 seeds)" and results.seeds_mark(3, 3) == ""


def test_collect_labels_a_run_by_its_config_not_its_directory_name(tmp_path, capsys):
    parent = tmp_path / "logs" / "mnist" / "SimpleConv_models"
    for name, seed in (("method_fastclip_wBN_1", 1), ("method_orig_wBN_7", 2)):
        run = make_run(parent, name, method="fastclip", seed=seed)
        pd.DataFrame(pgd_rows({0.02: 70.0 + seed}, 90.0 + seed)).to_csv(run / PGD, index=False)
    out, err = collect(f"{parent}/method_", capsys)
    runs = pd.read_csv(parent / "attack_results_runs.csv")
    assert sorted(zip(runs.method, runs.seed)) == [("fastclip", 1), ("fastclip", 2)]
    summary = pd.read_csv(parent / "attack_results_summary.csv")
    assert summary.method.tolist() == ["fastclip"] and summary.seeds.tolist() == ["1 2"]
    warning = [line for line in err.splitlines() if "warning:" in line]
    assert warning == [
        f"collect_attack_results.py: warning: run directory {parent}/method_orig_wBN_7 is named "
        "method orig, seed 7 but its config.json says method fastclip, seed 2; labelled by config.json"
    ]
    # selection goes by the config too
    out, _ = collect(f"{parent}/method_", capsys, "--method", "fastclip", "--seed", "2")
    assert "1 runs, 1 result rows" in out


def test_two_directories_of_one_run_are_named_and_counted_once(tmp_path, capsys):
    parent = tmp_path / "logs" / "mnist" / "SimpleConv_models"
    now = time.time()
    for name, adv, age in (("method_fastclip_wBN_1", 40.0, 50), ("method_fastclip_wBN_5", 45.0, 10)):
        run = make_run(parent, name, seed=1)  # the second is a copy of seed 1, renamed
        pd.DataFrame(pgd_rows({0.02: adv}, 90.0)).to_csv(run / PGD, index=False)
        os.utime(run / PGD, (now - age, now - age))
    _, err = collect(f"{parent}/method_", capsys)
    assert (
        f"warning: runs {parent}/method_fastclip_wBN_1, {parent}/method_fastclip_wBN_5 are all "
        "method fastclip, mode wBN, seed 1 by their config.json" in err
    )
    assert f"{parent}/method_fastclip_wBN_1/{PGD} row 1, {PGD} row 1); counted once, the newest" in err
    summary = pd.read_csv(parent / "attack_results_summary.csv")
    assert summary.seeds.astype(str).tolist() == ["1"] and summary.adv_acc_mean.tolist() == [45.0]


# -- trained runs: attack.py, compute_trained_SVs.py, lipschitz_report.py ---------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory, train_mnist):
    """One SimpleConv run (fastclip, wBN, seed 1) trained by train.py; (run dir, data dir)."""
    tmp = tmp_path_factory.mktemp("evalfaults")
    prefix = train_mnist(tmp, "fastclip", 64)
    return Path(f"{prefix}fastclip_wBN_1"), tmp / "data"


REASON = "diverged: loss is inf at step 7 (epoch 2)"


@pytest.fixture
def failed_run(trained, tmp_path):
    """A copy of the trained run that ended FAILED the way train.py ends it."""
    run, data = trained
    copy = tmp_path / "mnist" / "SimpleConv_models" / run.name
    shutil.copytree(run, copy)
    (copy / "DONE").unlink()
    write_failed(copy, Diverged("loss", float("inf"), 7, 2))
    return copy, data


def run_main(name: str, argv: list[str]) -> int:
    script = load_script(name)
    return script.main(script.get_args_parser().parse_args(argv))


def attack_argv(prefix: str, data: Path, *flags: str) -> list[str]:
    return [
        "mnist",
        prefix,
        "--n-examples",
        "8",
        "--n-steps",
        "1",
        "--eps",
        "0.1",
        "--data-dir",
        str(data),
        *flags,
    ]


@pytest.mark.slow
def test_a_failed_run_is_refused_in_one_line_unless_included(failed_run, capsys):
    run, data = failed_run
    prefix = f"{run.parent}/method_"
    commands = {
        "attack": attack_argv(prefix, data),
        "compute_trained_SVs": ["mnist", "all", prefix],
        "lipschitz_report": [str(run)],
    }
    for name, argv in commands.items():
        with pytest.raises(SystemExit) as e:
            run_main(name, argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2, name
        assert f"error: run {run} ended FAILED: {REASON}; --include-failed evaluates it anyway" in err[-1], (
            name
        )
        assert "Traceback" not in "\n".join(err)
    assert not list(run.glob("attack_*.csv")) and not (run.parent / "layer_norms.csv").exists()
    assert not (run / "lipschitz_report.csv").exists()

    assert run_main("attack", attack_argv(prefix, data, "--include-failed")) == 0
    assert f"warning: evaluating run {run} that ended FAILED ({REASON})" in capsys.readouterr().err
    csv = pd.read_csv(run / "attack_pgd_eps0.1_steps1_n8.csv")
    assert csv.failed.tolist() == [REASON] and csv.method.tolist() == ["fastclip"]
    out, _ = collect(prefix, capsys)
    assert f"- {run}: training FAILED (see its FAILED file); results kept" in out

    assert run_main("compute_trained_SVs", ["mnist", "all", prefix, "--include-failed"]) == 0
    out = capsys.readouterr().out
    per_seed = pd.read_csv(run.parent / "layer_norms_runs.csv")
    assert (per_seed.failed == REASON).all() and len(per_seed) == 3
    summary = pd.read_csv(run.parent / "layer_norms.csv")
    assert summary.failed_seeds.astype(str).tolist() == ["1", "1", "1"]
    assert "FAILED seeds" in out.splitlines()[0]

    assert run_main("lipschitz_report", [str(run), "--include-failed"]) == 0
    report = pd.read_csv(run / "lipschitz_report.csv")
    assert (report.model == f"SimpleConv (fastclip, wBN, seed 1) [FAILED: {REASON}]").all()
    assert f"[FAILED: {REASON}]" in capsys.readouterr().out


@pytest.mark.slow
def test_attack_and_sv_tables_label_a_run_by_its_config(trained, tmp_path, capsys):
    run, data = trained
    parent = tmp_path / "mnist" / "SimpleConv_models"
    misnamed = parent / "method_gouk_noBN_7"  # config.json: fastclip, wBN, seed 1
    shutil.copytree(run, misnamed)
    prefix = f"{parent}/method_"
    note = (
        f"warning: run directory {misnamed} is named method gouk, mode noBN, seed 7 but its config.json "
        "says method fastclip, mode wBN, seed 1; labelled by config.json"
    )

    assert run_main("attack", attack_argv(prefix, data)) == 0
    assert note in capsys.readouterr().err
    csv = pd.read_csv(misnamed / "attack_pgd_eps0.1_steps1_n8.csv")
    assert (csv.method.tolist(), csv["mode"].tolist(), csv.seed.tolist()) == (["fastclip"], ["wBN"], [1])

    assert run_main("compute_trained_SVs", ["mnist", "fastclip", prefix, "--seed", "1"]) == 0
    assert note in capsys.readouterr().err
    per_seed = pd.read_csv(parent / "layer_norms_runs.csv")
    assert set(zip(per_seed.method, per_seed["mode"], per_seed.seed)) == {("fastclip", "wBN", 1)}

    # the name no longer selects it: its config says fastclip
    with pytest.raises(SystemExit) as e:
        run_main("compute_trained_SVs", ["mnist", "gouk", prefix])
    last = capsys.readouterr().err.splitlines()[-1]
    assert (
        e.value.code == 2
        and "no run matches" in last
        and "found 1 runs with methods fastclip; modes wBN" in last
    )
