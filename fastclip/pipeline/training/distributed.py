"""One training run over several processes: ranks from torchrun or SLURM, DDP, the data
split, and the checks that keep every rank's model bitwise the same.

A run started by ``torchrun`` (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``) or as a multi-task submitit job on SLURM (the variables exported by
:class:`submitit.helpers.TorchDistributedEnvironment`) joins a process group: nccl with
one GPU per local rank, gloo on the CPU. A plain ``python train.py`` gets a
:class:`Replica` of world size 1 that creates no process group and changes nothing.

How every rank stays bitwise identical (docs/design.md, "Many processes"):

* gradients are all-reduced by DDP, so every rank takes the same optimiser step;
* every random start a method draws comes from generators seeded the same way on every
  rank (the per-epoch seeds of :func:`fastclip.pipeline.training.state.epoch_seeds`); data
  augmentation draws from a stream of its own per rank (:class:`_RankDataStream`), so it
  never moves the stream the methods draw from;
* batch norm is the one rank-local input: each rank normalises its own shard, and its
  running statistics would differ. :meth:`Replica.after_backward` broadcasts every buffer
  from rank 0 after each backward pass, before the optimiser step and the method's
  clip/projection/clamp, so that what the methods read (running variance in a Conv+BN
  composition, the clipBN clamp, FastClip's tracked vectors, Miyato's u/v) is the same
  everywhere;
* :meth:`Replica.check_consistent` all-gathers a checksum of every parameter, buffer and
  method-state tensor at each epoch end and raises :class:`RankDivergenceError` naming the
  first tensor that differs.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import re
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Sampler, Subset

from fastclip.pipeline.training.config import ConfigError, TrainConfig
from fastclip.pipeline.training.state import _seed_worker, epoch_seeds

logger = logging.getLogger("fastclip.pipeline.training")

__all__ = [
    "NullWriter",
    "PeerGone",
    "peer_gone",
    "RankDivergenceError",
    "Replica",
    "GlobalBatchSampler",
    "checksums",
    "launch_env",
    "setup",
]


class RankDivergenceError(RuntimeError):
    """The ranks of one run hold different models: the run stops rather than split."""


class PeerGone(RuntimeError):
    """Another rank of this run is gone (its process died or was killed) and a collective
    step found its connection closed: one line, in place of gloo's or NCCL's traceback."""


#: What gloo and NCCL say when the process at the other end of a collective is gone.
_PEER_GONE = re.compile(
    r"Connection (reset|closed|refused)|by peer|Broken pipe|ECONNRESET|EPIPE|"
    r"NCCL communicator was aborted|remote process exited|socket (closed|timeout)",
    re.IGNORECASE,
)


def peer_gone(error: BaseException, replica: Replica) -> PeerGone | None:
    """The :class:`PeerGone` that ``error`` (raised on ``replica``'s rank during a run of
    several processes) means, or None when it is something else."""
    if not replica.distributed or not isinstance(error, RuntimeError) or isinstance(error, PeerGone):
        return None
    text = str(error)
    if not (_PEER_GONE.search(text) or type(error).__name__ in ("DistBackendError", "DistNetworkError")):
        return None
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), type(error).__name__)
    if len(first) > 200:
        first = first[:200] + "..."
    return PeerGone(
        f"rank {replica.rank} of {replica.world_size}: a peer rank is gone (its process died or was "
        f"killed; its own log says why): {first}; the checkpoints written before are intact: "
        f"rerun the same command to resume"
    )


# -- the environment ------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class LaunchEnv:
    """Where this process sits in the job: its global rank, the world size, its rank on
    its node, and the launcher that said so."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    launcher: str = "none"


