"""Demographics from DICOM patient/study tags; the identifying ones are read nowhere else and kept nowhere.

* height: PatientSize (0010,1020), metres;
* weight: PatientWeight (0010,1030), kilograms;
* sex: PatientSex (0010,0040), M or F (O or empty → skipped: the cohort contract has no third value);
* age: PatientAge (0010,1010) ``nnnY``/``nnnM``/``nnnW``/``nnnD``; without it, whole years from
  PatientBirthDate (0010,0030) to StudyDate (0008,0020) (else SeriesDate).
"""

from __future__ import annotations

import re

from ..demographics import Demographics, DemographicsError
from .dicomtime import parse_da
from .errors import SkipStudy

_AGE = re.compile(r"^(\d{1,3})([DWMY])$")
_AGE_UNIT_YEARS = {"D": 1 / 365.25, "W": 7 / 365.25, "M": 1 / 12, "Y": 1.0}


def _float(ds, key: str) -> float | None:
    value = ds.get(key)
    if value in (None, ""):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if number > 0 else None


def weight_kg(ds) -> float | None:
    """PatientWeight (kg), None when absent, zero or malformed."""
    return _float(ds, "PatientWeight")


def age_years(ds) -> float:
    """PatientAge, else the whole years between PatientBirthDate and the study date."""
    text = str(ds.get("PatientAge") or "").strip().upper()
    match = _AGE.match(text)
    if match:
        return int(match.group(1)) * _AGE_UNIT_YEARS[match.group(2)]
    if not ds.get("PatientBirthDate"):
        raise SkipStudy("age unknown: PatientAge (0010,1010) and PatientBirthDate (0010,0030) missing")
    born = parse_da(ds.PatientBirthDate, "PatientBirthDate (0010,0030)")
    seen = parse_da(ds.get("StudyDate") or ds.get("SeriesDate"), "StudyDate (0008,0020)")
    return float(seen.year - born.year - ((seen.month, seen.day) < (born.month, born.day)))


def demographics(ds, subject_id: str) -> Demographics:
    """The validated cohort row of a study; :class:`SkipStudy` names the missing or implausible field."""
    height = _float(ds, "PatientSize")
    if height is None:
        raise SkipStudy("PatientSize (0010,1020) missing: height is needed for the cohort")
    weight = weight_kg(ds)
    if weight is None:
        raise SkipStudy("PatientWeight (0010,1030) missing")
    sex = str(ds.get("PatientSex") or "").strip().upper()
    if sex not in ("M", "F"):
        raise SkipStudy(f"PatientSex (0010,0040) is {sex or 'missing'}, not M or F")
    try:
        return Demographics(subject_id, round(height, 3), round(weight, 1), sex, round(age_years(ds), 1))
    except DemographicsError as exc:
        raise SkipStudy(f"demographics refused: {exc}") from None
