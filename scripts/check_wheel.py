"""The library as ``pip install fastclip`` gives it: build the wheel, install it with its core
dependencies only into a fresh venv, and run the README's library example there.

Steps (``make test-wheel``; about 20 s):

1. ``pip wheel --no-deps --no-build-isolation`` builds the wheel under ``build/wheel``.
2. Its metadata must require torch, numpy and scipy and nothing else outside extras.
3. A fresh venv (``build/slim-venv``, no system site packages) gets the wheel by pip
   (``--no-deps``) and, instead of a 5 GB download and copy, links to the installed
   distributions that pip would install for those three requirements: their closure
   under the ``Requires-Dist`` metadata (markers evaluated), nothing else. So pandas,
   torchvision, matplotlib and the other pipeline packages are absent there, as after a
   real ``pip install fastclip``.
4. There: every fastclip module imports; the README's first ``python`` block under
   "## The library" runs; the exact references agree with the default method and the
   wrapper trains (:data:`LIBRARY_CHECK`); a command says in one line which extra it
   needs (exit 2).

Run by hand: ``python scripts/check_wheel.py`` from the repository root.
"""

from __future__ import annotations

import importlib.metadata as md
import logging
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "build"
CORE = {"torch", "numpy", "scipy"}
log = logging.getLogger("check_wheel")


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    line = " ".join(map(str, cmd))
    log.info("$ %s", line if len(line) < 160 else line[:150].replace("\n", "; ") + " ...")
    return subprocess.run([str(c) for c in cmd], check=True, **kw)


def build_wheel() -> Path:
    out = BUILD / "wheel"
    shutil.rmtree(out, ignore_errors=True)
    # setuptools builds in build/lib: a stale copy of a deleted module would ship
    shutil.rmtree(BUILD / "lib", ignore_errors=True)
    for stale in BUILD.glob("bdist.*"):
        shutil.rmtree(stale, ignore_errors=True)
    run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", out, ROOT],
        cwd=ROOT,
    )
    (wheel,) = out.glob("fastclip-*.whl")
    return wheel


def core_requirements(wheel: Path) -> list[Requirement]:
    with zipfile.ZipFile(wheel) as z:
        (meta,) = [n for n in z.namelist() if n.endswith(".dist-info/METADATA")]
        text = z.read(meta).decode()
    reqs = [
        Requirement(line.split(":", 1)[1].strip())
        for line in text.splitlines()
        if line.startswith("Requires-Dist:")
    ]
    core = [r for r in reqs if not (r.marker and "extra" in str(r.marker))]
    names = {canonicalize_name(r.name) for r in core}
    if names != CORE:
        raise SystemExit(
            f"the wheel requires {sorted(names)}, expected exactly {sorted(CORE)} outside extras"
        )
    return core


def closure(reqs: list[Requirement]) -> list[md.Distribution]:
    """The installed distributions that pip would install for ``reqs``, recursively."""
    seen: dict[str, md.Distribution] = {}
    todo = list(reqs)
    while todo:
        r = todo.pop()
        name = canonicalize_name(r.name)
        if name in seen or (r.marker and not r.marker.evaluate({"extra": ""})):
            continue
        try:
            dist = md.distribution(r.name)
        except md.PackageNotFoundError:
            raise SystemExit(f"{r.name} (needed by the core install) is not installed here") from None
        seen[name] = dist
        todo += [Requirement(s) for s in dist.requires or []]
    return list(seen.values())


def link_into(dists: list[md.Distribution], site: Path) -> None:
    """Link each distribution's top-level files and folders (from its RECORD) into ``site``."""
    src = Path(sysconfig.get_paths()["purelib"])
    for dist in dists:
        tops = {Path(f).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
        for top in tops:
            target = site / top
            if not target.exists() and (src / top).exists():
                target.symlink_to(src / top)


#: What the README's example does not reach: the exact references (dense SVD, scipy's ARPACK,
#: the FFT formula) against the default method, and a training step through the wrapper.
LIBRARY_CHECK = """
import torch, torch.nn as nn, fastclip
conv = nn.Conv2d(2, 3, 3, padding=1, padding_mode="circular")
shape = (2, 8, 8)
ref = fastclip.exact_singular_values(conv, shape, k=2)
for other in (fastclip.svds_singular_values(conv, shape, k=2), fastclip.fft_singular_values(conv, shape, k=2),
              fastclip.singular_values(conv, shape, k=2)):
    assert torch.allclose(other.double(), ref, rtol=1e-4), (other, ref)
layer = fastclip.SpectralNorm(nn.Conv2d(2, 3, 3, padding=1), clip=1.0, clip_steps=1, init_delay=0)
opt = torch.optim.SGD(layer.parameters(), lr=0.1)
for _ in range(3):
    layer(torch.randn(4, *shape)).square().mean().backward()
    opt.step()
    opt.zero_grad()
assert float(layer.sigma) > 0
print("exact references and a wrapper training step: ok")
"""


def readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    m = re.search(r"^## The library\n.*?^```python\n(.*?)^```", text, re.S | re.M)
    if not m:
        raise SystemExit("README.md: no ```python block under '## The library'")
    return m.group(1)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    wheel = build_wheel()
    reqs = core_requirements(wheel)
    venv = BUILD / "slim-venv"
    shutil.rmtree(venv, ignore_errors=True)
    run([sys.executable, "-m", "venv", "--without-pip", venv])
    py = venv / "bin" / "python"
    site = Path(
        subprocess.run(
            [py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    link_into(closure(reqs), site)
    run([sys.executable, "-m", "pip", "--python", py, "install", "-q", "--no-deps", wheel])
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HOME": str(venv)}
    # nothing of the pipeline is there, and every module of the library imports without it
    check = (
        "import importlib, importlib.util, pkgutil, fastclip\n"
        "extra = [m for m in ('pandas', 'torchvision', 'matplotlib', 'submitit', 'tqdm', 'tensorboard')"
        " if importlib.util.find_spec(m)]\n"
        "assert not extra, f'pipeline packages in the core install: {extra}'\n"
        "for m in pkgutil.walk_packages(fastclip.__path__, 'fastclip.'):\n"
        "    importlib.import_module(m.name)\n"
        "print('imports ok')\n"
    )
    run([py, "-c", check], cwd=venv, env=env)
    run([py, "-c", readme_example()], cwd=venv, env=env)
    run([py, "-c", LIBRARY_CHECK], cwd=venv, env=env)
    out = subprocess.run(
        [venv / "bin" / "fastclip-train", "--help"], cwd=venv, env=env, capture_output=True, text=True
    )
    lines = out.stderr.strip().splitlines()
    if out.returncode != 2 or len(lines) != 1 or "pip install 'fastclip[experiments]'" not in lines[0]:
        raise SystemExit(f"fastclip-train without the extra: exit {out.returncode}, stderr {out.stderr!r}")
    log.info("fastclip-train without the extra: %s", lines[0])
    log.info("wheel %s: core install ok (%s)", wheel.name, ", ".join(sorted(CORE)))


if __name__ == "__main__":
    main()
