"""Inference: trained checkpoints + a demographics CSV → a synthetic cohort directory.

Per subject the sampler starts from noise drawn from the subject's own seed (derived from the job seed
and the subject id), so subject k gets the same noise and seeds on its own, in any batch and on any row of any
CSV; its volumes agree across batch sizes up to the floating-point differences of batched network arithmetic
(not bit for bit).  Jobs resume onto their own outputs only (see :func:`run_job`), and a failing row is
reported without stopping the others.
"""

from __future__ import annotations

import json
import os
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from tqdm import tqdm

from . import training
from .channels import ChannelError, ChannelSet
from .checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    load_safetensors_weights,
    safetensors_metadata,
    sha256_file,
    versions,
)
from .cohort import Cohort
from .config import load_config
from .demographics import Demographics, encode_many, read_demographics_rows
from .diffusion import make_denoiser
from .ema import PowerFunctionEMA
from .files import atomic_write_text
from .intensity import CT_BACKGROUND_HU, unit_to_ct, unit_to_suv
from .lowres import LowresConfig, SampleConfig, Standardize, demographic_input, expand_cond, lowres_cond_channels
from .manifest import ManifestError, claim, fingerprint
from .samplers import guided, initial_noise, per_sample_generators
from .volumes import centered_affine


@dataclass
class Model:
    """A loaded stage: its denoiser (EMA weights by default; a flow model as its exact denoiser), config and
    provenance."""

    denoiser: torch.nn.Module
    config: LowresConfig
    path: Path
    sha256: str
    step: int
    standardize: Standardize
    normalization: dict = field(default_factory=dict)    # the checkpoint's record (channels, demographic scaling)

    @property
    def channels(self) -> ChannelSet:
        return ChannelSet.from_record(self.normalization)

    @property
    def objective(self) -> str:
        return self.config.diffusion.objective


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint file, or the newest valid checkpoint of a run folder."""
    path = Path(path)
    if path.is_dir():
        found = latest_checkpoint(path)
        if found is None:
            raise FileNotFoundError(f"{path}: no checkpoint (ckpt-*.pt) in this run folder")
        return found
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    return path


def read_stage_file(path: Path, stage: str) -> dict:
    """A training checkpoint, or exported weights (``*.safetensors``, :func:`export_stage_safetensors`: EMA weights
    already, so no separate EMA) of ``stage``, as a checkpoint-like dict (config, model, normalization, step)."""
    if path.suffix != ".safetensors":
        return load_checkpoint(path, map_location="cpu")
    tensors, meta = load_safetensors_weights(path)
    if meta.get("format") != "totalgen-unet":
        raise CheckpointError(f"{path}: not TotalGen exported weights (no 'format': 'totalgen-unet' in its metadata)")
    if meta.get("stage") != stage:
        raise CheckpointError(f"{path}: holds {meta.get('stage')!r} weights, this is the {stage} stage")
    return {"config": meta.get("config"), "model": tensors, "normalization": meta.get("normalization"),
            "step": meta.get("step"), "ema": None}


def stage_source(runs: str | os.PathLike, stage: str) -> Path:
    """Where a folder of trained stages keeps ``stage``: its run folder ``runs/<stage>`` (training checkpoints)
    or its exported weights ``runs/<stage>.safetensors`` (e.g. ``Resource/demo_weights``)."""
    runs = Path(runs)
    if (runs / stage).is_dir() and latest_checkpoint(runs / stage) is not None:
        return runs / stage
    if (runs / f"{stage}.safetensors").is_file():
        return runs / f"{stage}.safetensors"
    raise FileNotFoundError(f"{runs}: neither a {stage}/ run folder with checkpoints nor {stage}.safetensors")


def stage_channels(stage: str, norm: dict) -> tuple[int, int]:
    """(input channels, conditioning channels) of a stage's network, from its checkpoint's normalization record."""
    from .superres import sr_cond_channels
    channels = ChannelSet.from_record(norm)
    return channels.count, (sr_cond_channels(channels, bool(norm.get("lr_anchors"))) if stage == "superres"
                            else lowres_cond_channels(norm))


def load_stage(path: str | os.PathLike, config_cls, stage: str, device: torch.device, ema: bool,
               compile: bool = False):
    """Checkpoint (``weights_only``; a run folder means its newest) of ``stage`` ('lowres' / 'superres') →
    (path, checkpoint, config, network in eval mode on ``device``, holding the first EMA's weights unless
    ``ema`` is False).  The network's channels follow the channel set the checkpoint records.  On CUDA the
    network is in channels-last 3-D layout; ``compile`` wraps it in ``torch.compile``."""
    path = resolve_checkpoint(path)
    ckpt = read_stage_file(path, stage)
    for key in ("config", "model", "normalization", "step"):
        if key not in ckpt:
            raise CheckpointError(f"{path}: not a complete TotalGen checkpoint (no {key!r})")
    cfg = load_config(ckpt["config"], config_cls, origin=f"{path} (config)")
    try:
        in_channels, cond_channels = stage_channels(stage, ckpt["normalization"])
    except ChannelError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    net = cfg.model.build(in_channels=in_channels, cond_channels=cond_channels)
    net = load_weights(net, ckpt, cfg.loop.ema_sigma_rels, path, ema, device)
    return path, ckpt, cfg, torch.compile(net) if compile else net


def load_weights(net: torch.nn.Module, ckpt: dict, ema_sigma_rels, path, ema: bool,
                 device: torch.device) -> torch.nn.Module:
    """A checkpoint-like dict's weights into ``net`` (its first EMA's unless ``ema`` is False, or when it has none),
    in eval mode on ``device``; weights that do not fit the network are refused with one line naming ``path``."""
    try:
        net.load_state_dict(ckpt["model"])
        if ema and ckpt.get("ema"):
            averaged = PowerFunctionEMA(net, ema_sigma_rels)
            averaged.load_state_dict(ckpt["ema"])
            averaged.copy_to(net)
    except (RuntimeError, ValueError, KeyError, TypeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[-1].strip()
        raise CheckpointError(f"{path}: its weights do not fit the network its config describes ({first})") from None
    return net.eval().to(device, memory_format=training.memory_format(device))


def check_recorded_objective(path, norm: dict, objective: str) -> None:
    """The objective a checkpoint's record names (none: edm, older checkpoints) must be its config's."""
    recorded = norm.get("objective", "edm")
    if recorded != objective:
        raise CheckpointError(f"{path}: its record says the {recorded} objective but its config says {objective}; "
                              f"the file is inconsistent")


def load_lowres_model(path: str | os.PathLike, device: torch.device, ema: bool = True,
                      compile: bool = False) -> Model:
    """Load a low-resolution checkpoint (``weights_only``; a run folder means its newest checkpoint) and
    build its network in eval mode (``compile``: under ``torch.compile``)."""
    path, ckpt, cfg, net = load_stage(path, LowresConfig, "lowres", device, ema, compile)
    std = Standardize.from_record(ckpt["normalization"], cfg.diffusion.sigma_data)
    check_recorded_objective(path, ckpt["normalization"], cfg.diffusion.objective)
    denoiser = make_denoiser(net, cfg.diffusion.objective, cfg.diffusion.sigma_data)
    return Model(denoiser, cfg, Path(path), sha256_file(path), int(ckpt["step"]), std,
                 ckpt["normalization"])


def subject_seed(seed: int, subject_id: str, stage: int = 0) -> int:
    """The sampling seed of one subject and stage (0 low-res, 1 super-res): a function of the job seed and
    the subject id only."""
    entropy = [int(seed), zlib.crc32(subject_id.encode())] + ([stage] if stage else [])
    return int(np.random.SeedSequence(entropy).generate_state(1)[0] % 2**31)


@torch.no_grad()
def sample_lowres(model: Model, records: list[Demographics], seeds: list[int], sample: SampleConfig,
                  device: torch.device, progress: bool = False) -> torch.Tensor:
    """Low-resolution samples (B, C, X, Y, Z) in [0, 1] for ``records`` (the model's channel set: CT, PET and
    any one-hot label channels)."""
    shape = model.config.sample_shape
    demo = torch.from_numpy(encode_many(records))
    cond = expand_cond(demographic_input(demo, model.normalization), shape).to(device)
    denoiser = model.denoiser
    if sample.guided:        # the model's "no demographics" input for classifier-free guidance
        none = expand_cond(demographic_input(demo, model.normalization, given=False), shape).to(device)
        denoiser = guided(model.denoiser, none, sample.guidance, sample.guidance_sigma)
    sigmas = sample.sigmas(sample.sigma_max, device=device)
    x = initial_noise((model.channels.count, *shape), seeds, sample.sigma_max, device=device)
    gens = per_sample_generators(seeds, stream=1, device=device) if sample.churn > 0 else None
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else _null()
    with autocast:
        x = sample.solve(denoiser, x, sigmas, cond, model.objective, gens, progress)
    return model.standardize.from_net(x.float()).clamp(0.0, 1.0)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


AIR_THRESHOLD_HU = -400.0      # below this, connected to the slice border: air outside the body


def restore_background(ct_hu: np.ndarray) -> np.ndarray:
    """Set air outside the body to −1000 HU: voxels below −400 HU connected, within each axial slice, to the
    slice border.  Generated CT lives in the paper's [−500, 500] HU window, so air sits at its −500 HU floor
    plus the sampler's residual noise; −400 HU (a common air / lung mask threshold) keeps that noise out of
    the body while no tissue at the body surface (skin, fat ≈ −100 HU) is that dark.  Air inside the body
    (lungs, bowel gas) is not connected to the border and stays in the window."""
    out = ct_hu.copy()
    low = ct_hu < AIR_THRESHOLD_HU
    for k in range(ct_hu.shape[2]):
        lab, n = ndimage.label(low[:, :, k])
        if n == 0:
            continue
        border = np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]]))
        out[:, :, k][np.isin(lab, border[border > 0])] = CT_BACKGROUND_HU
    return out


def decode_labels(u: torch.Tensor, channels: ChannelSet) -> np.ndarray | None:
    """One sample (C, X, Y, Z) → its label map as uint8 TotalSegmentator ids (None for a CT + PET model)."""
    if not channels.has_labels:
        return None
    return channels.to_total_ids(channels.decode(u[channels.labels].float().cpu()).numpy())


def labels_meta(channels: ChannelSet) -> dict:
    """What a generated subject's sidecar says about its labels."""
    if not channels.has_labels:
        return {}
    return {"labels": {"source": "generated", "encoding": "one-hot channels decoded by argmax",
                       "groups": channels.record()["label_groups"]}}


