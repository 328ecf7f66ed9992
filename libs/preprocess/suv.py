"""PET values → SUVbw following the QIBA vendor-neutral SUV pseudo-code.

Per slice k:  SUV = (stored · RescaleSlope_k + RescaleIntercept_k) · f_k, where f_k is

* Units (0054,1001) ``BQML``: f = weight_g / decayed_dose, decayed_dose = RadionuclideTotalDose (0018,1074)
  · 2^(−Δt / RadionuclideHalfLife (0018,1075)), Δt = scan start − injection (seconds);
* ``CNTS`` (Philips): f = SUV scale factor (7053,1000) of "Philips PET Private Group"; without it, the
  activity concentration scale factor (7053,1009) turns values into Bq/mL and f = (7053,1009) · BQML factor;
* ``GML``: f = 1 (the values are SUVbw already).

Preconditions for every unit (else the study is skipped): CorrectedImage (0028,0051) holds ATTN and DECAY,
DecayCorrection (0054,1102) is START.

Scan start: SeriesDate/SeriesTime (0008,0021/0031) when not after the earliest AcquisitionDate/Time
(0008,0022/0032) of the series; otherwise (a post-processed series) GE's private scan date-time
(0009,100D) of "GEMS_PETD_01"; otherwise the study is skipped.
Injection: RadiopharmaceuticalStartDateTime (0018,1078) when present, else StudyDate (0008,0020) +
RadiopharmaceuticalStartTime (0018,1072); with a time only, an injection that falls after the scan start
by less than a day is taken on the previous day (midnight crossing).  Δt must lie in [0, 12] h.
"""

from __future__ import annotations

import datetime as dt
import struct
from dataclasses import dataclass

import numpy as np

from .dicom_io import tag_values
from .dicomtime import combine, parse_dt
from .errors import SkipStudy

PHILIPS_CREATOR = "Philips PET Private Group"
GE_CREATOR = "GEMS_PETD_01"
MAX_UPTAKE_S = 12 * 3600.0
MIN_DOSE_BQ = 1e5          # a smaller "dose" is almost surely MBq or mCi, not Bq


@dataclass(frozen=True)
class SuvScale:
    """Per-slice factors f_k (SUV = rescaled value · f_k) and how they were obtained (no identifying data)."""

    factors: np.ndarray
    units: str
    rule: str
    uptake_s: float | None = None
    half_life_s: float | None = None


def private_value(ds, group: int, element: int, creator: str):
    """Value of private tag (group, xxEE) in the block reserved by ``creator``; None when absent.

    ``element`` is the tag's last byte as written in vendor tables, e.g. 0x1000 → block offset 0x00.
    """
    for slot in range(0x10, 0x100):
        owner = ds.get((group, slot))
        if owner is None:
            continue
        text = owner.value.decode("ascii", "ignore") if isinstance(owner.value, bytes) else str(owner.value)
        if text.strip() == creator:
            item = ds.get((group, (slot << 8) | (element & 0xFF)))
            return None if item is None else item.value
    return None


def _number(value, what: str) -> float:
    if isinstance(value, bytes):
        text = value.decode("ascii", "ignore").strip("\x00 ")
        try:
            return float(text.split("\\")[0])
        except ValueError:
            if len(value) in (4, 8):
                return struct.unpack("<d" if len(value) == 8 else "<f", value)[0]
            raise SkipStudy(f"{what}: unreadable value") from None
    if isinstance(value, (list, tuple)) or hasattr(value, "__len__") and not isinstance(value, str):
        value = value[0]
    try:
        return float(value)
    except (TypeError, ValueError):
        raise SkipStudy(f"{what}: not a number") from None


def _positive(ds, key: str, what: str) -> float:
    value = ds.get(key)
    if value in (None, ""):
        raise SkipStudy(f"{what} missing")
    number = _number(value, what)
    if not np.isfinite(number) or number <= 0:
        raise SkipStudy(f"{what} is not positive")
    return number


def scan_start(headers: list) -> dt.datetime:
    """Scan start of the series (see the module docstring)."""
    first = headers[0]
    series = combine(first.get("SeriesDate"), first.get("SeriesTime"), "SeriesDate (0008,0021)",
                     "SeriesTime (0008,0031)")
    acquisitions = [combine(ds.get("AcquisitionDate") or first.get("SeriesDate"), ds.get("AcquisitionTime"),
                            "AcquisitionDate (0008,0022)", "AcquisitionTime (0008,0032)")
                    for ds in headers if ds.get("AcquisitionTime")]
    if not acquisitions or series <= min(acquisitions):
        return series
    ge = private_value(first, 0x0009, 0x100D, GE_CREATOR)
    if ge is not None:
        return parse_dt(ge.decode("ascii", "ignore") if isinstance(ge, bytes) else ge, "GE scan date-time (0009,100D)")
    raise SkipStudy("SeriesTime is after AcquisitionTime (post-processed series) and no GE private scan time "
                    "(0009,100D): scan start unknown")


