"""Aten ops dispatched per training step by every clipping method and mode (run by hand).

What a GPU pays for small-op code is one kernel launch (5-10 us) per op whatever its
size, which a CPU timing hides; the number of ops a step dispatches is that cost's
device-independent proxy (:class:`fastclip.linalg.opcount.OpCounter`, a ``TorchDispatchMode``).
Host syncs (``fastclip.linalg.syncs.SyncCounter``: ``item``-like reads, data-dependent shapes and
the library's batched ``to_host`` reads) are counted apart.

Protocol (the issue's): ResNet18 or DLA at CIFAR shape (3x32x32), batch 4, SGD lr 0.05
momentum 0.9 (weight decay 5e-4, the CIFAR default), random data, the training step of
``benchmarks/methods.py`` (its ``Trainer``: forward, loss + penalty, backward, optimiser
step, ``method.after_step``). Step 0 (FastClip's first PowerQR and clip) is counted apart
(*first*).

* FastClip, whose clip step costs more the further the layers drifted since the last
  clip: steps 1 .. P are all counted, P the least common multiple of its periods (wBN:
  the clip at step 50; noBN and clipBN: at step 100, clipBN's BN clamp at 50 too).
  *plain* is the mean of the steps where no schedule fires (and *max plain* the
  largest), *amortised* the mean over the P steps.
* Every other method (its per-step work does not depend on the drift): steps 1-3 are
  plain (their counts must agree), then one step where every schedule fires (forced, as
  ``benchmarks/methods.py`` does); *amortised* = plain + each schedule's extra ops / its
  period (clipBN's BN clamp counted alone to split them).

Usage::

    python benchmarks/op_counts.py                                  # both models, every method and mode
    python benchmarks/op_counts.py --models ResNet18 --modes wBN --methods orig fastclip
    python benchmarks/op_counts.py --save-json before.json          # keep a run to compare against
    python benchmarks/op_counts.py --before before.json             # adds the "before" columns
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import math
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from methods import Trainer, _fires, _force_schedule, _schedules  # benchmarks/methods.py

from fastclip import batched, spectral
from fastclip.batched import BatchedTracker, _Group
from fastclip.linalg.opcount import OpCounter
from fastclip.linalg.operator import AffineOperator
from fastclip.linalg.syncs import SyncCounter
from fastclip.pipeline.cli import OneLineErrorParser, int_at_least
from fastclip.pipeline.io import atomic_write_text
from fastclip.pipeline.methods import MODES, available
from fastclip.pipeline.methods.base import Method
from fastclip.pipeline.training import ConfigError, TrainConfig, resolve
from fastclip.wrapping import clip_step, lockstep_clip

logger = logging.getLogger("benchmarks.op_counts")

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "op_counts.md"
MODELS = ("ResNet18", "DLA")
#: plain steps counted for a method whose work does not depend on the drift
PLAIN_STEPS = 3


def get_args_parser() -> argparse.ArgumentParser:
    p = OneLineErrorParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--methods", nargs="+", choices=available(), default=available())
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    p.add_argument("--batch-size", type=int_at_least(1), default=4)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--threads", type=int_at_least(1), default=1, help="torch CPU threads")
    p.add_argument(
        "--device-defaults",
        choices=("gpu", "cpu"),
        default="gpu",
        help="count with a GPU's defaults (what a GPU dispatches: Lanczos stop-rule checks every 4 passes, "
        "the clip step's estimates in lockstep) or the CPU's (checks every pass, estimates layer by layer)",
    )
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--save-json", type=Path, default=None, help="also write the counts as JSON here")
    p.add_argument(
        "--before-label",
        default="the code of the `--before` run",
        help="what the --before columns were counted on (for the report)",
    )
    p.add_argument(
        "--reuse",
        type=Path,
        default=None,
        help="a --save-json file of an earlier run: its rows of methods not counted in this run join the report",
    )
    p.add_argument(
        "--before", type=Path, default=None, help="JSON of an earlier run (--save-json): shown beside"
    )
    p.add_argument(
        "--set",
        nargs="*",
        type=_key_value,
        default=[],
        metavar="KEY=VALUE",
        help="fastclip hyper-parameters (values in JSON: track_steps=2)",
    )
    return p


class PhaseCounter(OpCounter):
    """An :class:`OpCounter` that also files each op under the phase of FastClip's clip
    step it ran in (``by_phase``): the block Lanczos estimates (``measure``; their layer
    passes apart, ``measure/gram``), the least-squares fits (``fit``), the rest. Counts
    the clip-step calls (``clips``) and layer passes of the estimates (``passes``) too."""

    def __init__(self) -> None:
        super().__init__()
        self.by_phase: Counter[str] = Counter()
        self.phase: list[str] = []
        self.clips = 0
        self.passes = 0
        self.rounds = 0
        self.lockstep = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        self.by_phase["/".join(self.phase) or "other"] += 1
        return super().__torch_dispatch__(func, types, args, kwargs)

    @contextlib.contextmanager
    def patched(self) -> Iterator[PhaseCounter]:
        """Wraps the clip step's phases while inside."""
        counter = self

        def wrap(owner: Any, name: str, phase: str | None, count: str | None = None) -> tuple:
            orig = getattr(owner, name)

            @functools.wraps(orig)
            def wrapped(*a: Any, **kw: Any) -> Any:
                if count:
                    setattr(counter, count, getattr(counter, count) + 1)
                if phase is None:
                    return orig(*a, **kw)
                counter.phase.append(phase)
                try:
                    return orig(*a, **kw)
                finally:
                    counter.phase.pop()

            setattr(owner, name, wrapped)
            return owner, name, orig

        saved = [
            wrap(clip_step.ClipStep, "measure", "measure"),
            wrap(BatchedTracker, "_measure_together", "measure", "rounds"),
            wrap(lockstep_clip, "lanczos_many", "lockstep", "lockstep"),
            wrap(clip_step, "fit_directions_", "fit"),
            wrap(clip_step, "_left_vectors", "left"),
            wrap(AffineOperator, "gram_and_image", "gram", "passes"),
            wrap(_Group, "gram_of", "gram", "passes"),
            wrap(clip_step.ClipStep, "__init__", None, "clips"),
        ]
        try:
            yield self
        finally:
            for owner, name, orig in saved:
                setattr(owner, name, orig)