def to_physical(u: torch.Tensor, demo: Demographics, cfg: LowresConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One sample (C, X, Y, Z) in [0, 1] → CT (HU), SUV and the RAS+ affine of its true grid.

    In-plane voxels are ``in_plane_mm × factor`` (8 mm for the paper); the z axis spans the body length
    predicted from height by the height law, so z spacing = length / slices."""
    ct = restore_background(unit_to_ct(u[0].cpu().numpy()))
    suv = unit_to_suv(u[1].cpu().numpy()).astype(np.float32)
    shape = ct.shape
    xy = cfg.in_plane_mm * cfg.data.grid[0] / shape[0]
    dz = cfg.height_law.length_mm(demo.height_m) / shape[2]
    return ct, suv, centered_affine(shape, (xy, xy, dz))


@dataclass
class JobReport:
    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0


def _meta(demo: Demographics, seed: int, sample: SampleConfig, model: Model, extra: dict) -> dict:
    return {"subject_id": demo.subject_id, "demographics": asdict(demo), "seed": seed,
            "sampler": {**asdict(sample), "ode_space": sample.space(model.objective)},
            "checkpoints": {"lowres": {"path": str(model.path), "sha256": model.sha256, "step": model.step,
                                       "objective": model.objective}},
            "versions": versions(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **extra}


def _pending(cohort: Cohort, records: list[Demographics], prints: dict[str, str], overwrite: bool,
             report: JobReport, labels: bool = False) -> list[Demographics]:
    """Subjects to (re)generate: all with ``overwrite``; else those not complete under the job's own
    fingerprint.  A subject whose sidecar records another fingerprint (other demographics, seeds, settings or
    checkpoints) is refused with one line rather than silently kept or replaced."""
    todo, foreign = [], []
    for d in records:
        recorded = _recorded_fingerprint(cohort, d.subject_id)
        if recorded == prints[d.subject_id] and not overwrite and cohort.is_complete(d.subject_id, labels=labels):
            report.skipped.append(d.subject_id)
        elif recorded is None or recorded == prints[d.subject_id] or overwrite:
            todo.append(d)                   # new, or this job's own unfinished / truncated subject
        else:
            foreign.append(d.subject_id)
    if foreign:
        more = f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else ""
        raise ManifestError(f"{cohort.path('meta', foreign[0])}: subject {foreign[0]}{more} was generated from "
                            "other demographics, seeds, sampler settings or checkpoints; pass --overwrite to "
                            "regenerate, or choose another --out")
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    return todo[rank::world]


def _recorded_fingerprint(cohort: Cohort, subject_id: str) -> str | None:
    """The fingerprint a subject's meta sidecar records, "" for a sidecar without one, None without a sidecar."""
    path = cohort.path("meta", subject_id)
    if not path.is_file():
        return None
    try:
        return str(json.loads(path.read_text(encoding="utf-8")).get("fingerprint", ""))
    except (OSError, UnicodeError, ValueError, AttributeError):
        return ""


def _check_input_outside(demographics_csv: str | os.PathLike, cohort: Cohort) -> None:
    """The job rewrites ``<out>/demographics.csv``: it must not be the user's input file."""
    src, dst = Path(demographics_csv), cohort.demographics_path
    if dst.exists() and src.exists() and os.path.samefile(src, dst):
        raise ManifestError(f"{src}: is the output's own demographics.csv, which the job rewrites; keep the input "
                            "CSV outside --out")


def pick_device(device: str) -> torch.device:
    """The generation device (see :func:`libs.training.pick_device`: the same names, the same checks)."""
    return training.pick_device(device)


def run_job(demographics_csv: str | os.PathLike, out: str | os.PathLike, batch: int, overwrite: bool,
            previews: bool, progress: bool, produce, provenance, labels: bool = False,
            overlap_writes: bool = False) -> JobReport:
    """The cohort-job loop shared by low-res and cascade generation.

    ``produce(chunk)`` yields ``(demo, result)`` per subject of a chunk of up to ``batch`` subjects, where
    ``result`` is ``(ct_hu, suv, affine, meta, labels | None)`` or the exception that subject failed with.
    ``provenance(demo)`` describes everything a subject's volumes depend on (demographics, seeds, sampler
    settings, checkpoint hashes); its :func:`libs.manifest.fingerprint` is stored in the subject's meta
    sidecar, which is written last (the completion marker).  The output folder is claimed first
    (:func:`libs.manifest.claim`): a folder this job did not create is refused.  Complete subjects with the
    job's fingerprint are skipped, subjects made otherwise are refused, bad CSV rows and failures are
    reported, and each subject is written atomically.
    """
    start, report = time.perf_counter(), JobReport()
    records, bad_rows = read_demographics_rows(demographics_csv)
    for msg in bad_rows:
        report.failed[msg.split(": ", 1)[0]] = msg
    cohort = Cohort(out)
    _check_input_outside(demographics_csv, cohort)
    prints = {d.subject_id: fingerprint(provenance(d)) for d in records}
    main = int(os.environ.get("RANK", "0")) == 0
    claim(out, "generate", folder=True, overwrite=overwrite and main)
    todo = _pending(cohort, records, prints, overwrite, report, labels)
    if main and records:
        cohort.write_demographics(records)
    bar = tqdm(total=len(todo), desc="generating", unit="subj", disable=not progress or not todo)
    # overlap_writes (sampling on a GPU): one writer thread compresses a subject's NIfTI files and draws its
    # preview while the next subject is sampled (at most one subject waits, so memory stays bounded). On a CPU the
    # sampler's threads already use every core and a writer beside them slowed generation (64 bench subjects:
    # 14.9 min with it, 12.3 min without), so there each subject is written before the next is sampled.
    writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="totalgen-writer") if overlap_writes else None
    writing = None
    try:
        for i in range(0, len(todo), batch):
            chunk, done = todo[i:i + batch], set()
            try:
                for demo, result in produce(chunk):
                    done.add(demo.subject_id)
                    if not isinstance(result, Exception):
                        result = (*result[:3], {**result[3], "fingerprint": prints[demo.subject_id]}, *result[4:])
                    if writing is not None:
                        writing.result()
                    if writer is None:
                        _record(report, cohort, demo, result, previews)
                    else:
                        writing = writer.submit(_record, report, cohort, demo, result, previews)
                    bar.update()
            except Exception as exc:  # noqa: BLE001 - report the rest of the chunk, go on with the next one
                for d in chunk:
                    if d.subject_id not in done:
                        report.failed[d.subject_id] = f"sampling failed: {type(exc).__name__}: {exc}"
                        bar.update()
    finally:
        if writing is not None:
            writing.result()
        if writer is not None:
            writer.shutdown()
    bar.close()
    report.seconds = time.perf_counter() - start
    return report


