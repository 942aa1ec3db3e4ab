"""Honest tables (issue 42): every evaluation names the checkpoint it measured (``--checkpoint
last|best``, its SHA-256, the rule that chose it); a result of a checkpoint since replaced is
stale - attack.py recomputes it, collect_attack_results.py and the reproduction report leave it
out with a warning; the report states the settings its runs have, and the sentences under its
tables (and README's above its own) agree with the numbers."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
from scriptload import EXPERIMENTS, load_script

from fastclip.pipeline import jobs, provenance
from fastclip.pipeline.checkpoint import load_checkpoint, save_checkpoint, state_digest
from fastclip.pipeline.reproduce.publishing import write_results
from fastclip.pipeline.reproduce.settings import STEPS, Settings
from fastclip.pipeline.reproduce.summary import summary_sentences
from fastclip.pipeline.reproduce.writer import write_report
from fastclip.pipeline.results import Run

REPO = Path(__file__).resolve().parents[2]
CERTIFY = "attack_certify_eps0.1_n8.csv"


def run_main(name: str, argv: list[str]) -> int:
    script = load_script(name)
    return script.main(script.get_args_parser().parse_args(argv))


def stored_digest(path: Path) -> str:
    return torch.load(path, map_location="cpu", weights_only=True)["sha256"]


# -- trained runs: --checkpoint, and stale attack results -----------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory, train_mnist):
    """One SimpleConv run (orig, wBN, seed 1) trained by train.py; (run dir, data dir)."""
    tmp = tmp_path_factory.mktemp("honest")
    prefix = train_mnist(tmp, "orig", 64)
    return Path(f"{prefix}orig_wBN_1"), tmp / "data"


@pytest.fixture
def run(trained, tmp_path):
    """A copy of the trained run, its ckpt_best.pth remade from ckpt_last.pth with fc1 x 2:
    two checkpoints whose certified bounds differ by exactly that factor."""
    src, data = trained
    copy = tmp_path / "mnist" / "SimpleConv_models" / src.name
    shutil.copytree(src, copy)
    rescale(copy, 2.0)
    return copy, data


def rescale(run: Path, factor: float) -> None:
    """ckpt_best.pth := ckpt_last.pth with the dense layer's weight times ``factor`` (a retrain)."""
    ckpt = load_checkpoint(run / "ckpt_last.pth")
    (key,) = [k for k in ckpt["model"] if k.endswith("fc1.weight")]
    ckpt["model"][key] = ckpt["model"][key] * factor
    save_checkpoint(ckpt, run / "ckpt_best.pth")


def certify_argv(run: Path, data: Path, *flags: str) -> list[str]:
    prefix = f"{run.parent}/method_"
    return ["mnist", prefix, "--attack", "certify", "--eps", "0.1", "--n-examples", "8"] + [
        "--data-dir",
        str(data),
        *flags,
    ]


