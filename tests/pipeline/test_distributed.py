"""One run over several processes (fastclip.pipeline.training.distributed), on the CPU with gloo,
world size 2, one thread per rank, a free port per process group.

* the data split: at world size 1 the batches are torch's shuffled DataLoader's (so a
  plain run is unchanged), and global batch k holds the same samples at any world size;
* every method in wBN (and fastclip in clipBN) leaves parameters, buffers and method
  state bitwise equal on both ranks after steps that clip or project; without the buffer
  broadcast fastclip's ranks split (the mechanism is needed, not decoration);
* sharded evaluation counts every test image once; the epoch-end check names the
  first tensor that differs;
* train.py: 2 processes at batch b end with the weights and metrics of 1 process at
  batch 2b (noBN, no augmentation); a resume at another world size warns and is
  recorded; kill -9 of one rank under torchrun, then the same command: the metrics of
  an uninterrupted run; a 2-task SLURM job (local cluster) ends DONE;
* the grid's multi-process flags and their bad combinations (exit 2, one line).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from datagen import write_mnist
from dist_worker import CASES
from test_slurm import start_local_cluster, wait_until_settled
from torch.utils.data import DataLoader

import fastclip.pipeline.cli.train as train_module
import fastclip.pipeline.jobs as jobs
from fastclip.pipeline.cli.batch_job_submit import TRAIN_SCRIPT
from fastclip.pipeline.cli.batch_job_submit import get_args_parser as submit_parser
from fastclip.pipeline.cli.batch_job_submit import main as submit_cli
from fastclip.pipeline.cli.train import main as train_cli
from fastclip.pipeline.training import (
    TrainConfig,
    build_model,
    config_from_args,
    get_args_parser,
    make_optimizer,
    read_metrics,
    resolve,
    train_epoch,
)
from fastclip.pipeline.training import run as train_run
from fastclip.pipeline.training.distributed import (
    GlobalBatchSampler,
    LaunchEnv,
    RankDivergenceError,
    Replica,
    checksums,
    launch_env,
)

REPO = Path(__file__).resolve().parents[2]
TRAIN = str(REPO / "experiments" / "train.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, world: int, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SUBMITIT_"))}
    env.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
    )
    return env


def run_ranks(argv: list[str], world: int = 2, timeout: float = 300) -> list[subprocess.CompletedProcess]:
    """``argv`` as ``world`` processes with torchrun's variables (a fresh port)."""
    port = free_port()
    procs = [
        subprocess.Popen(
            argv, env=rank_env(r, world, port), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for r in range(world)
    ]
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=timeout)
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    for r, p in enumerate(out):
        assert p.returncode == 0, f"rank {r} failed: {p.stderr[-3000:]}"
    return out


# -- the data split ------------------------------------------------------------------------------


def test_world_size_1_batches_are_torchs_shuffled_dataloader():
    data = list(range(53))
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    torch_batches = [b.tolist() for b in DataLoader(data, batch_size=8, shuffle=True, generator=g1)]
    ours = [
        b.tolist()
        for b in DataLoader(data, batch_sampler=GlobalBatchSampler(53, 8, generator=g2), generator=g2)
    ]
    assert ours == torch_batches


@pytest.mark.parametrize("n", [48, 53, 49])
def test_global_batch_k_holds_the_same_samples_at_any_world_size(n):
    def batches(world: int, per_rank: int) -> list[list[int]]:
        per = []
        for r in range(world):
            s = GlobalBatchSampler(n, per_rank, r, world, torch.Generator().manual_seed(3))
            per.append(list(s))
        assert len({len(p) for p in per}) == 1  # every rank takes the same number of steps
        return [sum((p[k] for p in per), []) for k in range(len(per[0]))]

    one = batches(1, 12)
    assert batches(2, 6) == one
    assert batches(3, 4) == one
    assert sorted(sum(one, [])) == list(range(n))  # nothing padded, nothing dropped