def _record(report: JobReport, cohort: Cohort, demo: Demographics, result, previews: bool) -> None:
    if isinstance(result, Exception):
        report.failed[demo.subject_id] = f"{type(result).__name__}: {result}"
        return
    try:
        write_result(cohort, demo, *result, previews=previews)
        report.written.append(demo.subject_id)
    except Exception as exc:  # noqa: BLE001
        report.failed[demo.subject_id] = f"{type(exc).__name__}: {exc}"


def write_result(cohort: Cohort, demo: Demographics, ct: np.ndarray, suv: np.ndarray, affine: np.ndarray,
                 meta: dict, labels: np.ndarray | None = None, previews: bool = True) -> None:
    """Write one generated subject: volumes (and labels), preview, then the meta sidecar (marks the subject
    complete)."""
    spacing = tuple(float(v) for v in np.linalg.norm(affine[:3, :3], axis=0))
    cohort.write_subject(demo.subject_id, ct, suv, affine, labels=labels, meta=None)
    if previews:
        from .previews import preview_sheet
        preview_sheet(cohort.path("previews", demo.subject_id), demo, ct, suv, spacing, labels=labels)
    meta = {**meta, "shape": list(ct.shape), "spacing_mm": list(spacing)}
    atomic_write_text(cohort.path("meta", demo.subject_id), json.dumps(meta, indent=2) + "\n")


