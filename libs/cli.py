"""Shared pieces of the stage scripts: common click options and one-line error reporting."""

from __future__ import annotations

import functools

import click

from .checkpoint import CheckpointError
from .config import ConfigError
from .data import DataError
from .demographics import DemographicsError
from .manifest import ManifestError
from .volumes import VolumeError

# OSError: unreadable / unwritable paths, a full disk; UnicodeError: a CSV or YAML that is not UTF-8 text.
EXPECTED_ERRORS = (ConfigError, DataError, DemographicsError, VolumeError, CheckpointError, ManifestError, OSError,
                   UnicodeError)


def run_guarded(job) -> None:
    """Run ``job()``; turn the project's expected errors into a one-line message and exit code 1."""
    try:
        job()
    except EXPECTED_ERRORS as exc:
        raise click.ClickException(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None


def training_options(fn):
    """--config, --cohort, --run-dir, --set, --device, --dry-run, --quiet."""
    opts = [
        click.option("--config", required=True, type=click.Path(dir_okay=False), metavar="YAML",
                     help="Preset, e.g. 1_Trainings/configs/lowres_paper.yaml."),
        click.option("--cohort", type=click.Path(file_okay=False), metavar="DIR",
                     help="Override data.cohort (the training cohort directory)."),
        click.option("--run-dir", type=click.Path(file_okay=False), metavar="DIR",
                     help="Override run_dir (checkpoints, log.jsonl, config.yaml)."),
        click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                     help="Override any config key, e.g. --set optim.batch=4 (repeatable)."),
        click.option("--device", default="auto", metavar="DEV", help="auto, cpu, cuda or cuda:N."),
        click.option("--dry-run", is_flag=True, help="Print the resolved config and exit."),
        click.option("--quiet", is_flag=True, help="No progress bars."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return functools.wraps(fn)(fn)


def training_command(config_cls, train_fn, doc: str, check=None):
    """The click command of a training script: load/override/validate the config, then train or print it.

    ``check(cfg)`` (optional) runs before training, e.g. to verify the paired low-res preset exists.
    """
    from .config import dump_yaml
    from .runs import prepare_run

    @click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True}, help=doc)
    @training_options
    def main(config, cohort, run_dir, overrides, device, dry_run, quiet):
        def job():
            cfg = prepare_run(config, config_cls, cohort, run_dir, overrides, write=not dry_run)
            if check is not None:
                check(cfg)
            if dry_run:
                click.echo(dump_yaml(cfg), nl=False)
                return
            click.echo(f"done: {train_fn(cfg, device=device, progress=not quiet)}")

        run_guarded(job)

    return main
