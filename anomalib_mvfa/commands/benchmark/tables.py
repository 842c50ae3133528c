"""The benchmark's tables: every job's row (``benchmark.csv``) and mean ± std over seeds (``benchmark.md``).

Accuracy columns (AUROC, F1) are in percent and every number has the report's significant digits
(:func:`~anomalib_mvfa.reports.cells.format_cell`), in the Markdown table as on the report page.

Example:
    >>> row = {"model": "Patchcore", "data": "MVTecAD", "category": "bottle", "seed": 0, "weights": "pretrained",
    ...        **dict.fromkeys(METRICS, 1.0)}
    >>> format_cell("image_AUROC", summary_rows([row])[0]["image_AUROC"])
    '100'
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from ...reports.cells import Stat, column_label, format_cell
from ...utils import write_atomically, write_rows
from .config import METRICS, RANDOM_WEIGHTS, shown_metrics  # noqa: F401 - METRICS: the module example

__all__ = ["describe_row", "summary_rows", "summary_table", "write_tables"]


def describe_row(row: dict[str, Any]) -> str:
    """``Mvfa on MVTecAD bottle seed 0`` for a result row."""
    return f"{row['model']} on {row['data']} {row['category'] or ''} seed {row['seed']}"


def summary_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per model, data and category: the seeds that ran and each metric's mean ± std (a :class:`Stat`).

    A metric no job of the group has is ``None`` (not applicable, shown ``-``); one that was undefined
    in every job (masks of one class) is ``""`` (shown empty, named under the table).
    """
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["model"], row["data"], row["category"], row["weights"]), []).append(row)
    summary = []
    metrics = shown_metrics(rows)
    for (model, data, category, weights), group in groups.items():
        cells: dict[str, Any] = {"model": model, "data": data, "category": str(category)}
        cells["seeds"] = sum(not row.get("error") for row in group)
        for metric in metrics:
            values = [float(row[metric]) for row in group if row.get(metric) not in (None, "")]
            if not values:
                undefined = any(metric in str(row.get("undefined", "")) for row in group)
                cells[metric] = "" if undefined else None
                continue
            spread = statistics.stdev(values) if len(values) > 1 else None
            cells[metric] = Stat(statistics.fmean(values), spread)
        cells["weights"] = weights
        summary.append(cells)
    return summary


def summary_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table: one line per model, data and category, mean ± std over seeds."""
    header = ["model", "data", "category", "seeds", *shown_metrics(rows), "weights"]
    lines = ["| " + " | ".join(map(column_label, header)) + " |", "|---" * len(header) + "|"]
    lines += ["| " + " | ".join(format_cell(key, cells[key]) for key in header) + " |" for cells in summary_rows(rows)]
    reasons = sorted({reason for row in rows for reason in str(row.get("undefined") or "").split("; ") if reason})
    if reasons:
        lines += ["", "Empty cells (and means over fewer seeds): undefined metrics, left out. " + "; ".join(reasons)]
    failures = [f"- {describe_row(row)}: {row['error']}" for row in rows if row.get("error")]
    if failures:
        lines += ["", "Failed jobs (left out of the means), each with its whole message:", *failures]
    return "\n".join(lines) + "\n"


def write_tables(rows: list[dict[str, Any]], output: Path) -> str:
    """Write ``benchmark.csv`` and ``benchmark.md`` into ``output``; return the Markdown text."""
    write_rows(output / "benchmark.csv", rows)
    random_rows = any(row["weights"] == RANDOM_WEIGHTS for row in rows)
    note = "\nRandom weights: speed figures only, their accuracy columns mean nothing.\n" if random_rows else ""
    text = summary_table(rows) + note
    write_atomically(output / "benchmark.md", lambda path: Path(path).write_text(text))
    return text
