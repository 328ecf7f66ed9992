"""Atomic file output: nothing half-written ever sits under a final name."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

_UMASK = os.umask(0)  # there is no os.getumask(); read it once and put it back
os.umask(_UMASK)


def _suffixes(path: Path) -> str:
    """Keep multi-part suffixes (``.nii.gz``) so libraries that dispatch on the name still work."""
    name = path.name
    for suffix in (".nii.gz", ".tar.gz"):
        if name.endswith(suffix):
            return suffix
    return path.suffix


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``final``; rename it onto ``final`` only if the block succeeds.

    The temporary file lives in the same directory (same file system, so ``os.replace`` is atomic)
    and carries the same suffix as ``final``.  On any exception it is removed and ``final`` is left
    untouched.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp" + _suffixes(final),
                                    dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the final file the usual permissions
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(final: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``final`` atomically (UTF-8)."""
    with atomic_path(final) as tmp:
        tmp.write_text(text, encoding="utf-8")
