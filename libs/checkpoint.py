"""Checkpoints: state_dicts and plain containers only, written atomically, read with ``weights_only=True``.

A checkpoint file (``torch.save`` zip format) holds one dict::

    format         1
    model          model state_dict (DDP / torch.compile wrappers removed)
    ema            EMA state_dict or None
    optimizer      optimizer state_dict or None
    step           int, optimizer steps taken
    config         resolved config as a plain dict
    normalization  intensity / conditioning constants (plain dict)
    versions       {'libs', 'torch', 'python'}
    extra          plain dict (tensors allowed) or {}

Nothing else is pickled, so :func:`load_checkpoint` never executes code from a file.  In a run folder
checkpoints are named ``ckpt-<step:09d>.pt``; :func:`latest_checkpoint` resumes from the newest readable
one.  :func:`export_safetensors` writes inference weights with the config in the safetensors metadata.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import numbers
import operator
import os
import pickle
import platform
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch

from . import __version__
from .files import atomic_path

FORMAT_VERSION = 1
CHECKPOINT_PATTERN = re.compile(r"^ckpt-(\d+)\.pt$")
_REQUIRED_KEYS = ("format", "model", "step", "config", "normalization", "versions")


class CheckpointError(RuntimeError):
    """A checkpoint or weights file is missing, corrupt, unsafe or not in this package's format."""


def save_checkpoint(path: str | os.PathLike, *, model: Any, ema: Any = None, optimizer: Any = None,
                    step: int, config: Mapping[str, Any] | Any, normalization: Mapping[str, Any],
                    extra: Mapping[str, Any] | None = None) -> Path:
    """Write a checkpoint atomically (temp file in the same folder, fsync, rename) and return its path.

    ``model``, ``ema`` and ``optimizer`` are anything with ``state_dict()`` (or a state_dict itself);
    ``config`` is a plain dict or a config dataclass.  A failed save leaves an existing ``path`` intact.
    """
    path = Path(path)
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        from .config import to_dict
        config = to_dict(config)
    payload = {
        "format": FORMAT_VERSION,
        "model": _state_dict(model),
        "ema": None if ema is None else _state_dict(ema),
        "optimizer": None if optimizer is None else _state_dict(optimizer),
        "step": _step(step),
        "config": _checked_plain(config, "config", tensors=False),
        "normalization": _checked_plain(normalization, "normalization", tensors=False),
        "versions": versions(),
        "extra": _checked_plain(extra or {}, "extra", tensors=True),
    }
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
    _fsync_dir(path.parent)
    return path


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu", *, mmap: bool = False) -> dict:
    """Read a checkpoint written by :func:`save_checkpoint` with ``torch.load(weights_only=True)``.

    Raises :class:`CheckpointError` naming the file when it is missing, truncated/corrupt, holds pickled
    objects other than tensors and plain containers, or lacks the expected keys.  ``mmap=True`` maps
    tensor storage instead of reading it (cheap validity checks, large files).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"{path}: {_unpickling_reason(exc)}") from None
    except Exception as exc:  # torch raises RuntimeError, EOFError, KeyError, ... for damaged files
        reason = " ".join(str(exc).split())[:160] or type(exc).__name__
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint ({reason})") from None
    _check_layout(ckpt, path)
    return ckpt


def restore_checkpoint(ckpt: Mapping[str, Any], *, model: Any, ema: Any = None, optimizer: Any = None) -> int:
    """Load the state_dicts of a loaded checkpoint into live objects; returns the step to resume from."""
    _unwrap(model).load_state_dict(ckpt["model"])
    for name, target in (("ema", ema), ("optimizer", optimizer)):
        if target is None:
            continue
        if ckpt.get(name) is None:
            raise CheckpointError(f"checkpoint at step {ckpt['step']} holds no {name} state to restore")
        target.load_state_dict(ckpt[name])
    return int(ckpt["step"])


def versions() -> dict[str, str]:
    """Versions recorded with every checkpoint and export (builtin str: weights_only refuses TorchVersion)."""
    return {"libs": str(__version__), "torch": str(torch.__version__), "python": platform.python_version()}


def checkpoint_path(run_dir: str | os.PathLike, step: int) -> Path:
    """``run_dir/ckpt-<step:09d>.pt``."""
    return Path(run_dir) / f"ckpt-{_step(step):09d}.pt"


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(step, path)`` of every ``ckpt-*.pt`` in ``run_dir``, oldest first (temp files are ignored)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = []
    for entry in run_dir.iterdir():
        match = CHECKPOINT_PATTERN.match(entry.name)
        if match and entry.is_file():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """Newest readable checkpoint in ``run_dir`` or None; unreadable newer ones are skipped with a warning."""
    for _, path in reversed(list_checkpoints(run_dir)):
        try:
            load_checkpoint(path, mmap=True)
        except CheckpointError as exc:
            warnings.warn(f"skipping unreadable checkpoint, trying an older one: {exc}", stacklevel=2)
            continue
        return path
    return None


def prune_checkpoints(run_dir: str | os.PathLike, keep: int = 3) -> list[Path]:
    """Delete all but the ``keep`` newest *readable* checkpoints.  Unreadable files are neither counted nor
    deleted (left for inspection), so a damaged newest file never costs a valid older one.

    Returns the deleted paths.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    kept, removed = 0, []
    for _, path in reversed(list_checkpoints(run_dir)):
        if kept >= keep:
            path.unlink(missing_ok=True)
            removed.append(path)
            continue
        try:
            load_checkpoint(path, mmap=True)
            kept += 1
        except CheckpointError:
            continue
    return removed


