"""The full cascade: demographics → low-resolution sample → residual super-resolution over the whole
volume (overlapping blended windows) → body length restored from height → CT (HU) and SUV on the 2 mm grid.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .channels import ChannelSet
from .checkpoint import sha256_file
from .demographics import Demographics
from .diffusion import make_denoiser
from .generate import (
    Model,
    _meta,
    check_recorded_objective,
    decode_labels,
    labels_meta,
    load_lowres_model,
    load_stage,
    pick_device,
    restore_background,
    run_job,
    sample_lowres,
    subject_seed,
)
from .intensity import unit_to_ct, unit_to_suv
from .lowres import HeightLaw, SampleConfig, Standardize, standardize_demographics
from .samplers import initial_noise, per_sample_generators
from .superres import (
    AUG_CHANNEL_SCALE,
    SRConfig,
    SRSampleConfig,
    WindowConfig,
    check_pairing,
    residual_scaling,
)
from .training import memory_format
from .volumes import centered_affine
from .windows import WindowPlan, anchor_mask, anchored_upsample, position_channels, upsample


@dataclass
class SRModel:
    denoiser: torch.nn.Module
    config: SRConfig
    normalization: dict
    standardize: Standardize
    sigma_data: float
    path: Path
    sha256: str
    step: int

    @property
    def grid(self) -> tuple[int, int, int]:
        return tuple(self.normalization["grid"])

    @property
    def factor(self) -> int:
        return int(self.normalization["factor"])

    @property
    def channels(self) -> ChannelSet:
        return ChannelSet.from_record(self.normalization)

    @property
    def objective(self) -> str:
        return self.config.diffusion.objective

    @property
    def anchors(self) -> bool:
        """Trained with LR anchors (``data.lr_anchors``; absent in older checkpoints: off)."""
        return bool(self.normalization.get("lr_anchors", False))

    @property
    def residual(self) -> Standardize:
        """Standardized residual ↔ network residual (per-channel SD σ_data)."""
        return residual_scaling(self.normalization)


def load_sr_model(path: str | os.PathLike, device: torch.device, ema: bool = True, compile: bool = False) -> SRModel:
    """Load a super-resolution checkpoint (``weights_only``; a run folder means its newest checkpoint;
    ``compile``: the network under ``torch.compile``)."""
    path, ckpt, cfg, net = load_stage(path, SRConfig, "superres", device, ema, compile)
    norm = ckpt["normalization"]
    residual_scaling(norm)                           # refuse checkpoints without per-channel residual scales
    sigma = float(norm["sigma_data"])
    check_recorded_objective(path, norm, cfg.diffusion.objective)
    denoiser = make_denoiser(net, cfg.diffusion.objective, sigma)
    return SRModel(denoiser, cfg, norm, Standardize.from_record(norm, float(norm["net_sigma"])), sigma,
                   path, sha256_file(path), int(ckpt["step"]))


@torch.no_grad()
def sample_sr(model: SRModel, lr_u: torch.Tensor, demo: Demographics, seed: int, sample: SRSampleConfig,
              window: WindowConfig, device: torch.device, progress: bool = False) -> torch.Tensor:
    """One subject: LR sample (C, x, y, z) in [0, 1] → full-grid volume (C, X, Y, Z) in [0, 1] (C: the channel
    set the two stages share: CT, PET and any one-hot label channels).

    Every denoiser evaluation covers the whole grid with overlapping windows, ``window.batch`` at a time; the
    windows' blend weights and conditioning are computed once for the subject (:class:`WindowPlan`; at the paper
    size that holds ~1.6 GB on the device).
    """
    grid, f = model.grid, model.factor
    lr_u = lr_u.float()
    if model.channels.has_labels and sample.lr_labels == "onehot":
        # the SR stage was trained on exact one-hot LR labels: give it the generated LR's decoded labels in that
        # form, not the LR sampler's soft channel values
        lr_u = torch.cat([lr_u[model.channels.image], model.channels.one_hot(model.channels.decode(
            lr_u[model.channels.labels]))])
    lr_net = model.standardize.to_net(lr_u[None].to(device))
    offset = anchor_offset(seed, f) if model.anchors else None

    def up_fn(lr):
        return upsample(lr, f) if offset is None else anchored_upsample(lr, f, offset)

    up_clean = up_fn(lr_net)                                                             # (1, C, X, Y, Z)
    up = up_clean
    if sample.cond_noise > 0:                  # conditioning augmentation at a fixed level (its own stream)
        noise = torch.randn(lr_net.shape[1:], generator=per_sample_generators([seed], stream=2)[0])
        up = up_fn(lr_net + sample.cond_noise * noise[None].to(device))
    demo_vec = standardize_demographics(torch.from_numpy(demo.encode()), model.normalization).to(device)
    size = list(window.size or model.config.data.patch)
    level = sample.cond_noise / AUG_CHANNEL_SCALE

    def cond_fn(start, win):
        sl = tuple(slice(s, s + w) for s, w in zip(start, win))
        const = demo_vec[:, None, None, None].expand(-1, *win)
        parts = [up[0][(slice(None), *sl)], const, position_channels(start, win, grid, device),
                 torch.full((1, *win), level, device=device)]
        if offset is not None:
            parts.append(anchor_mask(start, win, f, offset, device))
        return torch.cat(parts)

    # windows, blend weights and every window's conditioning: once per subject, not once per denoiser call
    plan = WindowPlan(grid, size, window.overlap, window.batch, cond_fn, device, memory_format(device))

    def full_denoiser(x, sigma, _cond):
        return plan.denoise(model.denoiser, x, sigma)

    sigma_max = sample.sigma_max_ratio * model.sigma_data
    sigmas = sample.sigmas(sigma_max, device=device)
    x = initial_noise((lr_net.shape[1], *grid), [seed], sigma_max, device=device)
    gens = per_sample_generators([seed], stream=1, device=device) if sample.churn > 0 else None
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else _NullContext()
    with autocast:
        residual = sample.solve(full_denoiser, x, sigmas, None, model.objective, gens, progress)
    residual = model.residual.from_net(residual.float())
    if offset is not None:                     # the anchors are the LR sample itself: residual exactly 0
        residual = residual * (1.0 - anchor_mask((0, 0, 0), grid, f, offset, device))
    return model.standardize.from_net(up_clean + residual)[0].clamp(0.0, 1.0)


def anchor_offset(seed: int, factor: int) -> tuple[int, int, int]:
    """The polyphase offset a generated LR sample is taken to have (LR anchors): drawn from the subject's seed
    (its own stream), so every offset the SR stage was trained on occurs, reproducibly."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 3]))
    return tuple(int(v) for v in rng.integers(factor, size=3))


