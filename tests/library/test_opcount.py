"""Aten ops dispatched per training step: the GPU's kernel-launch proxy (issue 27).

Counts are deterministic, so a budget on them is a real test (never on time)."""

from __future__ import annotations

import torch

from fastclip.linalg.opcount import OpCounter


def test_counter_counts_every_dispatched_op():
    x = torch.randn(6)
    with OpCounter() as ops:
        y = x * 2 + 1
        y.view(2, 3).sum()
    assert ops.by_op == {"mul": 1, "add": 1, "view": 1, "sum": 1}
    assert ops.count == 4
    ops.reset()
    assert ops.count == 0
