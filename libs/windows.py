"""Whole-volume denoising with overlapping windows, and exact crops of an upsampled volume.

The super-resolution network is trained on patches; at inference every denoiser evaluation covers the
whole volume with overlapping windows whose outputs are blended with smooth weights (a separable
raised-cosine profile, never zero inside the volume), so there are no seams — unlike the reference,
which sampled 96-slice chunks independently and cut them hard.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F


def window_starts(size: int, window: int, overlap: float) -> list[int]:
    """Start indices of windows of ``window`` voxels covering ``size`` with at least ``overlap`` (fraction)."""
    if window >= size:
        return [0]
    stride = max(1, int(math.floor(window * (1.0 - overlap))))
    n = math.ceil((size - window) / stride) + 1
    return [round(i * (size - window) / (n - 1)) for i in range(n)]


def blend_profile(n: int, overlap_vox: int, lo_inner: bool, hi_inner: bool, device=None) -> torch.Tensor:
    """1-D blending weights of one window axis (n,).

    On a side that lies inside the volume (another window overlaps it) the weight is 0 for the outer
    ``overlap_vox // 4`` voxels — where a patch network sees its own zero padding — then rises as a raised
    cosine over ``overlap_vox // 2`` voxels to 1.  Sides on the volume border keep weight 1.  So, for a
    convolutional network whose receptive radius fits in that margin, blending reproduces the
    whole-volume result exactly, and every voxel is covered with positive total weight.
    """
    idx = torch.arange(n, device=device, dtype=torch.float32)
    margin, ramp = overlap_vox // 4, max(1, overlap_vox // 2)
    w = torch.ones(n, device=device)
    for inner, dist in ((lo_inner, idx), (hi_inner, n - 1 - idx)):
        if inner:
            t = ((dist - margin + 1) / (ramp + 1)).clamp(0.0, 1.0)
            w = w * torch.sin(0.5 * math.pi * t) ** 2
    return w


def position_channels(starts: Sequence[int], size: Sequence[int], full: Sequence[int], device=None) -> torch.Tensor:
    """(3, x, y, z) normalized voxel coordinates (index / full size, in [0, 1)) of a patch at ``starts``."""
    axes = [(torch.arange(s, s + n, device=device, dtype=torch.float32) / f) for s, n, f in zip(starts, size, full)]
    gx, gy, gz = torch.meshgrid(*axes, indexing="ij")
    return torch.stack([gx, gy, gz])


def upsample(lr: torch.Tensor, factor: int) -> torch.Tensor:
    """Trilinear ×``factor`` upsampling (align_corners=False) of (B, C, X, Y, Z)."""
    return F.interpolate(lr, scale_factor=factor, mode="trilinear", align_corners=False)


def anchored_axis(start: int, size: int, factor: int, offset: int, n_lr: int, lr_origin: int = 0
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One axis of :func:`anchored_upsample`: for HR indices ``start … start+size−1`` the two LR indices they
    read (relative to ``lr_origin``) and the weight of the second.  LR voxel j sits at HR index f·j + offset
    (the voxel the polyphase subsample took), so at those *anchor* voxels the weight is exactly 0."""
    h = torch.arange(start, start + size, dtype=torch.float64)
    t = ((h - offset) / factor).clamp(0.0, n_lr - 1)
    j0 = t.floor().clamp(max=max(n_lr - 2, 0))
    w = (t - j0).float()
    j0 = j0.long()
    j1 = (j0 + 1).clamp(max=n_lr - 1)
    return j0 - lr_origin, j1 - lr_origin, w


def anchored_region(start: Sequence[int], size: Sequence[int], factor: int, offset: Sequence[int],
                    lr_shape: Sequence[int]) -> list[slice]:
    """The LR slices that :func:`anchored_upsample` reads for the HR patch at ``start`` of ``size``."""
    out = []
    for s, n, o, full in zip(start, size, offset, lr_shape):
        j0, j1, _ = anchored_axis(s, n, factor, o, full)
        out.append(slice(int(j0.min()), int(j1.max()) + 1))
    return out


