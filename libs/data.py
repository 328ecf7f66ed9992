"""Training data from a cohort directory.

Each subject becomes one normalized volume ``(2, X, Y, Z)`` (channel 0 CT, channel 1 PET, both in
[0, 1], see :mod:`libs.intensity`) on the training grid: the cohort's in-plane grid with z resampled to a
fixed number of slices (the paper: 224 × 224 × 384 from 2 mm data).  The low-resolution stage trains on
4× polyphase subsamples of it — every offset (ox, oy, oz) ∈ {0..3}³ is a distinct 56 × 56 × 96 sample —
paired with the four demographic channels.  Volumes are cached in memory (float16) after the first
load, optionally also on disk as ``.npy`` so a restart skips the NIfTI decoding.  With organ-label channels
(:class:`libs.channels.ChannelSet`) each subject also keeps its label volume as uint8 group indices on the
same grid; a sample or patch is cut first and one-hot encoded after (:meth:`CohortVolumes.region`).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .channels import ChannelSet
from .cohort import Cohort
from .demographics import Demographics, encode_many
from .intensity import ct_to_unit, suv_to_unit
from .manifest import file_hash, fingerprint


class DataError(ValueError):
    """The cohort cannot serve as training data (missing files, wrong grid)."""


def normalized_volume(cohort: Cohort, demo: Demographics, grid: tuple[int, int, int],
                      in_plane_mm: float | None = None) -> torch.Tensor:
    """Read one subject and return ``(2, X, Y, Z)`` float16 in [0, 1] on ``grid``.

    CT (HU) and SUV are resampled along z (linear) in physical units, then mapped to [0, 1].  The
    in-plane size must already equal the grid's (preprocessing makes it 224 × 224 at 2 mm), and the in-plane
    voxel size ``in_plane_mm`` when given (one field of view for the whole cohort).
    """
    subj = cohort.load(demo, labels=False)
    shape = subj.ct.shape
    if in_plane_mm is not None and not np.allclose(subj.ct.spacing[:2], in_plane_mm, rtol=0.01):
        sx, sy = subj.ct.spacing[:2]
        raise DataError(f"{cohort.path('ct', demo.subject_id)}: in-plane voxel size {sx:g} × {sy:g} mm differs from "
                        f"the config's in_plane_mm {in_plane_mm:g}; every subject needs the same grid")
    if tuple(shape[:2]) != tuple(grid[:2]):
        raise DataError(f"{cohort.path('ct', demo.subject_id)}: in-plane size {shape[0]}×{shape[1]} differs from "
                        f"data.grid {grid[0]}×{grid[1]}; make the cohort on that grid (phantom: --spacing-mm "
                        f"{448 / grid[0]:g})")
    vol = torch.from_numpy(np.stack([subj.ct.array.astype(np.float32), subj.suv.array.astype(np.float32)]))
    if shape[2] != grid[2]:
        vol = F.interpolate(vol[None], size=tuple(grid), mode="trilinear", align_corners=False)[0]
    return torch.stack([ct_to_unit(vol[0]), suv_to_unit(vol[1])]).to(torch.float16)


def label_groups_volume(cohort: Cohort, demo: Demographics, grid: tuple[int, int, int],
                        channels: ChannelSet) -> torch.Tensor:
    """One subject's label volume → group indices (X, Y, Z) uint8 on ``grid`` (z by nearest neighbour, voxel
    centres aligned as for the images' linear resampling)."""
    from .volumes import read_volume
    path = cohort.path("labels", demo.subject_id)
    lab = read_volume(path, "labels")
    ct_shape = tuple(int(v) for v in _header_shape(cohort.path("ct", demo.subject_id)))
    if tuple(lab.shape) != ct_shape:
        raise DataError(f"{path}: grid {tuple(lab.shape)} differs from the CT grid {ct_shape}")
    groups = torch.from_numpy(channels.group_volume(lab.array))
    if groups.shape[2] != grid[2]:
        groups = F.interpolate(groups[None, None].float(), size=tuple(grid), mode="nearest-exact")[0, 0]
    return groups.to(torch.uint8)


def _header_shape(path: Path) -> tuple[int, ...]:
    """The RAS+ ``[x, y, z]`` shape of a NIfTI file, from its header alone (as :func:`read_volume` reorients)."""
    import nibabel as nib
    img = nib.load(str(path))
    axes = nib.orientations.io_orientation(img.affine)[:, 0].astype(int)
    shape = [0, 0, 0]
    for k in range(3):
        shape[axes[k]] = int(img.shape[k])
    return tuple(shape)


def polyphase(volume: torch.Tensor, factor: int, offset: tuple[int, int, int]) -> torch.Tensor:
    """Every ``factor``-th voxel starting at ``offset``: ``(..., X, Y, Z)`` → ``(..., X/f, Y/f, Z/f)``."""
    ox, oy, oz = offset
    return volume[..., ox::factor, oy::factor, oz::factor]