class _Noisy(torch.utils.data.Dataset):
    """An augmentation that draws from torch's global RNG in the main process."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.rand(1) + i


def test_augmentation_under_several_processes_leaves_the_methods_stream_alone():
    cfg = resolve(TrainConfig(dataset="mnist", batch_size=2))
    torch.manual_seed(5)
    before = torch.get_rng_state()
    draws = []
    for rank in range(2):
        replica = Replica(rank=rank, world_size=2)  # no process group: the loader needs none
        loader, sizes = replica.train_loader(_Noisy(), cfg, torch.Generator().manual_seed(1), epoch=1)
        draws.append(torch.cat(list(loader)).frac())
        assert sizes == [4, 4]
        assert torch.equal(torch.get_rng_state(), before)  # the stream the methods draw from
    assert not torch.equal(draws[0], draws[1])  # each rank augments with draws of its own


def test_checksums_see_a_one_ulp_change_and_a_swap():
    a = torch.randn(10)
    b = a.clone()
    b[4] = torch.nextafter(b[4], torch.tensor(float("inf")))
    c = a.clone()
    c[[1, 2]] = a[[2, 1]]
    ca, cb, cc = (checksums({"t": t})["t"] for t in (a, b, c))
    assert ca != cb and ca[0] == cc[0] and ca != cc
    assert checksums({"t": a.clone()}) == checksums({"t": a})


def test_launch_env_reads_torchruns_variables(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SUBMITIT_EXECUTOR"):
        monkeypatch.delenv(k, raising=False)
    assert launch_env() == LaunchEnv()
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert launch_env() == LaunchEnv(3, 4, 1, "torchrun")


def test_launch_env_reads_a_multi_task_submitit_job_through_submitit(monkeypatch):
    exported = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    for k in (*exported, "CUDA_VISIBLE_DEVICES"):
        # set, then deleted: monkeypatch restores only what it changed, and submitit's
        # export below sets these in os.environ behind its back
        monkeypatch.setenv(k, "")
        monkeypatch.delenv(k)
    slurm = {
        "SUBMITIT_EXECUTOR": "slurm",
        "SLURM_JOB_ID": "77",
        "SLURM_NTASKS": "4",
        "SLURM_PROCID": "3",
        "SLURM_LOCALID": "1",
        "SLURM_NODEID": "1",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_JOB_NODELIST": "node[7-8]",
    }
    for k, v in slurm.items():
        monkeypatch.setenv(k, v)
    assert launch_env() == LaunchEnv(3, 4, 1, "slurm")
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["MASTER_ADDR"]) == ("3", "4", "node7")
    assert "CUDA_VISIBLE_DEVICES" not in os.environ  # each process picks cuda:<LOCAL_RANK> itself
    monkeypatch.setenv("SLURM_NTASKS", "1")
    for k in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k)
    assert launch_env() == LaunchEnv()  # a one-task job is a plain run


def test_launch_env_reads_an_srun_step_but_not_the_batch_script(monkeypatch):
    exported = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    for k in (*exported, "SUBMITIT_EXECUTOR", "SLURM_STEP_ID", "SLURM_STEP_NUM_TASKS"):
        monkeypatch.setenv(k, "")  # recorded, so that what launch_env exports is undone
        monkeypatch.delenv(k)
    batch = {"SLURM_JOB_ID": "16", "SLURM_NTASKS": "2", "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}
    batch |= {"SLURM_NODEID": "0", "SLURM_JOB_NUM_NODES": "1", "SLURM_JOB_NODELIST": "vm"}
    for k, v in batch.items():
        monkeypatch.setenv(k, v)
    assert launch_env() == LaunchEnv()  # the batch script: srun starts the tasks
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    monkeypatch.setenv("SLURM_PROCID", "1")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    assert launch_env() == LaunchEnv(1, 2, 1, "slurm")
    assert (os.environ["MASTER_ADDR"], os.environ["WORLD_SIZE"]) == ("vm", "2")


# -- every method rank-consistent; evaluation; the divergence check ------------------------------


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ranks")
    run_ranks([sys.executable, str(REPO / "tests" / "dist_worker.py"), str(out)])
    results = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    return out, results


def _differing(out: Path, case: str) -> list[str]:
    a = torch.load(out / f"{case}_rank0.pt", weights_only=True)
    b = torch.load(out / f"{case}_rank1.pt", weights_only=True)
    assert a.keys() == b.keys()
    return [k for k in a if not torch.equal(a[k], b[k])]


@pytest.mark.parametrize("case", [c for c in CASES if c != "nobcast"])
def test_every_method_leaves_both_ranks_bitwise_equal(two_ranks, case):
    out, results = two_ranks
    assert results[0]["world_size"] == 2 and results[0]["backend"] == "gloo"
    assert _differing(out, case) == []


def test_without_the_buffer_broadcast_the_ranks_split(two_ranks):
    # fastclip in wBN tracks (and clips) the Conv+BN composition from BN's running
    # variance, which each rank updates from its own shard: without the broadcast after
    # backward the composition's tracked norm, which decides its next clip, splits.
    out, _ = two_ranks
    differing = _differing(out, "nobcast")
    assert "model.conv1.module.bn.module.running_var" in differing
    assert "model.conv1.sigma" in differing, differing


def test_sharded_evaluation_counts_every_image_once(two_ranks):
    _, results = two_ranks
    for r in results:
        loss, acc = r["eval_sharded"]
        single_loss, single_acc = r["eval_single"]
        assert acc == single_acc  # 37 images: a duplicated or missing one moves it by 2.7 points
        assert loss == pytest.approx(single_loss, rel=1e-6)


def test_divergence_check_names_the_first_differing_tensor(two_ranks):
    _, results = two_ranks
    for r in results:
        assert r["divergence"] == "ranks diverged after epoch 2: 'fc1.bias' differs between rank 0 and rank 1"


# -- train.py under several processes ------------------------------------------------------------

INVARIANCE = [
    "--dataset",
    "mnist",
    "--model",
    "SimpleConv",
    "--mode",
    "noBN",
    "--augment",
    "none",
    "--epochs",
    "2",
    "--threads",
    "1",
    "--lsv-every",
    "0",
]


@pytest.fixture(scope="module")
def mnist_data(tmp_path_factory):
    return str(write_mnist(tmp_path_factory.mktemp("data"), n_train=90, n_test=45, seed=0))


def _params(run_dir: Path) -> dict[str, torch.Tensor]:
    ckpt = torch.load(run_dir / "ckpt_last.pth", weights_only=True)
    return {
        k: v for k, v in ckpt["model"].items() if not k.endswith(("sigma", "vectors", "step", "input_shape"))
    }


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / a.norm()) if a.norm() > 0 else float((a - b).norm())


def train_here(argv: list[str]) -> dict:
    """A plain (world size 1) run in this process."""
    return train_run(config_from_args(get_args_parser().parse_args(argv)))


def test_two_processes_at_batch_b_train_as_one_at_batch_2b(tmp_path, mnist_data, caplog):
    # fastclip clips every 2 steps: 4 global batches per epoch (the last one partial,
    # 18 of 24 samples: 9 per rank), 2 epochs.
    flags = [*INVARIANCE, "--method", "fastclip", "--fastclip-clip-steps", "2", "--data-dir", mnist_data]
    two, one = tmp_path / "two", tmp_path / "one"
    run_ranks([sys.executable, TRAIN, *flags, "--batch-size", "12", "--logdir", str(two)])
    train_here([*flags, "--batch-size", "24", "--logdir", str(one)])
    run = "mnist/SimpleConv_models/method_fastclip_noBN_1"
    p1, p2 = _params(one / run), _params(two / run)
    errors = {k: _rel(p1[k], p2[k]) for k in p1}
    assert max(errors.values()) < 1e-5, errors
    m1, m2 = read_metrics(one / run / "metrics.csv"), read_metrics(two / run / "metrics.csv")
    for r1, r2 in zip(m1, m2, strict=True):
        for key in ("train_loss", "train_acc", "test_loss", "test_acc"):
            assert r2[key] == pytest.approx(r1[key], rel=1e-5), key
    config = json.loads((two / run / "config.json").read_text())
    assert (config["world_size"], config["batch_size_per_process"], config["global_batch_size"]) == (
        2,
        12,
        24,
    )
    assert config["backend"] == "gloo" and config["world_size_history"] == [
        {"from_epoch": 1, "world_size": 2}
    ]
    assert json.loads((one / run / "config.json").read_text())["world_size"] == 1
    # A resume at another world size warns once and is recorded (here: the last epoch's
    # checkpoint without DONE, so nothing is left to train).
    (two / run / "DONE").unlink()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fastclip"):
        train_here([*flags, "--batch-size", "12", "--logdir", str(two)])
    warnings = [r.getMessage() for r in caplog.records if "process(es)" in r.getMessage()]
    assert warnings == [
        "resuming after epoch 2, which ran on 2 process(es), on 1: the global batch changes from 24 to 12 "
        "(--batch-size is per process)"
    ]
    history = json.loads((two / run / "config.json").read_text())["world_size_history"]
    assert history == [{"from_epoch": 1, "world_size": 2}, {"from_epoch": 3, "world_size": 1}]
    assert (two / run / "DONE").exists()


def test_sync_bn_is_refused_on_the_cpu_in_one_line(tmp_path, mnist_data, capsys):
    argv = [
        "--dataset",
        "mnist",
        "--data-dir",
        mnist_data,
        "--sync-bn",
        "--device",
        "cpu",
        "--logdir",
        str(tmp_path),
    ]
    with pytest.raises(SystemExit) as e:
        train_cli(argv)
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "train.py: error: --sync-bn needs CUDA (SyncBatchNorm runs on GPU modules only); "
        "this run's device is cpu (see --help)"
    ]
    assert not any(tmp_path.iterdir())


def test_train_cli_reports_a_rank_split_in_one_line(monkeypatch, capsys):
    def split(config):
        raise RankDivergenceError(
            "ranks diverged after epoch 2: 'fc1.bias' differs between rank 0 and rank 1"
        )

    monkeypatch.setattr(train_module, "run", split)
    with pytest.raises(SystemExit) as exit_info:
        train_cli(["--dataset", "mnist"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [
        "train.py: error: ranks diverged after epoch 2: 'fc1.bias' differs between rank 0 and rank 1"
    ]


def _rank_pid(parent: int, rank: int) -> int | None:
    """The pid of the torchrun worker of ``rank`` among the descendants of ``parent``."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            env = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        if ppid == parent and f"RANK={rank}".encode() in env and b"TORCHELASTIC_RUN_ID" in b"\0".join(env):
            return int(proc.name)
    return None


