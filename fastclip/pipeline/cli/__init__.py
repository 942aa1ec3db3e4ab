"""The command-line layer: one module per command (``fastclip.pipeline.cli.train``, ``.attack``,
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
import functools
import importlib.util
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from fastclip.pipeline.limits import (
    MAX_COUNT,
    MAX_REAL,
    MAX_SEED,
    finite_float,
    int_at_least,
    int_seed,
    nonneg_float,
    path_arg,
    positive_float,
    real_in,
)
from fastclip.pipeline.paths import name_problem, pseudo_filesystem

__all__ = [
    "OneLineErrorParser",
    "int_at_least",
    "positive_float",
    "nonneg_float",
    "finite_float",
    "real_in",
    "int_seed",
    "path_arg",
    "MAX_COUNT",
    "MAX_REAL",
    "MAX_SEED",
    "output_dir_problem",
    "output_file_problem",
    "os_error_line",
    "fail",
    "one_line_os_errors",
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

    def format_help(self) -> str:
        # Every checked number type carries its valid range: --help documents it there,
        # where the check is, rather than in a table that could drift from it.
        for action in self._actions:
            valid = getattr(action.type, "valid_range", None)
            if valid and action.help and action.help != argparse.SUPPRESS and "[range " not in action.help:
                action.help += f" [range {valid}]"
        return super().format_help()


# -- output locations --------------------------------------------------------------------------
# Checked before any work, so that a bad --out/--logdir costs seconds, not the whole
# computation, and nothing is written. os.access asks the kernel, so a read-only mount
# is refused even for root.
def _shown(path: str | os.PathLike) -> str:
    """``repr`` of a path, its middle cut out when it is too long to read in one line."""
    text = str(path)
    return repr(text if len(text) <= 160 else text[:70] + "..." + text[-70:])


def output_dir_problem(path: str | os.PathLike, what: str = "output directory") -> str | None:
    """Why ``path`` cannot be (created as) a directory to write into, or None: an empty
    path, a component that exists and is not a directory, a name longer than the file
    system takes, a pseudo file system (``/proc``, ``/sys``), or a nearest existing
    directory that is not writable. Reads only.

    Example::

        >>> output_dir_problem("/proc/version/x", "--out-dir")
        "--out-dir '/proc/version/x': '/proc/version' exists and is not a directory"
    """
    if not str(path).strip():
        return f"{what} {_shown(path)} is not a path"
    path = Path(os.path.abspath(os.path.expanduser(str(path))))
    # The name first: stat() of a too long name fails with ENAMETOOLONG.
    too_long = name_problem(path)
    if too_long:
        return f"{what} {_shown(path)}: {too_long}"
    for p in [path, *path.parents]:
        if os.path.exists(p):
            if not os.path.isdir(p):
                return f"{what} {_shown(path)}: {_shown(p)} exists and is not a directory"
            break
    else:
        p = Path("/")
    pseudo = pseudo_filesystem(p)
    if pseudo:
        return f"{what} {_shown(path)}: {_shown(p)} is on a {pseudo} file system, which takes no files"
    if not os.access(p, os.W_OK | os.X_OK):
        return f"{what} {_shown(path)}: cannot write into {_shown(p)} (read-only or permission denied)"
    return None


def output_file_problem(path: str | os.PathLike, what: str = "output file") -> str | None:
    """Why the file ``path`` cannot be written (atomically: a temp beside it, then a
    rename), or None: its directory fails :func:`output_dir_problem`, ``path`` is a
    directory or another non-regular file (a device, a FIFO: a rename would replace it),
    or its name is too long. Reads only."""
    if not str(path).strip():
        return f"{what} {_shown(path)} is not a path"
    path = Path(os.path.abspath(os.path.expanduser(str(path))))
    too_long = name_problem(path)
    if too_long:
        return f"{what} {_shown(path)}: {too_long}"
    if os.path.isdir(path):
        return f"{what} {_shown(path)} is a directory"
    if os.path.lexists(path) and not os.path.isfile(path):
        return f"{what} {_shown(path)} exists and is not a regular file"
    problem = output_dir_problem(path.parent, what)
    return problem.replace(f"{what} {_shown(path.parent)}", f"{what} {_shown(path)}", 1) if problem else None


# -- failures part-way ---------------------------------------------------------------------------
def os_error_line(error: OSError) -> str:
    """One line for an OS error met part-way (a full disk, an I/O error): the path, the
    OS's words, and that the earlier files are intact (every write is atomic: the
    previous version stays until the new one is complete), so the same command, rerun
    once the cause is fixed, goes on from there."""
    if error.filename is not None and not str(error).startswith("cannot write"):
        text = f"{str(error.filename)!r}: {error.strerror or error} (errno {error.errno})"
    else:
        text = str(error)
    return f"{text}; the files written before are intact: rerun the same command once this is fixed"


def one_line_os_errors(main: Callable[..., int]) -> Callable[..., int]:
    """Wrap a command's ``main`` so that an OS error met part-way (a full disk while a
    result is written) ends it with :func:`os_error_line` and exit code 1, not a traceback."""

    @functools.wraps(main)
    def wrapper(argv: Sequence[str] | argparse.Namespace | None = None) -> int:
        try:
            return main(argv)
        except OSError as e:
            prog = sys.modules[main.__module__].get_args_parser().prog
            sys.stderr.write(f"{prog}: error: {os_error_line(e)}\n")
            raise SystemExit(1) from None

    return wrapper


def fail(parser: argparse.ArgumentParser, message: str, code: int = 1) -> None:
    """End the command with ``<prog>: error: <message>`` (one line) and exit ``code``: 1 for
    a failure part-way, where 2 (:meth:`OneLineErrorParser.error`) means bad input."""
    parser.exit(code, f"{parser.prog}: error: {message}\n")


# -- the commands ------------------------------------------------------------------------------
# Each command of the package (fastclip.pipeline.cli.<name>) is ``get_args_parser()`` + ``main(argv=None)``,
# registered in pyproject.toml's [project.scripts]; experiments/<name>.py calls the same main.
#: The source checkout's experiments/ directory (absent in an installed, non-editable copy).
EXPERIMENTS = Path(__file__).resolve().parents[3] / "experiments"


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
    module ``fastclip/pipeline/cli/<module>.py`` itself."""
    path = EXPERIMENTS / f"{script}.py"
    return path if path.is_file() else Path(__file__).resolve().with_name(f"{module}.py")
