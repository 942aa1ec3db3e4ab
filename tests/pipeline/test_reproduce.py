"""experiments/reproduce.py (``make reproduce``): the tiny chain end to end on generated MNIST
(train grid, PGD + CW attacks, certified accuracy, collection, layer norms, curves, report), then a second invocation
that does nothing new, then a resume after one attack result was lost."""

from __future__ import annotations

import importlib.util
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pandas as pd
import pytest
from datagen import write_mnist

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "experiments" / "reproduce.py"


def load_reproduce():
    spec = importlib.util.spec_from_file_location("_script_reproduce", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def reproduce(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *argv],
        capture_output=True,
        text=True,
        cwd=REPO,
        stdin=subprocess.DEVNULL,
    )


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """{relative path: (mtime_ns, size)} of every file under root."""
    return {
        str(p.relative_to(root)): (p.stat().st_mtime_ns, p.stat().st_size)
        for p in root.rglob("*")
        if p.is_file()
    }


def markdown_table(text: str) -> pd.DataFrame:
    """The first Markdown table in ``text`` as strings, indexed by its first column."""
    lines = [line for line in text.split("\n\n", 2)[1].splitlines() if line.startswith("|")]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    return pd.DataFrame(rows[2:], columns=rows[0]).set_index(rows[0][0])


def test_settings_and_doctests():
    import doctest

    import fastclip.pipeline.cli.reproduce
    from fastclip.pipeline.reproduce import publishing, settings, steps, writer

    mod = load_reproduce()
    assert doctest.testmod(mod, optionflags=doctest.ELLIPSIS).failed == 0
    # the shim only re-exports: the examples are in the command's modules
    attempted = 0
    for module in (fastclip.pipeline.cli.reproduce, settings, steps, writer, publishing):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.failed == 0, module.__name__
        attempted += result.attempted
    assert attempted >= 6
    parse = mod.get_args_parser().parse_args
    full = mod.settings_from_args(parse([]))
    assert (full.methods, full.modes, full.seeds, full.n_examples, full.attacks) == (
        ["all"],
        ["all"],
        [1, 10, 100],
        1000,
        ["pgd", "cw", "certify"],
    )
    assert len(full.eps) == 3 and full.train_subset is None
    assert full.l2_eps == [0.02, 0.05, 0.1, 36 / 255]
    tiny = mod.settings_from_args(parse(["--size", "tiny", "--seeds", "3", "4", "--eps", "0.1"]))
    assert (tiny.seeds, tiny.eps, tiny.epochs) == ([3, 4], [0.1], 1)


def test_command_line_rebuilds_the_flags_that_matter():
    mod = load_reproduce()
    parser = mod.get_args_parser()
    argv = ["--epochs", "5", "--dataset", "mnist", "--l2-eps", "0.1", str(36 / 255), "--steps", "report"]
    argv += ["--methods", "all", "--attacks", "pgd", "pgdl2", "--publish", "docs", "--dry-run"]
    line = mod.command_line(parser, parser.parse_args(argv))
    assert line == (
        "python experiments/reproduce.py --dataset mnist --size full --publish docs --methods all "
        "--epochs 5 --l2-eps 0.1 0.1411764705882353 --attacks pgd pgdl2"
    )
    # what it prints parses back to the same settings
    again = parser.parse_args(shlex.split(line)[2:])
    assert mod.settings_from_args(again) == mod.settings_from_args(parser.parse_args(argv))


def test_attack_commands_run_certify_first_then_linf_then_pgdl2():
    mod = load_reproduce()
    parser = mod.get_args_parser()
    args = parser.parse_args(["--l2-eps", "0.1", "--attacks", "pgdl2", "cw", "certify", "pgd"])
    commands = mod.attack_commands(mod.settings_from_args(args), args, "logs/method_")

    def attacks(cmd):
        i = cmd.index("--attack")
        return cmd[i + 1 : cmd.index("--eps")]

    assert [attacks(c) for c in commands] == [["certify"], ["cw", "pgd"], ["pgdl2"]]
    assert commands[0][commands[0].index("--eps") + 1] == "0.1" and "--n-steps" not in commands[0]
    assert (
        "--cw-max-iter" in commands[1] and "--n-steps" in commands[2] and "--cw-max-iter" not in commands[2]
    )
    args = parser.parse_args(["--attacks", "pgd"])
    assert [attacks(c) for c in mod.attack_commands(mod.settings_from_args(args), args, "p")] == [["pgd"]]