def generate_lowres_cohort(lowres: str | os.PathLike, demographics_csv: str | os.PathLike,
                           out: str | os.PathLike, seed: int = 0, sample: SampleConfig | None = None,
                           batch: int = 4, device: str = "auto", ema: bool = True, previews: bool = True,
                           overwrite: bool = False, progress: bool = True, compile: bool = False) -> JobReport:
    """Sample a low-resolution synthetic cohort (CT HU, SUV on the 8 mm grid) into ``out`` (``compile``: the
    network under ``torch.compile``)."""
    dev = pick_device(device)
    model = load_lowres_model(lowres, dev, ema=ema, compile=compile)
    sample = sample or model.config.sample

    def produce(chunk):
        seeds = [subject_seed(seed, d.subject_id) for d in chunk]
        u = sample_lowres(model, chunk, seeds, sample, dev)
        for d, s, ui in zip(chunk, seeds, u):
            ct, suv, affine = to_physical(ui, d, model.config)
            meta = _meta(d, s, sample, model, {"stage": "lowres", **labels_meta(model.channels)})
            yield d, (ct, suv, affine, meta, decode_labels(ui, model.channels))

    def provenance(d: Demographics) -> dict:
        return {"stage": "lowres", "demographics": asdict(d), "seed": subject_seed(seed, d.subject_id),
                "sampler": asdict(sample), "lowres": model.sha256, "ema": ema}

    return run_job(demographics_csv, out, batch, overwrite, previews, progress, produce, provenance,
                   labels=model.channels.has_labels, overlap_writes=dev.type == "cuda")


