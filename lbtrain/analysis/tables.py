"""Tables as people and programs read them: GitHub Markdown (numbers for people) and CSV (full precision).

Every table is a list of rows, each a dict whose keys are the columns (the first row's keys, in order).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lbtrain.analysis.runs import number
from lbtrain.checkpoint import atomic_write_bytes


def to_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """A GitHub pipe table; the columns are the first row's keys."""
    if not rows:
        return "(no rows)\n"
    columns = list(rows[0])
    cell = lambda v: number(v).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def to_csv(rows: Sequence[dict[str, Any]]) -> str:
    """CSV with full-precision numbers; None is written as an empty field."""
    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return buf.getvalue()


def write_tables(tables: dict[str, Sequence[dict[str, Any]]], out_dir: str | Path,
                 notes: dict[str, str] | None = None) -> list[Path]:
    """NAME.md and NAME.csv for each table, each written atomically; `notes[NAME]` (Markdown) is written below
    the table in NAME.md (the CSV stays one table)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, rows in tables.items():
        note = (notes or {}).get(name)
        md = to_markdown(rows) + (f"\n{note}" if note else "")
        for ext, text in (("md", md), ("csv", to_csv(rows))):
            path = out_dir / f"{name}.{ext}"
            atomic_write_bytes(path, text.encode())
            written.append(path)
    return written