@pytest.mark.slow
def test_kill_9_of_one_rank_under_torchrun_then_rerun_ends_as_uninterrupted(tmp_path, mnist_data):
    flags = [*INVARIANCE[:-4], "--method", "gouk", "--epochs", "4", "--data-dir", mnist_data]
    flags += ["--batch-size", "3", "--threads", "1"]
    run = "mnist/SimpleConv_models/method_gouk_noBN_1"
    run_ranks([sys.executable, TRAIN, *flags, "--logdir", str(tmp_path / "whole")])
    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", TRAIN]
    cmd += [*flags, "--logdir", str(killed)]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SUBMITIT_"))}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (killed / run / "ckpt_last.pth").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint before the run ended"
            time.sleep(0.05)
        victim = None
        while victim is None and time.monotonic() < deadline:
            victim = _rank_pid(proc.pid, 1)
        assert victim is not None
        os.kill(victim, signal.SIGKILL)
        proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert not (killed / run / "DONE").exists(), "the run ended before the kill"
    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=300)
    whole, resumed = (
        read_metrics(tmp_path / "whole" / run / "metrics.csv"),
        read_metrics(killed / run / "metrics.csv"),
    )
    drop = ("wall_time",)
    assert [{k: v for k, v in r.items() if k not in drop} for r in resumed] == [
        {k: v for k, v in r.items() if k not in drop} for r in whole
    ]
    assert "resuming after epoch" in (killed / run / "train.log").read_text()


