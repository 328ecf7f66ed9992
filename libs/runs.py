"""Run folders: the resolved config is written once and a resumed run must match it."""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from .checkpoint import latest_checkpoint
from .config import ConfigError, dump_yaml, load_config, override, to_dict
from .files import atomic_write_text

# Sections that fix what a checkpoint means; changing them under an existing run is refused. The sampler
# is among them: checkpoints record it as inference's default, so a changed one would be silently ignored
# by a run that is already complete (infer.py's --steps-*/--solver/--churn change it per job instead).
FROZEN_SECTIONS = ("data", "model", "diffusion", "in_plane_mm", "sample")
_FREE_DATA_KEYS = ("cohort", "cache_dir", "load_workers")     # where the data lives may change


def prepare_run(config_path: str | os.PathLike, cls, cohort: str | None, run_dir: str | None,
                overrides=(), write: bool = True):
    """Load + override + validate a stage config; check it against ``run_dir/config.yaml`` if present."""
    cfg = load_config(config_path, cls)
    extra = list(overrides)
    if cohort:
        extra.append(f"data.cohort={cohort}")
    if run_dir:
        extra.append(f"run_dir={run_dir}")
    cfg = override(cfg, extra) if extra else cfg
    saved = Path(cfg.run_dir) / "config.yaml"
    if saved.is_file() and latest_checkpoint(cfg.run_dir) is not None:     # only a trained run is bound to it
        previous, current = _frozen(yaml.safe_load(saved.read_text(encoding="utf-8")) or {}), _frozen(to_dict(cfg))
        changed = [k for k in FROZEN_SECTIONS if previous.get(k) != current.get(k)]
        if changed:
            raise ConfigError(f"{saved}: the run was started with other {', '.join(changed)} settings; "
                              "use a new --run-dir (or delete the old run)")
    if write and int(os.environ.get("RANK", "0")) == 0:
        atomic_write_text(saved, dump_yaml(cfg))
    return cfg


def _frozen(d: dict) -> dict:
    d = dict(d)
    if isinstance(d.get("data"), dict):
        d["data"] = {k: v for k, v in d["data"].items() if k not in _FREE_DATA_KEYS}
    return d
