"""Demographics: the validated record, the cohort CSV, and the 4-channel network encoding.

CSV contract (DESIGN.md): header ``subject_id,height_m,weight_kg,sex,age_years``; sex is ``M`` or
``F``; height in metres, weight in kilograms, age in years.  Every error names the file, the line
and the field.
"""

from __future__ import annotations

import csv
import io
import math
import numbers
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .files import atomic_write_text

COLUMNS = ("subject_id", "height_m", "weight_kg", "sex", "age_years")
HEIGHT_RANGE_M = (0.5, 2.5)
WEIGHT_RANGE_KG = (30.0, 250.0)
AGE_RANGE_Y = (0.0, 120.0)
_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# Header variants people bring from other tools, and what to do instead.
_WRONG_COLUMNS = {
    "height": "height_m (metres, e.g. 1.75)",
    "height_cm": "height_m (metres, e.g. 1.75)",
    "weight": "weight_kg (kilograms)",
    "age": "age_years (years)",
    "gender": "sex (M or F)",
    "id": "subject_id",
}


class DemographicsError(ValueError):
    """A demographics value or file breaks the cohort contract."""


@dataclass(frozen=True)
class Demographics:
    """One subject: height (m), weight (kg), sex ('M'/'F'), age (years)."""

    subject_id: str
    height_m: float
    weight_kg: float
    sex: str
    age_years: float

    def __post_init__(self) -> None:
        validate(self)

    @property
    def bmi(self) -> float:
        """Body-mass index, kg/m²."""
        return self.weight_kg / self.height_m**2

    @property
    def bsa_m2(self) -> float:
        """DuBois body-surface area, m²: 0.007184 · W^0.425 · H^0.725 (W kg, H cm)."""
        return 0.007184 * self.weight_kg**0.425 * (100.0 * self.height_m) ** 0.725

    def encode(self) -> np.ndarray:
        """The four conditioning values of DESIGN.md, float32 (4,):
        height_m − 1.0, (weight_kg − 30)/100, sex (F = 0, M = 1), age/100."""
        return np.array([self.height_m - 1.0, (self.weight_kg - 30.0) / 100.0,
                         1.0 if self.sex == "M" else 0.0, self.age_years / 100.0], dtype=np.float32)


def encode_many(records: list[Demographics]) -> np.ndarray:
    """(N, 4) float32 conditioning matrix, rows in the order of ``records``."""
    return np.stack([r.encode() for r in records]) if records else np.zeros((0, 4), np.float32)


def _finite(name: str, value: float) -> float:
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value):
        raise DemographicsError(f"{name}: missing or not a finite number ({value!r})")
    return float(value)


def validate(d: Demographics) -> None:
    """Raise :class:`DemographicsError` naming the field when ``d`` breaks the contract."""
    if not isinstance(d.subject_id, str) or not _ID_PATTERN.match(d.subject_id):
        raise DemographicsError(f"subject_id: {d.subject_id!r} is not a valid id "
                                "(letters, digits, '_', '-', '.', at most 64 characters)")
    h = _finite("height_m", d.height_m)
    if 100.0 <= h <= 250.0:
        raise DemographicsError(f"height_m: {h:g} looks like centimetres; give metres (e.g. {h / 100:.2f})")
    if not HEIGHT_RANGE_M[0] <= h <= HEIGHT_RANGE_M[1]:
        raise DemographicsError(f"height_m: {h:g} m is outside {HEIGHT_RANGE_M[0]}–{HEIGHT_RANGE_M[1]} m")
    w = _finite("weight_kg", d.weight_kg)
    if not WEIGHT_RANGE_KG[0] <= w <= WEIGHT_RANGE_KG[1]:
        hint = " (pounds? give kilograms)" if WEIGHT_RANGE_KG[1] < w <= 2.2 * WEIGHT_RANGE_KG[1] else ""
        raise DemographicsError(f"weight_kg: {w:g} kg is outside {WEIGHT_RANGE_KG[0]:g}–"
                                f"{WEIGHT_RANGE_KG[1]:g} kg{hint}")
    a = _finite("age_years", d.age_years)
    if not AGE_RANGE_Y[0] <= a <= AGE_RANGE_Y[1]:
        raise DemographicsError(f"age_years: {a:g} is outside {AGE_RANGE_Y[0]:g}–{AGE_RANGE_Y[1]:g} years")
    if d.sex not in ("M", "F"):
        raise DemographicsError(f"sex: {d.sex!r} is not M or F")


def _parse_number(field: str, text: str | None) -> float:
    if text is None or not text.strip():
        raise DemographicsError(f"{field}: missing value")
    try:
        value = float(text)
    except ValueError:
        raise DemographicsError(f"{field}: {text!r} is not a number") from None
    if not math.isfinite(value):
        raise DemographicsError(f"{field}: {text!r} is not a finite number")
    return value


