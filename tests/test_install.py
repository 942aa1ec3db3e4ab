"""The slim install: the library's dependencies are torch, numpy and scipy; every command
without the pipeline's packages ends in one line naming the extra to install.

(The wheel itself, installed with its core dependencies in a fresh venv, is checked by
``make test-wheel``, scripts/check_wheel.py.)"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fastclip.pipeline import cli
from fastclip.pipeline.cli import train

ROOT = Path(__file__).resolve().parents[1]
tomllib = pytest.importorskip("tomllib")  # Python >= 3.11


def _name(req: str) -> str:
    return re.split(r"[<>=!~\[; ]", req, maxsplit=1)[0].lower()


def test_core_dependencies_are_torch_numpy_scipy_and_the_pipeline_is_an_extra():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert sorted(_name(r) for r in project["dependencies"]) == ["numpy", "scipy", "torch"]
    extras = project["optional-dependencies"]
    assert {"experiments", "test", "offline-data"} <= set(extras)
    experiments = {_name(r) for r in extras["experiments"]}
    assert {"torchvision", "pandas", "matplotlib", "submitit", "tensorboard", "tqdm"} <= experiments
    # make keeps exact pins of everything: the core and the extra
    pinned = {_name(line) for line in (ROOT / "requirements.txt").read_text().splitlines() if "==" in line}
    assert experiments | {"torch", "numpy", "scipy"} <= {p.lower() for p in pinned}


def test_a_command_without_its_extra_says_so_in_one_line(monkeypatch, capsys):
    monkeypatch.setattr(cli, "EXPERIMENTS_EXTRA", ("torchvision", "not_a_module_xyz"))
    with pytest.raises(SystemExit) as e:
        train.main(["--help"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "train.py: needs not_a_module_xyz (not installed), which the library alone does without: "
        "pip install 'fastclip[experiments]'"
    ]


def test_with_the_extra_installed_nothing_is_missing():
    assert cli.missing_extra() == []