class _NullContext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def restore_length(u: torch.Tensor, height_m: float, law: HeightLaw,
                   voxel_mm: float) -> tuple[torch.Tensor, np.ndarray]:
    """Resample the z axis of (C, X, Y, Z) to the body length predicted from height (isotropic ``voxel_mm``);
    one-hot label channels are resampled like the images and decoded after, so organ edges stay smooth.

    The training grid stretched every body to Z slices; the law ``a · height_m + b`` slices of
    ``law.slice_mm`` gives the true length back.  Returns the volume and its RAS+ affine."""
    length = law.length_mm(height_m)
    nz = max(1, int(round(length / voxel_mm)))
    out = F.interpolate(u[None].float(), size=(u.shape[1], u.shape[2], nz), mode="trilinear", align_corners=False)[0]
    return out, centered_affine(tuple(out.shape[1:]), (voxel_mm, voxel_mm, length / nz))


def to_physical_hr(u: torch.Tensor, demo: Demographics,
                   model: SRModel) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """Full-grid (C, X, Y, Z) in [0, 1] → CT (HU), SUV, affine at the cohort's voxel size and true length, and
    the label map (uint8 TotalSegmentator ids; None for a CT + PET model)."""
    law = HeightLaw(*model.normalization["height_law"])
    voxel = float(model.normalization["in_plane_mm"])
    u, affine = restore_length(u.cpu(), demo.height_m, law, voxel)
    ct = restore_background(unit_to_ct(u[0].numpy()))
    suv = unit_to_suv(u[1].numpy()).astype(np.float32)
    return ct, suv, affine, decode_labels(u, model.channels)