class Counted:
    """A step (or any call) under an op and a sync counter."""

    def __init__(self) -> None:
        self.ops, self.syncs = 0, 0

    def __call__(self, fn: Any, *args: Any) -> Counted:
        with OpCounter() as ops, SyncCounter() as syncs:
            fn(*args)
        self.ops, self.syncs = ops.count, syncs.count
        return self


def _config(model: str, method: str, mode: str, args: argparse.Namespace) -> TrainConfig:
    overrides = dict(args.set) if method == "fastclip" else {}
    return resolve(
        TrainConfig(
            dataset="cifar",
            model=model,
            method=method,
            mode=mode,
            seed=args.seed,
            batch_size=args.batch_size,
            lr=args.lr,
            momentum=0.9,
            device="cpu",
            method_args=overrides,
        )
    )


def _key_value(item: str) -> tuple[str, Any]:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {item!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def count_method(model: str, method: str, mode: str, args: argparse.Namespace) -> dict[str, Any]:
    """The op counts of one (model, method, mode) under the module docstring's protocol."""
    t = Trainer(_config(model, method, mode, args), torch.device("cpu"))
    m = t.method
    first = Counted()(t.step, 0)
    periods = _schedules(m)
    row: dict[str, Any] = {
        "model": model,
        "method": method,
        "mode": mode,
        "first": first.ops,
        "periods": periods,
    }
    if method == "fastclip":
        P = math.lcm(*periods.values())
        plain, sched, total_ops, total_syncs = [], [], 0, 0
        for i in range(1, P + 1):
            fires = _fires(m, t.model, i)
            if fires and i == P:
                phases = PhaseCounter()
                with phases.patched(), phases, SyncCounter() as syncs:
                    t.step(i)
                c = Counted()
                c.ops, c.syncs = phases.count, syncs.count
                row["clip_phases"] = dict(phases.by_phase)
                row["clip_calls"], row["clip_passes"] = phases.clips, phases.passes
                row["clip_rounds"], row["clip_lockstep"] = phases.rounds, phases.lockstep
            else:
                c = Counted()(t.step, i)
            total_ops += c.ops
            total_syncs += c.syncs
            (sched if fires else plain).append((i, c.ops, c.syncs))
        row.update(
            plain=sum(o for _, o, _ in plain) / len(plain),
            max_plain=max(o for _, o, _ in plain),
            plain_syncs=max(s for _, _, s in plain),
            scheduled={str(i): o for i, o, _ in sched},
            scheduled_syncs={str(i): s for i, _, s in sched},
            amortised=total_ops / P,
            amortised_syncs=total_syncs / P,
            period=P,
        )
        logger.info(
            "%s %s %s: %s", model, mode, method, {k: row[k] for k in ("plain", "scheduled", "amortised")}
        )
        return row
    counts = [Counted()(t.step, i) for i in range(1, PLAIN_STEPS + 1)]
    ops = {c.ops for c in counts}
    if len(ops) != 1:
        logger.warning("%s %s %s: plain steps differ: %s", model, mode, method, sorted(ops))
    plain = min(ops)
    row.update(plain=plain, max_plain=max(ops), plain_syncs=max(c.syncs for c in counts))
    amortised, amortised_syncs = float(plain), float(row["plain_syncs"])
    if periods:
        step = _force_schedule(m, t.model, PLAIN_STEPS + 1)
        s = Counted()(t.step, step)
        row["scheduled"] = {str(step): s.ops}
        row["scheduled_syncs"] = {str(step): s.syncs}
        extra, extra_syncs = s.ops - plain, s.syncs - row["plain_syncs"]
        if "bn" in periods:
            bn = Counted()(Method.after_step, m, t.model, 0)
            amortised += bn.ops / periods["bn"]
            amortised_syncs += bn.syncs / periods["bn"]
            extra, extra_syncs = extra - bn.ops, extra_syncs - bn.syncs
            row["bn_clamp"] = bn.ops
        for key, period in periods.items():
            if key != "bn":
                amortised += extra / period
                amortised_syncs += extra_syncs / period
    row.update(amortised=amortised, amortised_syncs=amortised_syncs)
    logger.info("%s %s %s: plain %d, amortised %.0f", model, mode, method, plain, amortised)
    return row


def _key(r: dict[str, Any]) -> tuple[str, str, str]:
    return r["model"], r["mode"], r["method"]


def _sched(r: dict[str, Any]) -> str:
    s = r.get("scheduled") or {}
    return ", ".join(f"{v:,} (step {k})" for k, v in s.items()) or "-"


def report(rows: list[dict[str, Any]], args: argparse.Namespace, before: list[dict[str, Any]] | None) -> str:
    old = {_key(r): r for r in before or []}
    lines = [
        "# Aten ops dispatched per training step, every method and mode",
        "",
        f"Counted on the CPU (aten ops dispatched, `fastclip.linalg.opcount.OpCounter`; on a GPU about one kernel "
        f"launch each), {time.strftime('%Y-%m-%d')}, torch {torch.__version__}. Produced by "
        "`python benchmarks/op_counts.py` (protocol in its docstring): CIFAR shape, batch "
        f"{args.batch_size}, SGD lr {args.lr} momentum 0.9, random data, seed {args.seed}"
        + (f", fastclip with {' '.join(f'{k}={v}' for k, v in args.set)}" if args.set else "")
        + ". *plain*: ops of a step where no schedule fires (FastClip: mean over its period's plain steps); "
        "*scheduled*: a step where the method's schedule fires (FastClip's clip a whole period after the "
        "previous one; nsedghi's projection; clipBN's BN clamp); *amortised*: per step over the period; "
        "*syncs*: host reads per step amortised (`fastclip.linalg.syncs.SyncCounter`). "
        + (
            "Counted with a GPU's defaults (what a GPU dispatches): Lanczos checks its stopping rule every 4 "
            "passes and a clip step makes its estimates in lockstep (`fastclip.batched.LOCKSTEP_CLIPS`)."
            if args.device_defaults == "gpu"
            else "Counted with the CPU's defaults: Lanczos checks every pass, each layer clips alone."
        )
        + (f" *before*: the same count on {args.before_label}." if old else "")
        + (
            f" Rows of {', '.join(sorted({r['method'] for r in rows if r.get('reused')}))} were counted in "
            "an earlier run (`--reuse`: this change does not touch those methods)."
            if any(r.get("reused") for r in rows)
            else ""
        ),
        "",
    ]
    for model in args.models:
        for mode in args.modes:
            rs = [r for r in rows if r["model"] == model and r["mode"] == mode]
            if not rs:
                continue
            orig = next((r for r in rs if r["method"] == "orig"), None)
            lines += [f"## {model}, {mode}", ""]
            head = (
                "| method | first | plain | plain / orig | scheduled | period | amortised | amortised / orig "
                "| syncs |"
            )
            rule = "|---|--:|--:|--:|--:|---|--:|--:|--:|"
            if old:
                head += " plain / orig before | amortised / orig before |"
                rule += "--:|--:|"
            lines += [head, rule]
            for r in rs:
                po = r["plain"] / orig["plain"] if orig else float("nan")
                ao = r["amortised"] / orig["amortised"] if orig else float("nan")
                period = ", ".join(f"{k} {v}" for k, v in r["periods"].items()) or "-"
                line = (
                    f"| {r['method']} | {r['first']:,} | {r['plain']:,.0f} | {po:.2f} | {_sched(r)} | {period} | "
                    f"{r['amortised']:,.0f} | {ao:.2f} | {r['amortised_syncs']:.2f} |"
                )
                if old:
                    b, bo = old.get(_key(r)), old.get((model, mode, "orig"))
                    if b and bo:
                        line += f" {b['plain'] / bo['plain']:.2f} | {b['amortised'] / bo['amortised']:.2f} |"
                    else:
                        line += " - | - |"
                lines.append(line)
            lines.append("")
            for r in rs:
                if "clip_phases" in r:
                    ph = r["clip_phases"]
                    total = sum(ph.values())
                    lines += [
                        f"{r['method']}'s clip step (step {r['period']}): {r['clip_calls']} layer clips "
                        f"(`ClipStep`), {r.get('clip_rounds', 0)} rounds of estimates made together "
                        f"({r.get('clip_lockstep', 0)} lockstep Lanczos runs), {r['clip_passes']} passes "
                        f"(of a layer, or of a group of layers in one grouped convolution); its {total:,} ops: "
                        + ", ".join(f"{k} {v:,} ({100 * v / total:.0f} %)" for k, v in sorted(ph.items()))
                        + " (*measure*: the block Lanczos estimates, *gram*: their passes, *fit*: the "
                        "least-squares fits, *left*: the left vectors the fits need).",
                        "",
                    ]
    return "\n".join(lines)


def main(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    if args.device_defaults == "gpu":  # count what a GPU dispatches: its stop-rule checks, its clip steps
        spectral.CHECK_EVERY["cpu"] = spectral.CHECK_EVERY["default"]
        batched.LOCKSTEP_CLIPS["cpu"] = batched.LOCKSTEP_CLIPS["default"]
    before = json.loads(args.before.read_text()) if args.before else None
    try:
        for model in args.models:  # bad --set names or values: one line, before any work
            _config(model, "fastclip", args.modes[0], args)
    except ConfigError as e:
        print(f"op_counts: error: {str(e).splitlines()[0]}", file=sys.stderr)
        raise SystemExit(2) from None
    names = ["orig"] + [m for m in args.methods if m != "orig"]
    reused = [dict(r, reused=True) for r in json.loads(args.reuse.read_text())] if args.reuse else []
    rows = []
    for model in args.models:
        for mode in args.modes:
            for name in names:
                rows.append(count_method(model, name, mode, args))
                atomic_write_text(args.out, report(rows, args, before) + "\n")
            rows += [
                r for r in reused if (r["model"], r["mode"]) == (model, mode) and r["method"] not in names
            ]
            atomic_write_text(args.out, report(rows, args, before) + "\n")
            if args.save_json:
                atomic_write_text(args.save_json, json.dumps(rows, indent=1) + "\n")
    logger.info("wrote %s", args.out)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
