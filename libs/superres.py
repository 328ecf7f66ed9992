"""The super-resolution stage: a residual diffusion model from the low-resolution sample to the full grid.

With HR the standardized training volume (paper: 224 × 224 × 384 at 2 mm), LR = the same 4× polyphase
subsample the low-resolution stage trains on (a random one of the 64 offsets) and up() trilinear ×4
upsampling, the network denoises the residual r = HR − up(LR) on random patches (paper: 56 × 56 × 96),
conditioned on up(LR) (2 channels), the four demographic channels, the patch's position (3 channels:
voxel index / full size, in [0, 1)) and the conditioning-augmentation level (1 channel).

Residual scaling: CT and PET residuals are smaller than the standardized volumes (SD 0.5) and need not
match each other (bench preset, 8 mm / 2×: 0.219 CT, 0.233 PET).  Each channel's residual SD is measured on the training
patches, stored with the checkpoint (``residual_std``) and divided out, so the network sees a residual of
SD σ_data = 0.5 per channel — the data every EDM/EDM2 constant was tuned for (P_mean −0.4, P_std 1.0,
σ_max 80, σ_min 0.002).  Shifting P_mean by ln(σ_data / 0.5) instead would fix the training noise levels
but leave the two channels on one σ; one scale per channel fixes both.

Conditioning augmentation (cascaded diffusion, Ho et al. 2022, §3 / §4.2): in training, Gaussian noise of
a level s ~ U(0, ``augment.max_level``) (network units of the LR, SD 0.5) is added to the LR before it is
upsampled, and s / 0.5 is given to the network as a constant channel; the target stays HR − up(clean LR).
At inference the generated LR gets a small fixed level (``sample.cond_noise``), recorded in meta.

Blur augmentation (``augment.blur_max`` / ``blur_probability``; off by default and in older checkpoints; the
64 → 256 model of Ho et al. 2022, §4.2, conditions on blurred low-res images the same way): a generated LR
is not a polyphase sample of a body — its lung edges are grey (on the bench a generated man's 16 mm volume
has about 350 voxels in the −400…−200 HU band beside some 1 000 lung voxels, a true LR about 45), which a
network trained only on binary-edged true LRs may keep as grey (above the −400 HU lung threshold).  With
blur augmentation a training draw's LR image channels (CT, PET; not one-hot labels) are blurred with a
Gaussian of SD b LR voxels (truncated at 3 SD, computed on the LR region plus a 3b margin, nearest-value
beyond the volume: the same numbers as blurring the whole LR), before the noise; the target is
HR − up(blurred LR), since generation adds the residual to up(its LR) as it comes.  The network is not told
b: a blurred edge must be redrawn sharp from what the image shows.  Inference adds no blur.

LR anchors (``data.lr_anchors``, off in checkpoints that predate it): the LR is one polyphase subsample, so
every LR voxel *is* one HR voxel — the one at f·j + offset.  Plain trilinear up() (align_corners=False) puts it
half an HR voxel away whatever the offset, and the network is never told the offset: it cannot know which HR
voxels its conditioning states exactly, and must guess every edge to ±1 voxel.  Measured on the committed bench
weights (4 held-out phantoms super-resolved from their true LR): 13.8 % of the HR lung voxels that the LR itself
sampled as lung came out as tissue — no better than the voxels in between.  With anchors, up() is
:func:`~libs.windows.anchored_upsample` (LR voxel j exactly at f·j + offset, so the residual is 0 there), an
extra conditioning channel marks the anchor voxels, and at inference the residual is set to 0 on them at the end:
the SR output's polyphase component at that offset equals the LR sample.  Training draws the offset at random
(as before); generation draws one per subject from its seed.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from .channels import ChannelSet, check_same_channels
from .config import ConfigError, check_range, load_config, same_value, to_dict
from .data import CohortVolumes, offset_of
from .diffusion import make_loss
from .lowres import (
    DataConfig,
    HeightLaw,
    LowresConfig,
    ModelConfig,
    SamplerSettings,
    Standardize,
    channel_stats,
    check_objective,
    check_same_objective,
    demographic_scaling,
    expand_cond,
    init_demographic_scaling,
    normalization,
    standardize_demographics,
)
from .nn import count_parameters
from .training import LoopConfig, OptimConfig, Trainer, has_checkpoint
from .windows import anchor_mask, anchored_region, anchored_upsample, lr_region, position_channels, upsample

COND_CHANNELS = 2 + 4 + 3 + 1     # up(LR), demographics, position, augmentation level (CT + PET models)
BLUR_TRUNCATE = 3.0               # blur augmentation's Gaussian, truncated at this many SDs


def blur_image_channels(lr: torch.Tensor, sd: float, image: slice) -> torch.Tensor:
    """(1, C, x, y, z) LR with its ``image`` channels blurred by a Gaussian of SD ``sd`` voxels (truncated at
    BLUR_TRUNCATE SDs, nearest value beyond the edges); the other channels (one-hot labels) as they are."""
    out = lr.clone()
    arr = lr[0, image].numpy()
    blurred = np.stack([ndimage.gaussian_filter(c, sd, mode="nearest", truncate=BLUR_TRUNCATE) for c in arr])
    out[0, image] = torch.from_numpy(blurred.astype(np.float32))
    return out


def sr_cond_channels(channels: ChannelSet, anchors: bool = False) -> int:
    """Conditioning channels of the SR network: up(LR) of every channel, demographics, position, level and,
    with LR anchors, the anchor mask."""
    return channels.count + 4 + 3 + 1 + int(anchors)
AUG_CHANNEL_SCALE = 0.5          # the level channel holds s / 0.5 (s in network units of the LR)


@dataclass
class SRDataConfig:
    cohort: str = "data/cohort"
    patch: list[int] = field(default_factory=lambda: [56, 56, 96])
    cache_dir: str | None = None
    load_workers: int = 4
    lr_anchors: bool = False       # LR voxels placed at their own HR voxel + anchor-mask channel (module doc)

    def __post_init__(self):
        if len(self.patch) != 3:
            raise ValueError(f"patch must have 3 entries, got {self.patch}")


@dataclass
class SRDiffusionConfig:
    """EDM2 constants of the scaled residual (SD ``sigma_data`` per channel, see the module docstring)."""

    P_mean: float = -0.4
    P_std: float = 1.0
    sigma_data: float = 0.5                # the SD each channel's residual is scaled to
    residual_std: list[float] | None = None    # per-channel residual SD (CT, PET[, labels]); None: measured
    sigma_data_samples: int = 256          # random (subject, offset, patch) draws used for the measurement
    objective: str = "edm"                 # edm | flow, as the low-res stage's diffusion.objective (either may
    time_distribution: str = "logit_normal"    # pair with either: the research cascade is diffusion -> flow)
    label_weight: float = 1.0              # loss weight of all label channels together (see lowres.py)

    def __post_init__(self):
        check_range("sigma_data", self.sigma_data, low=0.0, low_inclusive=False)
        check_objective(self)
        if self.residual_std is not None and (len(self.residual_std) < 2 or min(self.residual_std) <= 0):
            raise ValueError(f"residual_std must be positive numbers, one per channel (CT, PET[, labels]), got "
                             f"{self.residual_std}")
        check_range("sigma_data_samples", self.sigma_data_samples, low=1)


@dataclass
class AugmentConfig:
    """Training-time Gaussian noise on the LR conditioning: level s ~ U(0, max_level) with probability
    ``probability`` (else s = 0), in network units of the LR (its SD is 0.5); and, independently, a Gaussian
    blur of the LR's image channels, SD b ~ U(0, blur_max) LR voxels with probability ``blur_probability``."""

    max_level: float = 0.2
    probability: float = 0.5
    blur_max: float = 0.0              # Gaussian blur of the LR image channels: SD ~ U(0, blur_max) LR voxels
    blur_probability: float = 0.0      # ... with this probability (module doc, "Blur augmentation")

    def __post_init__(self):
        check_range("max_level", self.max_level, low=0.0)
        check_range("probability", self.probability, low=0.0, high=1.0)
        check_range("blur_max", self.blur_max, low=0.0)
        check_range("blur_probability", self.blur_probability, low=0.0, high=1.0)