# -- grids ---------------------------------------------------------------------------------------


def submit(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = submit_cli(argv)
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def grid_flags(logdir: Path, data: str) -> list[str]:
    return [
        "--dataset",
        "mnist",
        "--model",
        "SimpleConv",
        "--method",
        "gouk",
        "--mode",
        "noBN",
        "--seed",
        "1",
        "--epochs",
        "1",
        "--batch-size",
        "16",
        "--train-subset",
        "64",
        "--test-subset",
        "32",
        "--data-dir",
        data,
        "--logdir",
        str(logdir),
    ]


@pytest.mark.parametrize(
    "flags, message",
    [
        (
            ["--backend", "local", "--tasks-per-node", "2"],
            "--nodes 1 --tasks-per-node 2 are SLURM options; with --backend local use --nproc-per-node",
        ),
        (
            [
                "--backend",
                "local",
                "--nproc-per-node",
                str(len(os.sched_getaffinity(0)) + 1),
                "--workers",
                "1",
            ],
            f"--nproc-per-node {len(os.sched_getaffinity(0)) + 1} x --workers 1 = "
            f"{len(os.sched_getaffinity(0)) + 1} processes but this machine has {len(os.sched_getaffinity(0))} CPU(s)",
        ),
        (
            ["--backend", "local", "--sync-bn"],
            "--sync-bn needs CUDA (SyncBatchNorm runs on GPU modules only); this machine has no GPU",
        ),
    ],
)
def test_grid_refuses_bad_process_combinations_before_submitting(
    tmp_path, mnist_data, capsys, flags, message
):
    if torch.cuda.is_available():
        pytest.skip("the CPU-only refusals")
    code, out, err = submit([*grid_flags(tmp_path / "logs", mnist_data), *flags], capsys)
    assert code == 2
    assert err.strip().splitlines()[-1] == f"batch_job_submit.py: error: {message} (see --help)"
    assert not (tmp_path / "logs").exists()


@pytest.mark.skipif(shutil.which("sbatch") is None, reason="needs sbatch on PATH (scripts/slurm-local.sh)")
@pytest.mark.parametrize(
    "flags, message",
    [
        (
            ["--nproc-per-node", "2"],
            "--nproc-per-node 2 is for --backend local; on SLURM use --tasks-per-node (one task per GPU)",
        ),
        (
            ["--tasks-per-node", "2", "--sync-bn"],
            "--sync-bn needs CUDA (SyncBatchNorm runs on GPU modules only): ask SLURM for GPUs (--gres gpu:N)",
        ),
    ],
)
def test_grid_refuses_bad_process_combinations_on_slurm(tmp_path, mnist_data, capsys, flags, message):
    code, _, err = submit([*grid_flags(tmp_path / "logs", mnist_data), "--backend", "slurm", *flags], capsys)
    assert code == 2
    assert err.strip().splitlines()[-1] == f"batch_job_submit.py: error: {message} (see --help)"
    assert not (tmp_path / "logs").exists()


def _finished_config(logdir: Path) -> dict:
    run = logdir / "mnist/SimpleConv_models/method_gouk_noBN_1"
    assert (run / "DONE").exists(), sorted(p.name for p in run.iterdir()) if run.exists() else "no run"
    return json.loads((run / "config.json").read_text())


@pytest.mark.slow
def test_local_grid_runs_each_run_under_torchrun(tmp_path, mnist_data, capsys):
    code, out, _ = submit(
        [
            *grid_flags(tmp_path / "logs", mnist_data),
            "--backend",
            "local",
            "--nproc-per-node",
            "2",
            "--workers",
            "1",
        ],
        capsys,
    )
    assert code == 0, out
    config = _finished_config(tmp_path / "logs")
    assert (config["world_size"], config["launcher"], config["threads"]) == (2, "torchrun", 1)


@pytest.mark.slow
@pytest.mark.slurm
@pytest.mark.timeout(900)
def test_two_task_slurm_job_ends_done(tmp_path, mnist_data, capsys, monkeypatch):
    monkeypatch.setenv("SLURM_CONF", str(start_local_cluster()))
    flags = [*grid_flags(tmp_path / "logs", mnist_data), "--backend", "slurm", "--tasks-per-node", "2"]
    code, out, _ = submit([*flags, "--cpus-per-task", "1", "--time", "10"], capsys)
    assert code == 0, out
    args = submit_parser().parse_args(flags)
    rows = wait_until_settled(jobs.train_grid(args, script=TRAIN_SCRIPT), timeout=600)
    assert [r.state for r in rows.values()] == ["done"], rows
    config = _finished_config(tmp_path / "logs")
    assert (config["world_size"], config["launcher"], config["backend"]) == (2, "slurm", "gloo")


# -- CUDA (skipped without GPUs) -----------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_sync_bn_converts_before_the_method_wraps_on_cuda():
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        cfg = resolve(
            TrainConfig(dataset="mnist", method="fastclip", mode="wBN", sync_bn=True, device="cuda")
        )
        model, method = build_model(cfg, "cuda")
        assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())
        x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
        stats = train_epoch(model, method, make_optimizer(cfg, model), [(x, y)], "cuda")
        assert stats["steps"] == 1
        assert all(0 < v < float("inf") for v in method.layer_norms(model).values())
    finally:
        dist.destroy_process_group()


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_two_gpus_with_sync_bn_train_and_stay_consistent(tmp_path, mnist_data):
    flags = ["--dataset", "mnist", "--method", "fastclip", "--epochs", "1", "--batch-size", "8"]
    flags += ["--data-dir", mnist_data, "--device", "cuda", "--sync-bn", "--logdir", str(tmp_path)]
    run_ranks([sys.executable, TRAIN, *flags])  # the epoch-end check would fail the run on a split
    config = json.loads((tmp_path / "mnist/SimpleConv_models/method_fastclip_wBN_1/config.json").read_text())
    assert (config["world_size"], config["backend"]) == (2, "nccl")


@pytest.mark.slow
@pytest.mark.slurm
@pytest.mark.timeout(600)
def test_srun_in_a_two_task_batch_script_is_one_run(tmp_path, mnist_data, monkeypatch):
    monkeypatch.setenv("SLURM_CONF", str(start_local_cluster()))
    logdir = tmp_path / "logs"
    script = tmp_path / "job.sh"
    train = [sys.executable, TRAIN, *grid_flags(logdir, mnist_data)[:-4], "--data-dir", mnist_data]
    script.write_text(f"#!/bin/bash\nsrun {' '.join(train)} --logdir {logdir}\n")
    out = subprocess.run(
        [
            "sbatch",
            "--parsable",
            "--ntasks",
            "2",
            "--cpus-per-task",
            "1",
            "--output",
            str(tmp_path / "job.out"),
            str(script),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    deadline = time.monotonic() + 500
    while subprocess.run(["squeue", "-h", "-j", out], capture_output=True, text=True).stdout.strip():
        assert time.monotonic() < deadline, "job still in the queue"
        time.sleep(1)
    config = _finished_config(logdir)
    assert (config["world_size"], config["launcher"]) == (2, "slurm"), (tmp_path / "job.out").read_text()[
        -2000:
    ]
