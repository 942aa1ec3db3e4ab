"""The library's structure: two wings, one validated wrapper config, one ``unwrap``, imports one way.

* The library (``fastclip`` outside ``fastclip/pipeline/``) never imports the pipeline, at
  module level or inside a function, and imports and runs with none of the pipeline's
  packages installed.

* :class:`fastclip.SpectralNormConfig` rejects bad values with the field, what it expects
  and what it got; the published keyword arguments and ``config=`` build the same wrapper,
  which trains identically; the ``fastclip`` method hands its wrappers that config.
* :func:`fastclip.unwrap` looks through any chain of wrappers and nothing else.
* The modules of ``fastclip/`` import each other without a cycle (module-level and
  function-level imports alike), and each core module imports on its own.
* Imports sit at the top of their module, except the heavy optional third-party
  packages of :data:`LAZY_IMPORTS`, which are imported where they are used, and
  importing the package or any command imports none of them.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import fastclip
from fastclip import SpectralNorm, SpectralNormConfig, unwrap
from fastclip.pipeline.methods import get
from fastclip.pipeline.models.layers import ConvBN

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fastclip"
PIPELINE = PACKAGE / "pipeline"


# -- the config ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "changes, error, message",
    [
        ({"clip": 0}, ValueError, r"clip must be > 0, got 0"),
        ({"clip": "1"}, TypeError, r"clip must be a number, got '1' \(str\)"),
        ({"clip_steps": 0}, ValueError, r"clip_steps must be >= 1, got 0"),
        ({"k": 2.5}, TypeError, r"k must be an integer, got 2.5 \(float\)"),
        ({"track_steps": -1}, ValueError, r"track_steps must be >= 0, got -1"),
        ({"refine_tol": 0.0}, ValueError, r"refine_tol must be > 0, got 0.0"),
        ({"clip_margin": 1.5}, ValueError, r"clip_margin must be in \[0, 1\), got 1.5"),
        ({"rescale_above": 0.5}, ValueError, r"rescale_above must be > 1 \(or 0/None: never\), got 0.5"),
        ({"clip_opt_stepsize": -1.0}, ValueError, r"clip_opt_stepsize must be > 0"),
        (
            {"clip_params": "gamma"},
            ValueError,
            r"clip_params must be 'auto', 'all' or a list of parameter names, "
            r"got 'gamma'",
        ),
    ],
)
def test_config_rejects_bad_values_saying_what_it_expected_and_got(changes, error, message):
    with pytest.raises(error, match=message):
        SpectralNormConfig(**changes)
    with pytest.raises(error, match=message):  # the wrapper's keywords go through the same check
        SpectralNorm(nn.Conv2d(2, 3, 3), **changes)


def test_config_normalises_and_is_frozen():
    cfg = SpectralNormConfig(clip_steps=10.0, clip_params=["bn.weight"], rescale_above=None)
    assert cfg.clip_steps == 10 and isinstance(cfg.clip_steps, int)
    assert cfg.clip_params == ("bn.weight",) and cfg.rescale_above == 0.0
    with pytest.raises(AttributeError):
        cfg.clip = 2.0
    with pytest.raises(
        TypeError, match=r"unknown SpectralNorm setting\(s\) clip_step; expected one of clip, k, "
    ):
        cfg.replace(clip_step=3)
    with pytest.raises(TypeError, match=r"unknown SpectralNorm setting\(s\) clip_stepz"):
        SpectralNorm(nn.Linear(2, 2), clip_stepz=3)
    with pytest.raises(TypeError, match="config must be a SpectralNormConfig, got dict"):
        SpectralNorm(nn.Linear(2, 2), config={"clip": 1.0})


def _train(wrapper: SpectralNorm, steps: int = 6) -> SpectralNorm:
    torch.manual_seed(0)
    opt = torch.optim.SGD(wrapper.parameters(), lr=0.5)
    for _ in range(steps):
        x = torch.randn(4, 2, 8, 8)
        loss = -wrapper(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return wrapper


def test_published_keywords_and_config_build_the_same_wrapper():
    kwargs = dict(
        clip=0.8, k=2, clip_steps=2, init_delay=1, init_pqr_iter=20, clip_margin=0.0, rescale_above=3.0
    )
    torch.manual_seed(1)
    a = SpectralNorm(nn.Conv2d(2, 3, 3, padding=1), clip_flag=True, identifier="conv", **kwargs)
    torch.manual_seed(1)
    b = SpectralNorm(
        nn.Conv2d(2, 3, 3, padding=1), clip_flag=True, identifier="conv", config=SpectralNormConfig(**kwargs)
    )
    assert a.config == b.config and a.config.clip_opt_stepsize == 0.35  # None resolved for a conv
    assert (a.clip, a.k, a.clip_steps, a.init_delay) == (0.8, 2, 2, 1)  # the published attribute names
    _train(a), _train(b)
    for key, value in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[key], value, rtol=0, atol=0)
    assert a.schedule.step == b.schedule.step == 6
    # keywords next to a config override its fields
    c = SpectralNorm(nn.Conv2d(2, 3, 3), config=SpectralNormConfig(**kwargs), clip_steps=7)
    assert c.clip_steps == 7 and c.clip == 0.8
    # setting a field on the wrapper validates a new config
    c.init_delay = 0
    assert c.config.init_delay == 0 and c.schedule.config is c.config
    with pytest.raises(ValueError, match="init_delay must be >= 0, got -2"):
        c.init_delay = -2


def test_the_method_gives_its_wrappers_one_config():
    m = get(
        "fastclip", mode="wBN", clip=0.5, clip_steps=7, composition_stepsize=0.02, composition_params="all"
    )
    model = m.prepare(
        nn.Sequential(ConvBN(1, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)), (1, 6, 6)
    )
    wrappers = [w for w in model.modules() if isinstance(w, SpectralNorm)]
    composition = next(w for w in wrappers if w.kind == "composition")
    conv = next(w for w in wrappers if w.kind == "conv")
    assert composition.config == m.wrapper_config(composition=True)
    assert conv.config == m.wrapper_config()
    assert composition.clip_opt_stepsize == 0.02 and conv.clip_opt_stepsize == 0.35
    assert composition.clip_params is None  # "all": every *weight
    assert {w.clip for w in wrappers} == {0.5} and {w.clip_steps for w in wrappers} == {7}
    with pytest.raises(ValueError, match="clip_block must be >= 1, got 0"):
        get("fastclip", clip_block=0)


# -- unwrap -------------------------------------------------------------------------


def test_unwrap_looks_through_every_wrapper_level_and_nothing_else():
    conv = nn.Conv2d(1, 2, 3)
    assert unwrap(conv) is conv
    assert unwrap(SpectralNorm(conv)) is conv
    assert unwrap(SpectralNorm(SpectralNorm(conv))) is conv
    pair = ConvBN(1, 2, 3)
    wrapped = SpectralNorm(pair)
    assert unwrap(wrapped) is pair  # a composition: its wrapped inner layers stay
    seq = nn.Sequential(conv)
    assert unwrap(seq) is seq  # a container with a `module`-less structure is not a wrapper
    fake = nn.Module()
    fake.module = conv  # an attribute named `module` alone does not make a wrapper
    assert unwrap(fake) is fake
    assert fastclip.unwrap is unwrap


# -- imports ------------------------------------------------------------------------


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """fastclip modules imported anywhere in the file (functions included), except under
    ``if TYPE_CHECKING:``."""
    tree = ast.parse(path.read_text())
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for n in ast.walk(node))
    inside = ROOT in path.parents
    package = "" if not inside else _module_name(path)
    package = package if path.name == "__init__.py" else package.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("fastclip"))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            if base.startswith("fastclip"):
                found.add(base)
                found.update(f"{base}.{a.name}" for a in node.names)
    return found


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        edges = set()
        for m in _imports(path):
            # importing a.b.c runs the package a.b first, unless the importer is inside it
            parts = m.split(".")
            edges.update(
                ".".join(parts[:i])
                for i in range(2, len(parts))
                if not name.startswith(".".join(parts[:i]) + ".")
            )
            edges.add(m)
        # the root package's __init__ only re-exports: no edge to it
        graph[name] = {m for m in edges if m in files and m != name and m != "fastclip"}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m) :] + [m]
            if m not in state and (found := visit(m)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_no_import_cycle_between_fastclip_modules():
    graph = _graph()
    assert "fastclip.exact" not in graph["fastclip.exact"]
    assert "fastclip.spectral" not in graph["fastclip.exact"], (
        "exact must not import spectral (one way: spectral -> exact)"
    )
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))
    # the lowest layer imports no other fastclip module
    assert graph["fastclip.linalg.operator"] == set()


def _library_imports_of_the_pipeline(files) -> list[str]:
    return [
        f"{path.relative_to(ROOT) if ROOT in path.parents else path.name}: imports {m}"
        for path in files
        for m in sorted(_imports(path))
        if m == "fastclip.pipeline" or m.startswith("fastclip.pipeline.")
    ]


def test_the_library_never_imports_the_pipeline():
    files = [p for p in sorted(PACKAGE.rglob("*.py")) if PIPELINE not in p.parents]
    assert len(files) >= 15 and all(not str(p).startswith(str(PIPELINE)) for p in files)
    bad = _library_imports_of_the_pipeline(files)
    assert not bad, "the library wing imports the pipeline:\n" + "\n".join(bad)


def test_the_contract_check_sees_imports_inside_functions(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("import torch\ndef f():\n    from fastclip.pipeline.io import atomic_write\n")
    g = tmp_path / "g.py"
    g.write_text("def f():\n    import fastclip.pipeline.models as models\n")
    h = tmp_path / "h.py"
    h.write_text("from fastclip.linalg import operator\n")
    assert _library_imports_of_the_pipeline([f, g, h]) == [
        "m.py: imports fastclip.pipeline.io",
        "m.py: imports fastclip.pipeline.io.atomic_write",
        "g.py: imports fastclip.pipeline.models",
    ]


#: The experiments extra's packages: the library must work without any of them.
PIPELINE_PACKAGES = (
    "torchvision",
    "pandas",
    "tqdm",
    "tensorboardX",
    "tensorboard",
    "matplotlib",
    "submitit",
    "advertorch",
    "tabulate",
)


@pytest.mark.slow
def test_the_library_imports_and_runs_without_the_pipelines_packages():
    # None in sys.modules makes a package absent to `import` and to importlib's find_spec,
    # as in `pip install fastclip` without the extra (the pipeline wing included).
    script = (
        "import importlib, sys\n"
        f"blocked = {(*PIPELINE_PACKAGES, 'fastclip.pipeline')!r}\n"
        "for b in blocked:\n"
        "    sys.modules[b] = None\n"
        f"for name in {LIBRARY!r}:\n"
        "    importlib.import_module(name)\n"
        "import torch, torch.nn as nn, fastclip\n"
        "torch.manual_seed(0)\n"
        "conv = nn.Conv2d(4, 4, 3, padding=1)\n"
        "s = fastclip.singular_values(conv, (4, 6, 6), k=2)\n"
        "before, after = fastclip.clip_spectral_norm_(conv, (4, 6, 6), 0.5)\n"
        "net = nn.Sequential(conv, nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 3))\n"
        "rep = fastclip.lipschitz_report(net, (4, 6, 6))\n"
        "assert '| layer |' in rep.to_markdown()\n"
        "sn = fastclip.parametrizations.spectral_norm(nn.Conv2d(2, 3, 3), input_shape=(2, 6, 6))\n"
        "sn(torch.randn(2, 2, 6, 6))\n"
        "leaked = sorted(m for m, v in sys.modules.items() if v is not None and m.startswith(blocked))\n"
        "print(0.475 <= after <= 0.505, rep.bound is not None, leaked)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "True True []", out.stdout


def test_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


#: Every module of the library wing (everything outside fastclip/pipeline/).
LIBRARY = sorted(
    _module_name(p) for p in PACKAGE.rglob("*.py") if PIPELINE not in p.parents and p.name != "__init__.py"
)
#: The pipeline modules each import on their own too.
CORE = [
    *(m.removeprefix("fastclip.") for m in LIBRARY),
    "pipeline.methods",
    "pipeline.results",
    "pipeline.attacks",
    "pipeline.io",
    "pipeline.checkpoint",
    "pipeline.plots",
    "pipeline.data",
    "pipeline.models",
]


def test_each_core_module_imports_alone():
    # One interpreter (torch loaded once); before each module every fastclip module is
    # dropped, so each import starts from nothing, as `python -c "import fastclip.X"` would.
    script = (
        "import importlib, sys\n"
        f"for name in {CORE!r}:\n"
        "    for m in [m for m in sys.modules if m == 'fastclip' or m.startswith('fastclip.')]:\n"
        "        del sys.modules[m]\n"
        "    importlib.import_module('fastclip.' + name)\n"
        "print('ok')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


# -- heavy optional imports ------------------------------------------------------------
#: Third-party modules that may be imported inside a function rather than at the top of
#: a module, and only these: they are not dependencies of ``pip install fastclip`` (the
#: library needs torch, numpy and scipy; the pipeline's packages are the ``experiments``
#: extra), or cost a noticeable part of the start-up (torchvision about 1.2 s, pyplot
#: 0.4 s, pandas and scipy.sparse.linalg 0.15 s each beside torch's 2.5 s), so that
#: ``import fastclip`` and every command's ``--help`` cost about what ``import torch``
#: does (benchmarks/startup.py). fastclip's own modules are always imported at the top.
LAZY_IMPORTS = (
    "torchvision",
    "pandas",
    "matplotlib",
    "tensorboard",
    "torch.utils.tensorboard",
    "submitit",
    "tqdm",
    "scipy",
)


def _function_level_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import not at the top level of the module (a top-level
    ``if TYPE_CHECKING:`` block counts as top level)."""
    tree = ast.parse(path.read_text())
    top = set()
    for node in tree.body:
        top.add(id(node))
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            top.update(id(n) for n in node.body)
    found = []
    for node in ast.walk(tree):
        if id(node) in top:
            continue
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((node.lineno, "." * node.level + (node.module or "")))
    return found