def anchored_upsample(lr: torch.Tensor, factor: int, offset: Sequence[int], start: Sequence[int] | None = None,
                      size: Sequence[int] | None = None, lr_shape: Sequence[int] | None = None,
                      lr_origin: Sequence[int] = (0, 0, 0)) -> torch.Tensor:
    """Trilinear ×``factor`` upsampling of (B, C, x, y, z) that puts LR voxel j at HR index f·j + offset.

    This is the inverse geometry of ``polyphase(hr, f, offset)``: at the anchor voxels (index ≡ offset mod f on
    every axis) the result equals the LR voxel exactly; between them it interpolates linearly, and outside the
    outermost anchors it holds the edge value.  ``start``/``size`` pick an HR patch (default: the whole
    f-times grid); ``lr`` may be a region of the full LR volume (shape ``lr_shape``) that begins at
    ``lr_origin`` — the result is then identical to the crop of the whole upsampled volume."""
    lr_shape = list(lr_shape or lr.shape[2:])
    start = list(start or (0, 0, 0))
    size = list(size or [n * factor for n in lr_shape])
    out = lr
    for axis, (s, n, o, full, origin) in enumerate(zip(start, size, offset, lr_shape, lr_origin)):
        j0, j1, w = anchored_axis(s, n, factor, o, full, origin)
        dim = 2 + axis
        shape = [1] * out.ndim
        shape[dim] = n
        w = w.to(out.device).view(shape)
        a = out.index_select(dim, j0.to(out.device))
        b = out.index_select(dim, j1.to(out.device))
        out = a * (1.0 - w) + b * w           # exactly a at the anchors (w = 0)
    return out


def anchor_mask(start: Sequence[int], size: Sequence[int], factor: int, offset: Sequence[int],
                device=None) -> torch.Tensor:
    """(1, x, y, z) 1.0 at the anchor voxels of an HR patch (index ≡ offset mod f on every axis), else 0."""
    axes = [((torch.arange(s, s + n, device=device) - o) % factor == 0) for s, n, o in zip(start, size, offset)]
    return (axes[0][:, None, None] & axes[1][None, :, None] & axes[2][None, None, :]).float()[None]


