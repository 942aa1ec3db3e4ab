"""One rank of the multi-process checks of tests/pipeline/test_distributed.py.

Started twice by the test, with torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT) set, as ``python tests/dist_worker.py <out_dir>``. Each rank
trains every method for a few steps (a clip or projection among them) through the
library's :class:`fastclip.pipeline.training.distributed.Replica`, saves its whole state to
``<out_dir>/<case>_rank<r>.pt`` (the test compares the ranks' files tensor by tensor),
and writes ``<out_dir>/rank<r>.json`` with the results of the checks that need the
process group (sharded evaluation, the divergence check).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

from fastclip.pipeline.training import (
    TrainConfig,
    build_model,
    evaluate,
    make_optimizer,
    resolve,
    train_epoch,
)
from fastclip.pipeline.training.distributed import RankDivergenceError, Replica, setup

#: Every method in wBN with the settings that make a clip / projection happen within the
#: few steps taken; ``nobcast`` is fastclip in wBN with the buffer broadcast switched off.
CASES = {
    "orig": ("orig", "wBN", {}),
    "fastclip": ("fastclip", "wBN", {"clip_steps": 2, "init_pqr_iter": 20}),
    "gouk": ("gouk", "wBN", {}),
    "miyato": ("miyato", "wBN", {}),
    "nsedghi": ("nsedghi", "wBN", {"clip_steps": 2}),
    "lip4conv": ("lip4conv", "wBN", {"weight": 1.0}),
    "fastclip_clipBN": ("fastclip", "clipBN", {"clip_steps": 2, "init_pqr_iter": 20, "bn_count": 2}),
    "nobcast": ("fastclip", "wBN", {"clip_steps": 2, "init_pqr_iter": 20}),
}
STEPS = 5


def data(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.rand(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g))


def train_case(replica: Replica, name: str, out: Path) -> None:
    method_name, mode, args = CASES[name]
    cfg = resolve(
        TrainConfig(
            dataset="mnist", model="SimpleConv", method=method_name, mode=mode, method_args=args, batch_size=6
        )
    )
    model, method = build_model(cfg)
    optimizer = make_optimizer(cfg, model)
    replica.wrap(model)
    if name == "nobcast":
        replica = Replica(**{**replica.__dict__, "ddp": replica.ddp})
        replica.after_backward = lambda model: None  # what DDP alone would leave
    generator = torch.Generator().manual_seed(3)
    loader, sizes = replica.train_loader(data(STEPS * 12, seed=1), cfg, generator, epoch=1)
    train_epoch(model, method, optimizer, loader, "cpu", replica=replica, global_sizes=sizes)
    method.finish_epoch(model)
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    state.update({f"method.{k}": v for k, v in _flat(method.state_dict()).items()})
    torch.save(state, out / f"{name}_rank{replica.rank}.pt")


def _flat(obj, prefix=""):
    out = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(_flat(v, f"{prefix}{k}."))
    elif isinstance(obj, torch.Tensor):
        out[prefix[:-1]] = obj
    return out


def main() -> int:
    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    cfg = resolve(TrainConfig(dataset="mnist", model="SimpleConv", method="orig", batch_size=8))
    replica = setup(cfg, torch.device("cpu"))
    results = {"world_size": replica.world_size, "backend": replica.backend}
    try:
        for name in CASES:
            train_case(replica, name, out)
        # Evaluation over an odd-sized test set: sharded + all-reduced vs this rank alone on all of it.
        model, _ = build_model(cfg)
        test = data(37, seed=2)
        results["eval_sharded"] = evaluate(model, replica.test_loader(test, cfg), "cpu", replica=replica)
        results["eval_single"] = evaluate(model, torch.utils.data.DataLoader(test, batch_size=8), "cpu")
        # The epoch-end check: silent on equal models, one line naming the tensor otherwise.
        model, method = build_model(resolve(TrainConfig(dataset="mnist", model="SimpleConv", method="gouk")))
        replica.check_consistent(model, method, epoch=1)
        if replica.rank == 1:
            with torch.no_grad():
                model.fc1.bias[3] = torch.nextafter(model.fc1.bias[3], torch.tensor(10.0))
        try:
            replica.check_consistent(model, method, epoch=2)
            results["divergence"] = None
        except RankDivergenceError as e:
            results["divergence"] = str(e)
    finally:
        replica.close()
    (out / f"rank{replica.rank}.json").write_text(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
