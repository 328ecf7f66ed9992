"""The label stage: organ labels for each generated subject, predicted from its generated CT + PET.

The cascade's joint generation factorizes as p(CT, PET, labels | d) = p(CT, PET | d) · p(labels | CT, PET, d):
the two diffusion stages draw the images, and this stage gives the labels of those images — a deterministic
network (argmax of per-class logits; the mode of p(labels | images), which is nearly a point mass where the
images show the organ) trained on the same cohort's images and labels.  Measured reason (README, "Organ
labels"): with the labels as one-hot channels inside the bench-sized diffusion networks, labels and images
compete for the same 16 base channels and no loss weight tried gives both; a separate label network costs
one forward pass per subject and leaves the image model exactly as it was.

Network: the cascade's :class:`libs.nn.UNet` with CT and PET (standardized) as input, the demographics
(z-scored, as the image stages) as constant conditioning channels, one logit channel per class (background
+ K groups of :class:`libs.channels.ChannelSet`), a constant noise embedding.  Loss: cross-entropy plus
soft Dice over the classes (the Dice term keeps small organs, e.g. the kidneys at 8 mm, from losing to the
background).  Training inputs are degraded at random — Gaussian noise and Gaussian blur of random strength —
because the generated images it labels are noisier or smoother than the phantoms it trains on.
Prediction: the subject's volumes on the training grid (z resampled linearly, as the training data), logits
resampled back to the subject's own z (linear), argmax → group → TotalSegmentator id, on the CT's grid.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .channels import DEFAULT_LABEL_GROUPS, ChannelError, ChannelSet, check_same_channels
from .checkpoint import CheckpointError, sha256_file
from .config import ConfigError, check_range, load_config, same_value, to_dict
from .data import CohortVolumes, batch_indices
from .demographics import Demographics, encode_many
from .intensity import ct_to_unit, suv_to_unit
from .lowres import (
    ModelConfig,
    Standardize,
    channel_stats,
    demographic_scaling,
    expand_cond,
    standardize_demographics,
)
from .nn import UNet, count_parameters
from .training import LoopConfig, OptimConfig, Trainer, has_checkpoint

STAGE = "labels"
N_IMAGE = 2                        # CT, PET
SIGMA_DATA = 0.5                   # the images' scale in network units, as in the diffusion stages


@dataclass
class LabelDataConfig:
    cohort: str = "data/cohort"           # training cohort with labels/ for every subject
    grid: list[int] = field(default_factory=lambda: [224, 224, 384])   # network grid (x, y, z voxels)
    patch: list[int] | None = None        # training crops (x, y, z); null = the whole grid
    labels: str | dict[str, list[str]] = "default"     # 'default' groups or {group: [TotalSegmentator names]}
    cache_dir: str | None = None
    load_workers: int = 4

    def __post_init__(self):
        if len(self.grid) != 3:
            raise ValueError(f"grid must have 3 entries, got {self.grid}")
        if self.patch is not None and (len(self.patch) != 3 or any(p > g for p, g in zip(self.patch, self.grid))):
            raise ValueError(f"patch must be 3 sizes within grid {self.grid}, got {self.patch}")
        if isinstance(self.labels, str) and self.labels != "default":
            raise ValueError(f"labels must be 'default' or a mapping group -> [class names], got {self.labels!r}")
        if not self.channel_set.has_labels:
            raise ValueError("labels: the label stage needs at least one group")

    @property
    def channel_set(self) -> ChannelSet:
        return ChannelSet.from_groups(DEFAULT_LABEL_GROUPS if self.labels == "default" else self.labels)

    @property
    def crop(self) -> tuple[int, int, int]:
        return tuple(self.patch or self.grid)


@dataclass
class SegmentConfig:
    """Loss and input degradation of label-stage training."""

    dice_weight: float = 1.0              # loss = cross-entropy + dice_weight · (1 − mean soft Dice over classes)
    degrade_probability: float = 0.8      # fraction of training volumes given noise and blur
    noise_max: float = 0.25               # Gaussian noise SD ~ U(0, noise_max) in network units (image SD 0.5)
    blur_max: float = 1.0                 # Gaussian blur SD ~ U(0, blur_max) voxels

    def __post_init__(self):
        check_range("dice_weight", self.dice_weight, low=0.0)
        check_range("degrade_probability", self.degrade_probability, low=0.0, high=1.0)
        check_range("noise_max", self.noise_max, low=0.0)
        check_range("blur_max", self.blur_max, low=0.0)


@dataclass
class LabelConfig:
    run_dir: str = "runs/labels"
    in_plane_mm: float = 2.0
    data: LabelDataConfig = field(default_factory=LabelDataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    segment: SegmentConfig = field(default_factory=SegmentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)


def load_label_config(path: str | os.PathLike) -> LabelConfig:
    return load_config(path, LabelConfig)


def is_label_config(config: dict) -> bool:
    """Whether a checkpoint's recorded config is a label stage's (it has the ``segment`` section)."""
    return isinstance(config, dict) and "segment" in config


def build_net(cfg: LabelConfig, n_classes: int) -> UNet:
    m = cfg.model
    return UNet(in_channels=N_IMAGE, cond_channels=4, out_channels=n_classes, model_channels=m.model_channels,
                channel_mult=m.channel_mult, num_blocks=m.num_blocks, attn_levels=m.attn_levels, dropout=m.dropout,
                channels_per_head=m.channels_per_head, cond_embed=m.cond_embed)


def gaussian_blur(x: torch.Tensor, sd: float) -> torch.Tensor:
    """(C, X, Y, Z) blurred by a separable Gaussian of SD ``sd`` voxels (replicate padding); sd ≤ 0.05: x."""
    if sd <= 0.05:
        return x
    r = max(1, int(math.ceil(3 * sd)))
    t = torch.arange(-r, r + 1, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / sd) ** 2)
    k = k / k.sum()
    out = x[None]
    for axis in range(3):
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = len(k)
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = r
        c = out.shape[1]
        out = F.conv3d(F.pad(out, pad, mode="replicate"), k.reshape(shape).expand(c, 1, *shape[2:]), groups=c)
    return out[0]


def degrade(x: torch.Tensor, cfg: SegmentConfig, gen: torch.Generator) -> torch.Tensor:
    """One training volume (C, X, Y, Z) in network units, with probability ``degrade_probability`` blurred
    (SD ~ U(0, blur_max) voxels) then given Gaussian noise (SD ~ U(0, noise_max)); draws from ``gen``."""
    u = torch.rand(3, generator=gen).tolist()
    if u[0] >= cfg.degrade_probability:
        return x
    x = gaussian_blur(x, u[1] * cfg.blur_max)
    return x + u[2] * cfg.noise_max * torch.randn(x.shape, generator=gen)


class SegmentationLoss:
    """Cross-entropy + ``dice_weight`` · (1 − soft Dice averaged over the classes), per sample (B,).

    ``x`` holds the network-space images in its first two channels and the group indices (as float) in the
    third; the model maps (images, c_noise, cond) to (B, K + 1, ...) logits."""

    def __init__(self, n_classes: int, dice_weight: float):
        self.n_classes, self.dice_weight = n_classes, dice_weight

    def wrap(self, net):
        return net

    def __call__(self, model, x: torch.Tensor, cond: torch.Tensor, generator=None) -> torch.Tensor:
        images, groups = x[:, :N_IMAGE], x[:, N_IMAGE].round().long()
        logits = model(images, torch.zeros(len(x), device=x.device), cond).float()
        ce = F.cross_entropy(logits, groups, reduction="none").flatten(1).mean(1)
        if not self.dice_weight:
            return ce
        return ce + self.dice_weight * soft_dice_loss(logits, groups, self.n_classes)


def soft_dice_loss(logits: torch.Tensor, groups: torch.Tensor, n_classes: int, eps: float = 1.0) -> torch.Tensor:
    """1 − mean over classes of the soft Dice between softmax(logits) and the one-hot of ``groups``, per sample;
    a class absent from both counts as Dice 1 (``eps`` smoothing)."""
    p = logits.softmax(1).flatten(2)
    t = F.one_hot(groups.flatten(1), n_classes).movedim(-1, 1).float()
    inter = (p * t).sum(2)
    dice = (2 * inter + eps) / (p.sum(2) + t.sum(2) + eps)
    return 1 - dice.mean(1)


def normalization(cfg: LabelConfig, channels: ChannelSet, mean, std, cond_scaling: dict) -> dict:
    """The checkpoint's record: image constants, demographic scaling, grid and the label groups."""
    return {**cond_scaling, "channel_mean": list(mean)[:N_IMAGE], "channel_std": list(std)[:N_IMAGE],
            **channels.record(), "grid": list(cfg.data.grid), "in_plane_mm": cfg.in_plane_mm,
            "demographics": ["height_m-1", "(weight_kg-30)/100", "sex(M=1)", "age/100"]}


