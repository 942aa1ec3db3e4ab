"""experiments/train.py as users run it: real subprocesses on tiny generated MNIST files.

- every method x mode: all outputs exist and parse, TensorBoard holds the scalars,
  fastclip's clipped layers end with exact sigma_1 <= 1.05 c;
- kill -9 mid-epoch and rerun == uninterrupted run (CPU);
- bad input: exit code 2, one line on stderr, nothing written is damaged.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from datagen import write_mnist

from fastclip.pipeline.methods import MODES, available
from fastclip.pipeline.training import CKPT_KEYS, TrainConfig, read_metrics, run, run_dir_for

pytestmark = pytest.mark.timeout(600)

TRAIN = Path(__file__).resolve().parents[2] / "experiments" / "train.py"
SCALARS = ("train/acc", "train/loss", "test/acc", "test/loss")
# Subprocesses at once: each is mostly torch's import; more would only queue on 2 cores.
PARALLEL = 3


@pytest.fixture(scope="module")
def mnist_root(tmp_path_factory):
    return write_mnist(tmp_path_factory.mktemp("mnist"), n_train=256, n_test=64)


def train_cmd(logdir, root, *extra: str) -> list[str]:
    return [
        sys.executable,
        str(TRAIN),
        "--dataset",
        "mnist",
        "--model",
        "SimpleConv",
        "--data-dir",
        str(root),
        "--logdir",
        str(logdir),
        "--device",
        "cpu",
        "--lr",
        "1e-4",
        *extra,
    ]


def call(cmd: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    # Only this process's threads wait on the children; their output is captured whole.
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of a run directory's TensorBoard event files, as (step, value) lists."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def without_time(rows):
    return [{k: v for k, v in r.items() if k != "wall_time"} for r in rows]


# -- every method x mode -----------------------------------------------------------------------
FASTCLIP_CLIP = 3.0  # SimpleConv's conv starts near sigma_1 = 5.2 on MNIST: clipping to 3 is real work


def method_flags(method: str, mode: str) -> list[str]:
    flags = []
    if method == "fastclip":
        # 2 epochs x 2 steps: the wrapper (which clips inside the training forward, before
        # the optimiser step) clips once, at the last step (step index 3). A short initial
        # PowerQR and a capped refinement keep that one clip to seconds.
        flags += [
            "--clip",
            str(FASTCLIP_CLIP),
            "--fastclip-init-delay",
            "3",
            "--fastclip-clip-steps",
            "3",
            "--fastclip-init-pqr-iter",
            "20",
            "--fastclip-refine-iter",
            "30",
        ]
    if mode == "clipBN":
        flags += ["--bn-count", "1"]  # clamp BN after every step, so the last step clamps
    return flags


@pytest.mark.slow
@pytest.mark.parametrize("method", available())
def test_every_mode_of_a_method_trains_and_writes_everything(method, mnist_root, tmp_path):
    cmds = {
        mode: train_cmd(
            tmp_path,
            mnist_root,
            "--method",
            method,
            "--mode",
            mode,
            "--epochs",
            "2",
            "--train-subset",
            "64",
            "--test-subset",
            "32",
            "--batch-size",
            "32",
            *method_flags(method, mode),
        )
        for mode in MODES
    }
    with ThreadPoolExecutor(PARALLEL) as pool:
        results = dict(zip(cmds, pool.map(call, cmds.values())))
    for mode, proc in results.items():
        assert proc.returncode == 0, f"{method} {mode}: exit {proc.returncode}\n{proc.stderr[-3000:]}"
        assert "Traceback" not in proc.stderr
        d = run_dir_for(
            TrainConfig(
                dataset="mnist", model="SimpleConv", method=method, mode=mode, seed=1, logdir=str(tmp_path)
            )
        )
        check_run_dir(d, method, mode)


def check_run_dir(d: Path, method: str, mode: str) -> None:
    meta = json.loads((d / "config.json").read_text())
    s = meta["settings"]
    assert (s["method"], s["mode"], s["epochs"], s["batch_size"], s["lr"]) == (method, mode, 2, 32, 1e-4)
    assert s["clip"] == (FASTCLIP_CLIP if method == "fastclip" else 1.0)
    assert meta["device"] == "cpu" and meta["torch_version"] == torch.__version__
    done = json.loads((d / "DONE").read_text())
    rows = read_metrics(d / "metrics.csv")
    assert [r["epoch"] for r in rows] == [1, 2] and done["epochs"] == 2
    for r in rows:
        for k, v in r.items():
            assert v == v and v >= 0, (k, v)  # finite-ish, non-negative, no NaN
        assert r["train_acc"] <= 100 and r["test_acc"] <= 100
    for name in ("ckpt_last.pth", "ckpt_best.pth"):
        ckpt = torch.load(d / name, weights_only=True)
        assert set(CKPT_KEYS) <= set(ckpt) and ckpt["config"]["method"] == method
    assert torch.load(d / "ckpt_last.pth", weights_only=True)["epoch"] == 2
    assert "finished" in (d / "train.log").read_text()

    tb = scalars(d)
    for tag in SCALARS:
        key = tag.replace("/", "_")
        assert [round(v, 3) for _, v in tb[tag]] == [round(r[key], 3) for r in rows], tag
        assert [step for step, _ in tb[tag]] == [1, 3]  # index of each epoch's last step
    lsv_columns = {k[len("lsv/") :] for k in rows[0] if k.startswith("lsv/")}
    lsv_tags = {t[len("train/lsv_") :] for t in tb if t.startswith("train/lsv_")}
    assert lsv_tags == lsv_columns
    if mode != "noBN":
        assert "conv1.bn" in lsv_columns
    if method != "orig":  # every clipping method acts on the conv (nsedghi, lip4conv: convs only)
        assert "conv1.conv" in lsv_columns, lsv_columns
    if method in ("fastclip", "gouk", "miyato"):
        assert "fc1" in lsv_columns, lsv_columns
    clip = FASTCLIP_CLIP if method == "fastclip" else 1.0
    if mode == "clipBN":
        # Clamped after the last step, and eval does not move the running statistics.
        assert rows[-1]["lsv/conv1.bn"] <= clip * (1 + 1e-5)
    if method == "fastclip":
        check_fastclip_bound(d, clip)


def exact_sigma(module: torch.nn.Module, input_shape: tuple[int, ...]) -> float:
    """sigma_1 of the module's linear part at input_shape, exact to float64 rounding:
    the n x n Gram matrix A^T A built column by column (autograd, float64) and its largest
    eigenvalue. For SimpleConv's conv (n = 784, m = 50176) this is much cheaper than the
    SVD of the explicit m x n matrix and gives the same number."""
    from fastclip.linalg.operator import AffineOperator

    op = AffineOperator(module, input_shape, dtype=torch.float64)
    eye = torch.eye(op.n, dtype=torch.float64)
    gram = torch.cat(
        [
            op.gram(eye[i : i + 256].reshape(-1, *op.input_shape)).reshape(-1, op.n)
            for i in range(0, op.n, 256)
        ]
    )
    return float(torch.linalg.eigvalsh((gram + gram.T) / 2)[-1].clamp(min=0).sqrt())


def check_fastclip_bound(d: Path, clip: float) -> None:
    """The exact sigma_1 of every layer FastClip clips (conv, linear, and in wBN the Conv+BN
    composition), in the trained model, is at most 1.05 c; the clip was real work
    (the conv started far above c)."""
    from fastclip.pipeline.training import load_model
    from fastclip.wrapper import SpectralNorm

    model, _ = load_model(d, "last")
    clipped = [m for m in model.modules() if isinstance(m, SpectralNorm) and m.clip_flag]
    kinds = sorted(m.kind for m in clipped)
    assert kinds == (["composition", "conv", "linear"] if "wBN" in d.name else ["conv", "linear"]), kinds
    # step 0's scalar is logged before the first clip: the conv started far above c
    assert scalars(d)["train/lsv_conv1.conv"][0][1] > 1.5 * clip
    # metrics.csv's per-epoch sigma_1 is taken after finish_epoch's clip
    assert read_metrics(d / "metrics.csv")[-1]["lsv/conv1.conv"] <= 1.02 * clip
    for w in clipped:
        if w.kind == "linear":
            sigma = float(torch.linalg.matrix_norm(w.module.weight.detach().double(), ord=2))
        else:
            sigma = exact_sigma(w.module, w.shape)
        assert sigma <= 1.05 * clip, f"{d.name} {w.identifier}: exact sigma_1 {sigma:.4f} > 1.05 x {clip}"
        if w.kind == "conv":
            assert sigma >= 0.9 * clip, f"{w.identifier}: {sigma:.4f}"  # clipped to c, not far below


# -- kill and resume ---------------------------------------------------------------------------------
KILL_RUNS = {
    # gouk keeps its power-iteration vectors in the method (method.state_dict()), 16 steps/epoch.
    "gouk": ("--train-subset", "256", "--batch-size", "16", "--lsv-every", "4"),
    # fastclip keeps its state in wrapper buffers; clips at steps 10 and 18 (epochs 2 and 3),
    # and its wrappers write train/lsv_* every 4 steps. 8 steps/epoch.
    "fastclip": (
        "--train-subset",
        "128",
        "--batch-size",
        "16",
        "--clip",
        "4",
        "--fastclip-init-delay",
        "10",
        "--fastclip-clip-steps",
        "8",
        "--fastclip-init-pqr-iter",
        "20",
        "--fastclip-refine-iter",
        "30",
        "--fastclip-summary-steps",
        "4",
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("method", list(KILL_RUNS))
def test_kill_mid_epoch_then_rerun_equals_an_uninterrupted_run(method, mnist_root, tmp_path):
    extra = ("--method", method, "--epochs", "3", "--test-subset", "64", *KILL_RUNS[method])
    steps_per_epoch = int(extra[extra.index("--train-subset") + 1]) // int(
        extra[extra.index("--batch-size") + 1]
    )
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    d_whole = run_dir_for(TrainConfig(dataset="mnist", model="SimpleConv", method=method, logdir=str(whole)))
    d_killed = run_dir_for(
        TrainConfig(dataset="mnist", model="SimpleConv", method=method, logdir=str(killed))
    )
    with ThreadPoolExecutor(1) as pool:
        reference = pool.submit(call, train_cmd(whole, mnist_root, *extra))
        proc = subprocess.Popen(
            train_cmd(killed, mnist_root, *extra), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            deadline = time.monotonic() + 240
            while not (d_killed / "ckpt_last.pth").exists():
                assert proc.poll() is None, "the run ended before its first checkpoint"
                assert time.monotonic() < deadline, "no checkpoint after 240 s"
                time.sleep(0.05)
            # Half an epoch in: epoch 1's duration is in metrics.csv (written before the checkpoint).
            time.sleep(read_metrics(d_killed / "metrics.csv")[0]["wall_time"] / 2)
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        assert proc.returncode == -signal.SIGKILL and not (d_killed / "DONE").exists()
        epochs_done = torch.load(d_killed / "ckpt_last.pth", weights_only=True)["epoch"]
        assert epochs_done < 3
        ref = reference.result()
    assert ref.returncode == 0, ref.stderr[-3000:]

    resumed = call(train_cmd(killed, mnist_root, *extra))
    assert resumed.returncode == 0 and "Traceback" not in resumed.stderr, resumed.stderr[-3000:]
    assert f"resuming after epoch {epochs_done}" in resumed.stderr
    expected = read_metrics(d_whole / "metrics.csv")
    assert without_time(read_metrics(d_killed / "metrics.csv")) == without_time(expected)
    # TensorBoard: the killed attempt's events after the checkpoint are purged, so every
    # curve equals the uninterrupted one, one point per step.
    tb_whole, tb_killed = scalars(d_whole), scalars(d_killed)
    assert set(tb_killed) == set(tb_whole)
    for tag in tb_whole:
        assert tb_killed[tag] == tb_whole[tag], tag
    assert [s for s, _ in tb_whole["test/acc"]] == [steps_per_epoch * e - 1 for e in (1, 2, 3)]
    assert any(t.startswith("train/lsv_") and len(v) > 3 for t, v in tb_whole.items())
    # The final models are the same tensors.
    a = torch.load(d_whole / "ckpt_last.pth", weights_only=True)["model"]
    b = torch.load(d_killed / "ckpt_last.pth", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- bad input ----------------------------------------------------------------------------------------
def snapshot(root: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


BAD_INPUT = {
    "model": (["--model", "VGG"], ["'VGG'", "SimpleConv", "ResNet18", "DLA"]),
    "dataset": (["--dataset", "svhn"], ["'svhn'", "cifar", "fashion-mnist"]),
    "method": (["--method", "parseval"], ["'parseval'", "fastclip", "lip4conv"]),
    "mode": (["--mode", "BN"], ["'BN'", "wBN", "noBN", "clipBN"]),
    "epochs": (["--epochs", "-3"], ["--epochs", "-3"]),
    "other method's flag": (["--gouk-n-iter", "3"], ["--gouk-n-iter", "'gouk'", "'orig'"]),
    "logdir is a file": (["--logdir", "{file}"], ["{file}", "not a directory"]),
    "conflicting run": (["--lr", "1e-3"], ["lr=0.0001 there vs 0.001 now", "--force"]),
}
#: Cases run as real subprocesses (the rest call the script's main() in-process: the same
#: code path, without paying torch's import per case).
BAD_INPUT_SUBPROCESS = ("model", "logdir is a file", "conflicting run")


@pytest.fixture
def existing_run(mnist_root, tmp_path):
    """A finished run under tmp_path/logs and a plain file tmp_path/file; returns tmp_path."""
    cfg = TrainConfig(
        dataset="mnist",
        model="SimpleConv",
        method="orig",
        seed=1,
        epochs=1,
        lr=1e-4,
        batch_size=32,
        train_subset=32,
        test_subset=32,
        data_dir=str(mnist_root),
        logdir=str(tmp_path / "logs"),
    )
    run(cfg)
    (tmp_path / "file").write_text("keep")
    return tmp_path


def bad_argv(case: str, root: Path, tmp: Path) -> list[str]:
    argv, _ = BAD_INPUT[case]
    return [
        "--dataset",
        "mnist",
        "--data-dir",
        str(root),
        "--logdir",
        str(tmp / "logs"),
        "--method",
        "orig",
        "--epochs",
        "1",
        "--batch-size",
        "32",
        "--train-subset",
        "32",
        "--test-subset",
        "32",
        "--lr",
        "1e-4",
        # argparse keeps the last of repeated flags, so the case's own value applies.
        *[a.format(file=tmp / "file") for a in argv],
    ]


def check_refusal(case: str, code: int, stderr: str, tmp: Path) -> None:
    err = stderr.strip()
    assert code == 2, f"{case}: exit {code}\n{stderr[-2000:]}"
    assert len(err.splitlines()) == 1, f"{case}: {err}"
    assert err.startswith("train.py: error:") and "Traceback" not in err
    for needle in BAD_INPUT[case][1]:
        needle = needle.format(file=tmp / "file")
        assert needle in err, f"{case}: {needle!r} not in {err!r}"


@pytest.mark.slow
def test_bad_input_exits_2_with_one_line_and_damages_nothing(mnist_root, existing_run):
    tmp = existing_run
    before = snapshot(tmp)
    cmds = {
        case: [sys.executable, str(TRAIN), *bad_argv(case, mnist_root, tmp)] for case in BAD_INPUT_SUBPROCESS
    }
    with ThreadPoolExecutor(PARALLEL) as pool:
        results = dict(zip(cmds, pool.map(call, cmds.values())))
    for case, proc in results.items():
        check_refusal(case, proc.returncode, proc.stderr, tmp)
    assert snapshot(tmp) == before


@pytest.mark.parametrize("case", [c for c in BAD_INPUT if c not in BAD_INPUT_SUBPROCESS])
def test_bad_input_in_process(case, mnist_root, existing_run, capsys):
    import runpy

    tmp = existing_run
    before = snapshot(tmp)
    script = runpy.run_path(str(TRAIN), run_name="train")
    with pytest.raises(SystemExit) as e:
        script["main"](script["get_args_parser"]().parse_args(bad_argv(case, mnist_root, tmp)))
    check_refusal(case, e.value.code, capsys.readouterr().err, tmp)
    assert snapshot(tmp) == before


@pytest.mark.slow
def test_output_to_a_file_has_no_bars_and_one_line_per_epoch(mnist_root, tmp_path):
    """Not a terminal (a SLURM log, ``make demo > log``): no tqdm redraws (``\\r``), and
    one log line per epoch with its loss, accuracy and time."""
    log = tmp_path / "train.out"
    with open(log, "wb") as f:
        proc = subprocess.run(
            train_cmd(
                tmp_path / "logs",
                mnist_root,
                "--method",
                "orig",
                "--epochs",
                "3",
                "--train-subset",
                "64",
                "--test-subset",
                "32",
                "--batch-size",
                "16",
            ),
            stdout=f,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            timeout=300,
        )
    out = log.read_bytes()
    assert proc.returncode == 0, out[-2000:]
    assert b"\r" not in out
    lines = [ln for ln in out.decode().splitlines() if " epoch " in ln and "/3" in ln]
    assert [ln.split(" epoch ")[1].split(":")[0] for ln in lines] == ["1/3", "2/3", "3/3"], lines
    for ln in lines:
        assert "train loss" in ln and "acc" in ln and "test loss" in ln and ln.endswith(" s"), ln
