"""Benchmark: start-up wall time of ``import fastclip`` and of every command's ``--help``,
side by side with ``python -c "import torch"`` (the floor: every command needs torch).

Each round runs every command once, in a shuffled order, so that load from other
processes spreads over all of them; the table keeps each command's median over the
rounds and its ratio to the median of ``import torch``. Commands run as
``python -m fastclip.pipeline.cli.<name> --help`` with this checkout first on ``PYTHONPATH``.

Run: ``python benchmarks/startup.py [--rounds 7]`` (about 3 s per command and round on
this 2-core machine); the table goes to benchmarks/results/startup.md.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

from fastclip.pipeline.cli import OneLineErrorParser

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = sorted(
    p.stem for p in (ROOT / "fastclip" / "cli").glob("*.py") if p.stem not in ("__init__", "runs")
)


def get_args_parser() -> argparse.ArgumentParser:
    p = OneLineErrorParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=7, help="runs of every command (default 7)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "startup.md"))
    p.add_argument("--seed", type=int, default=0)
    return p


def cases() -> dict[str, list[str]]:
    out = {
        'python -c "import torch"': ["-c", "import torch"],
        'python -c "import fastclip"': ["-c", "import fastclip"],
    }
    for name in COMMANDS:
        out[f"fastclip.pipeline.cli.{name} --help"] = ["-m", f"fastclip.pipeline.cli.{name}", "--help"]
    out["fastclip.pipeline.demo --help"] = ["-m", "fastclip.pipeline.demo", "--help"]
    return out


def wall(args: list[str], env: dict[str, str]) -> float:
    t = time.perf_counter()
    subprocess.run([sys.executable, *args], env=env, cwd=ROOT, check=True, capture_output=True)
    return time.perf_counter() - t


def main(args: argparse.Namespace) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    todo = cases()
    load_before = os.getloadavg()[0]
    times: dict[str, list[float]] = {k: [] for k in todo}
    rng = random.Random(args.seed)
    for _ in range(args.rounds):
        order = list(todo)
        rng.shuffle(order)
        for k in order:
            times[k].append(wall(todo[k], env))
    base = statistics.median(times['python -c "import torch"'])
    rows = [
        f"| `{k}` | {statistics.median(v):.2f} | {statistics.median(v) / base:.2f} |"
        for k, v in times.items()
    ]
    worst = max(statistics.median(v) / base for v in times.values())
    text = "\n".join(
        [
            "# Start-up: import and --help beside `import torch`",
            "",
            f"`python benchmarks/startup.py --rounds {args.rounds}`: wall time, median of {args.rounds} "
            f"shuffled rounds, one thread, Python {sys.version.split()[0]}, {os.cpu_count()} CPUs. "
            f"Load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after (other processes "
            f"share the CPUs: the ratios are what matters). Largest ratio: {worst:.2f}.",
            "",
            "| command | median wall (s) | ratio to `import torch` |",
            "|---|---|---|",
            *rows,
            "",
        ]
    )
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
