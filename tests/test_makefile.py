"""make test starts the local SLURM cluster (or says how), make test-fast leaves out the
slow tests, and CI runs make test."""

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def recipe(target: str) -> str:
    proc = subprocess.run(
        ["make", "-n", "-C", str(ROOT), target, "STAMP=", "FMNIST=/dev/null"], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_make_test_starts_slurm_or_says_how():
    text = recipe("test")
    assert "scripts/slurm-local.sh start" in text and "apt-get install" in text and "slurm-wlm munge" in text
    assert "SLURM tests skipped: start the local cluster with 'sudo scripts/slurm-local.sh start'" in text
    assert text.index("slurm-local.sh start") < text.index("-m pytest")


def test_make_test_fast_leaves_out_slow_tests():
    assert '-m pytest -q -m "not slow"' in recipe("test-fast")
    assert "slurm-local.sh" not in recipe("test-fast")


def test_ci_runs_make_test_then_the_blas_pass():
    commands = [ln for ln in (ROOT / ".ci" / "run").read_text().splitlines() if ln and not ln.startswith("#")]
    assert commands[-2:] == ["make test", "make test-blas"] and len(commands) <= 4, commands
    assert "MKL_CBWR=COMPATIBLE" in recipe("test-blas") and "test_batched.py" in recipe("test-blas")


def test_other_targets_still_resolve():
    for target in ("demo", "reproduce", "how-to-use", "benchmark", "venv", "data"):
        recipe(target)
    assert "experiments/train.py" in recipe("how-to-use")


def test_make_test_checks_the_wheel_in_a_fresh_venv():
    assert "scripts/check_wheel.py" in recipe("test-wheel")
    assert "scripts/check_wheel.py" in recipe("test")


def test_make_test_runs_the_type_check_the_docs_build_and_the_doctests():
    text = recipe("test")
    assert "mypy" in text and "sphinx -W" in text and "--doctest-modules" in text
    assert "fastclip/parametrizations.py" in recipe("doctest")
