"""The low-resolution stage: a demographics-conditioned 3D diffusion model of the whole body.

Training data are 4× polyphase subsamples of the training grid (paper: 56 × 56 × 96 at 8 mm from
224 × 224 × 384), conditioned on four constant demographic channels; the network is the EDM2-style
:class:`libs.nn.UNet` under EDM preconditioning, trained with the EDM2 uncertainty-weighted loss.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .channels import DEFAULT_LABEL_GROUPS, ChannelSet, check_same_channels
from .config import ConfigError, check_range, load_config, to_dict
from .data import CohortVolumes, PolyphaseSamples, batch_indices
from .diffusion import OBJECTIVES, TIME_DISTRIBUTIONS, make_loss
from .intensity import CT_MAX_HU, CT_MIN_HU, SUV_MAX
from .nn import UNet, count_parameters
from .samplers import SCHEDULES, SOLVERS, SPACES, schedule_sigmas
from .training import LoopConfig, OptimConfig, Trainer, has_checkpoint


@dataclass
class DataConfig:
    cohort: str = "data/cohort"           # cohort directory (relative paths: from the current directory)
    grid: list[int] = field(default_factory=lambda: [224, 224, 384])   # training grid (x, y, z voxels)
    factor: int = 4                       # polyphase factor: samples are grid / factor
    cache_dir: str | None = None          # optional .npy cache of normalized volumes
    load_workers: int = 4                 # threads decoding NIfTI files at start-up
    # Organ-label channels generated with CT and PET (libs/channels.py): null = CT + PET only; "default" = the
    # ten groups of libs.channels.DEFAULT_LABEL_GROUPS; or {group: [TotalSegmentator 'total' class names]}.
    # The cohort must then have labels/ for every subject.
    labels: str | dict[str, list[str]] | None = None

    def __post_init__(self):
        if len(self.grid) != 3:
            raise ValueError(f"grid must have 3 entries, got {self.grid}")
        check_range("factor", self.factor, low=1)
        if isinstance(self.labels, str) and self.labels != "default":
            raise ValueError(f"labels must be null, 'default' or a mapping group -> [class names], got {self.labels!r}")
        _ = self.channel_set      # validates the class names against the installed TotalSegmentator

    @property
    def channel_set(self) -> ChannelSet:
        return ChannelSet.from_groups(DEFAULT_LABEL_GROUPS if self.labels == "default" else self.labels)


@dataclass
class ModelConfig:
    model_channels: int = 64
    channel_mult: list[int] = field(default_factory=lambda: [1, 2, 3, 4])
    num_blocks: int = 3
    attn_levels: list[int] = field(default_factory=lambda: [-1])     # -1 = the coarsest level
    dropout: float = 0.0
    channels_per_head: int = 64
    # Feed the demographic channels as z-scores of the training cohort (mean / SD stored in the checkpoint's
    # normalization record) instead of the raw DESIGN.md encoding, whose weight and height channels vary by
    # only ~0.1 between subjects: the magnitude-preserving input layer then weighs them like the image
    # channels. Measured on the bench (500-step low-res runs, 32 held-out phantoms): body-volume-vs-weight
    # slope 261 -> 317 mL/kg (truth 371). Off by default (the paper's raw encoding); the bench and demo presets
    # turn it on.
    standardize_demographics: bool = False
    # Also feed the conditioning's spatial mean (for the low-res stage: the demographic vector) through EDM2's
    # class-label path into every block's embedding, as well as concatenating it to the input (libs/nn.py).
    # Off by default (the paper conditions by concatenation only); older checkpoints load with it off.
    cond_embed: bool = False

    def build(self, in_channels: int, cond_channels: int) -> UNet:
        return UNet(in_channels=in_channels, cond_channels=cond_channels, model_channels=self.model_channels,
                    channel_mult=self.channel_mult, num_blocks=self.num_blocks, attn_levels=self.attn_levels,
                    dropout=self.dropout, channels_per_head=self.channels_per_head, cond_embed=self.cond_embed)


def check_objective(cfg) -> None:
    """Validate a stage's ``diffusion.objective`` / ``diffusion.time_distribution`` / ``diffusion.label_weight``."""
    check_range("label_weight", cfg.label_weight, low=0.0, low_inclusive=False)
    if cfg.objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {cfg.objective!r}")
    if cfg.time_distribution not in TIME_DISTRIBUTIONS:
        raise ValueError(f"time_distribution must be one of {', '.join(TIME_DISTRIBUTIONS)}, "
                         f"got {cfg.time_distribution!r}")


