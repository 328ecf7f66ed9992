"""DICOM date/time value representations (PS3.5 §6.2) → :class:`datetime.datetime`.

DA ``YYYYMMDD``; TM ``HH[MM[SS[.FFFFFF]]]`` (the old ``HH:MM:SS`` form is accepted too);
DT ``YYYY[MM[DD[HH[MM[SS[.FFFFFF]]]]]][&ZZXX]``.  A UTC offset on a DT value is dropped: every time
of one study is taken in the scanner's local time, as the DA/TM pairs it is compared with are.
"""

from __future__ import annotations

import datetime as dt
import re

from .errors import SkipStudy

_TM = re.compile(r"^(\d{2})(\d{2})?(\d{2})?(?:\.(\d{1,6}))?$")
_DT = re.compile(r"^(\d{4})(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\d{2})?(?:\.(\d{1,6}))?(?:[+-]\d{4})?$")


def _text(value) -> str:
    return "" if value is None else str(value).strip()


def parse_da(value, field: str) -> dt.date:
    """DA → date; :class:`SkipStudy` naming ``field`` when absent or malformed."""
    text = _text(value).replace(".", "")
    try:
        return dt.datetime.strptime(text, "%Y%m%d").date()
    except ValueError:
        raise SkipStudy(f"{field}: missing or malformed date") from None


def parse_tm(value, field: str) -> dt.time:
    """TM → time; :class:`SkipStudy` naming ``field`` when absent or malformed."""
    match = _TM.match(_text(value).replace(":", ""))
    if not match:
        raise SkipStudy(f"{field}: missing or malformed time")
    hh, mm, ss, frac = match.groups()
    try:
        return dt.time(int(hh), int(mm or 0), int(ss or 0), int((frac or "0").ljust(6, "0")))
    except ValueError:
        raise SkipStudy(f"{field}: time out of range") from None


def parse_dt(value, field: str) -> dt.datetime:
    """DT → naive datetime (offset dropped); :class:`SkipStudy` naming ``field`` when absent or malformed."""
    match = _DT.match(_text(value))
    if not match:
        raise SkipStudy(f"{field}: missing or malformed date-time")
    y, mo, d, hh, mi, ss, frac = match.groups()
    try:
        return dt.datetime(int(y), int(mo or 1), int(d or 1), int(hh or 0), int(mi or 0), int(ss or 0),
                           int((frac or "0").ljust(6, "0")))
    except ValueError:
        raise SkipStudy(f"{field}: date-time out of range") from None


def combine(date_value, time_value, date_field: str, time_field: str) -> dt.datetime:
    """DA + TM → datetime."""
    return dt.datetime.combine(parse_da(date_value, date_field), parse_tm(time_value, time_field))
