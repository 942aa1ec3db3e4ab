"""Per-step cost and resulting spectral norms of every clipping method and BN mode (run by hand).

For ResNet18 (or DLA) at CIFAR shape, batch 128, SGD as in the paper (lr 0.1, momentum
0.9, weight decay 5e-4), random data, for each mode and method, in one run:

1. ``--train-steps`` N training steps (the same step as training: forward, loss + penalty,
   backward, optimiser step, ``method.after_step``). Step 0 is timed on its own
   ("first": FastClip's initial PowerQR and first clip, nsedghi's first projection).
   The fastest of the other steps where no schedule fires is the *plain* step: timing
   noise on a shared machine only ever adds time (timeit's rule), and on this VM it
   moved single steps by up to 15 %, more than the differences measured. The steps of
   all methods of a mode are interleaved (one step of each method per round, the order
   rotated every round so that no method always follows the same one), so a change of
   load hits every method alike.
2. The exact sigma_1 of every conv (and, with BN, every Conv+BN composition) after the N
   steps, at its true input size: block Lanczos run to convergence in float64
   (``fastclip.singular_values``), which agrees with scipy's svds to ~1e-6.
3. One *scheduled* step (FastClip's clip step, nsedghi's projection, clipBN's BN clamp)
   timed alone: if none happened naturally within the N steps, the schedule is forced
   for one extra step (after the measurement of 2.), right after a plain step of the same
   method, its *base*. The *amortised* cost is ``plain + (scheduled - base) / period``,
   as a ratio to orig's plain step (``base`` is the plain step when the schedule fired
   within the rounds); the base is not folded into *plain*, which is the fastest of the
   same number of interleaved steps for every method.
   FastClip's per-step tracking is also timed apart (every wrapper's PowerQR
   iterations, batched as in training), a deterministic share of its plain step.
4. With ``--full-period`` (for CPU-sized N): FastClip then trains on to its next natural
   clip step, a whole ``clip_steps`` after the forced one, and that step is the one
   amortised. Its cost grows with the drift since the previous clip (the others' do not:
   a fixed projection), so a clip a few steps after the last one is not what training pays.
   Its base is the fastest of the 5 plain steps just before it.

Usage::

    nice python benchmarks/methods.py                               # CUDA: 200 steps, 20 timed
    nice python benchmarks/methods.py --train-steps 4 --modes wBN   # a CPU-sized run
    nice python benchmarks/methods.py --train-steps 8 --full-period --threads 1 --append  # the README's
"""

from __future__ import annotations

import argparse
import logging
import math
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

import fastclip
from fastclip.batched import detach, tracker_of
from fastclip.pipeline.cli import OneLineErrorParser, int_at_least
from fastclip.pipeline.io import atomic_write_text
from fastclip.pipeline.methods import MODES, available
from fastclip.pipeline.methods.base import Method
from fastclip.pipeline.methods.fastclip import original_named_modules
from fastclip.pipeline.models.layers import ConvBN
from fastclip.pipeline.training import TrainConfig, build_model, choose_device, make_optimizer, resolve
from fastclip.wrapper import SpectralNorm, track_all_

logger = logging.getLogger("benchmarks.methods")

RESULTS = Path(__file__).resolve().parent / "results" / "methods.md"
#: Methods whose bound is on the true operator norm (nsedghi: of the circular conv).
TRUE_NORM = ("fastclip", "fastclip-published", "fastclip-per-layer", "gouk", "nsedghi", "lip4conv")
#: Extra rows: a registered method with other hyper-parameters. "fastclip-published" is
#: FastClip with the authors' clip step (10 estimation passes, one round on one direction,
#: fixed step 0.35) instead of this project's converged, multi-round clip.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "fastclip-published": (
        "fastclip",
        {
            "refine_iter": 10,
            "clip_block": 1,
            "max_clip_rounds": 1,
            "line_search": False,
            "clip_margin": 0.0,
            "rescale_above": 0.0,
        },
    ),
    "fastclip-track0": ("fastclip", {"track_steps": 0}),
    "fastclip-per-layer": ("fastclip", {}),
}
#: Variants whose wrappers step themselves, layer by layer, in their forwards (the batched
#: tracker of fastclip.batched detached): the per-step work before issue 27.
PER_LAYER = ("fastclip-per-layer",)
TITLE = [
    "# Clipping methods: cost per training step and resulting spectral norms",
    "",
    "Produced by `benchmarks/methods.py` (see its docstring). "
    "*plain*: fastest of the training steps where no schedule fires (noise only adds time; steps of all "
    "methods interleaved, order rotated every round); *plain / orig*: their ratio; "
    "*scheduled*: one step where the method's schedule fires (FastClip's clip, nsedghi's projection, "
    "clipBN's BN clamp), alone; "
    "*amortised*: plain + (scheduled - base) / period, relative to orig's (base: the same method's plain "
    "step just before the scheduled one; for a full period, the fastest of the 5 before it); "
    "*first*: step 0 (for FastClip: 100 PowerQR iterations from random starts and the first clip of every "
    "layer from its initialisation). "
    "sigma_1 columns: exact (converged float64 Lanczos) over the convs (and Conv+BN compositions) after "
    "the training steps, at each layer's true input size.",
    "",
]