@dataclass
class DiffusionConfig:
    sigma_data: float = 0.5
    P_mean: float = -0.4
    P_std: float = 1.0
    # edm: EDM preconditioning, EDM2 uncertainty-weighted loss; flow: flow matching on the optimal-transport
    # path (velocity, unweighted MSE, no preconditioning: the research code's flow arm).  libs/diffusion.py.
    objective: str = "edm"
    # flow training times: logit_normal (t = 1 / (1 + σ), ln σ ~ N(P_mean, P_std²)) or uniform
    time_distribution: str = "logit_normal"
    # loss weight of all organ-label channels together, relative to one image channel (CT, PET: 1 each); a plain
    # mean over channels would give the K + 1 one-hot channels K + 1 votes against the images' two
    label_weight: float = 1.0
    # Classifier-free guidance (Ho & Salimans 2022): the fraction of training samples whose demographics are
    # replaced by a learned "none" (zeros plus a fifth channel that is 1 when the demographics are given, 0 when
    # not), so that one network is both the conditional and the unconditional model; sample.guidance then
    # extrapolates from the second to the first.  0 = the paper's always-conditioned model (four channels).
    cond_dropout: float = 0.0

    def __post_init__(self):
        check_range("sigma_data", self.sigma_data, low=0.0, low_inclusive=False)
        check_range("cond_dropout", self.cond_dropout, low=0.0, high=1.0, high_inclusive=False)
        check_objective(self)


@dataclass
class SamplerSettings:
    """EDM sampler settings shared by both stages (recorded with each generated subject)."""

    solver: str = "heun"           # heun | euler | dpmpp_2m (libs.samplers.SOLVERS)
    steps: int = 32
    sigma_min: float = 0.002
    rho: float = 7.0
    churn: float = 0.0
    schedule: str = "karras"       # karras (EDM Eq. 5; as flow times, the research grid) | uniform_time
    ode_space: str = "auto"        # variables of the ODE steps: sigma (EDM) | flow (t) | auto: the objective's

    def __post_init__(self):
        if self.solver not in SOLVERS:
            raise ValueError(f"solver must be one of {', '.join(SOLVERS)}, got {self.solver!r}")
        if self.solver == "dpmpp_2m" and self.churn > 0:
            raise ValueError(f"solver dpmpp_2m is deterministic: set churn: 0 (got {self.churn})")
        check_range("steps", self.steps, low=1)
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.ode_space not in ("auto", *SPACES):
            raise ValueError(f"ode_space must be auto, sigma or flow, got {self.ode_space!r}")

    def space(self, objective: str) -> str:
        """The ODE variables used for a model of ``objective`` ('auto': EDM's for edm, flow time for flow)."""
        return ("flow" if objective == "flow" else "sigma") if self.ode_space == "auto" else self.ode_space

    def sigmas(self, sigma_max: float, device=None) -> torch.Tensor:
        return schedule_sigmas(self.schedule, self.steps, self.sigma_min, sigma_max, self.rho, device=device)

    def solve(self, denoiser, x: torch.Tensor, sigmas: torch.Tensor, cond, objective: str, generator=None,
              progress: bool = False) -> torch.Tensor:
        """Run this sampler (solver, churn, ODE variables) on a stage's denoiser."""
        return SOLVERS[self.solver](denoiser, x, sigmas, cond, churn=self.churn, generator=generator, progress=progress,
                      space=self.space(objective))