@pytest.mark.slow
def test_checkpoint_last_and_best_evaluate_different_files_and_record_them(run, capsys):
    run, data = run
    best, last = stored_digest(run / "ckpt_best.pth"), stored_digest(run / "ckpt_last.pth")
    assert best != last
    assert run_main("attack", certify_argv(run, data)) == 0
    assert run_main("attack", certify_argv(run, data, "--checkpoint", "last")) == 0
    b = pd.read_csv(run / CERTIFY)
    la = pd.read_csv(run / CERTIFY.replace(".csv", "_last.csv"))
    assert b.checkpoint.tolist() == ["best"] and la.checkpoint.tolist() == ["last"]
    assert b.checkpoint_sha256.tolist() == [best] and la.checkpoint_sha256.tolist() == [last]
    # a run trained before the rule was recorded chose its best checkpoint on the test set
    assert b.chosen_by.tolist() == [provenance.best_rule(run)] and la.chosen_by.tolist() == ["last epoch"]
    assert b.lipschitz.iloc[0] == pytest.approx(2 * la.lipschitz.iloc[0], rel=1e-4)

    prefix = f"{run.parent}/method_"
    for kind in ("best", "last"):
        assert run_main("compute_trained_SVs", ["mnist", "all", prefix, "--checkpoint", kind]) == 0
        norms = pd.read_csv(run.parent / "layer_norms_runs.csv").set_index("layer")
        assert set(norms.checkpoint) == {kind}
        assert set(norms.checkpoint_sha256) == {best if kind == "best" else last}
        if kind == "best":
            fc1_best = norms.loc["fc1", "sigma1"]
    assert fc1_best == pytest.approx(2 * norms.loc["fc1", "sigma1"], rel=1e-4)

    out = run.parent / "lip"
    assert run_main("lipschitz_report", [str(run), "--checkpoint", "last", "--out-dir", str(out)]) == 0
    report = pd.read_csv(out / "lipschitz_report.csv")
    assert set(report.checkpoint) == {"last"} and set(report.checkpoint_sha256) == {last}
    assert (
        (out / "lipschitz_report.md")
        .read_text()
        .startswith(f"Measured: the last checkpoint (ckpt_last.pth, the last epoch), SHA-256 {last}.")
    )
    capsys.readouterr()


@pytest.mark.slow
def test_a_stale_attack_result_is_recomputed_after_the_checkpoint_changes(run, capsys):
    run, data = run
    assert run_main("attack", certify_argv(run, data)) == 0
    before = pd.read_csv(run / CERTIFY)
    old = stored_digest(run / "ckpt_best.pth")
    assert before.checkpoint_sha256.tolist() == [old]
    capsys.readouterr()

    rescale(run, 3.0)  # `train.py --force` made a new best checkpoint
    new = stored_digest(run / "ckpt_best.pth")
    assert run_main("attack", certify_argv(run, data)) == 0  # no --force
    err = capsys.readouterr().err
    assert (
        f"warning: {CERTIFY} of run {run} measured ckpt_best.pth {old[:12]}, the run's is now "
        f"{new[:12]} (retrained since); recomputing it"
    ) in err
    after = pd.read_csv(run / CERTIFY)
    assert after.checkpoint_sha256.tolist() == [new]
    assert after.lipschitz.iloc[0] == pytest.approx(1.5 * before.lipschitz.iloc[0], rel=1e-4)

    # current again: skipped, the file untouched
    stamp = (run / CERTIFY).stat().st_mtime_ns
    assert run_main("attack", certify_argv(run, data)) == 0
    assert "stale" not in capsys.readouterr().err and (run / CERTIFY).stat().st_mtime_ns == stamp


@pytest.mark.slow
def test_the_attack_grid_resubmits_a_stale_result(run, capsys):
    # the grid's skip of "done" results asks the same question as attack.py: a result whose
    # checkpoint changed is stale, and a dispatch plans it again
    run, data = run
    assert run_main("attack", certify_argv(run, data)) == 0
    args = jobs.attack_submit_parser().parse_args(
        [*certify_argv(run, data), "--method", "orig", "--mode", "wBN", "--seed", "1", "--backend", "local"]
    )
    grid = jobs.attack_grid(args, script=EXPERIMENTS / "attack.py")
    assert [r.state for r in jobs.grid_status(grid)] == ["done"]
    assert not jobs.plan(grid).submit
    rescale(run, 3.0)  # a retrain made a new best checkpoint
    (row,) = jobs.grid_status(grid)
    assert row.state == "stale" and "retrained since" in row.detail
    assert [r.name for r in jobs.plan(grid).submit] == [grid.runs[0].name]