def get_args_parser() -> argparse.ArgumentParser:
    p = OneLineErrorParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--methods",
        nargs="+",
        choices=available() + list(VARIANTS),
        default=available(),
        help="methods, and variants: " + "; ".join(f"{k} = {v[0]} with {v[1]}" for k, v in VARIANTS.items()),
    )
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--model", choices=["ResNet18", "DLA"], default="ResNet18")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument(
        "--train-steps",
        type=int_at_least(2, why="step 0 is timed apart"),
        default=None,
        help="training steps before measuring sigma_1 (cuda 200, cpu 4)",
    )
    p.add_argument("--no-sigma", action="store_true", help="skip the exact sigma_1 measurement")
    p.add_argument(
        "--full-period",
        action="store_true",
        help="after the rest, train fastclip on to its next natural clip step (a whole "
        "clip_steps after the previous clip) and amortise that step: what training pays. "
        "Without it the clip step is timed a few steps after the previous clip",
    )
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (on a shared, loaded machine 1 thread times more steadily)",
    )
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--append", action="store_true", help="add this run as a new section of --out")
    return p


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _wrappers(model: nn.Module) -> list[SpectralNorm]:
    return [m for m in model.modules() if isinstance(m, SpectralNorm)]


def _schedules(method: Method) -> dict[str, int]:
    """Period (in steps) of each scheduled action of the method in its mode."""
    out = {}
    if method.name in ("fastclip", "nsedghi"):
        out[method.name] = method.config.clip_steps
    if method.mode == "clipBN":
        out["bn"] = method.config.bn_count
    return out


def _fires(method: Method, model: nn.Module, step: int) -> bool:
    if method.name == "fastclip":
        w = _wrappers(model)
        if w and w[0].schedule.step % method.config.clip_steps == 0 and w[0].schedule.started():
            return True
    if method.name == "nsedghi" and step % method.config.clip_steps == 0:
        return True
    return method.mode == "clipBN" and step % method.config.bn_count == 0


