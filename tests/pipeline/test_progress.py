"""fastclip.pipeline.progress: a tqdm bar on a terminal, log lines (never a carriage return) elsewhere."""

import doctest
import io
import logging

import pytest
from tqdm.auto import tqdm

import fastclip.pipeline.progress as progress


class _Stream(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def test_doctests():
    result = doctest.testmod(progress)
    assert result.attempted > 0 and result.failed == 0


def test_a_bar_only_on_a_terminal(monkeypatch):
    monkeypatch.setattr("sys.stderr", _Stream(tty=True))
    assert progress.interactive()
    with progress.progress(range(3), desc="x", file=_Stream(tty=True)) as bar:
        assert isinstance(bar, tqdm)
        assert list(bar) == [0, 1, 2]
    monkeypatch.setattr("sys.stderr", _Stream(tty=False))
    assert not progress.interactive()
    bar = progress.progress(range(3), desc="x")
    assert isinstance(bar, progress.LogProgress) and list(bar) == [0, 1, 2] and bar.n == 3


def test_log_lines_carry_the_numbers(monkeypatch, caplog):
    monkeypatch.setattr("sys.stderr", _Stream(tty=False))
    caplog.set_level(logging.INFO, logger="fastclip.pipeline.progress")
    with progress.progress(total=4, desc="epoch 1/2", unit="step", every=0.0) as bar:
        for _ in range(4):
            bar.update(1)
            bar.set_postfix(loss="0.5000", acc="50.00")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 4 and not any("\r" in ln for ln in lines)
    assert lines[-1].startswith("epoch 1/2: 4/4 step loss=0.5000 acc=50.00 (") and lines[-1].endswith(" s)")


@pytest.mark.parametrize("every, lines", [(None, 0), (3600.0, 0)])
def test_quiet_between_intervals(monkeypatch, caplog, every, lines):
    monkeypatch.setattr("sys.stderr", _Stream(tty=False))
    caplog.set_level(logging.INFO, logger="fastclip.pipeline.progress")
    bar = progress.progress(range(5), every=every)
    assert list(bar) == list(range(5))
    assert len(caplog.records) == lines


def test_disabled_is_silent_even_on_a_terminal(monkeypatch, caplog):
    monkeypatch.setattr("sys.stderr", _Stream(tty=True))
    caplog.set_level(logging.INFO, logger="fastclip.pipeline.progress")
    bar = progress.progress(total=2, disable=True, every=0.0)
    bar.update(2)
    assert isinstance(bar, progress.LogProgress) and not caplog.records