def _int_env(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    return int(value) if value.lstrip("-").isdigit() else None


def launch_env() -> LaunchEnv:
    """The rank and world size of this process: torchrun's variables if set, else those
    of a submitit job or an ``srun`` step with several tasks (exported through submitit's
    ``TorchDistributedEnvironment``, never touching ``CUDA_VISIBLE_DEVICES``), else world
    size 1 (also in a SLURM batch script itself, which is no step: ``srun`` starts the
    tasks).

    Example::

        >>> launch_env()            # plain python
        LaunchEnv(rank=0, world_size=1, local_rank=0, launcher='none')
    """
    world = _int_env("WORLD_SIZE")
    rank = _int_env("RANK")
    if world is not None and rank is not None:
        local = _int_env("LOCAL_RANK")
        return LaunchEnv(rank, world, rank if local is None else local, "torchrun")
    if not os.environ.get("SUBMITIT_EXECUTOR") and os.environ.get("SLURM_STEP_ID") is not None:
        # A task of `srun` (a job step; the batch script itself has no step id): submitit
        # reads SLURM's variables once told that it runs in a SLURM job.
        if (_int_env("SLURM_STEP_NUM_TASKS") or _int_env("SLURM_NTASKS") or 1) > 1:
            os.environ["SUBMITIT_EXECUTOR"] = "slurm"
    if os.environ.get("SUBMITIT_EXECUTOR"):
        # Only a SLURM or submitit task pays for importing submitit (the experiments extra).
        import submitit
        from submitit.helpers import TorchDistributedEnvironment

        job = submitit.JobEnvironment()
        if job.num_tasks > 1:
            env = TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
            return LaunchEnv(env.rank, env.world_size, env.local_rank, job.name())
    return LaunchEnv()


# -- the replica ----------------------------------------------------------------------------------
class NullWriter:
    """A TensorBoard writer that writes nothing: ranks other than 0 get it, so that every
    rank runs the same code (a method may track more when it logs)."""

    def add_scalar(self, *args: Any, **kwargs: Any) -> None:
        pass

    def add_scalars(self, *args: Any, **kwargs: Any) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bit patterns as int64 (floats reinterpreted, not converted)."""
    t = t.detach().contiguous()
    if t.is_floating_point():
        t = t.view({8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()])
    elif t.is_complex():
        return _bits(torch.view_as_real(t))
    return t.reshape(-1).to(torch.int64)


def checksums(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[int, int]]:
    """Per tensor: (sum of its bit patterns, sum weighted by position mod 1021), exact
    integers, so a change of one bit anywhere changes the first, and a permutation of
    values almost surely the second.

    Example::

        >>> a = torch.ones(3); b = a.clone(); b[1] = torch.nextafter(b[1], torch.tensor(2.0))
        >>> checksums({"a": a}) == checksums({"a": b})
        False
    """
    out = {}
    for name, t in tensors.items():
        b = _bits(t)
        w = torch.arange(b.numel(), device=b.device) % 1021 + 1
        out[name] = (int(b.sum()), int((b * w).sum()))
    return out


def _state_tensors(model: nn.Module, method: Any) -> dict[str, torch.Tensor]:
    tensors = {k: v for k, v in model.state_dict(keep_vars=False).items() if isinstance(v, torch.Tensor)}

    def walk(prefix: str, obj: Any) -> None:
        if isinstance(obj, torch.Tensor):
            tensors[prefix] = obj
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(f"{prefix}.{k}", v)
        elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
            tensors[prefix] = torch.tensor(float(obj), dtype=torch.float64)

    walk("method", method.state_dict())
    return tensors


class GlobalBatchSampler(Sampler[list[int]]):
    """Batches of one rank: global batch k is ``perm[k*B*W : (k+1)*B*W]`` of one
    permutation ``perm`` (``torch.randperm`` with ``generator``, drawn when iteration
    starts, as torch's RandomSampler draws it), split into ``world_size`` contiguous
    shares as even as possible; this rank takes share ``rank``. At world size 1 the
    batches are those of ``DataLoader(shuffle=True, generator=generator)`` with the same
    generator, so a plain run is unchanged, and global batch k holds the same samples
    whatever the world size. Nothing is padded or dropped; in a last global batch
    smaller than the world size some ranks get an empty share.

    Example::

        >>> g = torch.Generator().manual_seed(0)
        >>> [len(b) for b in GlobalBatchSampler(10, 2, rank=1, world_size=2, generator=g)]
        [2, 2, 1]
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        generator: torch.Generator | None = None,
    ) -> None:
        self.n, self.batch_size, self.rank, self.world_size = int(n), int(batch_size), rank, world_size
        self.generator = generator
        self.global_batch = self.batch_size * self.world_size

    def __len__(self) -> int:
        return -(-self.n // self.global_batch)

    def global_sizes(self) -> list[int]:
        """The number of samples of each global batch, in order."""
        full, rest = divmod(self.n, self.global_batch)
        return [self.global_batch] * full + ([rest] if rest else [])

    def _share(self, size: int) -> tuple[int, int]:
        q, r = divmod(size, self.world_size)
        start = self.rank * q + min(self.rank, r)
        return start, start + q + (self.rank < r)

    def __iter__(self) -> Iterator[list[int]]:
        perm = torch.randperm(self.n, generator=self.generator).tolist()
        for k, size in enumerate(self.global_sizes()):
            lo, hi = self._share(size)
            base = k * self.global_batch
            yield perm[base + lo : base + hi]


class _RankDataStream:
    """Swaps the process's torch RNG for a stream of this rank's own around each batch a
    loader makes (augmentation in the main process), so that data loading never moves
    the stream the methods draw their random starts from, and ranks do not augment their
    different samples with the same draws."""

    def __init__(self, loader: DataLoader, seed: int) -> None:
        self.loader = loader
        self.state = torch.Generator().manual_seed(seed).get_state()

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        it = self._swapped(lambda: iter(self.loader))
        while True:
            try:
                yield self._swapped(lambda: next(it))
            except StopIteration:
                return

    def _swapped(self, fn: Any) -> Any:
        main = torch.get_rng_state()
        torch.set_rng_state(self.state)
        try:
            return fn()
        finally:
            self.state = torch.get_rng_state()
            torch.set_rng_state(main)


@dataclasses.dataclass
class Replica:
    """This process's part of a run: rank, world size, device and backend, and the
    collective steps of the training loop (all no-ops at world size 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    launcher: str = "none"
    backend: str | None = None
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False
    ddp: nn.Module | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def describe(self, batch_size: int) -> dict[str, Any]:
        """What config.json records about the processes of this attempt."""
        return {
            "world_size": self.world_size,
            "batch_size_per_process": batch_size,
            "global_batch_size": batch_size * self.world_size,
            "backend": self.backend,
            "launcher": self.launcher,
        }

    # -- model -------------------------------------------------------------------------------
    def wrap(self, model: nn.Module) -> nn.Module:
        """The module the training forward runs through: DDP at world size > 1 (rank 0's
        parameters and buffers broadcast at construction), else ``model`` itself. DDP's
        own buffer broadcast before each forward is off: :meth:`after_backward` does it
        after the backward pass, where the methods need it."""
        if not self.distributed:
            return model
        self.ddp = nn.parallel.DistributedDataParallel(
            model,
            device_ids=[self.device.index] if self.device.type == "cuda" else None,
            forward_sync_buffers=False,
        )
        return self.ddp

    def after_backward(self, model: nn.Module) -> None:
        """Broadcast every buffer (BN running statistics, tracked vectors) from rank 0, one
        flat tensor per dtype (one round trip each rather than one per buffer)."""
        if not self.distributed:
            return
        groups: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
        for buf in model.buffers():
            if buf.numel():
                groups.setdefault((buf.dtype, buf.device), []).append(buf)
        for bufs in groups.values():
            flat = torch.cat([b.detach().reshape(-1) for b in bufs])
            dist.broadcast(flat, src=0)
            offset = 0
            for b in bufs:
                b.data.copy_(flat[offset : offset + b.numel()].view_as(b))
                offset += b.numel()

    def loss_scale(self, n_local: int, n_global: int) -> float:
        """The factor on this rank's mean loss that makes DDP's mean over ranks the mean
        over the global batch (1.0 whenever the shares are equal)."""
        if not self.distributed or n_local * self.world_size == n_global:
            return 1.0
        return n_local * self.world_size / n_global

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks (float64)."""
        if not self.distributed:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self._comm_device)
        dist.all_reduce(t)
        return t.tolist()

    @property
    def _comm_device(self) -> torch.device:
        return self.device if self.backend == "nccl" else torch.device("cpu")

    def share(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.distributed:
            return obj
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0, device=self._comm_device)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if not self.distributed:
            return
        if self.backend == "nccl":
            dist.barrier(device_ids=[self.device.index])
        else:
            dist.barrier()

    def check_consistent(self, model: nn.Module, method: Any, epoch: int) -> None:
        """Raise :class:`RankDivergenceError` naming the first parameter, buffer or method
        tensor whose checksum differs between ranks."""
        if not self.distributed:
            return
        mine = checksums(_state_tensors(model, method))
        every = self.gather(mine)
        for r, theirs in enumerate(every):
            if list(theirs) != list(mine):
                raise RankDivergenceError(
                    f"ranks hold different tensors after epoch {epoch}: rank {r} has "
                    f"{sorted(set(theirs) ^ set(mine))[:3]} where rank {self.rank} has not"
                )
            for name in mine:
                if theirs[name] != mine[name]:
                    raise RankDivergenceError(
                        f"ranks diverged after epoch {epoch}: {name!r} differs between rank "
                        f"{min(r, self.rank)} and rank {max(r, self.rank)}"
                    )

    # -- data --------------------------------------------------------------------------------
    def train_loader(
        self, dataset: Any, cfg: TrainConfig, generator: torch.Generator, epoch: int
    ) -> tuple[Any, list[int]]:
        """This rank's training batches of ``epoch`` and the size of each global batch.
        ``generator`` (seeded the same on every rank) draws the DataLoader's worker seed
        and then the permutation, as a shuffling DataLoader does."""
        sampler = GlobalBatchSampler(len(dataset), cfg.batch_size, self.rank, self.world_size, generator)
        loader = DataLoader(
            dataset,
            batch_sampler=sampler,
            generator=generator,
            num_workers=cfg.num_workers,
            worker_init_fn=_RankWorkerInit(self.rank, self.world_size) if cfg.num_workers else None,
            pin_memory=self.device.type == "cuda",
        )
        if self.distributed and not cfg.num_workers:
            seed = epoch_seeds(cfg.seed, epoch)["torch"] % 2**63
            return _RankDataStream(loader, seed + self.rank + 1), sampler.global_sizes()
        return loader, sampler.global_sizes()

    def test_loader(self, dataset: Any, cfg: TrainConfig) -> DataLoader:
        """This rank's contiguous part of the test set: every image on exactly one rank."""
        if self.distributed:
            n = len(dataset)
            lo, hi = self.rank * n // self.world_size, (self.rank + 1) * n // self.world_size
            dataset = Subset(dataset, range(lo, hi))
        return DataLoader(
            dataset,
            batch_size=cfg.batch_size,
            shuffle=False,
            num_workers=cfg.num_workers,
            worker_init_fn=_seed_worker if cfg.num_workers else None,
            pin_memory=self.device.type == "cuda",
        )

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
        self.owns_group = False


class _RankWorkerInit:
    """A worker's seeds: the DataLoader's (the same on every rank) moved by the rank, so
    ranks augment with different draws; unchanged at world size 1."""

    def __init__(self, rank: int, world_size: int) -> None:
        self.rank, self.world_size = rank, world_size

    def __call__(self, worker_id: int) -> None:
        if self.world_size > 1:
            torch.manual_seed((torch.initial_seed() + 1_000_003 * self.rank) % 2**63)
        _seed_worker(worker_id)


def setup(cfg: TrainConfig, device: torch.device) -> Replica:
    """The :class:`Replica` of this process for a run on ``device`` (what ``cfg.device``
    resolved to): at world size > 1 the process group is created (nccl on CUDA, gloo on
    the CPU) and a CUDA process takes ``cuda:<LOCAL_RANK>``. Raises :class:`ConfigError`
    for settings the processes cannot run with."""
    env = launch_env()
    if env.world_size < 1 or not 0 <= env.rank < env.world_size:
        raise ConfigError(f"RANK={env.rank} and WORLD_SIZE={env.world_size} do not describe a process group")
    if cfg.sync_bn and device.type != "cuda":
        raise ConfigError(
            f"--sync-bn needs CUDA (SyncBatchNorm runs on GPU modules only); this run's device is {device}"
        )
    if env.world_size == 1:
        return Replica(device=device)
    if device.type == "cuda":
        if device.index is not None and cfg.device not in ("auto", "cuda"):
            raise ConfigError(
                f"--device {cfg.device} with {env.world_size} processes: each process takes "
                "cuda:<LOCAL_RANK>; pass --device cuda (or auto)"
            )
        if env.local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"local rank {env.local_rank} but only {torch.cuda.device_count()} CUDA device(s) on this node"
            )
        device = torch.device("cuda", env.local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(
            backend,
            rank=env.rank,
            world_size=env.world_size,
            timeout=datetime.timedelta(minutes=30),
            device_id=device if device.type == "cuda" else None,
        )
    return Replica(
        rank=env.rank,
        world_size=env.world_size,
        local_rank=env.local_rank,
        launcher=env.launcher,
        backend=backend,
        device=device,
        owns_group=owns,
    )
