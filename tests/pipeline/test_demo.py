"""`make demo`'s job (python -m fastclip.pipeline.demo) on a slice of the real offline Fashion-MNIST."""

import re
import subprocess
import sys

import pytest

from fastclip.pipeline.data import DEBIAN_FASHION_MNIST

pytestmark = pytest.mark.skipif(
    not (DEBIAN_FASHION_MNIST / "train-images-idx3-ubyte.gz").exists(),
    reason="Debian's dataset-fashion-mnist is not installed (make data)",
)


@pytest.mark.slow
def test_demo_trains_and_reports_exact_norms_within_the_clip(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "fastclip.pipeline.demo",
        "--epochs",
        "1",
        "--train-subset",
        "1024",
        "--test-subset",
        "256",
        "--logdir",
        str(tmp_path),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    acc = float(re.search(r"test accuracy: ([\d.]+) %", out.stdout).group(1))
    assert 30 < acc <= 100  # 1024 images of 10 classes: well above chance
    rows = re.findall(r"^\s+(\S+) \((\w+)\)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)$", out.stdout, re.M)
    assert sorted(kind for _, kind, *_ in rows) == ["Conv2d", "ConvBN", "Linear"], out.stdout
    for name, _, _init, trained, clip in rows:
        assert float(trained) <= 1.05 * float(clip), (name, trained)
    assert max(float(init) for _, _, init, _, _ in rows) > 1.5  # the clip had work to do
    # each clipping wrapper announces itself once, though the demo builds the model three times
    announced = re.findall(r"SpectralNorm\((\S+)\): clipping to", out.stderr)
    assert len(announced) == len(rows) == len(set(announced)), out.stderr[-2000:]


def test_demo_bad_input_is_one_line_exit_2(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "fastclip.pipeline.demo", "--method", "nope", "--logdir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "invalid choice: 'nope'" in out.stderr