@pytest.mark.slow  # each case is a reproduce.py process
@pytest.mark.parametrize(
    "argv, message",
    [
        (["--size", "huge"], "invalid choice: 'huge'"),
        (["--epochs", "0"], "argument --epochs: expected a positive integer, got '0'"),
        (["--eps", "0.02", "-1"], "argument --eps: expected a positive finite number, got -1"),
        (["--attacks", "fgsm"], "invalid choice: 'fgsm'"),
        (["--l2-eps", "0"], "argument --l2-eps: expected a positive finite number, got 0"),
        (
            ["--publish-name", "../x"],
            "--publish-name must be a file name (letters, digits, . _ -), got '../x'",
        ),
    ],
)
def test_bad_input(argv, message):
    proc = reproduce(*argv, "--dry-run")
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


@pytest.mark.slow
def test_dry_run_prints_the_full_grid_commands(tmp_path):
    proc = reproduce("--dry-run", "--logdir", str(tmp_path / "logs"), "--epochs", "7")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert (
        "batch_job_submit.py --dataset fashion-mnist --model SimpleConv --method all --mode all "
        "--seed 1 10 100 --epochs 7"
    ) in out
    assert re.search(
        r"batch_attack_submit.py fashion-mnist \S+/fashion-mnist/SimpleConv_models/method_ "
        r"--model SimpleConv --method all --mode all --seed 1 10 100 --attack pgd cw --eps ",
        out,
    )
    # the certified accuracy at the L2 radii, in a command of its own (no PGD steps, no CW)
    certify = [line for line in out.splitlines() if "--attack certify" in line]
    assert len(certify) == 1 and "--eps 0.02 0.05 0.1 0.1411764705882353 --n-examples 1000" in certify[0], out
    assert "--n-steps" not in certify[0] and "--cw-max-iter" not in certify[0]
    assert "--n-examples 1000" in out and "--backend local" in out
    assert not (tmp_path / "logs").exists()  # nothing written


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_tiny_chain_end_to_end_then_nothing_new_then_resume(tmp_path):
    data = write_mnist(tmp_path / "data", n_train=256, n_test=64, seed=0)
    logdir = tmp_path / "logs"
    docs = tmp_path / "docs"
    argv = ["--size", "tiny", "--dataset", "mnist", "--data-dir", str(data), "--logdir", str(logdir)]
    argv += ["--publish", str(docs)]
    first = reproduce(*argv)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "all steps succeeded" in first.stdout

    parent = logdir / "mnist" / "SimpleConv_models"
    runs = {m: parent / f"method_{m}_wBN_1" for m in ("fastclip", "miyato")}
    pgd_csv, cw_csv = "attack_pgd_eps0.02+0.05_steps3_n32.csv", "attack_cw_c0.02_conf0.1_iter5_bs1_n32.csv"
    certify_csv = "attack_certify_eps0.05+0.1_n32.csv"
    for run in runs.values():
        assert (run / "DONE").exists()
        pgd = pd.read_csv(run / pgd_csv)
        assert sorted(pgd["eps"]) == [0.02, 0.05] and set(pgd["n_examples"]) == {32}
        assert (
            (0 <= pgd["adv_acc"]) & (pgd["adv_acc"] <= pgd["clean_acc"]) & (pgd["clean_acc"] <= 100)
        ).all()
        cw = pd.read_csv(run / cw_csv)
        assert len(cw) == 1 and 0 <= cw["adv_acc"].iloc[0] <= cw["clean_acc"].iloc[0]
        cert = pd.read_csv(run / certify_csv)
        assert sorted(cert["eps"]) == [0.05, 0.1] and (cert["clean_acc"] == pgd["clean_acc"].iloc[0]).all()
        assert cert.sort_values("eps")["adv_acc"].is_monotonic_decreasing  # a larger radius certifies fewer
        assert (cert["adv_acc"] <= cert["clean_acc"]).all() and cert["lipschitz"].nunique() == 1
    summary = pd.read_csv(parent / "attack_results_summary.csv")
    assert sorted(zip(summary["method"], summary["attack"], summary["eps"].fillna(0))) == [
        ("fastclip", "certify", 0.05),
        ("fastclip", "certify", 0.1),
        ("fastclip", "cw", 0),
        ("fastclip", "pgd", 0.02),
        ("fastclip", "pgd", 0.05),
        ("miyato", "certify", 0.05),
        ("miyato", "certify", 0.1),
        ("miyato", "cw", 0),
        ("miyato", "pgd", 0.02),
        ("miyato", "pgd", 0.05),
    ]
    norms = pd.read_csv(parent / "layer_norms.csv").set_index(["method", "layer"])["sigma1_mean"]
    assert set(norms.index) == {(m, layer) for m in runs for layer in ("conv1", "conv1.conv", "fc1")}
    assert norms[("fastclip", "conv1.conv")] <= 1.05 and norms[("miyato", "conv1.conv")] > 1.05
    # The certificate's L is the chain's product: the input normalisation (std 0.5: a scale of
    # 2), the Conv+BN composition and the dense layer, as the norms step measured them.
    bounds = {}
    for m, run in runs.items():
        bounds[m] = pd.read_csv(run / certify_csv)["lipschitz"].iloc[0]
        assert bounds[m] == pytest.approx(2 * norms[(m, "conv1")] * norms[(m, "fc1")], rel=1e-4)
    for png in (
        "layer_norms.png",
        "curves_wBN.png",
        "sigma_fastclip_wBN.png",
        "clean_vs_certified_wBN.png",
        "robustness_wBN.png",
    ):
        image = matplotlib.image.imread(parent / png)  # a real PNG, of a real size
        assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 300, (png, image.shape)
    assert not (parent / "sigma_miyato_wBN.png").exists()
    report = (parent / "reproduction_report.md").read_text()
    assert report.splitlines()[2].startswith(
        f"Made by `python experiments/reproduce.py --dataset mnist --size tiny --data-dir {data} "
        f"--logdir {logdir} --publish {docs}` on 20"
    ), report[:500]
    table = markdown_table(report.split("### wBN")[1])
    assert table.index.name == "method" and list(table.columns) == [
        "clean acc (%)",
        "PGD Linf 0.02",
        "PGD Linf 0.05",
        "CW L2",
        "certified L2 0.05",
        "certified L2 0.1",
        "network bound L",
        "sigma_1 conv1.conv (conv)",
        "sigma_1 conv1 (Conv+BN)",
        "sigma_1 fc1 (linear)",
    ]
    assert list(table.index) == ["fastclip", "miyato"]
    per_run = pd.read_csv(parent / "attack_results_runs.csv").set_index(["method", "attack", "eps"])
    for m in runs:  # one seed, as the grid asks: the plain value of each CSV
        cell = table.loc[m]
        assert cell["clean acc (%)"] == f"{per_run.loc[(m, 'pgd', 0.02), 'clean_acc']:.2f}"
        assert cell["PGD Linf 0.05"] == f"{per_run.loc[(m, 'pgd', 0.05), 'adv_acc']:.2f}"
        assert cell["certified L2 0.1"] == f"{per_run.loc[(m, 'certify', 0.1), 'adv_acc']:.2f}"
        assert cell["network bound L"] == f"{bounds[m]:.4g}"
        assert cell["sigma_1 conv1 (Conv+BN)"] == f"{norms[(m, 'conv1')]:.4g}"
        assert cell["sigma_1 fc1 (linear)"] == f"{norms[(m, 'fc1')]:.4g}"
    for needle in (
        "![clean vs certified accuracy, wBN](clean_vs_certified_wBN.png)",
        "![accuracy under attack, wBN](robustness_wBN.png)",
        "![sigma_1 curves of fastclip, wBN](sigma_fastclip_wBN.png)",
        "## Comparison with the paper",
        "## Wall time per method",
        "![layer_norms](layer_norms.png)",
        "![curves_wBN](curves_wBN.png)",
    ):
        assert needle in report, needle
    # published: the report in docs/, its figures in docs/img/, the links rewritten to them
    published = (docs / "reproduce_mnist.md").read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", published)
    assert len(links) == 5 and all(link.startswith("img/reproduce_mnist_") for link in links), links
    for link in links:
        original = parent / link.removeprefix("img/reproduce_mnist_")
        assert (docs / link).read_bytes() == original.read_bytes()
    # and its tables in docs/results.md, between the report's markers, the figures linked from docs/img
    results = (docs / "results.md").read_text()
    assert results.startswith("# Results\n\n")
    section = results.split("<!-- results:reproduce_mnist:start -->", 1)[1]
    section = section.split("<!-- results:reproduce_mnist:end -->", 1)[0]
    assert "### wBN" in section and "[reproduce_mnist.md](reproduce_mnist.md)" in section
    assert "Made by `python experiments/reproduce.py --dataset mnist --size tiny" in section
    assert markdown_table(section.split("### wBN")[1]).equals(markdown_table(published.split("### wBN")[1]))
    assert re.findall(r"!\[[^\]]*\]\(([^)]+)\)", section) == [
        f"img/reproduce_mnist_{png}_wBN.png" for png in ("clean_vs_certified", "robustness", "sigma_fastclip")
    ]

    # Second invocation: the submit scripts submit nothing, the other steps are up to date,
    # and not one file under the logdir is written.
    before = snapshot(logdir)
    second = reproduce(*argv)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "0 run(s) to submit (local), 2 skipped" in second.stdout
    assert "0 run(s) to submit (local), 4 skipped" in second.stdout
    for step in ("collect", "norms", "curves wBN", "curves fastclip wBN", "plots", "report", "publish"):
        assert f"[{step}] up to date" in second.stdout, step
    assert snapshot(logdir) == before

    # Resume: a lost attack result is recomputed alone, and only what depends on it is remade.
    (runs["miyato"] / cw_csv).unlink()
    third = reproduce(*argv)
    assert third.returncode == 0, third.stderr[-3000:]
    assert "0 run(s) to submit (local), 2 skipped" in third.stdout
    assert "1 run(s) to submit (local), 3 skipped" in third.stdout
    assert "[norms] up to date" in third.stdout and "[curves wBN] up to date" in third.stdout
    assert "[collect] up to date" not in third.stdout and "[report] wrote" in third.stdout
    after = snapshot(logdir)
    changed = sorted(k for k in after if after[k] != before.get(k))
    assert all(
        re.fullmatch(
            r"mnist/SimpleConv_models/(method_miyato_wBN_1/(attack_cw_.*\.csv|logs/.*)"
            r"|attack_results_(runs|summary|wide)\.csv|reproduction_report\.md|(clean_vs_certified|robustness)_wBN\.png"
            r"|grids/.*)",
            k,
        )
        for k in changed
    ), changed
    assert (runs["miyato"] / cw_csv).exists()
    assert pd.read_csv(parent / "attack_results_summary.csv").equals(summary)

    # An earlier attack on another number of images stays in the CSVs, not in the report.
    old = pd.read_csv(runs["miyato"] / pgd_csv).assign(n_examples=16, clean_acc=12.5)
    old.to_csv(runs["miyato"] / pgd_csv.replace("n32", "n16"), index=False)
    fourth = reproduce(*argv, "--steps", "collect", "report")
    assert fourth.returncode == 0, fourth.stderr[-3000:]
    assert set(pd.read_csv(parent / "attack_results_summary.csv")["n_examples"]) == {16, 32}
    report = (parent / "reproduction_report.md").read_text()
    assert "Attack results on 16 images from earlier runs" in report
    table = markdown_table(report.split("### wBN")[1])
    assert "12.5" not in table.to_string() and list(table.index) == ["fastclip", "miyato"], table

    # Other settings remake the report even where no file changed: a grid of two seeds, the
    # second never trained, has every cell of one seed labelled.
    fifth = reproduce(*argv, "--seeds", "1", "2", "--steps", "report")
    assert fifth.returncode == 0 and "[report] wrote" in fifth.stdout, fifth.stdout[-3000:]
    table = markdown_table((parent / "reproduction_report.md").read_text().split("### wBN")[1])
    assert table.map(lambda c: c.endswith("(1 of 2 seeds)")).all().all(), table
    assert table.loc["fastclip", "network bound L"] == f"{bounds['fastclip']:.4g} (1 of 2 seeds)"