def test_a_result_without_a_digest_is_stale_when_older_than_the_checkpoint(tmp_path):
    run = tmp_path / "method_orig_wBN_1"
    run.mkdir()
    save_checkpoint({"epoch": 1, "w": torch.ones(2)}, run / "ckpt_best.pth")
    csv = run / "attack_pgd_eps0.1_steps1_n8.csv"
    rows = pd.DataFrame({"attack": ["pgd"], "checkpoint": ["best"], "adv_acc": [50.0]})
    rows.to_csv(csv, index=False)
    stamp = (run / "ckpt_best.pth").stat().st_mtime
    os.utime(csv, (stamp + 10, stamp + 10))
    assert provenance.stale_reason(run, csv, rows) is None
    os.utime(csv, (stamp - 10, stamp - 10))
    assert provenance.stale_reason(run, csv, rows) == (
        f"{csv.name} of run {run} records no checkpoint digest and is older than its ckpt_best.pth "
        "(retrained since)"
    )
    # a digest decides by itself, whatever the times
    digest = provenance.checkpoint_id(run, "best").sha256
    assert digest == state_digest({"epoch": 1, "w": torch.ones(2)})
    assert provenance.stale_reason(run, csv, rows.assign(checkpoint_sha256=digest)) is None


# -- collect: a stale row is named and left out of the means ---------------------------------

PGD = "attack_pgd_eps0.05_steps50_n100.csv"
ADV = {1: 60.0, 2: 66.0, 3: 10.0}  # seed 3's result is of its old checkpoint


def fake_run(parent: Path, method: str, seed: int, epochs: int = 1) -> Run:
    path = parent / f"method_{method}_wBN_{seed}"
    path.mkdir(parents=True)
    settings = {"model": "SimpleConv", "dataset": "mnist", "method": method, "mode": "wBN", "seed": seed}
    settings |= {
        "epochs": epochs,
        "train_subset": 256,
        "test_subset": 64,
        "batch_size": 64,
        "augment": "paper",
    }
    (path / "config.json").write_text(json.dumps({"settings": settings, "best_by": "val_acc"}))
    (path / "DONE").write_text("")
    save_checkpoint({"epoch": epochs, "w": torch.full((2,), float(seed))}, path / "ckpt_best.pth")
    return Run(path, method, "wBN", seed)


def test_collect_flags_a_stale_row_and_leaves_it_out_of_the_means(tmp_path, capsys):
    parent = tmp_path / "mnist" / "SimpleConv_models"
    runs = {seed: fake_run(parent, "fastclip", seed) for seed in (1, 2, 3)}
    old = state_digest({"epoch": 1, "w": torch.zeros(2)})
    for seed, r in runs.items():
        digest = old if seed == 3 else provenance.checkpoint_id(r.path, "best").sha256
        row = {"attack": "pgd", "eps": 0.05, "params": "eps=0.05 n_steps=50", "n_examples": 100}
        row |= {"clean_acc": 97.0, "adv_acc": ADV[seed], "checkpoint": "best", "checkpoint_sha256": digest}
        pd.DataFrame([row | {"chosen_by": "val_acc"}]).to_csv(r.path / PGD, index=False)
    assert run_main("collect_attack_results", [f"{parent}/method_"]) == 0
    got = capsys.readouterr()
    now = provenance.checkpoint_id(runs[3].path, "best").sha256
    warning = (
        f"warning: stale result: {PGD} of run {runs[3].path} measured ckpt_best.pth {old[:12]}, the "
        f"run's is now {now[:12]} (retrained since); left out of the tables (rerun attack.py)"
    )
    assert [line for line in got.err.splitlines() if "stale" in line] == [
        f"collect_attack_results.py: {warning}"
    ]
    assert "Results of each run's best checkpoint (ckpt_best.pth, chosen by val_acc):" in got.out
    summary = pd.read_csv(parent / "attack_results_summary.csv")
    assert summary.adv_acc_mean.tolist() == [63.0] and summary.seeds.tolist() == ["1 2"]
    assert summary.seeds_note.tolist() == ["(2 of 3 seeds)"] and summary.checkpoint.tolist() == ["best"]
    assert set(pd.read_csv(parent / "attack_results_runs.csv").seed) == {1, 2}


