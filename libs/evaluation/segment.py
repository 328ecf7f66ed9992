"""TotalSegmentator on CT volumes, through its Python API, offline-safe (reused by preprocessing).

How the installed TotalSegmentator (2.x) finds its weights, read from its source:

* ``totalsegmentator.config.get_weights_dir()``: ``$TOTALSEG_WEIGHTS_PATH`` if set, else
  ``$TOTALSEG_HOME_DIR/nnunet/results``, else ``~/.totalsegmentator/nnunet/results``;
* each model is an nnU-Net v2 results folder named in ``map_tasks_config.TASK_ID_WEIGHTS_CONFIGS``,
  holding ``<trainer>__<plans>__3d_fullres/{plans.json, dataset.json, fold_0/checkpoint_final.pth}``;
* task ``total`` needs dataset 297 (3 mm) in fast mode or datasets 291–295 (1.5 mm) in full mode, plus
  dataset 298 (the rough 6 mm model, hard-coded in ``python_api.totalsegmentator``) whenever an ROI
  subset is given, because the image is first cropped around the requested organs.

TotalSegmentator downloads any missing folder on first use, and reports usage statistics over the
network.  Here nothing may reach the network, so :func:`prepare` checks every needed folder *before*
any work starts and raises :class:`SegmenterWeightsError` with one line saying where the weights are
looked for and how to install them; during a run the API's download function is replaced by a check
that refuses, and usage statistics are switched off (``send_usage_stats: false`` in TotalSegmentator's
``config.json``, and its sender replaced by a no-op).

torchvision: importing ``totalsegmentator.python_api`` does not import it, but nnU-Net resolves the
trainer class of a checkpoint by importing every module under ``nnunetv2.training.nnUNetTrainer``, one of
which imports ``timm`` → ``torchvision``, and torchvision cannot be imported beside the project's CPU
torch.  :func:`register_trainers` imports only the module that defines the needed trainer and hands it to
TotalSegmentator's table of known trainers, so nnU-Net never walks the others.
"""

from __future__ import annotations

import contextlib
import importlib
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from tqdm import tqdm

from ..cohort import Cohort
from ..labels import total_class_map
from ..manifest import Manifest, claim, file_hash, fingerprint, manifest_path, pending, read_manifest
from ..volumes import Volume, read_volume, write_volume
from .errors import EvaluationError, SegmenterWeightsError

TASK = "total"
PAPER_ROI = ("heart", "liver", "kidney_left", "kidney_right", "spleen")
CROP_TASK_ID = 298                      # python_api.totalsegmentator: roi_subset crop model (6 mm)
CROP_TRAINER = "nnUNetTrainer_4000epochs_NoMirroring"
PLANS = "nnUNetPlans"
CHECKPOINT = "checkpoint_final.pth"
SEGMENT_JOB = "segment"        # the manifest job of 3_Evaluations/1_segment.py (<cohort>/labels/manifest.json)
SEARCH_ORDER = ("TOTALSEG_WEIGHTS_PATH, else $TOTALSEG_HOME_DIR/nnunet/results, "
                "else ~/.totalsegmentator/nnunet/results")


@dataclass(frozen=True)
class ModelFolder:
    """One nnU-Net results folder TotalSegmentator will load."""

    task_id: int
    folder: str                 # dataset folder name, e.g. Dataset297_TotalSegmentator_total_3mm_1559subj
    trainer: str
    configuration: str
    folds: tuple[int, ...]


@dataclass(frozen=True)
class Segmenter:
    """A checked set-up: fast (3 mm) or full (1.5 mm) 'total' task, ROI subset (empty = all), device."""

    fast: bool
    roi: tuple[str, ...]
    device: str                 # TotalSegmentator's device string: cpu, gpu, gpu:N or mps


def weights_dir() -> Path:
    """The folder TotalSegmentator reads its nnU-Net results from (see the module docstring)."""
    from totalsegmentator.config import get_weights_dir

    return Path(get_weights_dir())


