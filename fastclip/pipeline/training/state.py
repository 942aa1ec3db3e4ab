"""What a run carries between epochs and attempts: per-epoch seeds, the RNG states, the
checkpoints (rotated, verified) and the metadata of config.json."""

from __future__ import annotations

import os
import platform
import random
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import fastclip
from fastclip.pipeline.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from fastclip.pipeline.training.config import (
    CKPT_BEST,
    CKPT_KEYS,
    CKPT_LAST,
    CKPT_PREV,
    ConfigError,
    _conflicts,
)


# -- seeding ------------------------------------------------------------------------------------
def epoch_seeds(seed: int, epoch: int) -> dict[str, int]:
    """Independent seeds for torch, the DataLoader, numpy and random in ``epoch`` of a run
    with ``seed`` (epoch 0 = model construction), from ``numpy.random.SeedSequence``.

    Example::

        >>> epoch_seeds(1, 3) == epoch_seeds(1, 3), epoch_seeds(1, 3) == epoch_seeds(1, 4)
        (True, False)
    """
    words = np.random.SeedSequence([int(seed), int(epoch)]).generate_state(5, dtype=np.uint32)
    return {
        "torch": int(words[0]) << 32 | int(words[1]),
        "loader": int(words[2]),
        "numpy": int(words[3]),
        "random": int(words[4]),
    }


def _seed_all(seeds: dict[str, int]) -> None:
    torch.manual_seed(seeds["torch"])
    np.random.seed(seeds["numpy"])
    random.seed(seeds["random"])


def _seed_worker(worker_id: int) -> None:
    # DataLoader seeds torch in each worker from the loader's generator; numpy and random follow it.
    s = torch.initial_seed() % 2**32
    np.random.seed(s)
    random.seed(s)


def _rng_state() -> dict[str, Any]:
    """Global RNG states as tensors and plain values (loadable with weights_only=True)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, state, gauss_next = random.getstate()
    out = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(gauss),
        },
        "random": {"version": version, "state": list(state), "gauss_next": gauss_next},
    }
    if torch.cuda.is_available():
        out["cuda"] = [s for s in torch.cuda.get_rng_state_all()]
    return out


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    r = state["random"]
    random.setstate((r["version"], tuple(r["state"]), r["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- checkpoints --------------------------------------------------------------------------------
def _load_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint at ``path`` (weights_only, SHA-256 verified when it has a digest), or
    raise CheckpointError if it is unusable."""
    ckpt = load_checkpoint(path)
    if any(k not in ckpt for k in CKPT_KEYS):
        raise CheckpointError(
            f"{path.name} lacks the keys {', '.join(k for k in CKPT_KEYS if k not in ckpt)}"
        )
    return ckpt


def _find_resume_checkpoint(
    run_dir: Path, identity: dict[str, Any]
) -> tuple[dict[str, Any] | None, list[str]]:
    """The newest usable checkpoint (ckpt_last, else ckpt_prev) or None to start afresh,
    and one warning line per unusable checkpoint skipped. Only reads. A checkpoint of
    other settings is a ConfigError, not a fallback."""
    warnings = []
    for name in (CKPT_LAST, CKPT_PREV):
        path = run_dir / name
        if not path.exists():
            continue
        try:
            ckpt = _load_checkpoint(path)
        except CheckpointError as e:
            fallback = CKPT_PREV if name == CKPT_LAST and (run_dir / CKPT_PREV).exists() else "a fresh start"
            warnings.append(f"{e}; falling back to {fallback}")
            continue
        conflicts = _conflicts(ckpt["config"], identity)
        if conflicts:
            raise ConfigError(
                f"{path} was written by a run with other settings ({'; '.join(conflicts)}); "
                f"use --force to start afresh or another --logdir"
            )
        return ckpt, warnings
    return None, warnings


def _save_checkpoint(run_dir: Path, state: dict[str, Any], best: bool) -> None:
    last, prev = run_dir / CKPT_LAST, run_dir / CKPT_PREV
    if best:
        save_checkpoint(state, run_dir / CKPT_BEST)
    # Keep the previous good checkpoint (if ckpt_last is ever damaged, resume from it),
    # by a hard link so that ckpt_last exists at every moment: a kill between the two
    # steps leaves both files, never neither.
    link = run_dir / (CKPT_PREV + ".link")
    link.unlink(missing_ok=True)
    # After a kill between this rotation and the save below, prev and last are one file;
    # rename(2) between two links of one file does nothing (and would leave the .link),
    # so there is nothing to rotate then.
    if last.exists() and not (prev.exists() and os.path.samefile(last, prev)):
        os.link(last, link)
        os.replace(link, prev)
    link.unlink(missing_ok=True)
    save_checkpoint(state, last)


def _metadata(device: torch.device) -> dict[str, Any]:
    commit, dirty = None, None
    repo = Path(fastclip.__file__).resolve().parent.parent
    try:
        commit = (
            subprocess.run(
                ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
            ).stdout.strip()
            or None
        )
        if commit:
            dirty = bool(
                subprocess.run(
                    ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                    capture_output=True,
                    text=True,
                    timeout=10,
                ).stdout.strip()
            )
    except (OSError, subprocess.SubprocessError):
        pass
    return {
        "fastclip_version": fastclip.__version__,
        "git_commit": commit,
        "git_dirty": dirty,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "device": str(device),
        "hostname": platform.node(),
        "cuda_device": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        # What CPU results depend on besides the settings: same values here, same metrics.
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "deterministic": {
            "use_deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
            "cudnn_deterministic": bool(torch.backends.cudnn.deterministic),
            "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        },
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