# -- the reproduction report: the runs' own settings, stale rows, generated sentences --------


L2_PARAMS = "eps=0.1 n_steps=3 rand_init=True step_size=0.01"
CW_PARAMS = "binary_search_steps=1 c=0.02 confidence=0.1 learning_rate=0.01 max_iter=100"


def report_grid(parent: Path, epochs: dict[int, int]) -> list[Run]:
    """orig and fastclip runs of seed 1 (and more seeds per ``epochs``), with metrics.csv and
    the collected attack table."""
    runs, rows = [], []
    numbers = {"orig": (93.0, 90.0, 0.0, 143.4, 88.0), "fastclip": (82.0, 80.5, 74.0, 2.0, 82.0)}
    for method, (clean, l2, cert, bound, cw) in numbers.items():
        for seed, n in epochs.items():
            r = fake_run(parent, method, seed, epochs=n)
            runs.append(r)
            metrics = (
                "epoch,train_loss,train_acc,test_loss,test_acc,lr,wall_time\n1,0.5,80,0.5,80,0.001,2.0\n"
            )
            (r.path / "metrics.csv").write_text(metrics)
            ident = provenance.checkpoint_id(r.path, "best").columns()
            base = {"model": "SimpleConv", "dataset": "mnist", "mode": "wBN", "method": method, "seed": seed}
            base |= {"n_examples": 32, "clean_acc": clean, **ident}
            rows += [
                base
                | {"file": "c.csv", "attack": "certify", "eps": 0.1, "params": "c", "adv_acc": cert}
                | {"lipschitz": bound},
                base | {"file": "l.csv", "attack": "pgdl2", "eps": 0.1, "params": L2_PARAMS, "adv_acc": l2},
                base | {"file": "w.csv", "attack": "cw", "eps": None, "params": CW_PARAMS, "adv_acc": cw},
            ]
    pd.DataFrame(rows).to_csv(parent / "attack_results_runs.csv", index=False)
    return runs


def settings(seeds: list[int]) -> Settings:
    return Settings(
        methods=["orig", "fastclip"],
        modes=["wBN"],
        seeds=seeds,
        epochs=2,  # the flag of this invocation: the runs were trained 1 epoch
        train_subset=512,
        test_subset=128,
        batch_size=32,
        n_examples=32,
        eps=[0.05],
        pgd_steps=3,
        cw_max_iter=7,  # neither: the results record 100
        attacks=["pgdl2", "cw", "certify"],
        l2_eps=[0.1],
    )


def test_the_report_states_the_runs_own_settings_and_sentences_made_from_its_table(tmp_path):
    parent = tmp_path / "mnist" / "SimpleConv_models"
    runs = report_grid(parent, {1: 1})
    path = parent / "reproduction_report.md"
    args = argparse.Namespace(dataset="mnist", steps=list(STEPS))
    assert write_report(parent, runs, settings([1]), args, path, "cmd") == []
    text = path.read_text()
    assert (
        "- training (as the runs' config.json record it): 1 epoch(s), train subset 256, test subset 64, "
        "batch size 64, augmentation paper"
    ) in text
    assert "2 epoch(s)" not in text and "train subset 512" not in text
    assert (
        "- attacks (as the results below record them): cw, pgdl2, certify on the first 32 test images; "
        "CW up to 100 iterations; L2 eps (certify, pgdl2) 0.1, PGD L2 with 3 steps"
    ) in text
    assert "7 iterations" not in text and "- CW L2: Carlini-Wagner, up to 100 iterations per image" in text
    assert "Every number measures each run's best checkpoint (ckpt_best.pth, chosen by val_acc)." in text
    summary = text.split("### wBN", 1)[1].split("Summary (made from this table): ", 1)[1].splitlines()[0]
    assert summary == (
        "fastclip has the smallest network bound L (2; the largest: orig, 143.4). fastclip has the "
        "highest certified L2 accuracy at eps 0.1 (74.00 %). orig has the highest clean accuracy "
        "(93.00 %), fastclip the lowest (82.00 %). PGD L2 at eps 0.1 costs the models 1.5-3.0 points "
        "of clean accuracy. CW (up to 100 iterations) costs at most 5.0 points of clean accuracy (orig)."
    )
    # published: the sentences travel into results.md with the table
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "r.md").write_text(text)
    write_results(docs / "r.md", docs, "r")
    assert f"Summary (made from this table): {summary}" in (docs / "results.md").read_text()


