"""The super-resolution stage: a residual diffusion model from the low-resolution sample to the full grid.

With HR the standardized training volume (paper: 224 × 224 × 384 at 2 mm), LR = the same 4× polyphase
subsample the low-resolution stage trains on (a random one of the 64 offsets) and up() trilinear ×4
upsampling, the network denoises the residual r = HR − up(LR) on random patches (paper: 56 × 56 × 96),
conditioned on up(LR) (2 channels), the four demographic channels and the patch's position (3 channels:
voxel index / full size, in [0, 1)).  σ_data of the residual is measured on the training data and stored
with the checkpoint; sampling starts at σ_max = ``sample.sigma_max_ratio`` · σ_data instead of 80.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .config import ConfigError, check_range, load_config, to_dict
from .data import CohortVolumes, offset_of, polyphase
from .diffusion import EDM2Loss
from .lowres import (
    HeightLaw,
    LowresConfig,
    ModelConfig,
    SamplerSettings,
    Standardize,
    channel_stats,
    expand_cond,
    normalization,
)
from .nn import count_parameters
from .training import LoopConfig, OptimConfig, Trainer
from .windows import position_channels, upsample_crop

COND_CHANNELS = 2 + 4 + 3     # up(LR), demographics, position


@dataclass
class SRDataConfig:
    cohort: str = "data/cohort"
    patch: list[int] = field(default_factory=lambda: [56, 56, 96])
    cache_dir: str | None = None
    load_workers: int = 4

    def __post_init__(self):
        if len(self.patch) != 3:
            raise ValueError(f"patch must have 3 entries, got {self.patch}")


@dataclass
class SRDiffusionConfig:
    P_mean: float = -0.4
    P_std: float = 1.0
    sigma_data: float | None = None        # None: measured on the training residuals (recommended)
    sigma_data_samples: int = 256          # random (subject, offset, patch) draws used for the measurement


@dataclass
class SRSampleConfig(SamplerSettings):
    """Super-resolution sampler: σ_max follows the residual's σ_data."""

    sigma_max_ratio: float = 160.0         # σ_max = ratio · σ_data (EDM: 80 / 0.5)


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

    @staticmethod
    def of(lowres: LowresConfig) -> Pairing:
        return Pairing(tuple(lowres.data.grid), lowres.data.factor, lowres.in_plane_mm, lowres.height_law,
                       lowres.diffusion.sigma_data)


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
    """Refuse a low-res / SR checkpoint pair that disagrees on grid, factor, intensities or demographics."""
    keys = ("grid", "factor", "in_plane_mm", "ct_range_hu", "suv_max", "pet_map", "demographics", "channel_mean",
            "channel_std")
    bad = [k for k in keys if not _same(lowres_norm.get(k), sr_norm.get(k))]
    if bad:
        raise ConfigError(f"the super-resolution checkpoint was trained for another low-res stage: {', '.join(bad)} "
                          f"differ ({[lowres_norm.get(k) for k in bad]} vs {[sr_norm.get(k) for k in bad]})")


def _same(a, b) -> bool:
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b) and all(
            isinstance(v, (int, float)) for v in a + b):
        return bool(np.allclose(a, b, rtol=1e-6, atol=1e-9))
    return a == b