@dataclass
class SampleConfig(SamplerSettings):
    """Low-resolution sampler: the Karras schedule from ``sigma_max`` (EDM: 80) down to ``sigma_min``."""

    sigma_max: float = 80.0
    # Classifier-free guidance weight w: D = D_none + w · (D_demographics − D_none) (1 = no guidance, the only
    # value for a model trained without diffusion.cond_dropout), applied while guidance_sigma[0] ≤ σ ≤
    # guidance_sigma[1] (guidance in a limited interval, Kynkäänniemi et al. 2024; elsewhere w = 1).
    guidance: float = 1.0
    guidance_sigma: list[float] = field(default_factory=lambda: [0.0, 1e9])

    def __post_init__(self):
        super().__post_init__()
        check_range("guidance", self.guidance, low=0.0)
        if len(self.guidance_sigma) != 2 or not 0.0 <= self.guidance_sigma[0] <= self.guidance_sigma[1]:
            raise ValueError(f"guidance_sigma must be [low, high] with 0 <= low <= high, got {self.guidance_sigma}")

    @property
    def guided(self) -> bool:
        return self.guidance != 1.0


@dataclass
class HeightLaw:
    """Body length (slices of ``slice_mm``) = a · height_m + b — the paper's fit at 2 mm by default."""

    a: float = 146.629
    b: float = 110.419
    slice_mm: float = 2.0

    def __post_init__(self):
        check_range("a", self.a)
        check_range("b", self.b)
        check_range("slice_mm", self.slice_mm, low=0.0, low_inclusive=False)

    def length_mm(self, height_m: float) -> float:
        return (self.a * height_m + self.b) * self.slice_mm


@dataclass
class LowresConfig:
    run_dir: str = "runs/lowres"
    in_plane_mm: float = 2.0               # voxel size of the cohort's x/y grid (224 × 2 mm = 448 mm FOV)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    height_law: HeightLaw = field(default_factory=HeightLaw)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return tuple(g // self.data.factor for g in self.data.grid)


def load_lowres_config(path: str | os.PathLike) -> LowresConfig:
    return load_config(path, LowresConfig)


def channel_stats(volumes: CohortVolumes) -> tuple[list[float], list[float]]:
    """Per-channel mean and SD of the [0, 1] training volumes (CT, PET) over all subjects and voxels."""
    total = torch.zeros(2, dtype=torch.float64)
    square = torch.zeros(2, dtype=torch.float64)
    count = 0
    for vol in volumes.volumes:
        v = vol.double().flatten(1)
        total += v.sum(1)
        square += (v * v).sum(1)
        count += v.shape[1]
    mean = total / count
    std = (square / count - mean**2).clamp_min(1e-8).sqrt()
    return mean.tolist(), std.tolist()


