"""The publish step's ``DIR/results.md``: one section per published report between its markers,
a second publish replacing only its own section, the image links pointing into ``DIR/img``;
and the committed docs/results.md made by it from the published MNIST grid report."""

from __future__ import annotations

import argparse
import doctest
import os
import re
from pathlib import Path

import pytest

from fastclip.pipeline.reproduce import publishing
from fastclip.pipeline.reproduce.publishing import (
    RESULTS_HEADER,
    results_markers,
    results_section,
    write_results,
)
from fastclip.pipeline.reproduce.steps import Chain, publish_step
from fastclip.pipeline.reproduce.writer import KEEP_END, KEEP_START, REPORT

REPO = Path(__file__).resolve().parents[2]


def fake_report(parent: Path, dataset: str = "mnist", clean: str = "93.07") -> Path:
    """A report as write_report lays it out, with one figure beside it."""
    parent.mkdir(parents=True, exist_ok=True)
    (parent / "clean_vs_certified_wBN.png").write_bytes(b"\x89PNG fake " + dataset.encode())
    text = f"""# SimpleConv on {dataset}: reproduction report

Made by `python experiments/reproduce.py --dataset {dataset} --size tiny` on 2026-12-06 16:39 UTC.

- grid: methods orig fastclip, modes wBN, seeds 1; 2 of 2 runs finished

## Results per mode (seed 1)

Each cell: the value of seed 1; a value not measured reads `missing`.

### wBN

| method   | clean acc (%)   |
|:---------|:----------------|
| orig     | {clean}           |

![clean vs certified accuracy, wBN](clean_vs_certified_wBN.png)

Notes:

- certified L2: the share of the test images whose logit margin exceeds sqrt(2) L eps.

## Comparison with the paper

{KEEP_START}
(to be written)
{KEEP_END}

## Figures

![layer_norms](layer_norms.png)
"""
    (parent / REPORT).write_text(text)
    return parent / REPORT


def publish_chain(parent: Path, dest: Path, name: str | None = None, dataset: str = "mnist") -> Chain:
    args = argparse.Namespace(
        publish=dest, publish_name=name, dataset=dataset, dry_run=False, steps=["publish"]
    )
    return Chain(settings=None, args=args, parent=parent, command="")  # type: ignore[arg-type]


def section_of(text: str, name: str) -> str:
    start, end = results_markers(name)
    assert text.count(start) == 1 and text.count(end) == 1, text
    return text.split(start, 1)[1].split(end, 1)[0]


def test_doctests():
    assert doctest.testmod(publishing).failed == 0


def test_publish_writes_the_results_section_between_markers(tmp_path, capsys):
    parent, docs = tmp_path / "logs" / "mnist" / "SimpleConv_models", tmp_path / "docs"
    fake_report(parent)
    assert publish_step(publish_chain(parent, docs)) == []
    assert f"{docs / 'results.md'}" in capsys.readouterr().out
    text = (docs / "results.md").read_text()
    assert text.startswith(RESULTS_HEADER) and text.startswith("# Results\n\n")
    section = section_of(text, "reproduce_mnist")
    assert section.splitlines()[1] == "## SimpleConv on mnist: results per mode (seed 1)"
    assert "Made by `python experiments/reproduce.py --dataset mnist --size tiny` on 2026-12-06" in section
    assert "[reproduce_mnist.md](reproduce_mnist.md)" in section
    assert "### wBN" in section and "| orig     | 93.07" in section and "Notes:" in section
    # only the results part: not the settings, the comparison with the paper or the other figures
    for outside in ("- grid:", "Comparison with the paper", KEEP_START, "layer_norms"):
        assert outside not in section, outside
    # the image links point into DIR/img, at the copies the publish step made
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", section)
    assert links == ["img/reproduce_mnist_clean_vs_certified_wBN.png"]
    assert (docs / links[0]).read_bytes() == (parent / "clean_vs_certified_wBN.png").read_bytes()

    # published again with nothing changed: up to date, results.md not rewritten
    before = (docs / "results.md").stat().st_mtime_ns
    assert publish_step(publish_chain(parent, docs)) == []
    assert f"[publish] up to date: {docs / 'reproduce_mnist.md'}" in capsys.readouterr().out
    assert (docs / "results.md").stat().st_mtime_ns == before


