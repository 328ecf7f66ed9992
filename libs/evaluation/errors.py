"""Errors of the evaluation stage and the guard every evaluation script runs its job under."""

from __future__ import annotations

import click

from ..cli import run_guarded


class EvaluationError(ValueError):
    """An evaluation input is unusable (no common subjects, unknown organ, empty cohort, ...)."""


class SegmenterWeightsError(EvaluationError):
    """TotalSegmentator's model weights are not on this machine (they are never downloaded here)."""


def guarded(job) -> None:
    """Run ``job()`` under :func:`libs.cli.run_guarded`; an :class:`EvaluationError` also becomes a
    one-line message with exit code 1 (click prints ``Error: <message>``)."""
    def job_with_evaluation_errors() -> None:
        try:
            job()
        except EvaluationError as exc:
            text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise click.ClickException(text) from None

    run_guarded(job_with_evaluation_errors)