def export_safetensors(ckpt_path: str | os.PathLike, out_path: str | os.PathLike,
                       which: str = "ema") -> Path:
    """Write the EMA (or, with ``which='model'`` or no EMA, the model) weights of a checkpoint as safetensors.

    Nested state_dicts are flattened with ``.``-joined keys.  The metadata (str → str, each value JSON)
    holds ``config``, ``normalization``, ``versions``, ``step``, ``weights`` (which set was written),
    ``source_checkpoint`` and ``source_sha256``; non-tensor entries of the state_dict go to ``non_tensor``.
    """
    if which not in ("ema", "model"):
        raise ValueError(f"which must be 'ema' or 'model', got {which!r}")
    ckpt_path, out_path = Path(ckpt_path), Path(out_path)
    ckpt = load_checkpoint(ckpt_path)
    if which == "ema" and ckpt.get("ema") is None:
        warnings.warn(f"{ckpt_path}: no EMA state, exporting the raw model weights", stacklevel=2)
        which = "model"
    tensors, non_tensor = _flatten(ckpt[which])
    metadata = {
        "format": "totalgen", "weights": which, "step": ckpt["step"], "config": ckpt["config"],
        "normalization": ckpt["normalization"], "versions": ckpt["versions"],
        "source_checkpoint": ckpt_path.name, "source_sha256": sha256_file(ckpt_path),
        "non_tensor": non_tensor,
    }
    encoded = {key: json.dumps(value, default=str) for key, value in metadata.items()}
    with atomic_path(out_path) as tmp:
        safetensors.torch.save_file(tensors, str(tmp), metadata=encoded)
    return out_path


def load_safetensors_weights(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read ``(state_dict, metadata)``; metadata values that are JSON are decoded, others stay strings."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: weights file not found")
    try:
        with safetensors.safe_open(str(path), framework="pt", device="cpu") as handle:
            raw = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as exc:  # SafetensorError and OSError for damaged files
        raise CheckpointError(f"{path}: corrupt or unreadable safetensors file ({exc})") from None
    return tensors, {key: _json_or_str(value) for key, value in raw.items()}