def _allowed_lazily(module: str) -> bool:
    return any(module == m or module.startswith(m + ".") for m in LAZY_IMPORTS)


def test_only_heavy_optional_modules_are_imported_inside_functions():
    bad = [
        f"{path.relative_to(ROOT)}:{line}: {module}"
        for path in sorted(PACKAGE.rglob("*.py"))
        for line, module in _function_level_imports(path)
        if not _allowed_lazily(module)
    ]
    assert not bad, "imports inside functions (move them to the top of the module):\n" + "\n".join(bad)


def test_lazy_import_check_catches_an_internal_import(tmp_path):
    f = tmp_path / "m.py"
    f.write_text(
        "import os\ndef f():\n    import pandas\n    from fastclip import spectral\n    import json\n"
    )
    found = _function_level_imports(f)
    assert found == [(3, "pandas"), (4, "fastclip"), (5, "json")]
    assert [m for _, m in found if not _allowed_lazily(m)] == ["fastclip", "json"]


COMMAND_MODULES = sorted(
    f"fastclip.pipeline.cli.{p.stem}"
    for p in (PIPELINE / "cli").glob("*.py")
    if p.stem not in ("__init__", "runs")
) + ["fastclip.pipeline.demo"]


def test_importing_the_package_and_every_command_imports_no_heavy_module():
    # One interpreter: if no command pulls any of them in, none does on its own either.
    # What torch itself imports when it finds it installed (tqdm) does not count.
    script = (
        "import importlib, sys, torch\n"
        "before = set(sys.modules)\n"
        f"for name in ['fastclip', *{COMMAND_MODULES!r}]:\n"
        "    importlib.import_module(name)\n"
        f"heavy = {LAZY_IMPORTS!r}\n"
        "new = set(sys.modules) - before\n"
        "print(sorted(m for m in new if any(m == h or m.startswith(h + '.') for h in heavy)))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]", out.stdout[:2000]