def _force_schedule(method: Method, model: nn.Module, step: int) -> int:
    """Step index (and, for FastClip, wrapper counters) at which the next step runs every
    schedule of the method: a multiple of every period."""
    periods = list(_schedules(method).values())
    lcm = math.lcm(*periods) if periods else 1
    target = (step // lcm + 1) * lcm
    if method.name == "fastclip":
        # The wrappers count their own training forwards; move them to a clip step.
        for w in _wrappers(model):
            w.set_step(target)
    return target


class Trainer:
    """One (mode, method) on random data: timed training steps."""

    def __init__(self, config: TrainConfig, device: torch.device) -> None:
        t0 = time.perf_counter()
        self.model, self.method = build_model(config, device)
        self.optimizer = make_optimizer(config, self.model)
        _sync(device)
        self.setup = time.perf_counter() - t0
        self.device = device
        self.batch_size = config.batch_size
        self.criterion = nn.CrossEntropyLoss()
        self.generator = torch.Generator().manual_seed(config.seed)

    def step(self, index: int) -> float:
        x = torch.rand(self.batch_size, 3, 32, 32, generator=self.generator).to(self.device)
        y = torch.randint(0, 10, (self.batch_size,), generator=self.generator).to(self.device)
        self.model.train()
        _sync(self.device)
        t0 = time.perf_counter()
        loss = self.criterion(self.model(x), y) + self.method.penalty(self.model)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.method.after_step(self.model, index)
        _sync(self.device)
        return time.perf_counter() - t0


def tracking_time(model: nn.Module, device: torch.device, repeats: int = 5) -> float:
    """Median seconds of one step's tracking alone (every wrapper's warm-started
    PowerQR iterations, batched as in training): the part of FastClip's plain step that
    the interleaved step times cannot resolve on a noisy machine."""
    tracker = tracker_of(model)
    batched = tracker is not None and tracker._plan is not None
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        if batched:  # every wrapper's iteration in the tracker's batched ops (fastclip.batched)
            with torch.no_grad():
                tracker.iterate()
        else:
            track_all_(model)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def exact_norms(model: nn.Module, method: Method) -> dict[str, dict[str, float]]:
    """Converged sigma_1 (float64) of every conv and every Conv+BN composition, by the
    layers' names in the unwrapped model."""
    convs, pairs = {}, {}
    model.eval()
    for name, m in original_named_modules(model):
        if isinstance(m, SpectralNorm):
            continue  # the layer inside has the same name
        if isinstance(m, nn.Conv2d):
            convs[name] = float(
                fastclip.singular_values(m, method.input_shapes[name], k=1, dtype=torch.float64)[0]
            )
        elif isinstance(m, ConvBN) and not isinstance(m.bn, nn.Identity):
            pairs[name] = float(
                fastclip.singular_values(m, method.input_shapes[name], k=1, dtype=torch.float64)[0]
            )
    return {"conv": convs, "composition": pairs}


def run_mode(
    mode: str, names: list[str], args: argparse.Namespace, device: torch.device, train_steps: int
) -> list[dict[str, Any]]:
    """All methods of one mode, their timed steps interleaved round by round so that every
    method sees the same machine load (the machine may be shared)."""
    trainers = {}
    for name in names:
        method, overrides = VARIANTS.get(name, (name, {}))
        cfg = resolve(
            TrainConfig(
                dataset="cifar",
                model=args.model,
                method=method,
                mode=mode,
                seed=args.seed,
                batch_size=args.batch_size,
                device=str(device),
                method_args=overrides,
            )
        )
        trainers[name] = Trainer(cfg, device)
        if name in PER_LAYER:
            detach(trainers[name].model)
    first, plain, scheduled = {}, {n: [] for n in names}, {n: [] for n in names}
    for name, t in trainers.items():
        first[name] = t.step(0)
        logger.info("%s %s: first step %.1f s", mode, name, first[name])
    order = list(trainers)
    for i in tqdm(range(1, train_steps), desc=f"{mode} rounds"):
        for name in order[i % len(order) :] + order[: i % len(order)]:
            t = trainers[name]
            fires = _fires(t.method, t.model, i)
            dt = t.step(i)
            (scheduled if fires else plain)[name].append(dt)
    rows = []
    for name, t in trainers.items():
        m = t.method
        extra: dict[str, Any] = {}
        logger.info("%s %s: plain steps %s", mode, name, [round(d, 2) for d in plain[name]])
        norms = exact_norms(t.model, m) if not args.no_sigma else {"conv": {}, "composition": {}}
        if m.name == "fastclip":  # per step: the iterations run every track_steps steps (0: at clips only)
            every = m.config.track_steps
            extra["tracking"] = tracking_time(t.model, device) / every if every else 0.0
        rows.append(
            {
                **extra,
                "mode": mode,
                "method": name,
                "setup": t.setup,
                "first": first[name],
                "plain": min(plain[name]) if plain[name] else float("nan"),
                "n_plain": len(plain[name]),
                "periods": _schedules(m),
                "norms": norms,
            }
        )
    # One step where each method's schedules fire, right after a plain step of the same
    # method (so "scheduled - plain" compares steps under the same load).
    for row in rows:
        t = trainers[row["method"]]
        m = t.method
        if not row["periods"]:
            row["scheduled"] = float("nan")
            continue
        if not scheduled[row["method"]]:
            # the plain step just before is the base of this step's extra cost only: it
            # is one more sample, taken outside the interleaved rounds, that the methods
            # without a schedule do not get (folded into *plain*, it let nsedghi's
            # plain step, which is orig's work, come out 2 % under orig's)
            row["base"] = t.step(train_steps)
            scheduled[row["method"]].append(t.step(_force_schedule(m, t.model, train_steps + 1)))
        row["scheduled"] = statistics.median(scheduled[row["method"]])
        if m.mode == "clipBN":
            # the BN clamp alone, to split a step where both schedules fire
            t0 = time.perf_counter()
            Method.after_step(m, t.model, 0)
            _sync(device)
            row["bn_clamp"] = time.perf_counter() - t0
        logger.info(
            "%s %s: plain %.2f s, scheduled %.2f s", mode, row["method"], row["plain"], row["scheduled"]
        )
        if args.full_period and m.name == "fastclip":
            # The cost of a clip step grows with the drift since the previous one: time
            # the one training actually pays, a whole period after the (forced) clip.
            step = _wrappers(t.model)[0].schedule.step
            wrappers = [w for w in _wrappers(t.model) if w.clip_flag]
            rescales = sum(w.rescales for w in wrappers)
            before = []
            while step % m.config.clip_steps:
                before.append(t.step(step))
                step += 1
            row["scheduled_period"] = t.step(step)
            # the base of its extra cost: the fastest of the plain steps just before it
            row["base_period"] = min(before[-5:]) if before else row["plain"]
            row["period_rescaled"] = sum(w.rescales for w in wrappers) - rescales
            top = max(w.sigma_at_clip for w in wrappers if w.kind != "bn")
            row["period_top_sigma"] = top
            if not args.no_sigma:
                after = exact_norms(t.model, m)
                row["period_max"] = {kind: max(v.values()) for kind, v in after.items() if v}
            logger.info(
                "%s %s: clip step %.2f s a full period after the previous one (%d layers rescaled, "
                "sigma_1 found before it up to %.2f)",
                mode,
                row["method"],
                row["scheduled_period"],
                row["period_rescaled"],
                top,
            )
    return rows


def amortised(r: dict[str, Any]) -> float:
    """plain + each schedule's extra cost / its period."""
    cost = r["plain"]
    periods = r["periods"]
    if not periods:
        return cost
    if "scheduled_period" in r:
        extra = r["scheduled_period"] - r["base_period"]
    else:
        extra = r["scheduled"] - r.get("base", r["plain"])
    bn = r.get("bn_clamp", 0.0)
    if "bn" in periods:
        cost += bn / periods["bn"]
        extra -= bn
    for key, period in periods.items():
        if key != "bn":
            cost += max(extra, 0.0) / period
    return cost


def plain_ratio(r: dict[str, Any], orig: dict[str, Any]) -> float:
    """This method's plain step over orig's (each the fastest of its plain steps)."""
    return r["plain"] / orig["plain"]


def _fmt(v: float, nd: int = 2) -> str:
    return "-" if v != v else f"{v:.{nd}f}"


def report(
    rows: list[dict[str, Any]], args: argparse.Namespace, device: torch.device, train_steps: int
) -> str:
    header = [
        f"## Run of {time.strftime('%Y-%m-%d %H:%M')}: {args.model}, {', '.join(args.modes)}",
        "",
        f"{platform.node()}: {device}"
        + (
            f" ({torch.cuda.get_device_name(device)})"
            if device.type == "cuda"
            else f", {torch.get_num_threads()} torch threads, {platform.processor() or platform.machine()}"
        )
        + f", torch {torch.__version__}. {args.model} at CIFAR shape (3x32x32), batch {args.batch_size}, "
        f"SGD lr 0.1 momentum 0.9 wd 5e-4, random data, seed {args.seed}, {train_steps} training steps per "
        f"configuration{' (a CPU-sized N, not the 200 of the issue)' if train_steps < 200 else ''}. "
        "Command: `python benchmarks/methods.py "
        + " ".join(
            f"--{k.replace('_', '-')} {v if not isinstance(v, list) else ' '.join(v)}"
            for k, v in sorted(vars(args).items())
            if k in ("modes", "methods", "train_steps", "model", "threads") and v is not None
        )
        + (" --full-period" if args.full_period else "")
        + "`.",
        "",
    ]
    lines: list[str] = []
    headline = []
    for mode in args.modes:
        rs = [r for r in rows if r["mode"] == mode]
        if not rs:
            continue
        orig = next((r for r in rs if r["method"] == "orig"), None)
        base_am = amortised(orig) if orig else float("nan")
        lines += [
            f"### {mode}",
            "",
            "| method | setup (s) | first (s) | plain (s) | plain / orig | scheduled step alone (s) | period "
            "| amortised / orig | max conv sigma_1 | median conv sigma_1 | max Conv+BN sigma_1 |",
            "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|",
        ]
        for r in rs:
            conv = list(r["norms"]["conv"].values())
            comp = list(r["norms"]["composition"].values())
            period = ", ".join(f"{k} {v}" for k, v in r["periods"].items()) or "-"
            ratio = plain_ratio(r, orig) if orig else float("nan")
            r["amortised_ratio"] = amortised(r) / base_am
            lines.append(
                f"| {r['method']} | {_fmt(r['setup'], 1)} | {_fmt(r['first'], 1)} | {_fmt(r['plain'])} | "
                f"{_fmt(ratio)} | {_fmt(r['scheduled'], 1)}"
                + (f" (full period: {_fmt(r['scheduled_period'], 1)})" if "scheduled_period" in r else "")
                + f" | {period} | "
                f"{_fmt(r['amortised_ratio'])} | {_fmt(max(conv) if conv else float('nan'), 3)} | "
                f"{_fmt(statistics.median(conv) if conv else float('nan'), 3)} | "
                f"{_fmt(max(comp) if comp else float('nan'), 3)} |"
            )
        lines.append("")
        for r in rs:
            if "tracking" in r and orig:
                lines += [
                    f"{r['method']}: tracking per step (every wrapper's PowerQR iterations, amortised over "
                    "track_steps), timed apart: "
                    f"{1000 * r['tracking']:.0f} ms, {100 * r['tracking'] / orig['plain']:.1f} % of orig's "
                    "plain step.",
                    "",
                ]
            if "scheduled_period" in r:
                lines += [
                    f"{r['method']}: the clip step a whole period after the previous clip (what training "
                    f"pays, and what *amortised* uses) took {r['scheduled_period']:.1f} s (the plain steps "
                    f"before it: {r['base_period']:.2f} s); its first estimates "
                    f"found sigma_1 up to {r['period_top_sigma']:.2f} c, {r['period_rescaled']} layers above "
                    f"rescale_above c were rescaled first"
                    + (
                        "; exact sigma_1 right after it: max "
                        + ", ".join(
                            f"{'Conv+BN' if kind == 'composition' else kind} {v:.3f} c"
                            for kind, v in r["period_max"].items()
                        )
                        if r.get("period_max")
                        else ""
                    )
                    + ".",
                    "",
                ]
        bounded = sorted((r for r in rs if r["method"] in TRUE_NORM), key=lambda r: r["amortised_ratio"])
        if bounded:
            headline.append(
                f"- {mode}: amortised overhead over orig: "
                + ", ".join(f"{r['method']} {100 * (r['amortised_ratio'] - 1):+.0f}%" for r in bounded)
                + "."
            )
        # per-layer table
        names = sorted({n for r in rs for n in r["norms"]["conv"]}, key=_layer_order(rs))
        if names:
            lines += [
                f"#### {mode}: exact sigma_1 of each conv after {train_steps} steps",
                "",
                "| layer | " + " | ".join(r["method"] for r in rs) + " |",
                "|---|" + "---:|" * len(rs),
            ]
            for n in names:
                lines.append(
                    f"| {n} | "
                    + " | ".join(_fmt(r["norms"]["conv"].get(n, float("nan")), 3) for r in rs)
                    + " |"
                )
            lines.append("")
        names = sorted({n for r in rs for n in r["norms"]["composition"]}, key=_layer_order(rs))
        if names:
            lines += [
                f"#### {mode}: exact sigma_1 of each Conv+BN composition after {train_steps} steps",
                "",
                "| layer | " + " | ".join(r["method"] for r in rs) + " |",
                "|---|" + "---:|" * len(rs),
            ]
            for n in names:
                lines.append(
                    f"| {n} | "
                    + " | ".join(_fmt(r["norms"]["composition"].get(n, float("nan")), 3) for r in rs)
                    + " |"
                )
            lines.append("")
    if headline:
        header += [
            "Headline (amortised per-step cost, methods that bound the true operator norm):",
            "",
            *headline,
            "",
        ]
    return "\n".join(header + lines)


def _layer_order(rows: list[dict[str, Any]]):
    order: dict[str, int] = {}
    for r in rows:
        for kind in ("conv", "composition"):
            for n in r["norms"][kind]:
                order.setdefault(n, len(order))
    return lambda n: order.get(n, len(order))


def main(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    device = choose_device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    train_steps = args.train_steps if args.train_steps is not None else (200 if device.type == "cuda" else 4)
    names = ["orig"] + [m for m in args.methods if m != "orig"]  # the ratios' reference first
    before = args.out.read_text() if args.append and args.out.exists() else "\n".join(TITLE) + "\n"
    rows = []
    for mode in args.modes:
        rows += run_mode(mode, names, args, device, train_steps)
        # finished modes survive an interrupted run
        atomic_write_text(args.out, before + "\n" + report(rows, args, device, train_steps))
    logger.info("wrote %s", args.out)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