def export_stage_safetensors(ckpt: str | os.PathLike, out: str | os.PathLike, ema: bool = True,
                             provenance: dict | None = None) -> Path:
    """Export a stage's network weights (the first EMA by default) as a plain UNet state_dict in
    safetensors, with the stage, resolved config, normalization constants, step, source sha256 and
    ``provenance`` (e.g. the command that trained it) as JSON metadata — loadable with
    ``safetensors.torch.load_file`` and ``UNet.load_state_dict``, and as a fine-tune start (``loop.init_from``)."""

    from .superres import SRConfig
    path = resolve_checkpoint(ckpt)
    raw = load_checkpoint(path)
    if "segment" in raw["config"]:                       # a label stage (libs/labelstage.py)
        from .labelstage import STAGE, load_label_model
        stage, loaded = STAGE, load_label_model(path, "cpu", ema)
        cfg, net = loaded.config, loaded.net
    else:
        stage = "superres" if "lowres_config" in raw["config"] else "lowres"
        cls = SRConfig if stage == "superres" else LowresConfig
        _, _, cfg, net = load_stage(path, cls, stage, torch.device("cpu"), ema)
    meta = {"format": "totalgen-unet", "stage": stage, "weights": "ema" if ema else "model",
            "step": int(raw["step"]), "ema_sigma_rel": cfg.loop.ema_sigma_rels[0] if ema else None,
            "config": raw["config"], "normalization": raw["normalization"], "versions": raw["versions"],
            "source_checkpoint": path.name, "source_sha256": sha256_file(path), "provenance": provenance or {}}
    return _write_stage_safetensors(out, net.state_dict(), meta)