def generate_cascade_cohort(lowres: str | os.PathLike, superres: str | os.PathLike,
                            demographics_csv: str | os.PathLike, out: str | os.PathLike, seed: int = 0,
                            sample_lowres_cfg: SampleConfig | None = None, sample_sr_cfg: SRSampleConfig | None = None,
                            window: WindowConfig | None = None, batch: int = 4, device: str = "auto",
                            ema: bool = True, previews: bool = True, overwrite: bool = False,
                            progress: bool = True, compile: bool = False, labels: str | os.PathLike | None = None):
    """The whole cascade for every row of ``demographics_csv`` into the cohort directory ``out`` (``compile``:
    both networks under ``torch.compile``; ``labels``: a label stage, :mod:`libs.labelstage`, that labels every
    generated subject from its CT + PET)."""
    dev = pick_device(device)
    lr_model = load_lowres_model(lowres, dev, ema=ema, compile=compile)
    sr_model = load_sr_model(superres, dev, ema=ema, compile=compile)
    check_pairing(lr_model.normalization, sr_model.normalization)
    label_model = None
    if labels is not None:
        from .labelstage import check_label_pairing, load_label_model
        label_model = load_label_model(labels, dev, ema=ema)
        check_label_pairing(label_model, sr_model.normalization, sr_model.channels.has_labels)
    s_lr = sample_lowres_cfg or lr_model.config.sample
    s_sr = sample_sr_cfg or sr_model.config.sample
    win = window or sr_model.config.window

    def produce(chunk):
        seeds = [subject_seed(seed, d.subject_id) for d in chunk]
        lows = sample_lowres(lr_model, chunk, seeds, s_lr, dev)
        for d, s, lr_u in zip(chunk, seeds, lows):
            try:
                sr_seed = subject_seed(seed, d.subject_id, stage=1)
                hr = sample_sr(sr_model, lr_u, d, sr_seed, s_sr, win, dev)
                ct, suv, affine, lab = to_physical_hr(hr, d, sr_model)
                meta = _cascade_meta(d, s, sr_seed, s_lr, s_sr, win, lr_model, sr_model)
                if label_model is not None:
                    lab = label_model.predict(ct, suv, d)
                    meta["labels"] = label_model.meta()
                yield d, (ct, suv, affine, meta, lab)
            except Exception as exc:  # noqa: BLE001 - this subject fails alone
                yield d, exc

    def provenance(d: Demographics) -> dict:
        return {"stage": "cascade", "demographics": asdict(d), "seed": subject_seed(seed, d.subject_id),
                "seed_superres": subject_seed(seed, d.subject_id, stage=1), "sampler": asdict(s_lr),
                "sampler_superres": sr_settings(s_sr, sr_model), "window": asdict(win), "lowres": lr_model.sha256,
                "superres": sr_model.sha256, "ema": ema,
                **({"labels": label_model.sha256} if label_model is not None else {})}

    return run_job(demographics_csv, out, batch, overwrite, previews, progress, produce, provenance,
                   labels=sr_model.channels.has_labels or label_model is not None, overlap_writes=dev.type == "cuda")


def sr_settings(s_sr: SRSampleConfig, model: SRModel) -> dict:
    """The SR sampler settings a subject depends on (``lr_labels`` only for a model with label channels)."""
    out = asdict(s_sr)
    if not model.channels.has_labels:
        out.pop("lr_labels")
    return out


def _cascade_meta(d, seed_lr, seed_sr, s_lr, s_sr, win, lr_model: Model, sr_model: SRModel) -> dict:
    meta = _meta(d, seed_lr, s_lr, lr_model, {"stage": "cascade", **labels_meta(sr_model.channels)})
    meta["seed_superres"] = seed_sr
    meta["sampler_superres"] = {**sr_settings(s_sr, sr_model), "sigma_max": s_sr.sigma_max_ratio * sr_model.sigma_data,
                                "ode_space": s_sr.space(sr_model.objective)}
    meta["window"] = asdict(win)
    if sr_model.anchors:
        meta["lr_anchor_offset"] = list(anchor_offset(seed_sr, sr_model.factor))
    meta["checkpoints"]["superres"] = {"path": str(sr_model.path), "sha256": sr_model.sha256, "step": sr_model.step,
                                       "objective": sr_model.objective}
    return meta