def crop_starts(step: int, rank: int, n: int, grid, crop, seed: int) -> list[tuple[int, int, int]]:
    """Random crop corners of one rank's batch at ``step`` (a pure function of its arguments)."""
    rng = np.random.default_rng([seed, step, rank, 17])
    return [tuple(int(rng.integers(0, g - c + 1)) for g, c in zip(grid, crop)) for _ in range(n)]


def train_labels(cfg: LabelConfig, device: str = "auto", progress: bool = True) -> Path | None:
    """Train (or resume) the label stage described by ``cfg``; returns the last checkpoint."""
    channels = cfg.data.channel_set
    volumes = CohortVolumes(cfg.data.cohort, cfg.data.grid, cfg.data.cache_dir, cfg.data.load_workers, progress,
                            cfg.in_plane_mm, channels)
    torch.manual_seed(cfg.loop.seed)
    net = build_net(cfg, channels.n_classes)
    crop = cfg.data.crop
    net.check_input(torch.zeros(1, N_IMAGE, *crop), torch.zeros(1), torch.zeros(1, 4, *crop))
    mean, std = channel_stats(volumes)
    scaling = demographic_scaling(volumes.cond) if cfg.model.standardize_demographics else {}
    if cfg.loop.init_from:
        init = load_label_weights(cfg.loop.init_from, net)
        check_same_channels(init, channels, cfg.loop.init_from)
        mean, std = init["channel_mean"], init["channel_std"]
        scaling = {k: init[k] for k in ("cond_mean", "cond_std") if k in init}
        if bool(scaling) != cfg.model.standardize_demographics:
            raise ConfigError(f"{cfg.loop.init_from}: model.standardize_demographics must be "
                              f"{bool(scaling)} as in the weights fine-tuned")
        if progress and not has_checkpoint(cfg.run_dir):
            print(f"labels: starting from {cfg.loop.init_from} (its normalization constants)")
    standardize = Standardize(mean, std, SIGMA_DATA)
    norm = normalization(cfg, channels, mean, std, scaling)
    seed, per = cfg.loop.seed, cfg.optim.batch

    def batch(step: int, rank: int, world: int):
        idx = batch_indices(step, per // world, rank, world, len(volumes), seed)
        gen = torch.Generator().manual_seed(int(np.random.default_rng([seed, step, rank, 23]).integers(2**62)))
        xs = []
        for i, corner in zip(idx, crop_starts(step, rank, len(idx), volumes.grid, crop, seed)):
            index = tuple(slice(s, s + c) for s, c in zip(corner, crop))
            image = standardize.to_net(volumes.volumes[i][(slice(None), *index)].float()[None])[0]
            groups = volumes.labels[i][index].float()[None]
            xs.append(torch.cat([degrade(image, cfg.segment, gen), groups]))
        cond = standardize_demographics(volumes.cond[idx], norm)
        return torch.stack(xs), expand_cond(cond, crop)

    loss = SegmentationLoss(channels.n_classes, cfg.segment.dice_weight)
    trainer = Trainer(net, loss, batch, cfg.optim, cfg.loop, cfg.run_dir, to_dict(cfg), norm,
                      device=device, progress=progress)
    if progress and trainer.dist.main:
        print(f"label stage: {count_parameters(net) / 1e6:.2f} M parameters, classes {channels.names[N_IMAGE:]}, "
              f"crops {crop} of {tuple(volumes.grid)}, {len(volumes)} subjects")
    return trainer.run()


@dataclass
class LabelModel:
    """A loaded label stage (EMA weights unless told otherwise) and its provenance."""

    net: torch.nn.Module
    config: LabelConfig
    normalization: dict
    path: Path
    sha256: str
    step: int
    device: torch.device

    @property
    def channels(self) -> ChannelSet:
        return ChannelSet.from_record(self.normalization)

    @property
    def grid(self) -> tuple[int, int, int]:
        return tuple(int(g) for g in self.normalization["grid"])

    def meta(self) -> dict:
        """What a labelled subject's sidecar says about its labels."""
        return {"source": "generated", "by": "label stage (argmax of its logits for the generated CT + PET)",
                "label_stage": {"path": str(self.path), "sha256": self.sha256, "step": self.step},
                "groups": self.channels.record()["label_groups"]}

    @torch.no_grad()
    def logits(self, ct_hu: np.ndarray, suv: np.ndarray, demo: Demographics) -> torch.Tensor:
        """(K + 1, X, Y, Z) float32 logits on the volumes' own grid (CPU)."""
        if ct_hu.shape != suv.shape:
            raise ValueError(f"CT grid {ct_hu.shape} differs from the SUV grid {suv.shape}")
        grid = self.grid
        if tuple(ct_hu.shape[:2]) != grid[:2]:
            raise ValueError(f"in-plane size {ct_hu.shape[:2]} differs from the label stage's grid {grid[:2]}; "
                             f"it labels volumes of the cohort grid it was trained on")
        vol = torch.stack([ct_to_unit(torch.from_numpy(np.asarray(ct_hu, np.float32))),
                           suv_to_unit(torch.from_numpy(np.asarray(suv, np.float32)))])
        if vol.shape[-1] != grid[2]:
            vol = F.interpolate(vol[None], size=grid, mode="trilinear", align_corners=False)[0]
        std = Standardize(self.normalization["channel_mean"], self.normalization["channel_std"], SIGMA_DATA)
        x = std.to_net(vol[None]).to(self.device)
        cond = standardize_demographics(torch.from_numpy(encode_many([demo])), self.normalization).to(self.device)
        out = self.net(x, torch.zeros(1, device=self.device), expand_cond(cond, grid)).float()
        if out.shape[-1] != ct_hu.shape[2]:
            out = F.interpolate(out, size=tuple(ct_hu.shape), mode="trilinear", align_corners=False)
        return out[0].cpu()

    def predict(self, ct_hu: np.ndarray, suv: np.ndarray, demo: Demographics) -> np.ndarray:
        """The label map of one subject's volumes: uint8 TotalSegmentator ids on the CT's grid."""
        channels = self.channels
        return channels.to_total_ids(channels.decode(self.logits(ct_hu, suv, demo)).numpy())


def load_label_weights(path: str | os.PathLike, net: torch.nn.Module) -> dict:
    """Exported label-stage weights → ``net``; returns their normalization record (a fine-tune's start)."""
    from .generate import load_init_weights
    return load_init_weights(path, STAGE, net)


def load_label_model(path: str | os.PathLike, device: torch.device | str = "cpu", ema: bool = True) -> LabelModel:
    """A label-stage checkpoint, run folder (its newest checkpoint) or exported ``labels.safetensors``."""
    from .generate import load_weights, read_stage_file, resolve_checkpoint
    path = resolve_checkpoint(path)
    ckpt = read_stage_file(path, STAGE)
    if not is_label_config(ckpt.get("config")):
        raise CheckpointError(f"{path}: not a label-stage checkpoint (its config has no 'segment' section)")
    cfg = load_config(ckpt["config"], LabelConfig, origin=f"{path} (config)")
    try:
        channels = ChannelSet.from_record(ckpt["normalization"])
    except ChannelError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    device = torch.device(device)
    net = load_weights(build_net(cfg, channels.n_classes), ckpt, cfg.loop.ema_sigma_rels, path, ema, device)
    return LabelModel(net, cfg, ckpt["normalization"], Path(path), sha256_file(path), int(ckpt["step"]), device)


def check_label_pairing(model: LabelModel, cascade_norm: dict, cascade_has_labels: bool) -> None:
    """Refuse a label stage for a cascade whose output grid it was not trained on, or for a cascade that already
    generates labels in its own channels (two sources for one label map)."""
    if cascade_has_labels:
        raise ConfigError(f"{model.path}: this cascade generates organ labels in its own channels already; "
                          f"give a label stage only to a CT + PET cascade")
    bad = [k for k in ("grid", "in_plane_mm") if not same_value(model.normalization.get(k), cascade_norm.get(k))]
    if bad:
        raise ConfigError(f"{model.path}: the label stage was trained on another grid than the cascade's output "
                          f"({', '.join(f'{k} {model.normalization.get(k)} vs {cascade_norm.get(k)}' for k in bad)})")