@dataclass
class SRSampleConfig(SamplerSettings):
    """Super-resolution sampler: σ_max follows the residual's σ_data."""

    sigma_max_ratio: float = 160.0         # σ_max = ratio · σ_data (EDM: 80 / 0.5)
    cond_noise: float = 0.0                # augmentation level added to the generated LR (network units)
    lr_labels: str = "onehot"              # generated LR label channels as given to SR: onehot (argmax) | soft

    def __post_init__(self):
        super().__post_init__()
        check_range("cond_noise", self.cond_noise, low=0.0)
        if self.lr_labels not in ("onehot", "soft"):
            raise ValueError(f"lr_labels must be 'onehot' or 'soft', got {self.lr_labels!r}")


@dataclass
class WindowConfig:
    """Whole-volume sampling: windows of ``size`` (default: the training patch) overlapping by ``overlap``."""

    size: list[int] | None = None
    overlap: float = 0.25
    batch: int = 8

    def __post_init__(self):
        check_range("overlap", self.overlap, low=0.0, high=0.9)
        check_range("batch", self.batch, low=1)


@dataclass
class SRConfig:
    run_dir: str = "runs/superres"
    lowres_config: str = "1_Trainings/configs/lowres_paper.yaml"   # the low-res stage this one pairs with
    data: SRDataConfig = field(default_factory=SRDataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: SRDiffusionConfig = field(default_factory=SRDiffusionConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    sample: SRSampleConfig = field(default_factory=SRSampleConfig)
    window: WindowConfig = field(default_factory=WindowConfig)


@dataclass
class Pairing:
    """What the SR stage inherits from its low-res stage: grid, factor, voxel size, height law."""

    grid: tuple[int, int, int]
    factor: int
    in_plane_mm: float
    height_law: HeightLaw
    net_sigma: float          # the low-res stage's σ_data: the SD of standardized intensities
    labels: str | dict | None = None      # the low-res stage's data.labels (the channel set both stages share)

    @staticmethod
    def of(lowres: LowresConfig) -> Pairing:
        return Pairing(tuple(lowres.data.grid), lowres.data.factor, lowres.in_plane_mm, lowres.height_law,
                       lowres.diffusion.sigma_data, lowres.data.labels)

    @property
    def channels(self) -> ChannelSet:
        return DataConfig(labels=self.labels).channel_set


REPO_ROOT = Path(__file__).resolve().parents[1]


def lowres_config_path(cfg: SRConfig) -> Path:
    """``lowres_config`` as given (from the current directory) or, failing that, from the repository root —
    so the presets' repository-relative paths work from inside the stage folders too."""
    path = Path(cfg.lowres_config)
    for candidate in (path, REPO_ROOT / path):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"lowres_config: {path} not found (the low-res preset this SR stage pairs with)")


def load_pairing(cfg: SRConfig) -> Pairing:
    path = lowres_config_path(cfg)
    pairing = Pairing.of(load_config(path, LowresConfig))
    if any(p > g for p, g in zip(cfg.data.patch, pairing.grid)):
        raise ConfigError(f"data.patch {cfg.data.patch} is larger than the paired grid {list(pairing.grid)}")
    return pairing


def check_pairing(lowres_norm: dict, sr_norm: dict) -> None:
    """Refuse a low-res / SR checkpoint pair that disagrees on grid, factor, intensities, demographics or the
    height law."""
    keys = ("grid", "factor", "in_plane_mm", "ct_range_hu", "suv_max", "pet_map", "demographics", "channel_mean",
            "channel_std", "height_law", "channels", "label_groups")
    bad = [k for k in keys if not same_value(lowres_norm.get(k), sr_norm.get(k))]
    if bad:
        raise ConfigError(f"the super-resolution checkpoint was trained for another low-res stage: {', '.join(bad)} "
                          f"differ ({[lowres_norm.get(k) for k in bad]} vs {[sr_norm.get(k) for k in bad]})")


class ResidualPatches:
    """Training patches of the residual task.

    ``draw(rng)`` → residual (2, *patch) = HR − up(LR) in the standardized units of the low-res stage
    (unscaled), cond (10, *patch).  Only the patch and the LR region it reads are cut from the stored
    [0, 1] float16 volume and standardized — never the whole grid.  With ``aug_rng`` and ``aug_level`` > 0
    the LR region gets Gaussian noise of that level before upsampling (the target keeps the clean LR).
    """

    def __init__(self, volumes: CohortVolumes, pairing: Pairing, patch, standardize: Standardize,
                 cond_scaling: dict | None = None, anchors: bool = False):
        self.volumes, self.pairing, self.patch, self.std = volumes, pairing, tuple(patch), standardize
        self.anchors = anchors
        self.cond = standardize_demographics(volumes.cond, cond_scaling or {})     # (N, 4) as the network sees it
        self.lr_shape = tuple(g // pairing.factor for g in pairing.grid)

    def lr_region(self, i: int, offset, lr_sl, blur: float = 0.0) -> torch.Tensor:
        """Subject i's LR (polyphase ``offset``) on the LR slices ``lr_sl``, network units, (1, C, region); with
        ``blur`` > 0 its image channels blurred as the whole LR would be (module doc, "Blur augmentation")."""
        f = self.pairing.factor
        ext = lr_sl
        if blur > 0:
            m = math.ceil(BLUR_TRUNCATE * blur)
            ext = tuple(slice(max(s.start - m, 0), min(s.stop + m, n)) for s, n in zip(lr_sl, self.lr_shape))
        idx = tuple(slice(o + s.start * f, o + (s.stop - 1) * f + 1, f) for o, s in zip(offset, ext))
        lr = self.std.to_net(self.volumes.region(i, idx)[None])
        if blur <= 0:
            return lr
        lr = blur_image_channels(lr, blur, self.pairing.channels.image)
        crop = tuple(slice(s.start - e.start, s.stop - e.start) for s, e in zip(lr_sl, ext))
        return lr[(slice(None), slice(None), *crop)].contiguous()

    def draw(self, rng: np.random.Generator, aug_level: float = 0.0,
             aug_rng: np.random.Generator | None = None, blur: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        f, grid = self.pairing.factor, self.pairing.grid
        i = int(rng.integers(len(self.volumes)))
        offset = offset_of(int(rng.integers(f**3)), f)
        start = [int(rng.integers(g - p + 1)) for g, p in zip(grid, self.patch)]
        if self.anchors:
            lr_sl = anchored_region(start, self.patch, f, offset, self.lr_shape)

            def up_fn(lr):
                return anchored_upsample(lr, f, offset, start, self.patch, self.lr_shape, [s.start for s in lr_sl])[0]
        else:
            lr_sl, hr_sl = lr_region(start, self.patch, f, self.lr_shape)

            def up_fn(lr):
                return upsample(lr, f)[(0, slice(None), *hr_sl)]
        lr_clean = self.lr_region(i, offset, lr_sl, blur)                                # (1, C, region)
        up_clean = up_fn(lr_clean)
        up = up_clean
        if aug_level > 0:
            noise = torch.from_numpy(aug_rng.standard_normal(lr_clean.shape, dtype=np.float32))
            up = up_fn(lr_clean + aug_level * noise)
        sl = tuple(slice(s, s + p) for s, p in zip(start, self.patch))
        residual = self.std.to_net(self.volumes.region(i, sl)[None])[0] - up_clean
        demo = expand_cond(self.cond[i:i + 1], self.patch)[0]
        level = torch.full((1, *self.patch), aug_level / AUG_CHANNEL_SCALE)
        parts = [up, demo, position_channels(start, self.patch, grid), level]
        if self.anchors:
            parts.append(anchor_mask(start, self.patch, f, offset))
        return residual, torch.cat(parts)

    def batch(self, rng: np.random.Generator, n: int, augment: AugmentConfig | None = None,
              aug_rng: np.random.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """n draws; with ``augment``, each draw's noise level (U(0, max_level) w.p. probability), then its blur SD
        (U(0, blur_max) w.p. blur_probability, drawn only when blur_max > 0) come from ``aug_rng``."""
        pairs = []
        for _ in range(n):
            level = blur = 0.0
            if augment is not None and augment.max_level > 0 and aug_rng.random() < augment.probability:
                level = float(aug_rng.uniform(0.0, augment.max_level))
            if augment is not None and augment.blur_max > 0 and aug_rng.random() < augment.blur_probability:
                blur = float(aug_rng.uniform(0.0, augment.blur_max))
            pairs.append(self.draw(rng, level, aug_rng, blur))
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


def measure_residual_std(patches: ResidualPatches, draws: int, seed: int) -> list[float]:
    """Per-channel SD of the residual r = HR − up(LR) over ``draws`` random patches (deterministic for a seed).

    CT and PET get their own SD; the label channels share one (their pooled RMS), so every class is scaled
    alike and the argmax decoding stays symmetric between classes."""
    rng = np.random.default_rng([seed, 424242])
    n = patches.volumes.channels.count
    total = torch.zeros(n, dtype=torch.float64)
    square = torch.zeros(n, dtype=torch.float64)
    count = 0
    for _ in range(draws):
        r, _ = patches.draw(rng)
        r = r.double().flatten(1)
        total += r.sum(1)
        square += (r * r).sum(1)
        count += r.shape[1]
    mean = total / count
    var = (square / count - mean * mean).clamp_min(1e-12)
    labels = patches.volumes.channels.labels
    if patches.volumes.channels.has_labels:
        var[labels] = var[labels].mean()
    return var.sqrt().tolist()


def residual_scaling(norm: dict) -> Standardize:
    """Standardized residual ↔ network residual (SD σ_data per channel), from a checkpoint's normalization."""
    if "residual_std" not in norm:
        raise ConfigError("this super-resolution checkpoint has no per-channel residual_std (it was trained by an "
                          "older TotalGen with one σ_data for both channels); retrain the super-resolution stage")
    return Standardize([0.0] * len(norm["residual_std"]), norm["residual_std"], float(norm["sigma_data"]))


def sr_normalization(cfg: SRConfig, pairing: Pairing, mean, std, residual_std, cond_scaling: dict | None = None
                     ) -> dict:
    lowres_like = LowresConfig(in_plane_mm=pairing.in_plane_mm, height_law=pairing.height_law)
    lowres_like.data.grid, lowres_like.data.factor = list(pairing.grid), pairing.factor
    lowres_like.data.labels = pairing.labels
    lowres_like.diffusion.sigma_data = pairing.net_sigma
    return {**normalization(lowres_like, mean, std, cond_scaling), "objective": cfg.diffusion.objective,
            "net_sigma": pairing.net_sigma,
            "sigma_data": cfg.diffusion.sigma_data, "residual_std": [float(v) for v in residual_std],
            "patch": list(cfg.data.patch), "lr_anchors": bool(cfg.data.lr_anchors),
            "cond": [f"up(lr) {c}" for c in pairing.channels.names] + [
                "demographics x4", "position x/X", "position y/Y", "position z/Z",
                f"augmentation level / {AUG_CHANNEL_SCALE}"] + (["anchor mask"] if cfg.data.lr_anchors else [])}


def train_superres(cfg: SRConfig, device: str = "auto", progress: bool = True) -> Path | None:
    """Train (or resume) the residual super-resolution model; returns the last checkpoint."""
    pairing = load_pairing(cfg)
    channels = pairing.channels
    volumes = CohortVolumes(cfg.data.cohort, pairing.grid, cfg.data.cache_dir, cfg.data.load_workers, progress,
                             pairing.in_plane_mm, channels)
    mean, std = channels.full_stats(*channel_stats(volumes))
    torch.manual_seed(cfg.loop.seed)
    n_cond = sr_cond_channels(channels, cfg.data.lr_anchors)
    net = cfg.model.build(in_channels=channels.count, cond_channels=n_cond)
    residual_std = cfg.diffusion.residual_std
    scaling = demographic_scaling(volumes.cond) if cfg.model.standardize_demographics else {}
    if cfg.loop.init_from:            # its constants hold for the whole run, resumed or not
        from .generate import load_init_weights
        init = load_init_weights(cfg.loop.init_from, "superres", net)
        check_same_channels(init, channels, cfg.loop.init_from)
        check_same_objective(init, cfg.diffusion.objective, cfg.loop.init_from)
        mean, std, residual_std = init["channel_mean"], init["channel_std"], init["residual_std"]
        scaling = init_demographic_scaling(init, cfg.model.standardize_demographics, cfg.loop.init_from)
        if progress and not has_checkpoint(cfg.run_dir):
            print(f"super-res: starting from {cfg.loop.init_from} (its normalization constants)")
    # the SR stage sees intensities standardized exactly like its low-res stage (same cohort statistics)
    standardize = Standardize(mean, std, pairing.net_sigma)
    patches = ResidualPatches(volumes, pairing, cfg.data.patch, standardize, scaling, cfg.data.lr_anchors)
    if residual_std and len(residual_std) != channels.count:
        raise ConfigError(f"diffusion.residual_std has {len(residual_std)} values; the channels {channels.names} "
                          f"need {channels.count} (or null to measure them)")
    residual_std = residual_std or measure_residual_std(patches, cfg.diffusion.sigma_data_samples, cfg.loop.seed)
    norm = sr_normalization(cfg, pairing, mean, std, residual_std, scaling)
    scale = residual_scaling(norm)
    net.check_input(torch.zeros(1, channels.count, *cfg.data.patch), torch.zeros(1),
                    torch.zeros(1, n_cond, *cfg.data.patch))

    def batch(step: int, rank: int, world: int):
        rng = np.random.default_rng([cfg.loop.seed, step, rank, 7])
        aug_rng = np.random.default_rng([cfg.loop.seed, step, rank, 8])
        residual, cond = patches.batch(rng, cfg.optim.batch // world, cfg.augment, aug_rng)
        return scale.to_net(residual), cond

    d = cfg.diffusion
    loss = make_loss(d.objective, d.P_mean, d.P_std, d.sigma_data, d.time_distribution,
                     channels.loss_weights(d.label_weight))
    trainer = Trainer(net, loss, batch, cfg.optim, cfg.loop, cfg.run_dir, to_dict(cfg), norm,
                      device=device, progress=progress)
    if progress and trainer.dist.main:
        print(f"super-res model: {count_parameters(net) / 1e6:.1f} M parameters, {d.objective} objective, "
              f"channels {channels.names}, "
              f"patches {tuple(cfg.data.patch)} of "
              f"{pairing.grid}, residual SD CT {residual_std[0]:.4f} / PET {residual_std[1]:.4f} "
              f"(scaled to {cfg.diffusion.sigma_data})")
    return trainer.run()


def load_sr_config(path: str | os.PathLike) -> SRConfig:
    return load_config(path, SRConfig)
