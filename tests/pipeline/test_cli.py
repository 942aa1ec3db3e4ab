"""The command layer: every [project.scripts] entry point imports and has a main, every
experiments/ script is a thin call of one, and bad input is one line with exit code 2."""

import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

import fastclip.pipeline.cli

ROOT = Path(__file__).resolve().parents[2]


def entry_points() -> dict[str, str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def test_every_entry_point_imports_and_has_main():
    scripts = entry_points()
    assert len(scripts) >= 11
    for name, target in scripts.items():
        module, _, func = target.partition(":")
        assert name.startswith("fastclip-") and func == "main", target
        main = getattr(importlib.import_module(module), func)
        assert callable(main), target
        assert callable(importlib.import_module(module).get_args_parser), target


@pytest.mark.parametrize("target", sorted(entry_points().values()))
def test_entry_point_help_exits_0(target, capsys):
    main = importlib.import_module(target.partition(":")[0]).main
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith("usage:")


def test_every_experiments_script_is_a_shim_of_an_entry_point():
    targets = {t.partition(":")[0] for t in entry_points().values()}
    scripts = sorted((ROOT / "experiments").glob("*.py"))
    assert len(scripts) == 10
    for path in scripts:
        text = path.read_text()
        modules = set(
            re.findall(r"^from (fastclip\.pipeline\.cli\.\w+) import (?:_merge, )?main\b", text, re.M)
        )
        assert len(modules) == 1 and modules <= targets, path.name
        assert len(text.splitlines()) <= 12, f"{path.name} should only call the package's main"


def test_experiments_script_equals_module_run(tmp_path, capsys):
    """``python experiments/status.py`` and ``fastclip.pipeline.cli.status.main`` are one command."""
    from fastclip.pipeline.cli import status

    proc = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "status.py"), "--help"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    with pytest.raises(SystemExit) as e:
        status.main(["--help"])
    assert proc.returncode == e.value.code == 0 and proc.stdout == capsys.readouterr().out


def test_main_accepts_argv_or_namespace(tmp_path, capsys):
    from fastclip.pipeline.cli import status

    argv = ["--logdir", str(tmp_path), "--all"]
    for args in (argv, status.get_args_parser().parse_args(argv)):
        with pytest.raises(SystemExit) as e:
            status.main(args)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "no grid manifests under" in err


@pytest.mark.parametrize(
    "flag, value, shown",
    [
        ("--attack", "pgdx", "invalid choice: 'pgdx' (choose from 'pgd', 'cw', 'pgdl2', 'certify')"),
        ("--method", "fast", "invalid choice: 'fast' (choose from 'orig', 'fastclip'"),
        ("--mode", "BN", "invalid choice: 'BN'"),
        ("--n-steps", "0", "argument --n-steps: expected a positive integer, got '0'"),
        ("--cw-lr", "-1", "argument --cw-lr: expected a positive finite number, got -1"),
    ],
)
def test_attack_flags_are_checked_by_argparse(flag, value, shown, capsys):
    from fastclip.pipeline.cli import attack

    with pytest.raises(SystemExit) as e:
        attack.main(["mnist", "logs/x/method_", flag, value])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and shown in err, err


def test_script_path_prefers_the_checkout():
    assert fastclip.pipeline.cli.script_path("train", "train") == ROOT / "experiments" / "train.py"
    assert (
        fastclip.pipeline.cli.script_path("nothing", "train")
        == ROOT / "fastclip" / "pipeline" / "cli" / "train.py"
    )


def _imports(path: Path) -> set[str]:
    """The fastclip modules ``path`` imports at its top level."""
    import ast

    out = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fastclip"):
            out |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("fastclip")}
    return out


def test_imports_run_one_way_without_cycles():
    """training -> jobs -> the commands: no module imports a later layer, and the module
    graph of the package has no cycle (a package's __init__ only re-exports its modules)."""
    modules = {}
    for path in sorted((ROOT / "fastclip").rglob("*.py")):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        modules[name] = path
    graph = {m: {i for i in _imports(p) if i in modules and i != m} for m, p in modules.items()}
    commands = {m for m in modules if m.startswith("fastclip.pipeline.cli.")}
    for m, deps in graph.items():
        if m.startswith("fastclip.pipeline.training"):
            assert not {
                d for d in deps if d.startswith(("fastclip.pipeline.jobs", "fastclip.pipeline.cli."))
            }, m
        if m.startswith("fastclip.pipeline.jobs"):
            assert not deps & commands, m
    # Cycles, ignoring the edge from a package to its own modules (re-exports).
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for d in graph[m]:
            if d.startswith(m + "."):
                continue
            assert state.get(d) != 1, " -> ".join([*stack, m, d])
            if d not in state:
                visit(d, [*stack, m])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [])