def test_makefile_target_calls_this_script():
    """`make reproduce` is a thin call of experiments/reproduce.py (recipes checked with make -n)."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")

    def recipe(*make_args: str) -> str:
        proc = subprocess.run(
            ["make", "-n", "reproduce", *make_args], capture_output=True, text=True, cwd=REPO
        )
        lines = [line for line in proc.stdout.splitlines() if "experiments/reproduce.py" in line]
        assert proc.returncode == 0 and len(lines) == 1, proc.stdout + proc.stderr
        return lines[0]

    assert "experiments/reproduce.py --dataset fashion-mnist --size full --epochs 5" in recipe("EPOCHS=5")
    assert "experiments/reproduce.py --dataset fashion-mnist --size tiny" in recipe("SIZE=tiny")
    assert "experiments/reproduce.py --dataset mnist --size full --epochs 3" in recipe("DATASET=mnist")


@pytest.mark.parametrize(
    "argv,augment",
    [
        (["--dataset", "mnist"], "paper"),
        (["--dataset", "fashion-mnist"], "none"),
        (["--dataset", "mnist", "--augment", "none"], "none"),
    ],
)
def test_training_augmentation_per_dataset(argv, augment):
    """MNIST runs with the authors' augmentation, Fashion-MNIST (no pipeline of theirs) without."""
    mod = load_reproduce()
    args = mod.get_args_parser().parse_args(argv)
    cmd = mod.train_command(mod.settings_from_args(args), args)
    i = cmd.index("--augment")
    assert cmd[i + 1] == augment
