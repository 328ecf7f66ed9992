"""TotalSegmentator 'total' label ids, read from the installed package's class map (never guessed)."""

from __future__ import annotations

import functools


@functools.lru_cache(maxsize=1)
def total_class_map() -> dict[str, int]:
    """name → id of TotalSegmentator's 'total' task, from the installed ``totalsegmentator``."""
    try:
        from totalsegmentator.map_to_binary import class_map
    except ImportError as exc:  # pragma: no cover - totalsegmentator is a hard requirement
        raise RuntimeError("totalsegmentator is not installed; `pip install -r requirements.txt`") from exc
    return {name: int(idx) for idx, name in class_map["total"].items()}


def label_id(name: str) -> int:
    """The 'total' id of structure ``name`` (e.g. 'liver' → 5); KeyError names unknown structures."""
    ids = total_class_map()
    if name not in ids:
        raise KeyError(f"{name!r} is not a TotalSegmentator 'total' class")
    return ids[name]


def label_name(idx: int) -> str:
    """The 'total' class name of id ``idx``."""
    for name, i in total_class_map().items():
        if i == idx:
            return name
    raise KeyError(f"{idx} is not a TotalSegmentator 'total' id")