def offset_of(k: int, factor: int) -> tuple[int, int, int]:
    """The k-th of the ``factor³`` polyphase offsets (x slowest)."""
    return k // factor**2, (k // factor) % factor, k % factor


class CohortVolumes:
    """All subjects of a cohort as normalized training volumes, loaded once (threads) and kept in memory."""

    def __init__(self, cohort_dir: str | os.PathLike, grid, cache_dir: str | os.PathLike | None = None,
                 workers: int = 4, progress: bool = True, in_plane_mm: float | None = None,
                 channels: ChannelSet | None = None):
        self.channels = channels or ChannelSet()
        self.cohort = Cohort(cohort_dir)
        if not self.cohort.demographics_path.is_file():
            raise DataError(f"{self.cohort.demographics_path}: not found; is {cohort_dir} a cohort directory?")
        self.records = self.cohort.demographics()
        self.grid = tuple(int(g) for g in grid)
        self.in_plane_mm = in_plane_mm
        self.cache_dir = Path(cache_dir) if cache_dir else None
        kinds = ("ct", "suv", "labels") if self.channels.has_labels else ("ct", "suv")
        for d in self.records:
            for kind in kinds:
                if not self.cohort.path(kind, d.subject_id).is_file():
                    why = " (the model generates organ labels: data.labels)" if kind == "labels" else ""
                    raise DataError(f"{self.cohort.path(kind, d.subject_id)}: missing (subject {d.subject_id} is "
                                    f"listed in {self.cohort.demographics_path}){why}")
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            it = pool.map(self._load, self.records)
            self.volumes = list(tqdm(it, total=len(self.records), desc="loading cohort", unit="subj",
                                     disable=not progress))
            self.labels = None
            if self.channels.has_labels:
                self.labels = list(pool.map(lambda d: label_groups_volume(self.cohort, d, self.grid, self.channels),
                                            self.records))
        self.cond = torch.from_numpy(encode_many(self.records))

    def region(self, i: int, index: tuple[slice, ...]) -> torch.Tensor:
        """Subject ``i`` cut by ``index`` (three slices, any step): (C, ...) float32 in [0, 1] — CT, PET and,
        with labels, the one-hot label channels of the channel set."""
        image = self.volumes[i][(slice(None), *index)].float()
        if self.labels is None:
            return image
        return torch.cat([image, self.channels.one_hot(self.labels[i][index])])

    def _load(self, demo: Demographics) -> torch.Tensor:
        if self.cache_dir is None:
            return normalized_volume(self.cohort, demo, self.grid, self.in_plane_mm)
        # keyed by the source files' content, so an edited or replaced volume is never served from the cache
        key = fingerprint({kind: file_hash(self.cohort.path(kind, demo.subject_id)) for kind in ("ct", "suv")})
        path = self.cache_dir / f"{demo.subject_id}_{'x'.join(map(str, self.grid))}_{key[:16]}.npy"
        if path.is_file():
            try:
                return torch.from_numpy(np.load(path))
            except (OSError, ValueError):
                pass  # a damaged cache entry is rebuilt below
        vol = normalized_volume(self.cohort, demo, self.grid, self.in_plane_mm)
        from .files import atomic_path
        with atomic_path(path) as tmp:
            np.save(tmp, vol.numpy())
        return vol

    def __len__(self) -> int:
        return len(self.records)


class PolyphaseSamples:
    """Low-resolution training samples: index i → subject i // f³, polyphase offset i % f³."""

    def __init__(self, volumes: CohortVolumes, factor: int):
        if any(g % factor for g in volumes.grid):
            raise DataError(f"data.grid {volumes.grid} is not divisible by data.factor {factor}")
        self.volumes, self.factor = volumes, factor

    def __len__(self) -> int:
        return len(self.volumes) * self.factor**3

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(g // self.factor for g in self.volumes.grid)

    def batch(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, C, X/f, Y/f, Z/f) float32 in [0, 1] (C = the channel set's) and demographics (B, 4) float32."""
        per, f = self.factor**3, self.factor
        xs = [self.volumes.region(i // per, tuple(slice(o, None, f) for o in offset_of(i % per, f)))
              for i in indices]
        cond = self.volumes.cond[[i // per for i in indices]]
        return torch.stack(xs), cond


def batch_indices(step: int, batch: int, rank: int, world: int, n_items: int, seed: int) -> list[int]:
    """Sample indices of one rank's batch at ``step``: a pure function, so a resumed run sees the same data.

    The global stream walks through a fresh permutation of all items each epoch; ranks take disjoint,
    consecutive slices of it.
    """
    start = (step * world + rank) * batch
    out, cache = [], {}
    for g in range(start, start + batch):
        epoch = g // n_items
        if epoch not in cache:
            cache[epoch] = np.random.default_rng([seed, epoch]).permutation(n_items)
        out.append(int(cache[epoch][g % n_items]))
    return out