def test_the_report_says_when_runs_disagree_and_leaves_out_a_stale_result(tmp_path):
    parent = tmp_path / "mnist" / "SimpleConv_models"
    runs = report_grid(parent, {1: 1, 2: 3})
    stale_run = parent / "method_orig_wBN_2"
    save_checkpoint({"epoch": 9, "w": torch.ones(3)}, stale_run / "ckpt_best.pth")  # retrained
    path = parent / "reproduction_report.md"
    args = argparse.Namespace(dataset="mnist", steps=list(STEPS))
    stale = write_report(parent, runs, settings([1, 2]), args, path, "cmd")
    assert len(stale) == 3 and all(f"of run {stale_run} measured ckpt_best.pth" in s for s in stale)
    text = path.read_text()
    assert "epochs that differ between the runs (1 in 2 run(s), 3 in 2 run(s))" in text
    assert f"- c.csv of run {stale_run} measured ckpt_best.pth" in text
    table = text.split("### wBN", 1)[1].split("\n\n", 2)[1]
    orig = next(line for line in table.splitlines() if line.startswith("| orig"))
    assert "(1 of 2 seeds)" in orig  # seed 2's stale values are out of orig's cells


# -- README: the sentence above its two results tables ---------------------------------------

_NUMBER = re.compile(r"^\s*(-?[\d.]+)")


def _readme_tables() -> tuple[str, list[pd.DataFrame]]:
    text = (REPO / "README.md").read_text()
    section = text.split("\n## Results\n", 1)[1].split("\n## ", 1)[0]
    tables, current = [], []
    for line in [*section.splitlines(), ""]:
        if line.startswith("|"):
            current.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif current:
            head, *body = current
            frame = pd.DataFrame([r for r in body if not set("".join(r)) <= set(":-")], columns=head)
            tables.append(frame.set_index("method").map(lambda c: float(_NUMBER.match(c).group(1))))
            current = []
    return section, tables


def test_the_readme_sentence_agrees_with_its_two_tables():
    section, tables = _readme_tables()
    sentence = "In both, FastClip has the smallest L, the highest certified and lowest clean accuracy."
    assert sentence in section.replace("\n", " ")
    assert len(tables) == 2  # "in both"
    for table in tables:
        (certified,) = [c for c in table.columns if c.startswith("certified")]
        assert table["L"].idxmin() == "fastclip", table["L"]
        assert table[certified].idxmax() == "fastclip", table[certified]
        assert table["clean"].idxmin() == "fastclip", table["clean"]
        # and the report's own sentences, made from these numbers, say the same
        values = pd.concat(
            [
                pd.DataFrame(
                    {
                        "mode": "wBN",
                        "method": table.index,
                        "seed": 1,
                        "column": column,
                        "kind": kind,
                        "attack": attack or "",
                        "eps": 0.1 if attack else float("nan"),
                        "value": table[source].to_numpy(),
                    }
                )
                for source, column, kind, attack in (
                    ("clean", "clean acc (%)", "acc", None),
                    (certified, "certified L2 0.1", "acc", "certify"),
                    ("L", "network bound L", "bound", None),
                )
            ],
            ignore_index=True,
        )
        said = " ".join(summary_sentences(values, "wBN", [1]))
        assert said.startswith("fastclip has the smallest network bound L")
        assert "fastclip has the highest certified L2 accuracy at eps 0.1" in said
        assert "fastclip the lowest" in said