def required_models(fast: bool, roi: tuple[str, ...]) -> list[ModelFolder]:
    """The model folders a 'total' run with these options loads (from TotalSegmentator's own tables)."""
    from totalsegmentator.map_tasks_config import TASK_ID_WEIGHTS_CONFIGS
    from totalsegmentator.python_api import get_task_config

    cfg = get_task_config(TASK, fast=fast, quiet=True, plans=PLANS)
    ids = cfg["task_id"] if isinstance(cfg["task_id"], list) else [cfg["task_id"]]
    specs = [(tid, cfg["trainer"], cfg["model"], tuple(cfg["folds"])) for tid in ids]
    if roi:
        specs.append((CROP_TASK_ID, CROP_TRAINER, "3d_fullres", (0,)))
    out = []
    for tid, trainer, configuration, folds in specs:
        info = TASK_ID_WEIGHTS_CONFIGS[tid]
        folder = str(Path(info.get("rel_path") or "") / info["foldername"])
        out.append(ModelFolder(tid, folder, trainer, configuration, folds))
    return out


def missing_files(model: ModelFolder, root: Path) -> list[Path]:
    """Files of ``model`` absent under ``root`` (the dataset folder itself when it is absent)."""
    dataset = root / model.folder
    if not dataset.is_dir():
        return [dataset]
    model_dir = dataset / f"{model.trainer}__{PLANS}__{model.configuration}"
    needed = [model_dir / "plans.json", model_dir / "dataset.json"]
    needed += [model_dir / f"fold_{f}" / CHECKPOINT for f in model.folds]
    return [p for p in needed if not p.is_file()]


def _download_task_name(ids: set[int]) -> str:
    """The ``totalseg_download_weights -t`` task whose id list covers ``ids``."""
    from totalsegmentator.bin.totalseg_download_weights import TASK_TO_ID

    fits = [name for name, tids in TASK_TO_ID.items() if ids <= set(tids)]
    return min(fits, key=lambda n: len(TASK_TO_ID[n])) if fits else "total"


def check_weights(fast: bool, roi: tuple[str, ...]) -> None:
    """Raise :class:`SegmenterWeightsError` (one line) unless every needed model file is present."""
    root, models = weights_dir(), required_models(fast, roi)
    missing = [m for m in models if missing_files(m, root)]
    if not missing:
        return
    from totalsegmentator.config import get_version

    names = ", ".join(m.folder for m in missing)
    globbed = missing[0].folder if len(missing) == 1 else "{" + ",".join(m.folder for m in missing) + "}"
    partial = [str(p) for m in missing for p in missing_files(m, root) if p != root / m.folder]
    what = f"incomplete ({partial[0]} missing)" if partial else "not found"
    raise SegmenterWeightsError(
        f"TotalSegmentator weights for task '{TASK}' ({'fast, 3 mm' if fast else 'full, 1.5 mm'}) are {what}: "
        f"need {names} in {root} (looked up as {SEARCH_ORDER}; nothing is downloaded here). On a machine with "
        f"internet run `pip install TotalSegmentator=={get_version()} && totalseg_download_weights -t "
        f"{_download_task_name({m.task_id for m in models})}`, then copy ~/.totalsegmentator/nnunet/results/"
        f"{globbed} into {root} (or set TOTALSEG_WEIGHTS_PATH to a folder holding them).")


def totalsegmentator_version() -> str:
    """The installed TotalSegmentator's version (part of what made a label file)."""
    from totalsegmentator.config import get_version

    return str(get_version())


def choose_device(device: str = "auto") -> str:
    """TotalSegmentator's device string for ``device`` (auto, cpu, cuda, cuda:N, gpu, gpu:N, mps).

    ``auto`` picks the first CUDA GPU, else Apple MPS, else the CPU.  An unavailable device is an error.
    """
    import torch

    text = device.strip().lower()
    mps = bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()
    if text == "auto":
        return "gpu" if torch.cuda.is_available() else ("mps" if mps else "cpu")
    match = re.fullmatch(r"(cuda|gpu)(?::(\d+))?", text)
    if match:
        index = int(match.group(2) or 0)
        if not torch.cuda.is_available() or index >= torch.cuda.device_count():
            raise EvaluationError(f"--device {device}: no such CUDA device here (use auto or cpu)")
        return f"gpu:{index}"
    if text == "mps" and not mps:
        raise EvaluationError(f"--device {device}: Apple MPS is not available here")
    if text in ("cpu", "mps"):
        return text
    raise EvaluationError(f"--device {device!r}: expected auto, cpu, cuda, cuda:N or mps")


