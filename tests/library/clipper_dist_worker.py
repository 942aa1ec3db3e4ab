"""One rank of tests/library/test_clipper.py's 2-process check (gloo, CPU): a model under
DDP trained on rank-dependent batches with a :class:`fastclip.Clipper` (a clip every 2
steps), its whole state saved to ``<out>/<case>_rank<r>.pt``. ``nosync`` switches the
Clipper's broadcast of the batch norms' running statistics off (each rank then clips
from its own statistics)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import fastclip


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        return self.fc(torch.relu(self.bn2(self.conv2(x))).flatten(1))


def main(out: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    for case in ("sync", "nosync"):
        torch.manual_seed(0)  # the same initial weights on every rank
        model = Block()
        ddp = nn.parallel.DistributedDataParallel(model)
        clipper = fastclip.Clipper(ddp, (3, 8, 8), clip=1.0, clip_steps=2, init_pqr_iter=20)
        if case == "nosync":
            clipper._sync = lambda: None
        opt = torch.optim.SGD(ddp.parameters(), lr=0.5)
        g = torch.Generator().manual_seed(100 + rank)  # each rank its own batches
        for _ in range(5):
            x, y = torch.randn(6, 3, 8, 8, generator=g) * (1 + rank), torch.randint(0, 10, (6,), generator=g)
            opt.zero_grad()
            (-F.cross_entropy(ddp(x), y)).backward()
            opt.step()
            clipper.step()
        clipper.clip_now()
        state = {f"model.{k}": v for k, v in model.state_dict().items()}
        state.update({f"sigma.{k}": torch.tensor(v) for k, v in clipper.sigmas().items()})
        torch.save(state, out / f"{case}_rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