def lr_region(start: Sequence[int], size: Sequence[int], factor: int,
              lr_shape: Sequence[int]) -> tuple[list[slice], list[slice]]:
    """The LR slices that ``upsample(lr, factor)[..., start:start+size]`` reads, and the patch's slices within
    the upsampled region.

    With align_corners=False, HR index h reads LR coordinate (h + 0.5)/f − 0.5, i.e. its two nearest LR
    voxels; a region with one LR voxel of margin (or the true volume edge, where both clamp alike) gives
    identical values after shifting the indices by the region's origin.
    """
    lr_sl, hr_sl = [], []
    for s, n, full in zip(start, size, lr_shape):
        lo, hi = max(s // factor - 1, 0), min((s + n - 1) // factor + 2, full)
        lr_sl.append(slice(lo, hi))
        hr_sl.append(slice(s - lo * factor, s - lo * factor + n))
    return lr_sl, hr_sl


def upsample_crop(lr: torch.Tensor, factor: int, start: Sequence[int], size: Sequence[int]) -> torch.Tensor:
    """``upsample(lr, factor)[..., start:start+size]`` computed from a small LR region — exactly equal."""
    lr_sl, hr_sl = lr_region(start, size, factor, lr.shape[2:])
    return upsample(lr[(slice(None), slice(None), *lr_sl)], factor)[(slice(None), slice(None), *hr_sl)]


def window_grid(full: Sequence[int], window: Sequence[int], overlap: float) -> tuple[list, list, list]:
    """Window size per axis (clipped to the volume), start tuples, and per-axis overlap in voxels."""
    win = [min(w, f) for w, f in zip(window, full)]
    per_axis = [window_starts(f, w, overlap) for f, w in zip(full, win)]
    overlap_vox = []
    for starts, w in zip(per_axis, win):
        gaps = [b - a for a, b in zip(starts, starts[1:])]
        overlap_vox.append(w - max(gaps) if gaps else 0)
    starts = [(a, b, c) for a in per_axis[0] for b in per_axis[1] for c in per_axis[2]]
    return win, starts, overlap_vox


def window_weight(start, win, full, overlap_vox, device=None) -> torch.Tensor:
    """(x, y, z) blending weight of the window at ``start`` (product of per-axis profiles)."""
    prof = [blend_profile(n, o, s > 0, s + n < f, device) for s, n, f, o in zip(start, win, full, overlap_vox)]
    return prof[0][:, None, None] * prof[1][None, :, None] * prof[2][None, None, :]


class WindowPlan:
    """The overlapping windows of one volume with everything that does not change between denoiser calls
    computed once: window starts, each window's blend weight, the reciprocal of the summed weights, and
    (given ``cond_fn``) each window's conditioning, stacked in batches of ``batch`` windows.

    ``cond_fn(start, window)`` gives the (Cc, *window) conditioning of the window at ``start``; it is called
    once per window here, not once per window and denoiser call.  ``memory_format`` (e.g.
    ``torch.channels_last_3d`` on CUDA) is applied to the batched network inputs.
    """

    def __init__(self, full: Sequence[int], window: Sequence[int], overlap: float = 0.25, batch: int = 8,
                 cond_fn: Callable[[Sequence[int], Sequence[int]], torch.Tensor] | None = None, device=None,
                 memory_format: torch.memory_format = torch.contiguous_format):
        self.full = tuple(int(f) for f in full)
        self.win, self.starts, overlap_vox = window_grid(self.full, window, overlap)
        self.batch, self.memory_format = max(1, int(batch)), memory_format
        self.chunks = [self.starts[i:i + self.batch] for i in range(0, len(self.starts), self.batch)]
        self.weights = [torch.stack([window_weight(s, self.win, self.full, overlap_vox, device) for s in chunk])
                        for chunk in self.chunks]
        norm = torch.zeros(self.full, device=device, dtype=torch.float32)
        for chunk, weights in zip(self.chunks, self.weights):
            for (a, b, c), w in zip(chunk, weights):
                norm[a:a + self.win[0], b:b + self.win[1], c:c + self.win[2]] += w
        self.inv_norm = norm.reciprocal()
        self.conds = None if cond_fn is None else [
            torch.stack([cond_fn(s, self.win) for s in chunk]).contiguous(memory_format=memory_format)
            for chunk in self.chunks]

    @property
    def redundancy(self) -> float:
        """Window voxels evaluated per volume voxel."""
        return len(self.starts) * math.prod(self.win) / math.prod(self.full)

    def denoise(self, denoise: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
                x: torch.Tensor, sigma: torch.Tensor, conds: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Blend ``denoise(x_windows (N, C, *window), sigma (N,), cond (N, Cc, *window))`` over the windows of
        ``x`` (1, C, *full) → (1, C, *full) float32; ``conds`` overrides the precomputed conditioning."""
        conds = conds if conds is not None else self.conds
        if conds is None:
            raise ValueError("WindowPlan.denoise: no conditioning (build the plan with cond_fn, or pass conds)")
        win = self.win
        out = torch.zeros_like(x, dtype=torch.float32)
        for chunk, weights, cs in zip(self.chunks, self.weights, conds):
            xs = torch.cat([x[:, :, a:a + win[0], b:b + win[1], c:c + win[2]] for a, b, c in chunk])
            ys = denoise(xs.contiguous(memory_format=self.memory_format),
                         sigma.reshape(-1)[:1].expand(len(chunk)), cs).float()
            for (a, b, c), y, w in zip(chunk, ys, weights):
                out[0, :, a:a + win[0], b:b + win[1], c:c + win[2]] += y * w
        return out * self.inv_norm


def windowed_denoise(denoise: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
                     x: torch.Tensor, sigma: torch.Tensor,
                     cond_fn: Callable[[Sequence[int], Sequence[int]], torch.Tensor],
                     window: Sequence[int], overlap: float = 0.25, batch: int = 8) -> torch.Tensor:
    """Apply a patch denoiser to the whole volume ``x`` (1, C, X, Y, Z) with overlapping, blended windows
    (one call; a sampler calling the denoiser many times on one volume builds a :class:`WindowPlan` once).

    ``denoise(x_patches (N, C, *window), sigma (N,), cond (N, Cc, *window))`` → (N, C, *window);
    ``cond_fn(start, window)`` gives the (Cc, *window) conditioning of the window at ``start``.  Windows
    are evaluated ``batch`` at a time.
    """
    return WindowPlan(x.shape[2:], window, overlap, batch, cond_fn, x.device).denoise(denoise, x, sigma)
