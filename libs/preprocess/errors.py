"""Errors of the preprocessing stage."""

from __future__ import annotations


class PreprocessError(ValueError):
    """A preprocessing input is unusable (bad folder, unreadable series, no subjects, ...)."""


class SkipStudy(PreprocessError):
    """A study cannot be converted trustworthily (unknown units, missing dose/weight/time, ...).

    The message is the reason written to ``skipped.csv``; it never holds identifying header values.
    """
