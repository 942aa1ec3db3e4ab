"""Checkpoints that carry their own SHA-256, so damage inside a file is never trained on.

A checkpoint is a plain ``torch.save``'d dict (loadable with ``torch.load(...,
weights_only=True)`` as before) with one more key, ``sha256``: the digest of every
value in it, in order - tensors by dtype, shape and bytes, other values by type and
``repr``. :func:`load_checkpoint` recomputes it after loading; bytes flipped anywhere in
the file either break the load or change a value, and both end in
:class:`CheckpointError`. The digest lives inside the file, so it is written by the
same atomic rename and moves with the file when it is rotated (hard-linked) to
``ckpt_prev.pth``.

Example::

    >>> import tempfile, torch
    >>> path = tempfile.mkdtemp() + "/c.pth"
    >>> save_checkpoint({"epoch": 1, "w": torch.ones(2)}, path)
    >>> load_checkpoint(path)["epoch"]
    1
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch

from fastclip.pipeline.io import atomic_torch_save

__all__ = ["CheckpointError", "DIGEST_KEY", "state_digest", "save_checkpoint", "load_checkpoint"]

DIGEST_KEY = "sha256"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, not a dict, or its digest does not match.
    The message is one line and names the file."""


def _feed(h: hashlib._Hash, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)}|".encode())
        for k, v in obj.items():  # insertion order: pickling keeps it
            _feed(h, k)
            _feed(h, v)
    elif isinstance(obj, (list, tuple)):
        h.update(f"{type(obj).__name__[0]}{len(obj)}|".encode())
        for v in obj:
            _feed(h, v)
    else:
        h.update(f"{type(obj).__name__}:{obj!r}|".encode())


def state_digest(state: dict[str, Any]) -> str:
    """SHA-256 (hex) of every value of ``state`` except its own digest key."""
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in state.items() if k != DIGEST_KEY})
    return h.hexdigest()


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> None:
    """``state`` plus its digest, written atomically to ``path``."""
    atomic_torch_save({**state, DIGEST_KEY: state_digest(state)}, path)


def load_checkpoint(path: str | os.PathLike, require_digest: bool = False) -> dict[str, Any]:
    """The checkpoint at ``path`` (``torch.load(weights_only=True)``, on the CPU), verified
    against its digest. A checkpoint without one (written before digests existed) is
    returned unverified unless ``require_digest``. Raises :class:`CheckpointError`."""
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, bad pickle, disallowed global: all mean "damaged"
        # torch's own text for a refused pickle advises weights_only=False, which would
        # run whatever the damaged file holds: name the error type only.
        raise CheckpointError(f"{path.name} is unreadable ({type(e).__name__})") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path.name} is not a checkpoint (a {type(ckpt).__name__}, not a dict)")
    stored = ckpt.pop(DIGEST_KEY, None)
    if stored is None:
        if require_digest:
            raise CheckpointError(f"{path.name} has no {DIGEST_KEY} digest")
        return ckpt
    if stored != state_digest(ckpt):
        raise CheckpointError(f"{path.name} is damaged (SHA-256 mismatch)")
    return ckpt
