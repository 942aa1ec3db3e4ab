"""metrics.csv (one row per epoch) and the summary of a run."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any

from torch import nn

from fastclip.pipeline.data import dataset_info
from fastclip.pipeline.io import atomic_write_text
from fastclip.pipeline.results import measure_layer_norms
from fastclip.pipeline.training.config import BASE_COLUMNS, TrainConfig


class MetricsError(ValueError):
    """A metrics.csv that cannot be read as this library writes it; the message is one
    line naming the file, the line and what is wrong."""


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a metrics.csv as dicts (numbers as float, ``epoch`` as int); [] if missing.
    Raises :class:`MetricsError` for a file that is not one (garbled, truncated in a
    row, epochs out of order).

    Example::

        rows = read_metrics("logs/mnist/SimpleConv_models/method_fastclip_wBN_1/metrics.csv")
        rows[-1]["test_acc"]
    """
    path = Path(path)
    if not path.is_file():
        return []
    rows: list[dict[str, Any]] = []
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            missing = [c for c in BASE_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise MetricsError(f"{path.name} lacks the column(s) {', '.join(missing)}")
            for raw in reader:
                line = reader.line_num
                if None in raw or any(v is None for v in raw.values()):
                    raise MetricsError(f"{path.name} line {line} has not as many fields as the header")
                row: dict[str, Any] = {}
                for k, v in raw.items():
                    try:
                        row[k] = int(v) if k == "epoch" else float(v) if v != "" else float("nan")
                    except ValueError:
                        raise MetricsError(
                            f"{path.name} line {line}: {k} is {v[:40]!r}, not a number"
                        ) from None
                if row["epoch"] != (rows[-1]["epoch"] + 1 if rows else 1):  # epochs 1, 2, ... in order
                    raise MetricsError(f"{path.name} line {line}: epoch {row['epoch']} out of order")
                rows.append(row)
    except (UnicodeDecodeError, csv.Error) as e:
        raise MetricsError(f"{path.name} is not a CSV file ({type(e).__name__})") from None
    return rows


def _write_metrics(path: Path, rows: list[dict[str, Any]]) -> None:
    columns = list(BASE_COLUMNS)
    for row in rows:
        columns += [k for k in row if k not in columns]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    w.writeheader()
    for row in rows:
        # repr keeps every bit of a float, so reruns compare exactly.
        w.writerow({k: (repr(float(v)) if isinstance(v, float) else v) for k, v in row.items()})
    atomic_write_text(path, buf.getvalue())


def _summary(run_dir: Path, rows: list[dict[str, Any]], skipped: bool) -> dict[str, Any]:
    last = rows[-1] if rows else {}
    return {
        "run_dir": str(run_dir),
        "skipped": skipped,
        "epochs": last.get("epoch", 0),
        "final": last,
        "best_test_acc": max((r["test_acc"] for r in rows), default=float("nan")),
    }


def _exact_norms(model: nn.Module, cfg: TrainConfig) -> dict[str, float]:
    # Eval mode: the layers as evaluated (BN running statistics), and no wrapper
    # tracks or clips while it is measured.
    was_training = model.training
    model.eval()
    try:
        rows = measure_layer_norms(model, dataset_info(cfg.dataset).input_shape, progress=False)
    finally:
        model.train(was_training)
    return {f"exact/{r['layer']}": r["sigma1"] for r in rows}