def injection_time(ds, scan: dt.datetime) -> dt.datetime:
    """Injection date-time of the first RadiopharmaceuticalInformationSequence item (midnight-safe)."""
    item = ds.RadiopharmaceuticalInformationSequence[0]
    if item.get("RadiopharmaceuticalStartDateTime"):
        return parse_dt(item.RadiopharmaceuticalStartDateTime, "RadiopharmaceuticalStartDateTime (0018,1078)")
    date = ds.get("StudyDate") or ds.get("SeriesDate")
    start = combine(date, item.get("RadiopharmaceuticalStartTime"), "StudyDate (0008,0020)",
                    "RadiopharmaceuticalStartTime (0018,1072)")
    if dt.timedelta(0) < start - scan < dt.timedelta(days=1):
        start -= dt.timedelta(days=1)  # injected before midnight, scanned after it
    return start


def bqml_factor(ds, headers: list, weight_kg: float | None) -> tuple[float, float, float]:
    """weight_g / decayed dose for a START-decay-corrected series; also Δt (s) and half-life (s)."""
    if weight_kg is None:
        raise SkipStudy("PatientWeight (0010,1030) missing: SUVbw needs the weight")
    seq = ds.get("RadiopharmaceuticalInformationSequence")
    if not seq:
        raise SkipStudy("RadiopharmaceuticalInformationSequence (0054,0016) missing")
    dose = _positive(seq[0], "RadionuclideTotalDose", "RadionuclideTotalDose (0018,1074)")
    if dose < MIN_DOSE_BQ:
        raise SkipStudy(f"RadionuclideTotalDose (0018,1074) of {dose:g} Bq is implausibly small (MBq given?)")
    half_life = _positive(seq[0], "RadionuclideHalfLife", "RadionuclideHalfLife (0018,1075)")
    scan = scan_start(headers)
    uptake = (scan - injection_time(ds, scan)).total_seconds()
    if not 0.0 <= uptake <= MAX_UPTAKE_S:
        raise SkipStudy(f"injection-to-scan time of {uptake / 3600:.2f} h is outside 0–12 h")
    decayed = dose * 2.0 ** (-uptake / half_life)
    return weight_kg * 1000.0 / decayed, uptake, half_life


def _check_corrections(ds) -> None:
    values = tag_values(ds.get("CorrectedImage"))
    missing = [c for c in ("ATTN", "DECAY") if c not in values]
    if missing:
        raise SkipStudy(f"CorrectedImage (0028,0051) lacks {' and '.join(missing)}")
    decay = str(ds.get("DecayCorrection") or "").strip().upper()
    if decay != "START":
        raise SkipStudy(f"DecayCorrection (0054,1102) is {decay or 'missing'}, not START")


def suv_scale(headers: list, weight_kg: float | None) -> SuvScale:
    """The SUVbw factors of a PET series whose slice headers are ``headers`` (sorted)."""
    ds = headers[0]
    _check_corrections(ds)
    units = str(ds.get("Units") or "").strip().upper()
    n = len(headers)
    if units == "GML":
        return SuvScale(np.ones(n), units, "GML: values are SUVbw")
    if units == "BQML":
        f, uptake, half = bqml_factor(ds, headers, weight_kg)
        return SuvScale(np.full(n, f), units, "BQML: weight / decayed dose", uptake, half)
    if units == "CNTS":
        suv = [private_value(h, 0x7053, 0x1000, PHILIPS_CREATOR) for h in headers]
        if all(v is not None for v in suv):
            factors = np.array([_number(v, "Philips SUV scale factor (7053,1000)") for v in suv])
            if not (np.isfinite(factors).all() and (factors > 0).all()):
                raise SkipStudy("Philips SUV scale factor (7053,1000) is not positive")
            return SuvScale(factors, units, "CNTS: Philips SUV scale factor (7053,1000)")
        acs = [private_value(h, 0x7053, 0x1009, PHILIPS_CREATOR) for h in headers]
        if all(v is not None for v in acs):
            activity = np.array([_number(v, "Philips activity scale factor (7053,1009)") for v in acs])
            if not (np.isfinite(activity).all() and (activity > 0).all()):
                raise SkipStudy("Philips activity concentration scale factor (7053,1009) is not positive")
            f, uptake, half = bqml_factor(ds, headers, weight_kg)
            return SuvScale(activity * f, units, "CNTS: Philips activity scale (7053,1009) then BQML", uptake, half)
        raise SkipStudy("Units CNTS without Philips SUV (7053,1000) or activity (7053,1009) scale factors")
    raise SkipStudy(f"Units (0054,1001) {units or 'missing'} not supported (BQML, CNTS or GML)")