def parse_row(row: dict[str, str | None]) -> Demographics:
    """Build a validated record from one CSV row (strings); errors name the field."""
    sid = (row.get("subject_id") or "").strip()
    if not sid:
        raise DemographicsError("subject_id: missing value")
    sex = (row.get("sex") or "").strip().upper()
    if not sex:
        raise DemographicsError("sex: missing value")
    return Demographics(subject_id=sid,
                        height_m=_parse_number("height_m", row.get("height_m")),
                        weight_kg=_parse_number("weight_kg", row.get("weight_kg")),
                        sex=sex,
                        age_years=_parse_number("age_years", row.get("age_years")))


def _check_header(path: Path, header: list[str] | None) -> None:
    if not header:
        raise DemographicsError(f"{path}: empty file; expected header {','.join(COLUMNS)}")
    header = [h.strip() for h in header]
    for col in COLUMNS:
        if col in header:
            continue
        wrong = [h for h in header if h.lower() in _WRONG_COLUMNS and _WRONG_COLUMNS[h.lower()].startswith(col)]
        if wrong:
            raise DemographicsError(f"{path}: column {wrong[0]!r} is not part of the contract; "
                                    f"rename it to {_WRONG_COLUMNS[wrong[0].lower()]}")
        raise DemographicsError(f"{path}: missing column {col!r}; header must be {','.join(COLUMNS)}")


def read_demographics_rows(path: str | os.PathLike) -> tuple[list[Demographics], list[str]]:
    """Read a demographics CSV leniently: the valid records, and one message per bad row.

    For batch jobs (inference) where one bad row must not stop the others.  File-level problems
    (missing file, bad header) still raise :class:`DemographicsError`.  Messages read
    ``<file> line <n> (subject_id): <field>: <reason>``.
    """
    path = Path(path)
    if not path.is_file():
        raise DemographicsError(f"{path}: file not found")
    records: list[Demographics] = []
    errors: list[str] = []
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            _read_rows(path, fh, records, errors)
    except UnicodeDecodeError as exc:
        raise DemographicsError(f"{path}: not UTF-8 text (byte {exc.start}); save the CSV as UTF-8") from None
    except csv.Error as exc:
        raise DemographicsError(f"{path}: not a readable CSV file ({exc})") from None
    return records, errors


def _read_rows(path: Path, fh, records: list[Demographics], errors: list[str]) -> None:
    reader = csv.DictReader(fh, skipinitialspace=True)
    _check_header(path, reader.fieldnames)
    reader.fieldnames = [h.strip() for h in reader.fieldnames]
    seen: dict[str, int] = {}
    for row in reader:
        line = reader.line_num
        if not any((v or "").strip() for v in row.values() if isinstance(v, str)):
            continue  # blank line
        sid = (row.get("subject_id") or "").strip()
        if None in row:                                  # DictReader's key for fields beyond the header
            errors.append(f"{path} line {line} ({sid or 'no id'}): more fields than the header's "
                          f"{len(reader.fieldnames)}")
            continue
        try:
            rec = parse_row(row)
        except DemographicsError as exc:
            errors.append(f"{path} line {line} ({sid or 'no id'}): {exc}")
            continue
        if rec.subject_id in seen:
            errors.append(f"{path} line {line}: subject_id {rec.subject_id!r} duplicates line {seen[rec.subject_id]}")
            continue
        seen[rec.subject_id] = line
        records.append(rec)


def read_demographics_csv(path: str | os.PathLike) -> list[Demographics]:
    """Read and validate a cohort ``demographics.csv``.

    Raises :class:`DemographicsError` with ``<file> line <n> (subject_id): <field>: <reason>`` for
    the first bad row; duplicate subject ids are an error.
    """
    records, errors = read_demographics_rows(path)
    if errors:
        raise DemographicsError(errors[0])
    if not records:
        raise DemographicsError(f"{path}: no subjects")
    return records


def demographics_to_csv_text(records: list[Demographics]) -> str:
    """The CSV text of ``records`` in the cohort-contract layout."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(COLUMNS)
    for r in records:
        writer.writerow([r.subject_id, f"{r.height_m:.3f}", f"{r.weight_kg:.1f}", r.sex, f"{r.age_years:.1f}"])
    return buf.getvalue()


def write_demographics_csv(path: str | os.PathLike, records: list[Demographics]) -> Path:
    """Write ``records`` as a cohort ``demographics.csv`` (atomically); duplicate ids are refused."""
    ids = [r.subject_id for r in records]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise DemographicsError(f"{path}: duplicate subject_id {dup[0]!r}")
    atomic_write_text(path, demographics_to_csv_text(records))
    return Path(path)
