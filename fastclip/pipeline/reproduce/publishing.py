"""``DIR/results.md``: the results tables of every report published into ``DIR``, one section each.

The publish step (``--publish DIR``) copies the report into ``DIR/<name>.md`` and its figures
into ``DIR/img/`` (``fastclip.pipeline.report.publish``), then :func:`write_results` puts the
report's "Results per mode" part into ``DIR/results.md`` between the markers of
:func:`results_markers`. Publishing another report adds a section of its own; publishing the same
one again replaces only its section, and text outside the markers (hand-written sections
included) is kept.

Example::

    write_results(Path("docs/reproduce_mnist.md"), Path("docs"), "reproduce_mnist")
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from fastclip.pipeline.io import atomic_write_text
from fastclip.pipeline.reproduce.writer import RESULTS_HEADING

__all__ = ["RESULTS", "RESULTS_HEADER", "results_markers", "results_section", "write_results"]

RESULTS = "results.md"
#: What a new results.md starts with; an existing file keeps its own.
RESULTS_HEADER = (
    "# Results\n"
    "\n"
    "The tables of the reproduction chain (`python experiments/reproduce.py`, `make reproduce`), one\n"
    "section per published report. Each section between its `<!-- results:<name>:start -->` and\n"
    "`<!-- results:<name>:end -->` markers is rewritten when that report is published again\n"
    "(`--publish DIR --publish-name <name>`); text outside the markers is kept as it is.\n"
)
#: An image link of Markdown: ``![alt](target)``.
_IMAGE_LINK = re.compile(r"!\[([^\]]*)\]\(([^)\s]+)\)")
_TITLE_SUFFIX = ": reproduction report"


def results_markers(name: str) -> tuple[str, str]:
    """The markers around the section of the report published as ``name``.

    >>> results_markers("reproduce_mnist")
    ('<!-- results:reproduce_mnist:start -->', '<!-- results:reproduce_mnist:end -->')
    """
    return f"<!-- results:{name}:start -->", f"<!-- results:{name}:end -->"


def _relative_to(dest: Path, target: Path) -> str:
    return Path(os.path.relpath(target, dest)).as_posix()


def results_section(report: str | os.PathLike, dest: str | os.PathLike, name: str) -> str | None:
    """The section of ``dest/results.md`` for ``report`` (normally the published copy
    ``dest/<name>.md``), markers included: a heading, the report's "Made by" line, a link to
    the report, then what the report holds under its results heading up to its next ``##``
    heading, its image links made relative to ``dest``. None when the report has no results."""
    report, dest = Path(report), Path(dest)
    lines = report.read_text().splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith(RESULTS_HEADING)), None)
    if start is None:
        return None
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    title = next((line[2:].strip() for line in lines[:start] if line.startswith("# ")), name)
    heading = lines[start][3:].strip()
    made = next((line for line in lines[:start] if line.startswith("Made by ")), None)

    def relink(m: re.Match) -> str:
        target = m.group(2)
        if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith(("/", "#")):
            return m.group(0)  # a URL or an absolute path reads the same from anywhere
        return f"![{m.group(1)}]({_relative_to(dest, report.parent / target)})"

    body = _IMAGE_LINK.sub(relink, "\n".join(lines[start + 1 : end]).strip("\n"))
    link = _relative_to(dest, report)
    markers = results_markers(name)
    return "\n".join(
        [
            markers[0],
            f"## {title.removesuffix(_TITLE_SUFFIX)}: {heading[:1].lower()}{heading[1:]}",
            "",
            *([made] if made else []),
            f"The full report, with its settings, wall times and every figure: [{link}]({link}).",
            "",
            body,
            "",
            markers[1],
        ]
    )


def write_results(report: str | os.PathLike, dest: str | os.PathLike, name: str) -> Path | None:
    """Write :func:`results_section` of ``report`` into ``dest/results.md`` (atomically): in
    place of the section between ``name``'s markers if there is one, else at the end (a new
    file starts with :data:`RESULTS_HEADER`). Returns the path, or None when nothing was
    written: the report has no results, or the file already holds this section."""
    section = results_section(report, dest, name)
    if section is None:
        return None
    path = Path(dest) / RESULTS
    old = path.read_text() if path.is_file() else None
    text = RESULTS_HEADER if old is None else old
    start, end = results_markers(name)
    if start in text and end in text.split(start, 1)[1]:
        head, rest = text.split(start, 1)
        new = head + section + rest.split(end, 1)[1]
    else:
        new = text.rstrip("\n") + "\n\n" + section + "\n"
    if new == old:
        return None
    atomic_write_text(path, new)
    return path