class ResidualPatches:
    """Training patches of the residual task.  ``draw(rng)`` → residual (2, *patch), cond (9, *patch)."""

    def __init__(self, volumes: CohortVolumes, pairing: Pairing, patch, standardize: Standardize):
        self.volumes, self.pairing, self.patch, self.std = volumes, pairing, tuple(patch), standardize
        self.lr_shape = tuple(g // pairing.factor for g in pairing.grid)

    def draw(self, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        f, grid = self.pairing.factor, self.pairing.grid
        i = int(rng.integers(len(self.volumes)))
        hr = self.std.to_net(self.volumes.volumes[i][None].float())                  # (1, 2, X, Y, Z)
        lr = polyphase(hr, f, offset_of(int(rng.integers(f**3)), f))
        start = [int(rng.integers(g - p + 1)) for g, p in zip(grid, self.patch)]
        up = upsample_crop(lr, f, start, self.patch)[0]
        sl = tuple(slice(s, s + p) for s, p in zip(start, self.patch))
        residual = hr[0][(slice(None), *sl)] - up
        demo = expand_cond(self.volumes.cond[i:i + 1], self.patch)[0]
        cond = torch.cat([up, demo, position_channels(start, self.patch, grid)])
        return residual, cond

    def batch(self, rng: np.random.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        pairs = [self.draw(rng) for _ in range(n)]
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


def measure_sigma_data(patches: ResidualPatches, draws: int, seed: int) -> float:
    """SD of the residual r = HR − up(LR) over ``draws`` random patches (deterministic for a seed)."""
    rng = np.random.default_rng([seed, 424242])
    total = square = count = 0.0
    for _ in range(draws):
        r, _ = patches.draw(rng)
        r = r.double()
        total += float(r.sum())
        square += float((r * r).sum())
        count += r.numel()
    mean = total / count
    return float(np.sqrt(max(square / count - mean * mean, 1e-12)))


def sr_normalization(cfg: SRConfig, pairing: Pairing, mean, std, sigma_data: float) -> dict:
    lowres_like = LowresConfig(in_plane_mm=pairing.in_plane_mm, height_law=pairing.height_law)
    lowres_like.data.grid, lowres_like.data.factor = list(pairing.grid), pairing.factor
    lowres_like.diffusion.sigma_data = pairing.net_sigma
    return {**normalization(lowres_like, mean, std), "net_sigma": pairing.net_sigma, "sigma_data": sigma_data,
            "patch": list(cfg.data.patch),
            "cond": ["up(lr) ct", "up(lr) pet", "demographics x4", "position x/X", "position y/Y", "position z/Z"]}


def train_superres(cfg: SRConfig, device: str = "auto", progress: bool = True) -> Path | None:
    """Train (or resume) the residual super-resolution model; returns the last checkpoint."""
    pairing = load_pairing(cfg)
    volumes = CohortVolumes(cfg.data.cohort, pairing.grid, cfg.data.cache_dir, cfg.data.load_workers, progress)
    mean, std = channel_stats(volumes)
    # the SR stage sees intensities standardized exactly like its low-res stage (same cohort statistics)
    standardize = Standardize(mean, std, pairing.net_sigma)
    patches = ResidualPatches(volumes, pairing, cfg.data.patch, standardize)
    sigma_data = cfg.diffusion.sigma_data or measure_sigma_data(patches, cfg.diffusion.sigma_data_samples,
                                                                cfg.loop.seed)
    torch.manual_seed(cfg.loop.seed)
    net = cfg.model.build(in_channels=2, cond_channels=COND_CHANNELS)
    net.check_input(torch.zeros(1, 2, *cfg.data.patch), torch.zeros(1), torch.zeros(1, COND_CHANNELS, *cfg.data.patch))

    def batch(step: int, rank: int, world: int):
        rng = np.random.default_rng([cfg.loop.seed, step, rank, 7])
        return patches.batch(rng, cfg.optim.batch // world)

    loss = EDM2Loss(cfg.diffusion.P_mean, cfg.diffusion.P_std, sigma_data)
    trainer = Trainer(net, loss, batch, cfg.optim, cfg.loop, cfg.run_dir, to_dict(cfg),
                      sr_normalization(cfg, pairing, mean, std, sigma_data), sigma_data, device=device,
                      progress=progress)
    if progress and trainer.dist.main:
        print(f"super-res model: {count_parameters(net) / 1e6:.1f} M parameters, patches {tuple(cfg.data.patch)} of "
              f"{pairing.grid}, residual sigma_data {sigma_data:.4f}")
    return trainer.run()


def load_sr_config(path: str | os.PathLike) -> SRConfig:
    return load_config(path, SRConfig)