def _write_stage_safetensors(out: str | os.PathLike, tensors: dict, meta: dict) -> Path:
    """Atomically write ``tensors`` with ``meta`` (each value JSON-encoded) as safetensors."""
    import safetensors.torch

    from .files import atomic_path
    with atomic_path(out) as tmp:
        safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
                                    metadata={k: json.dumps(v) for k, v in meta.items()})
    return Path(out)


def set_sampler_defaults(weights: str | os.PathLike, preset: str | os.PathLike, out: str | os.PathLike,
                         made_by: str) -> Path:
    """Copy exported weights (:func:`export_stage_safetensors`) to ``out`` with the ``sample:`` section of their
    recorded config — the sampler that generation uses unless told otherwise — replaced by ``preset``'s.

    The tensors are copied unchanged: the sampler is an inference setting, so a better one measured later does not
    need a retrained network. Provenance keeps the earlier sampler and names ``preset`` and ``made_by``; a file that
    already records this sampler is left as it is when ``out`` is the file itself. Refuses a
    preset of the other stage, or one whose network or diffusion differ from the weights'."""
    from .checkpoint import CheckpointError, load_safetensors_weights
    from .config import ConfigError, to_dict
    from .superres import SRConfig
    tensors, meta = load_safetensors_weights(weights)
    stage = meta.get("stage")
    if meta.get("format") != "totalgen-unet" or stage not in ("lowres", "superres"):
        raise CheckpointError(f"{weights}: not a TotalGen exported stage (1_Trainings/export_safetensors.py)")
    cls = SRConfig if stage == "superres" else LowresConfig
    try:
        new = load_config(preset, cls)
    except ConfigError as exc:
        raise ConfigError(f"{preset}: not a {stage} preset like {weights}'s ({exc})") from None
    recorded = load_config(meta["config"], cls)
    for key in ("model", "diffusion"):
        if to_dict(getattr(new, key)) != to_dict(getattr(recorded, key)):
            raise ConfigError(f"{preset}: its '{key}' differs from the one {weights} was trained with")
    previous = meta["config"].get("sample")
    if to_dict(recorded.sample) == to_dict(new.sample) and Path(out).resolve() == Path(weights).resolve():
        return Path(out)                                  # already this sampler: the file stays as it is
    meta["config"] = {**meta["config"], "sample": to_dict(new.sample)}
    meta["provenance"] = {**meta.get("provenance", {}), "sampler_from": str(preset), "sampler_set_by": made_by,
                          "sampler_before": previous}
    return _write_stage_safetensors(out, tensors, meta)