class Standardize:
    """[0, 1] intensities ↔ network space: x = (u − mean_c) / sd_c · σ_data per channel (zero mean, SD σ_data,
    the data EDM preconditioning assumes).  The constants are measured on the training cohort and stored
    in the checkpoint's normalization record."""

    def __init__(self, mean, std, sigma_data: float):
        self.mean = torch.tensor(mean, dtype=torch.float32)
        self.std = torch.tensor(std, dtype=torch.float32)
        self.sigma_data = sigma_data

    def _shape(self, t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        return t.to(ref.device).reshape([1, -1] + [1] * (ref.ndim - 2))

    def to_net(self, u: torch.Tensor) -> torch.Tensor:
        return (u - self._shape(self.mean, u)) / self._shape(self.std, u) * self.sigma_data

    def from_net(self, x: torch.Tensor) -> torch.Tensor:
        return x / self.sigma_data * self._shape(self.std, x) + self._shape(self.mean, x)

    @staticmethod
    def from_record(norm: dict, sigma_data: float) -> Standardize:
        return Standardize(norm["channel_mean"], norm["channel_std"], sigma_data)


DEMOGRAPHIC_SD_FLOOR = 0.05    # encoded units: 5 cm, 5 kg, 0.05 of sex, 5 years


def demographic_scaling(cond: torch.Tensor) -> dict:
    """Training cohort's encoded demographics (N, 4) → {"cond_mean", "cond_std"} for the normalization record.

    Each SD is floored at :data:`DEMOGRAPHIC_SD_FLOOR`, so a cohort of one sex (SD 0) or of near-equal
    heights still gives finite z-scores of bounded size for the subjects it did not contain."""
    c = cond.double()
    sd = c.std(0, unbiased=False) if len(c) > 1 else torch.zeros(c.shape[1], dtype=torch.float64)
    return {"cond_mean": c.mean(0).tolist(), "cond_std": sd.clamp_min(DEMOGRAPHIC_SD_FLOOR).tolist()}


def standardize_demographics(cond: torch.Tensor, norm: dict) -> torch.Tensor:
    """Encoded demographics (B, 4) → what the network was trained on: z-scores with the record's
    ``cond_mean`` / ``cond_std`` when it has them, else unchanged (raw encoding: paper presets and older
    checkpoints)."""
    if "cond_mean" not in norm:
        return cond
    mean = torch.tensor(norm["cond_mean"], dtype=cond.dtype, device=cond.device)
    std = torch.tensor(norm["cond_std"], dtype=cond.dtype, device=cond.device)
    return (cond - mean) / std


NONE_CHANNEL_KEY = "cond_none_channel"   # normalization record: the network takes the fifth, "given" channel


def lowres_cond_channels(norm: dict) -> int:
    """Conditioning channels of a low-res network: the four demographics, plus the "given" channel of a model
    trained with classifier-free condition dropout (its record says so; older records: four)."""
    return 5 if norm.get(NONE_CHANNEL_KEY) else 4


def demographic_input(cond: torch.Tensor, norm: dict, given: torch.Tensor | bool = True) -> torch.Tensor:
    """Encoded demographics (B, 4) → the network's conditioning vector (B, 4 or 5): standardized as in
    training (:func:`standardize_demographics`) and, for a network with the "given" channel, zeroed where
    ``given`` (bool, or (B,) bool) is False and followed by that channel (1 given, 0 none)."""
    cond = standardize_demographics(cond, norm)
    if lowres_cond_channels(norm) == 4:
        if given is not True:
            raise ValueError("this low-res model was trained without diffusion.cond_dropout: it has no "
                             "unconditional mode, so classifier-free guidance (sample.guidance ≠ 1) cannot be used")
        return cond
    g = torch.as_tensor(given, dtype=cond.dtype, device=cond.device).reshape(-1, 1).expand(len(cond), 1)
    return torch.cat([cond * g, g], dim=1)


def normalization(cfg: LowresConfig, mean=None, std=None, cond_scaling: dict | None = None) -> dict:
    """Constants a checkpoint needs to turn samples back into HU and SUV on a true grid (and, with
    ``cond_scaling``, to feed the demographics as the network was trained)."""
    none = {NONE_CHANNEL_KEY: True} if cfg.diffusion.cond_dropout > 0 else {}
    return {**(cond_scaling or {}), **none, "objective": cfg.diffusion.objective,
            "channel_mean": mean, "channel_std": std,
            "ct_range_hu": [CT_MIN_HU, CT_MAX_HU], "suv_max": SUV_MAX, "pet_map": "log2(suv+1)/log2(26)",
            **cfg.data.channel_set.record(),
            "demographics": ["height_m-1", "(weight_kg-30)/100", "sex(M=1)", "age/100"],
            "grid": list(cfg.data.grid), "factor": cfg.data.factor, "in_plane_mm": cfg.in_plane_mm,
            "height_law": [cfg.height_law.a, cfg.height_law.b, cfg.height_law.slice_mm]}


def check_same_objective(init: dict, objective: str, source) -> None:
    """A fine-tune keeps the objective its initial weights were trained with (records without one: edm)."""
    had = init.get("objective", "edm")
    if had != objective:
        raise ConfigError(f"{source}: these weights were trained with the {had} objective; set "
                          f"diffusion.objective: {had} to fine-tune them (or train {objective} from scratch)")


def init_demographic_scaling(init: dict, standardize: bool, source) -> dict:
    """A fine-tune keeps the demographic scaling its initial weights were trained with; the config must agree."""
    scaling = {k: init[k] for k in ("cond_mean", "cond_std") if k in init}
    if bool(scaling) != bool(standardize):
        have = "z-scored" if scaling else "raw"
        raise ConfigError(f"{source}: these weights were trained on {have} demographics; set "
                          f"model.standardize_demographics: {str(bool(scaling)).lower()} to fine-tune them")
    return scaling


def init_none_channel(init: dict, cond_dropout: float, source) -> None:
    """A fine-tune keeps the conditioning channels of its initial weights: condition dropout on iff it was."""
    had = bool(init.get(NONE_CHANNEL_KEY))
    if had != (cond_dropout > 0):
        want = "> 0 (e.g. the value they were trained with)" if had else "0"
        raise ConfigError(f"{source}: these weights were trained {'with' if had else 'without'} classifier-free "
                          f"condition dropout; set diffusion.cond_dropout {want} to fine-tune them")


def dropout_mask(batch: int, p: float, seed: int, step: int, rank: int) -> torch.Tensor:
    """(batch,) bool, True = demographics given: each False with probability ``p``, a function of
    (seed, step, rank) only, so a resumed run drops the same samples."""
    state = np.random.SeedSequence([int(seed), int(step), int(rank), 0xCFD]).generate_state(1)[0]
    gen = torch.Generator().manual_seed(int(state))
    return torch.rand(batch, generator=gen) >= p


def expand_cond(cond: torch.Tensor, shape) -> torch.Tensor:
    """Demographics (B, 4) → constant channels (B, 4, X, Y, Z)."""
    return cond[:, :, None, None, None].expand(-1, -1, *shape).contiguous()


def train_lowres(cfg: LowresConfig, device: str = "auto", progress: bool = True) -> Path | None:
    """Train (or resume) the low-resolution model described by ``cfg``; returns the last checkpoint."""
    channels = cfg.data.channel_set
    volumes = CohortVolumes(cfg.data.cohort, cfg.data.grid, cfg.data.cache_dir, cfg.data.load_workers, progress,
                             cfg.in_plane_mm, channels)
    samples = PolyphaseSamples(volumes, cfg.data.factor)
    shape = samples.shape
    torch.manual_seed(cfg.loop.seed)                     # the same initial weights on every rank and rerun
    d = cfg.diffusion
    n_cond = 5 if d.cond_dropout > 0 else 4
    net = cfg.model.build(in_channels=channels.count, cond_channels=n_cond)
    net.check_input(torch.zeros(1, channels.count, *shape), torch.zeros(1), torch.zeros(1, n_cond, *shape))
    seed = cfg.loop.seed
    mean, std = channels.full_stats(*channel_stats(volumes))
    scaling = demographic_scaling(volumes.cond) if cfg.model.standardize_demographics else {}
    if cfg.loop.init_from:            # its constants hold for the whole run, resumed or not
        from .generate import load_init_weights
        init = load_init_weights(cfg.loop.init_from, "lowres", net)
        check_same_channels(init, channels, cfg.loop.init_from)
        check_same_objective(init, cfg.diffusion.objective, cfg.loop.init_from)
        mean, std = init["channel_mean"], init["channel_std"]      # keep the constants the weights know
        scaling = init_demographic_scaling(init, cfg.model.standardize_demographics, cfg.loop.init_from)
        init_none_channel(init, d.cond_dropout, cfg.loop.init_from)
        if progress and not has_checkpoint(cfg.run_dir):
            print(f"low-res: starting from {cfg.loop.init_from} (its normalization constants)")
    standardize = Standardize(mean, std, cfg.diffusion.sigma_data)
    norm = normalization(cfg, mean, std, scaling)

    def batch(step: int, rank: int, world: int):
        idx = batch_indices(step, cfg.optim.batch // world, rank, world, len(samples), seed)
        u, cond = samples.batch(idx)
        given = dropout_mask(len(idx), d.cond_dropout, seed, step, rank) if d.cond_dropout > 0 else True
        return standardize.to_net(u), expand_cond(demographic_input(cond, norm, given), shape)

    loss = make_loss(d.objective, d.P_mean, d.P_std, d.sigma_data, d.time_distribution,
                     channels.loss_weights(d.label_weight))
    trainer = Trainer(net, loss, batch, cfg.optim, cfg.loop, cfg.run_dir, to_dict(cfg), norm,
                      device=device, progress=progress)
    if progress and trainer.dist.main:
        print(f"low-res model: {count_parameters(net) / 1e6:.1f} M parameters, {d.objective} objective, "
              f"channels {channels.names}, "
              f"samples {shape}, "
              f"{len(volumes)} subjects × {cfg.data.factor ** 3} offsets = {len(samples)} training samples")
    return trainer.run()