def check_roi(roi) -> tuple[str, ...]:
    """Validated ROI class names (empty tuple = every 'total' class); EvaluationError names a bad one."""
    known = total_class_map()
    roi = tuple(dict.fromkeys(r.strip() for r in roi if r.strip()))
    for name in roi:
        if name not in known:
            raise EvaluationError(f"--roi: {name!r} is not a TotalSegmentator 'total' class")
    return roi


def disable_usage_stats() -> None:
    """Create TotalSegmentator's config.json if needed and switch its usage statistics off."""
    from totalsegmentator.config import get_totalseg_dir, set_config_key, setup_totalseg

    get_totalseg_dir().mkdir(parents=True, exist_ok=True)
    setup_totalseg()
    set_config_key("send_usage_stats", False)
    set_config_key("statistics_disclaimer_shown", True)


def _trainer_module(name: str) -> str:
    """Dotted module under nnunetv2.training.nnUNetTrainer that defines class ``name`` (read as text)."""
    import nnunetv2

    base = Path(nnunetv2.__file__).parent
    pattern = re.compile(rf"^class {re.escape(name)}\(", re.MULTILINE)
    for path in sorted((base / "training" / "nnUNetTrainer").rglob("*.py")):
        if pattern.search(path.read_text(encoding="utf-8", errors="ignore")):
            return "nnunetv2." + ".".join(path.relative_to(base).with_suffix("").parts)
    raise EvaluationError(f"nnU-Net trainer {name!r} not found in {base}; is nnunetv2 installed fully?")


def register_trainers(names) -> None:
    """Import only the modules defining these nnU-Net trainers and register them with TotalSegmentator."""
    from totalsegmentator.config import setup_nnunet

    setup_nnunet()  # TotalSegmentator sets nnU-Net's paths before importing its nnunet module
    import totalsegmentator.nnunet as ts_nnunet

    for name in names:
        if name not in ts_nnunet.custom_trainers:
            module = importlib.import_module(_trainer_module(name))
            ts_nnunet.custom_trainers[name] = getattr(module, name)


def prepare(fast: bool = True, roi=PAPER_ROI, device: str = "auto") -> Segmenter:
    """Check ROI names and weights (before anything runs), pick the device, silence statistics, and
    register the trainers; returns the set-up :func:`segment_ct` takes."""
    roi = check_roi(roi)
    check_weights(fast, roi)
    seg = Segmenter(fast, roi, choose_device(device))
    disable_usage_stats()
    register_trainers(sorted({m.trainer for m in required_models(fast, roi)}))
    return seg


@contextlib.contextmanager
def offline_guard():
    """Within the block, TotalSegmentator can neither download weights nor send usage statistics."""
    import totalsegmentator.python_api as api

    saved = api.download_pretrained_weights, api.send_usage_stats

    def refuse_download(task_id) -> None:
        from totalsegmentator.map_tasks_config import TASK_ID_WEIGHTS_CONFIGS

        folder = TASK_ID_WEIGHTS_CONFIGS.get(task_id, {}).get("foldername", f"task {task_id}")
        if not (weights_dir() / folder).is_dir():
            raise SegmenterWeightsError(f"TotalSegmentator asked for {folder}, which is not in {weights_dir()} "
                                        "(nothing is downloaded here; install it from a connected machine)")

    api.download_pretrained_weights, api.send_usage_stats = refuse_download, lambda *args, **kwargs: None
    try:
        yield
    finally:
        api.download_pretrained_weights, api.send_usage_stats = saved


