"""Tidy tables: rows are dicts, files are CSV (written atomically), numbers round-trip through text.

Floats are written with 7 significant digits; NaN is written as an empty cell and read back as NaN;
``inf`` stays ``inf``.  :class:`SubjectTable` is the resumable per-subject table of the batch scripts:
it is rewritten (atomically) after every subject, so an interrupted job loses at most one subject.
"""

from __future__ import annotations

import csv
import io
import math
import os
from pathlib import Path

from ..files import atomic_write_text
from .errors import EvaluationError


def format_value(value) -> str:
    """A CSV cell: floats with 7 significant digits, NaN/None as empty, everything else as str."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.7g}"
    return str(value)


def parse_value(text: str):
    """Inverse of :func:`format_value` for numbers: '' → NaN, numeric text → float, else the text."""
    if text == "":
        return math.nan
    try:
        return float(text)
    except ValueError:
        return text


def rows_to_csv_text(rows: list[dict], columns: list[str]) -> str:
    """CSV text with header ``columns``; missing keys become empty cells."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([format_value(row.get(c)) for c in columns])
    return buf.getvalue()


def write_csv(path: str | os.PathLike, rows: list[dict], columns: list[str]) -> Path:
    """Write ``rows`` as CSV (atomically)."""
    atomic_write_text(path, rows_to_csv_text(rows, columns))
    return Path(path)


def read_csv(path: str | os.PathLike, text_columns: tuple[str, ...] = ()) -> tuple[list[str], list[dict]]:
    """Header and rows of a CSV; cells are parsed numbers except in ``text_columns`` (kept as str)."""
    path = Path(path)
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            header = list(reader.fieldnames or [])
            rows = [{k: (v if k in text_columns else parse_value(v)) for k, v in r.items()} for r in reader]
    except (OSError, csv.Error, UnicodeDecodeError) as exc:
        raise EvaluationError(f"{path}: cannot read CSV ({exc})") from exc
    return header, rows


class SubjectTable:
    """Rows grouped by subject, persisted to ``path`` after every update (resumable batch output).

    Rows of an existing file are kept only if its header equals ``columns``; otherwise (or with
    ``fresh=True``) the table starts empty and the old file is replaced on the first write.
    """

    def __init__(self, path: str | os.PathLike, columns: list[str], text_columns: tuple[str, ...],
                 fresh: bool = False):
        self.path, self.columns, self.text_columns = Path(path), list(columns), text_columns
        self.by_subject: dict[str, list[dict]] = {}
        if self.path.is_file() and not fresh:
            header, rows = read_csv(self.path, text_columns)
            if header == self.columns:
                for row in rows:
                    self.by_subject.setdefault(row["subject_id"], []).append(row)

    def rows_of(self, subject_id: str) -> list[dict] | None:
        """The stored rows of one subject, or None."""
        return self.by_subject.get(subject_id)

    def put(self, subject_id: str, rows: list[dict], order: list[str]) -> None:
        """Replace one subject's rows and rewrite the file with subjects in ``order`` (others dropped)."""
        self.by_subject[subject_id] = rows
        self.write(order)

    def write(self, order: list[str]) -> None:
        """Rewrite the file with the stored subjects that are in ``order``, in that order."""
        rows = [r for sid in order for r in self.by_subject.get(sid, [])]
        write_csv(self.path, rows, self.columns)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A GitHub-flavoured Markdown table (cells already formatted)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines) + "\n"