def load_init_weights(path: str | os.PathLike, stage: str, net: torch.nn.Module) -> dict:
    """Load an exported stage (:func:`export_stage_safetensors`) into ``net``; returns its normalization record.

    Refuses a file of the other stage or of another architecture with one line naming the file."""
    from .checkpoint import CheckpointError, load_safetensors_weights
    from .superres import REPO_ROOT
    path = Path(path)
    if not path.is_file() and (REPO_ROOT / path).is_file():
        path = REPO_ROOT / path
    tensors, meta = load_safetensors_weights(path)
    if meta.get("stage") != stage:
        raise CheckpointError(f"{path}: holds {meta.get('stage')!r} weights, this is the {stage} stage")
    try:
        net.load_state_dict(tensors)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[1:2] or [str(exc)]
        raise CheckpointError(f"{path}: does not fit this stage's network ({first[0].strip()})") from None
    return meta["normalization"]


def find_stage_checkpoints(model_dir: str | os.PathLike) -> tuple[Path, Path | None, list[str]]:
    """The newest low-res and super-res checkpoints under ``model_dir`` (searched recursively), or exported
    weights (``*.safetensors`` of :func:`export_stage_safetensors`, e.g. ``Resource/demo_weights``).

    A run folder is a super-resolution run when its config names a ``lowres_config``; exported weights say
    their stage in their metadata.  Training checkpoints are preferred over exported weights.  Returns
    (lowres, superres or None, messages saying what was taken); raises FileNotFoundError naming the folder
    when no low-resolution checkpoint is found."""
    root = Path(model_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: --model_dir is not a folder")
    found: dict[str, list[Path]] = {"lowres": [], "superres": []}
    for ckpt, cfg in _run_configs(root):
        if "segment" in cfg:
            continue                                     # a label stage (find_label_stage)
        found["superres" if "lowres_config" in cfg else "lowres"].append(ckpt)
    for weights in sorted(root.rglob("*.safetensors")):
        meta = safetensors_metadata(weights)
        stage = meta.get("stage") if meta.get("format") == "totalgen-unet" else None
        if stage in found and not any(p.suffix == ".pt" for p in found[stage]):
            found[stage].append(weights)
    if not found["lowres"]:
        raise FileNotFoundError(f"{root}: no low-resolution checkpoint (ckpt-*.pt in a low-res run folder, or "
                                f"exported lowres weights *.safetensors) found")
    pick = {k: max(v, key=lambda p: p.stat().st_mtime) if v else None for k, v in found.items()}
    msgs = [f"low-res checkpoint: {pick['lowres']}" + (f" (newest of {len(found['lowres'])} runs)"
                                                       if len(found["lowres"]) > 1 else "")]
    msgs.append(f"super-res checkpoint: {pick['superres']}" if pick["superres"] else
                f"no super-resolution checkpoint under {root}: running the low-res stage only")
    return pick["lowres"], pick["superres"], msgs


def find_label_stage(model_dir: str | os.PathLike) -> Path | None:
    """The newest label stage under ``model_dir`` (a run folder whose config has a ``segment`` section, or exported
    ``labels`` weights), training checkpoints first; None when there is none."""
    root = Path(model_dir)
    runs = [ckpt for ckpt, cfg in _run_configs(root) if "segment" in cfg]
    if not runs:
        runs = [w for w in sorted(root.rglob("*.safetensors"))
                if (m := safetensors_metadata(w)).get("format") == "totalgen-unet" and m.get("stage") == "labels"]
    return max(runs, key=lambda p: p.stat().st_mtime) if runs else None


def _run_configs(root: Path):
    """(newest checkpoint, config dict) of every run folder under ``root``: its config.yaml, else the checkpoint's."""
    import yaml
    for run in sorted({p.parent for p in root.rglob("ckpt-*.pt")}):
        ckpt = latest_checkpoint(run)
        if ckpt is None:
            continue
        cfg_file = run / "config.yaml"
        cfg = yaml.safe_load(cfg_file.read_text()) if cfg_file.is_file() else load_checkpoint(ckpt)["config"]
        yield ckpt, cfg or {}