def segment_ct(ct_path: str | Path, segmenter: Segmenter) -> Volume:
    """Labels (uint8 'total' ids) of one CT file, on that CT's grid as :func:`libs.volumes.read_volume`
    returns it (RAS+ ``[x, y, z]``, the CT's affine)."""
    from totalsegmentator.python_api import totalsegmentator

    ct = read_volume(ct_path, "ct")
    with offline_guard():
        seg = totalsegmentator(nib.load(str(ct_path)), None, ml=True, fast=segmenter.fast, task=TASK,
                               roi_subset=list(segmenter.roi) or None, device=segmenter.device, quiet=True,
                               nr_thr_resamp=1, nr_thr_saving=1)
    canonical = nib.as_closest_canonical(seg)
    labels = np.asarray(canonical.dataobj).astype(np.uint8)
    if labels.shape != ct.shape or not np.allclose(canonical.affine, ct.affine, atol=1e-3):
        raise EvaluationError(f"{ct_path}: TotalSegmentator returned grid {labels.shape}, expected {ct.shape}")
    return Volume(labels, ct.affine)


@dataclass
class SegmentReport:
    """What a cohort segmentation did: written, skipped (already labelled) and failed subjects."""

    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    device: str = ""
    seconds: float = 0.0


def has_labels(cohort: Cohort, subject_id: str) -> bool:
    """True when the subject's label file reads to its end and has the CT's shape (resume check)."""
    try:
        labels = nib.load(str(cohort.path("labels", subject_id)))
        ct = nib.load(str(cohort.path("ct", subject_id)))
        np.asarray(labels.dataobj[..., -1])  # touches the end of the compressed stream
    except Exception:  # noqa: BLE001 - any failure means "segment this subject"
        return False
    return labels.shape == ct.shape


def segment_cohort(cohort_dir: str | Path, fast: bool = True, roi=PAPER_ROI, device: str = "auto",
                   overwrite: bool = False, progress: bool = True) -> SegmentReport:
    """Write ``labels/<id>.nii.gz`` for every CT of a cohort.

    Resumable: a subject is skipped when its labels are whole and ``labels/manifest.json`` says they were
    made from this very CT (content hash) with the same model, ROI and TotalSegmentator version; otherwise
    it is segmented again.  Labels this job did not write (a phantom's truth, preprocessing's) are refused
    unless ``overwrite``.  Weights are checked before the first subject; a failing subject is reported and
    the others go on.
    """
    cohort, report, start = Cohort(cohort_dir), SegmentReport(), time.perf_counter()
    if not cohort.demographics_path.is_file():
        raise EvaluationError(f"{cohort.demographics_path}: not found; is {cohort_dir} a cohort directory?")
    roi = check_roi(roi)
    choose_device(device)                             # a bad --device is refused even when nothing is to do
    labels_dir = cohort.root / "labels"
    found = manifest_path(labels_dir, folder=True)
    manifest = read_manifest(found, SEGMENT_JOB) or Manifest(found, SEGMENT_JOB)      # read only until the check
    settings = {"fast": fast, "roi": sorted(roi), "totalsegmentator": totalsegmentator_version()}
    keyed = {d.subject_id: fingerprint({"ct": file_hash(cohort.path("ct", d.subject_id)), **settings})
             for d in cohort.demographics()}
    report.skipped, todo = pending(keyed, manifest, lambda sid: has_labels(cohort, sid), overwrite)
    if not todo:
        report.seconds = time.perf_counter() - start
        return report
    segmenter = prepare(fast, roi, device)            # weights checked before anything is written
    manifest = claim(labels_dir, SEGMENT_JOB, folder=True, overwrite=overwrite)
    report.device = segmenter.device
    for sid in tqdm(todo, desc="TotalSegmentator", unit="subj", disable=not progress):
        try:
            manifest.forget(sid)
            labels = segment_ct(cohort.path("ct", sid), segmenter)
            write_volume(cohort.path("labels", sid), labels.array, labels.affine, "labels")
            manifest.record(sid, keyed[sid])
            report.written.append(sid)
        except SegmenterWeightsError:
            raise
        except Exception as exc:  # noqa: BLE001 - one subject's failure is reported, the others go on
            report.failed[sid] = f"{type(exc).__name__}: {exc}"
    report.seconds = time.perf_counter() - start
    return report
