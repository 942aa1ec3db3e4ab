"""The command-line layer: one module per command (``fastclip.cli.train``, ``.attack``,
``.batch_job_submit``, ``.batch_attack_submit``, ``.status``, ``.collect_attack_results``,
``.compute_trained_svs``, ``.lipschitz_report``, ``.plot_curves``, ``.reproduce``), each
``get_args_parser()`` + ``main(argv=None)``, installed as the ``fastclip-*`` entry points
of pyproject.toml and called by the thin ``experiments/<name>.py`` scripts; and below,
what every command shares: one-line errors and checked number types.

Bad input must end a script with one line naming the value (exit code 2), not a usage
block or a traceback; the argparse ``type=`` callables below reject a value with an
``ArgumentTypeError`` that argparse prefixes with the flag.

Example::

    >>> p = OneLineErrorParser(prog="train.py")
    >>> _ = p.add_argument("--epochs", type=int_at_least(1))
    >>> p.parse_args(["--epochs", "3"]).epochs
    3
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path

__all__ = [
    "OneLineErrorParser",
    "int_at_least",
    "positive_float",
    "nonneg_float",
    "output_dir_problem",
    "output_file_problem",
    "parse_args",
    "script_path",
    "EXPERIMENTS",
    "EXPERIMENTS_EXTRA",
    "missing_extra",
]


class OneLineErrorParser(argparse.ArgumentParser):
    """Reports a bad argument as one line on stderr (exit code 2) instead of usage + error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def int_at_least(minimum: int, what: str = "an integer", why: str = "") -> Callable[[str], int]:
    """An argparse type: an integer >= ``minimum``; the error reads ``expected <what> >=
    <minimum>`` (``a positive integer`` for 1), followed by ``why`` when given."""
    bound = "a positive integer" if minimum == 1 and what == "an integer" else f"{what} >= {minimum}"
    suffix = f" ({why})" if why else ""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {what if minimum != 1 else bound}, got {text!r}"
            ) from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {bound}{suffix}, got {text!r}")
        return value

    parse.__name__ = f"int_at_least_{minimum}"  # argparse names the type in some messages
    return parse


def _float(text: str, ok: Callable[[float], bool], bound: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {bound}, got {text!r}") from None
    if not (ok(value) and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected {bound}, got {text}")
    return value


def positive_float(text: str) -> float:
    """An argparse type: a finite number > 0."""
    return _float(text, lambda v: v > 0, "a positive finite number")


def nonneg_float(text: str) -> float:
    """An argparse type: a finite number >= 0."""
    return _float(text, lambda v: v >= 0, "a finite number >= 0")


# -- output locations --------------------------------------------------------------------------
# Checked before any work, so that a bad --out/--logdir costs seconds, not the whole
# computation, and nothing is written. os.access asks the kernel, so a read-only mount
# is refused even for root.
def output_dir_problem(path: str | os.PathLike, what: str = "output directory") -> str | None:
    """Why ``path`` cannot be (created as) a directory to write into, or None: a component
    that exists and is not a directory, or a nearest existing directory that is not
    writable. Reads only.

    Example::

        >>> output_dir_problem("/proc/version/x", "--out-dir")
        "--out-dir '/proc/version/x': '/proc/version' exists and is not a directory"
    """
    path = Path(os.path.abspath(os.path.expanduser(str(path))))
    for p in [path, *path.parents]:
        if p.exists():
            if not p.is_dir():
                return f"{what} {str(path)!r}: {str(p)!r} exists and is not a directory"
            if not os.access(p, os.W_OK | os.X_OK):
                return f"{what} {str(path)!r}: cannot write into {str(p)!r} (read-only or permission denied)"
            return None
    return None


def output_file_problem(path: str | os.PathLike, what: str = "output file") -> str | None:
    """Why the file ``path`` cannot be written (atomically: a temp beside it, then a
    rename), or None: its directory fails :func:`output_dir_problem`, or ``path`` is a
    directory. Reads only."""
    path = Path(os.path.abspath(os.path.expanduser(str(path))))
    if path.is_dir():
        return f"{what} {str(path)!r} is a directory"
    problem = output_dir_problem(path.parent, what)
    return problem.replace(f"{what} {str(path.parent)!r}", f"{what} {str(path)!r}", 1) if problem else None


# -- the commands ------------------------------------------------------------------------------
# Each command of the package (fastclip.cli.<name>) is ``get_args_parser()`` + ``main(argv=None)``,
# registered in pyproject.toml's [project.scripts]; experiments/<name>.py calls the same main.
#: The source checkout's experiments/ directory (absent in an installed, non-editable copy).
EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"


#: What the commands import beyond the library's torch, numpy and scipy (import names):
#: the ``experiments`` extra of pyproject.toml.
EXPERIMENTS_EXTRA = ("torchvision", "pandas", "matplotlib", "tensorboard", "submitit", "tqdm")


def missing_extra(modules: Sequence[str] | None = None) -> list[str]:
    """Which of ``modules`` (default :data:`EXPERIMENTS_EXTRA`) are not installed (looked
    up, not imported)."""
    return [
        m for m in (EXPERIMENTS_EXTRA if modules is None else modules) if importlib.util.find_spec(m) is None
    ]


def parse_args(
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | argparse.Namespace | None,
) -> argparse.Namespace:
    """``argv`` parsed by ``parser`` (None: ``sys.argv[1:]``); a Namespace parsed already as it is.

    Every command starts here, so a library-only install (``pip install fastclip``) ends
    each one with one line naming the extra to install, before any work."""
    missing = missing_extra()
    if missing:
        parser.exit(
            2,
            f"{parser.prog}: needs {', '.join(missing)} (not installed), which the library alone does "
            "without: pip install 'fastclip[experiments]'\n",
        )
    return argv if isinstance(argv, argparse.Namespace) else parser.parse_args(argv)


def script_path(script: str, module: str) -> Path:
    """The file that runs command ``script``: ``experiments/<script>.py`` in a source checkout
    (the command lines the grids and the reproduce chain have always recorded), else the
    module ``fastclip/cli/<module>.py`` itself."""
    path = EXPERIMENTS / f"{script}.py"
    return path if path.is_file() else Path(__file__).resolve().with_name(f"{module}.py")