def safetensors_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata of a safetensors file (JSON values decoded) without reading its tensors; {} when unreadable."""
    try:
        with safetensors.safe_open(str(path), framework="pt", device="cpu") as handle:
            raw = handle.metadata() or {}
    except Exception:  # SafetensorError and OSError for damaged files
        return {}
    return {key: _json_or_str(value) for key, value in raw.items()}


def sha256_file(path: str | os.PathLike, chunk_bytes: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks (for provenance sidecars)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def _unwrap(module: Any) -> Any:
    """Strip DistributedDataParallel (``.module``) and torch.compile (``._orig_mod``) wrappers."""
    while True:
        if isinstance(module, torch.nn.parallel.DistributedDataParallel):
            module = module.module
        elif isinstance(module, torch.nn.Module) and isinstance(getattr(module, "_orig_mod", None),
                                                                 torch.nn.Module):
            module = module._orig_mod
        else:
            return module


def _state_dict(obj: Any) -> Mapping[str, Any]:
    """``obj.state_dict()`` of an unwrapped module / EMA / optimizer, or ``obj`` if it is a mapping."""
    if isinstance(obj, Mapping):
        return obj
    obj = _unwrap(obj)
    if not callable(getattr(obj, "state_dict", None)):
        raise TypeError(f"expected an object with state_dict() or a mapping, got {type(obj).__name__}")
    return obj.state_dict()


def _step(step: Any) -> int:
    """A non-negative integer step (numpy / torch integers accepted, floats and bools refused)."""
    if isinstance(step, bool):
        raise TypeError(f"step must be an integer, got {step!r}")
    value = operator.index(step)
    if value < 0:
        raise ValueError(f"step must be >= 0, got {value}")
    return value


def _checked_plain(value: Any, where: str, *, tensors: bool) -> Any:
    """Return ``value`` (tuples as lists, numpy scalars as builtins) if it holds only plain values.

    Anything else would be refused by ``weights_only=True`` at load time, so refuse it at save time.
    """
    if isinstance(value, Mapping):
        for key in value:
            if not isinstance(key, str):
                raise TypeError(f"{where}: keys must be strings, got {key!r}")
        return {key: _checked_plain(item, f"{where}.{key}", tensors=tensors) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_checked_plain(item, f"{where}[{i}]", tensors=tensors) for i, item in enumerate(value)]
    if type(value) in (bool, str, int, float, type(None)) or (tensors and isinstance(value, torch.Tensor)):
        return value
    # str subclasses and numpy scalars would be refused by weights_only at load: store the builtin
    if isinstance(value, str):
        return str(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    raise TypeError(f"{where}: {type(value).__name__} is not a plain value (str, int, float, bool, None, "
                    f"list, dict{', tensor' if tensors else ''})")


def _unpickling_reason(exc: pickle.UnpicklingError) -> str:
    """Name the offending global when ``weights_only`` refused the file."""
    text = str(exc)
    match = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if match:
        return (f"refused: the file pickles '{match.group(1)}', not only tensors and plain containers "
                "(checkpoints are loaded with weights_only=True and never run code)")
    if "Weights only load failed" in text:
        return ("refused: the file holds pickled objects other than tensors and plain containers "
                "(checkpoints are loaded with weights_only=True and never run code)")
    return f"corrupt checkpoint ({' '.join(text.split())[:160]})"


def _check_layout(ckpt: Any, path: Path) -> None:
    """The loaded object must be a dict in this module's format."""
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: not a TotalGen checkpoint (holds {type(ckpt).__name__}, not dict)")
    missing = [key for key in _REQUIRED_KEYS if key not in ckpt]
    if missing:
        raise CheckpointError(f"{path}: not a TotalGen checkpoint (missing {', '.join(missing)})")
    if ckpt["format"] != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format {ckpt['format']!r}, this version reads "
                              f"{FORMAT_VERSION}")


def _flatten(state: Mapping[str, Any], prefix: str = "") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split a (nested) state_dict into contiguous, unshared tensors and JSON-able other entries."""
    tensors: dict[str, torch.Tensor] = {}
    other: dict[str, Any] = {}
    for key, value in state.items():
        name = f"{prefix}{key}"
        if isinstance(value, torch.Tensor):
            # clone: safetensors refuses tensors that share storage (tied weights)
            tensors[name] = value.detach().to("cpu").contiguous().clone()
        elif isinstance(value, Mapping):
            sub_tensors, sub_other = _flatten(value, f"{name}.")
            tensors.update(sub_tensors)
            other.update(sub_other)
        else:
            other[name] = value
    return tensors, other


def _json_or_str(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _fsync_dir(directory: Path) -> None:
    """Make the rename durable; a no-op where directories cannot be opened (Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
