"""fastclip.pipeline.plots, fastclip.pipeline.results.read_event_scalars and experiments/plot_curves.py
on real TensorBoard event files (written here with tensorboardX)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.container import BarContainer
from PIL import Image
from scriptload import load_script
from tensorboardX import SummaryWriter

from fastclip.pipeline.plots import plot_curves, plot_layer_norms
from fastclip.pipeline.results import read_event_scalars

ROOT = Path(__file__).resolve().parents[2]
STEPS = np.arange(0, 200, 10)


def curves(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "train/acc": 100 * (1 - np.exp(-STEPS / 50)) - rng.uniform(0, 5, len(STEPS)),
        "test/acc": 100 * (1 - np.exp(-STEPS / 60)) - rng.uniform(0, 5, len(STEPS)),
        "train/loss": np.exp(-STEPS / 50) + 0.01,
        "train/lsv_conv1": 1.0 + 2.0 * np.exp(-STEPS / 30),
        "train/lsv_layer1.0.conv1": 0.5 + rng.uniform(0, 0.5, len(STEPS)),
        "train/lsv_fc1": np.full(len(STEPS), 0.9),
    }


@pytest.fixture
def runs(tmp_path):
    """Two run directories with real event files and config.json."""
    dirs, written = [], {}
    for i, method in enumerate(("fastclip", "orig")):
        d = tmp_path / f"method_{method}_wBN_{i + 1}"
        d.mkdir()
        (d / "config.json").write_text(f'{{"settings": {{"method": "{method}", "clip": 1.5}}}}')
        values = curves(i)
        with SummaryWriter(str(d)) as w:
            for j, step in enumerate(STEPS):
                for tag, v in values.items():
                    w.add_scalar(tag, float(v[j]), int(step))
        dirs.append(d)
        written[d.name] = values
    return dirs, written


def test_read_event_scalars_returns_what_was_written(runs):
    dirs, written = runs
    got = read_event_scalars(dirs[0])
    assert set(got) == set(written[dirs[0].name])
    for tag, values in written[dirs[0].name].items():
        steps, v = got[tag]
        assert np.array_equal(steps, STEPS)
        np.testing.assert_allclose(v, values, rtol=1e-6)  # stored as float32


def test_read_event_scalars_keeps_the_last_value_of_a_repeated_step(tmp_path):
    # a resumed run logs some steps again
    with SummaryWriter(str(tmp_path)) as w:
        for step, v in [(0, 1.0), (1, 2.0), (2, 3.0), (1, 20.0), (2, 30.0), (3, 40.0)]:
            w.add_scalar("test/acc", v, step)
    steps, v = read_event_scalars(tmp_path)["test/acc"]
    assert steps.tolist() == [0, 1, 2, 3] and v.tolist() == [1.0, 20.0, 30.0, 40.0]


def test_plot_curves_script_renders_the_event_files(runs, tmp_path):
    dirs, written = runs
    out = tmp_path / "curves.png"
    script = load_script("plot_curves")
    assert script.main(script.get_args_parser().parse_args([*map(str, dirs), "--out", str(out)])) == 0
    with Image.open(out) as im:
        im.verify()
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size[0] > 800 and im.size[1] > 500


def test_plot_curves_draws_the_numbers(runs, tmp_path):
    dirs, written = runs
    data = {d.name: read_event_scalars(d) for d in dirs}
    fig = plot_curves(data, tmp_path / "c.png", clip={dirs[0].name: 1.5, dirs[1].name: None})
    axes = fig.axes
    assert len(axes) == 4
    for row, d in enumerate(dirs):
        acc_ax, sv_ax = axes[2 * row], axes[2 * row + 1]
        acc_lines = {ln.get_label(): ln for ln in acc_ax.get_lines()}
        assert set(acc_lines) == {"train/acc", "test/acc"}
        np.testing.assert_allclose(acc_lines["test/acc"].get_ydata(), written[d.name]["test/acc"], rtol=1e-6)
        sv_lines = {ln.get_label(): ln for ln in sv_ax.get_lines()}
        layers = {"conv1", "layer1.0.conv1", "fc1"}
        assert layers <= set(sv_lines)
        np.testing.assert_allclose(
            sv_lines["conv1"].get_ydata(), written[d.name]["train/lsv_conv1"], rtol=1e-6
        )
        assert sv_ax.get_yscale() == "log"
        # the clip line only for the run that clips
        assert ("clip = 1.5" in sv_lines) == (row == 0)


def test_plot_curves_script_bad_input_exits_2(tmp_path, capsys):
    script = load_script("plot_curves")
    (tmp_path / "empty").mkdir()
    for argv, expected in [
        ([str(tmp_path / "nope")], "does not exist"),
        ([str(tmp_path / "empty")], "no TensorBoard event files"),
    ]:
        with pytest.raises(SystemExit) as e:
            script.main(script.get_args_parser().parse_args(argv))
        assert e.value.code == 2
        assert expected in capsys.readouterr().err.strip().splitlines()[-1]


def test_plot_layer_norms_bars_are_the_means_on_a_log_scale(tmp_path):
    layers = ["conv1", "conv1.conv", "fc1"]
    rows = []
    for mode in ("wBN", "noBN"):
        for k, method in enumerate(("fastclip", "orig")):
            for i, layer in enumerate(layers):
                rows.append(
                    {
                        "model": "SimpleConv",
                        "dataset": "mnist",
                        "method": method,
                        "mode": mode,
                        "layer": layer,
                        "kind": "conv",
                        "input_shape": "1x28x28",
                        "sigma1_mean": 0.5 + i + 3 * k,
                        "sigma1_std": 0.1 if k else math.nan,
                        "n_seeds": 3,
                        "clip": 1.0 if method == "fastclip" else math.nan,
                    }
                )
    summary = pd.DataFrame(rows)
    out = tmp_path / "ln.png"
    fig = plot_layer_norms(summary, out, title="SimpleConv")
    with Image.open(out) as im:
        im.verify()
    assert len(fig.axes) == 2
    for ax in fig.axes:
        assert ax.get_yscale() == "log"
        # registry order: orig before fastclip
        bars = [c for c in ax.containers if isinstance(c, BarContainer)]
        assert [c.get_label() for c in bars] == ["orig", "fastclip"]
        heights = {c.get_label(): [b.get_height() for b in c] for c in bars}
        assert heights == {"fastclip": [0.5, 1.5, 2.5], "orig": [3.5, 4.5, 5.5]}
        assert [ln.get_ydata()[0] for ln in ax.get_lines() if ln.get_label() == "clip = 1"] == [1.0]
    with pytest.raises(ValueError, match="empty"):
        plot_layer_norms(summary.iloc[:0], out)