def test_a_second_publish_replaces_only_its_own_section(tmp_path, capsys):
    docs = tmp_path / "docs"
    mnist = tmp_path / "logs" / "mnist" / "SimpleConv_models"
    fashion = tmp_path / "logs" / "fashion-mnist" / "SimpleConv_models"
    fake_report(mnist)
    fake_report(fashion, dataset="fashion-mnist", clean="89.90")
    assert publish_step(publish_chain(mnist, docs)) == []
    assert publish_step(publish_chain(fashion, docs, dataset="fashion-mnist")) == []
    path = docs / "results.md"
    # hand text around and between the sections, and a hand edit inside the mnist one
    start, end = results_markers("reproduce_mnist")
    text = path.read_text().replace("# Results\n", "# Results\n\nHand intro.\n", 1)
    text = text.replace(end, end + "\n\nHand text between.\n", 1) + "\nHand text at the end.\n"
    path.write_text(text.replace("| orig     | 93.07", "| orig     | 11.11", 1))
    fashion_section = section_of(text, "reproduce_fashion-mnist")
    assert "89.90" in fashion_section and "93.07" not in fashion_section

    report = fake_report(mnist, clean="94.00")  # a new mnist report: its section alone changes
    later = (docs / "reproduce_mnist.md").stat().st_mtime_ns + 10**9  # newer, whatever the clock
    os.utime(report, ns=(later, later))
    assert publish_step(publish_chain(mnist, docs)) == []
    new = path.read_text()
    mnist_section = section_of(new, "reproduce_mnist")
    assert "94.00" in mnist_section and "11.11" not in new and "93.07" not in new
    assert section_of(new, "reproduce_fashion-mnist") == fashion_section
    for hand in ("Hand intro.", "Hand text between.", "Hand text at the end."):
        assert new.count(hand) == 1, hand
    assert new.index("Hand intro.") < new.index(start) < new.index("Hand text between.")
    assert new.index("Hand text between.") < new.index(results_markers("reproduce_fashion-mnist")[0])
    assert new.rstrip().endswith("Hand text at the end.")
    assert new.startswith("# Results\n\nHand intro.\n")  # an existing file keeps its own header


def test_publish_name_and_a_report_without_results(tmp_path):
    parent, docs = tmp_path / "logs", tmp_path / "docs"
    fake_report(parent)
    assert publish_step(publish_chain(parent, docs, name="grid")) == []
    section = section_of((docs / "results.md").read_text(), "grid")
    assert "[grid.md](grid.md)" in section and "(img/grid_clean_vs_certified_wBN.png)" in section
    # a report with no results heading writes no section (and no file)
    (tmp_path / "empty.md").write_text("# SimpleConv on mnist: reproduction report\n\nMade by `x` on y.\n")
    assert results_section(tmp_path / "empty.md", tmp_path / "other", "empty") is None
    assert write_results(tmp_path / "empty.md", tmp_path / "other", "empty") is None
    assert not (tmp_path / "other").exists()


def test_links_are_made_relative_to_dir(tmp_path):
    """A report outside DIR (not the published copy) still has working links from DIR/results.md."""
    report = fake_report(tmp_path / "logs")
    section = results_section(report, tmp_path / "docs", "r")
    assert "(../logs/clean_vs_certified_wBN.png)" in section and "[../logs/reproduction_report.md]" in section


@pytest.mark.parametrize("name", ["reproduce_mnist_grid"])
def test_committed_results_match_the_published_report(name):
    """docs/results.md's generated section is what the publish step makes of the published report."""
    text = (REPO / "docs" / "results.md").read_text()
    expected = results_section(REPO / "docs" / f"{name}.md", REPO / "docs", name)
    start, end = results_markers(name)
    assert expected is not None and start + section_of(text, name) + end == expected
    for link in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", expected):
        assert link.startswith(f"img/{name}_") and (REPO / "docs" / link).is_file(), link
