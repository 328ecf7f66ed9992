"""What the preprocessing scripts share: the one-line error guard and the end-of-batch summary."""

from __future__ import annotations

import sys

import click

from ..cli import EXPECTED_ERRORS
from .errors import PreprocessError
from .jobs import JobReport

CONTEXT = {"help_option_names": ["-h", "--help"], "show_default": True}


def guarded(job):
    """Run ``job()``; expected errors become ``Error: <one line>`` and exit code 1."""
    try:
        return job()
    except (PreprocessError, *EXPECTED_ERRORS) as exc:
        raise click.ClickException(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None


def report_and_exit(report: JobReport, where: str) -> None:
    """Print the counts and every skipped/failed subject with its reason; exit 1 when any failed."""
    click.echo(report.summary(where))
    for line in report.problems():
        click.echo(line, err=True)
    sys.exit(1 if report.failed else 0)
