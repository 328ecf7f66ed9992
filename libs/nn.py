"""3D UNet in the EDM2 style (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of
Diffusion Models", config G), written for volumes ``(B, C, X, Y, Z)``.

Every layer is *magnitude preserving*: with unit-variance inputs its output has (about) unit variance,
weights are kept at unit norm by forced weight normalization, there are no biases and no group norms.
One class, :class:`UNet`, serves both cascade stages: sizes come from the input, so the low-resolution
stage (56×56×96, cond = 4 demographic channels) and the super-resolution stage (56×56×96 patches,
cond = 2 + 4 + 3 channels) differ only in constructor arguments.

Equation numbers below refer to the EDM2 paper (arXiv 2312.02696).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

# ---------------------------------------------------------------------------------------------------
# Magnitude-preserving primitives


def normalize(x: torch.Tensor, dim: int | Sequence[int] | None = None, eps: float = 1e-4) -> torch.Tensor:
    """Scale ``x`` to unit RMS over ``dim`` (default: every dim but the first).

    The unit-magnitude normalization behind forced weight normalization (Eq. 66) and pixel norm.
    """
    if dim is None:
        dim = list(range(1, x.ndim))
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=torch.float32)
    norm = torch.add(eps, norm, alpha=math.sqrt(norm.numel() / x.numel()))
    return x / norm.to(x.dtype)


def mp_silu(x: torch.Tensor) -> torch.Tensor:
    """Magnitude-preserving SiLU (Eq. 81): E[silu(x)²]^½ = 0.596 for x ~ N(0, 1)."""
    return F.silu(x) / 0.596


def mp_sum(a: torch.Tensor, b: torch.Tensor, t: float = 0.5) -> torch.Tensor:
    """Magnitude-preserving sum (Eq. 88): lerp(a, b, t) / √((1-t)² + t²), ``t`` = weight of ``b``."""
    dtype = torch.promote_types(a.dtype, b.dtype)  # autocast may hand in bf16 and fp32 operands
    return a.to(dtype).lerp(b.to(dtype), t) / math.sqrt((1 - t) ** 2 + t**2)


def mp_cat(a: torch.Tensor, b: torch.Tensor, dim: int = 1, t: float = 0.5) -> torch.Tensor:
    """Magnitude-preserving concatenation (Eq. 103): ``b`` gets relative weight ``t`` regardless of the
    channel counts, and the result keeps unit RMS."""
    na, nb = a.shape[dim], b.shape[dim]
    c = math.sqrt((na + nb) / ((1 - t) ** 2 + t**2))
    return torch.cat([a * (c / math.sqrt(na) * (1 - t)), b * (c / math.sqrt(nb) * t)], dim=dim)


class MPFourier(nn.Module):
    """Magnitude-preserving Fourier features (Eq. 75): (B,) → (B, num_channels), √2·cos(2π(f x + φ))."""

    def __init__(self, num_channels: int, bandwidth: float = 1.0):
        super().__init__()
        self.register_buffer("freqs", 2 * math.pi * torch.randn(num_channels) * bandwidth)
        self.register_buffer("phases", 2 * math.pi * torch.rand(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.outer(x.float(), self.freqs.float()) + self.phases.float()
        return (y.cos() * math.sqrt(2)).to(x.dtype)


class MPConv3d(nn.Module):
    """Magnitude-preserving 3D convolution (Eq. 47) with forced weight normalization (Eq. 66).

    ``kernel`` is 3 or 1 (a ``kernel³`` convolution on (B, C, X, Y, Z), 'same' padding) or 0 (a fully
    connected layer on (B, C)).  No bias.  In training mode every forward first rescales the stored
    weight of each output channel to unit RMS, then the used weight is normalized again (so gradients
    stay orthogonal to the weights) and divided by √fan_in, times an optional ``gain``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int):
        super().__init__()
        if kernel not in (0, 1, 3):
            raise ValueError(f"MPConv3d kernel must be 0 (linear), 1 or 3, got {kernel}")
        self.out_channels = out_channels
        shape = (out_channels, in_channels) + ((kernel,) * 3 if kernel else ())
        self.weight = nn.Parameter(torch.randn(shape))

    def forward(self, x: torch.Tensor, gain: float | torch.Tensor = 1.0) -> torch.Tensor:
        w = self.weight.float()
        if self.training:
            with torch.no_grad():
                self.weight.copy_(normalize(w))  # forced weight normalization (Eq. 66)
        w = normalize(w) * (gain / math.sqrt(w[0].numel()))  # Eq. 47: unit-norm rows / √fan_in
        w = w.to(x.dtype)
        if w.ndim == 2:
            return x @ w.t()
        return F.conv3d(x, w, padding=w.shape[-1] // 2)


def resample(x: torch.Tensor, mode: str = "keep") -> torch.Tensor:
    """EDM2 'resample' with the [1, 1] filter, in 3D: 'down' = 2×2×2 average pooling, 'up' = nearest
    2× upsampling, 'keep' = identity.  (B, C, X, Y, Z) → (B, C, X·s, Y·s, Z·s)."""
    if mode == "keep":
        return x
    if mode == "down":
        return F.avg_pool3d(x, 2).to(x.dtype)  # CPU autocast runs pooling in fp32
    if mode == "up":
        return F.interpolate(x, scale_factor=2, mode="nearest")
    raise ValueError(f"resample mode must be keep/down/up, got {mode!r}")


# ---------------------------------------------------------------------------------------------------
# Blocks


class Block(nn.Module):
    """EDM2 residual block (config G), 3D.  Encoder flavor: resample → 1×1 skip conv → pixel norm →
    residual branch; decoder flavor: the residual branch sees the input, the skip conv is applied to the
    shortcut.  The embedding modulates the branch as ``y · (1 + gain·linear(emb))`` with a learned,
    zero-initialized gain; branch and shortcut meet in :func:`mp_sum` (t = ``res_balance``).

    forward(x (B, Cin, X, Y, Z), emb (B, E)) → (B, Cout, X', Y', Z').
    """

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, flavor: str = "enc",
                 resample_mode: str = "keep", attention: bool = False, channels_per_head: int = 64,
                 dropout: float = 0.0, res_balance: float = 0.3, attn_balance: float = 0.3,
                 clip_act: float | None = 256):
        super().__init__()
        if flavor not in ("enc", "dec"):
            raise ValueError(f"Block flavor must be 'enc' or 'dec', got {flavor!r}")
        self.out_channels, self.flavor, self.resample_mode = out_channels, flavor, resample_mode
        self.res_balance, self.attn_balance, self.clip_act = res_balance, attn_balance, clip_act
        self.emb_gain = nn.Parameter(torch.zeros([]))
        self.conv_res0 = MPConv3d(out_channels if flavor == "enc" else in_channels, out_channels, 3)
        self.emb_linear = MPConv3d(emb_channels, out_channels, 0)
        self.conv_res1 = MPConv3d(out_channels, out_channels, 3)
        self.conv_skip = MPConv3d(in_channels, out_channels, 1) if in_channels != out_channels else None
        self.dropout = nn.Dropout(dropout)
        self.num_heads = max(out_channels // channels_per_head, 1) if attention else 0
        if attention:
            if out_channels % self.num_heads:
                raise ValueError(f"{out_channels} channels do not split into {self.num_heads} heads")
            self.attn_qkv = MPConv3d(out_channels, out_channels * 3, 1)
            self.attn_proj = MPConv3d(out_channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        x = resample(x, self.resample_mode)
        if self.flavor == "enc":
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = normalize(x, dim=1)  # pixel norm
        y = self.conv_res0(mp_silu(x))
        c = self.emb_linear(emb, gain=self.emb_gain) + 1  # (B, Cout)
        y = mp_silu(y * c[:, :, None, None, None].to(y.dtype))
        y = self.conv_res1(self.dropout(y))
        if self.flavor == "dec" and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = mp_sum(x, y, t=self.res_balance)
        if self.num_heads:
            x = mp_sum(x, self._attention(x), t=self.attn_balance)
        if self.clip_act is not None:
            x = x.clamp(-self.clip_act, self.clip_act)
        return x

    def _attention(self, x: torch.Tensor) -> torch.Tensor:
        """Cosine self-attention over the X·Y·Z tokens: q, k, v normalized per head (EDM2 Sec. 3)."""
        b, c, *spatial = x.shape
        qkv = self.attn_qkv(x).reshape(b, self.num_heads, c // self.num_heads, 3, -1)
        q, k, v = (t.transpose(-1, -2) for t in normalize(qkv, dim=2).unbind(3))  # (B, heads, L, d)
        y = F.scaled_dot_product_attention(q, k, v)  # softmax(q kᵀ / √d) v
        return self.attn_proj(y.transpose(-1, -2).reshape(b, c, *spatial))


# ---------------------------------------------------------------------------------------------------
# UNet


class UNet(nn.Module):
    """EDM2 UNet (config G) for 3D volumes, with input-concatenated conditioning and a log-variance head.

    Args:
        in_channels: channels of the noisy volume (e.g. 2: CT, PET).
        cond_channels: conditioning channels concatenated to the noisy input (4 demographics for the
            low-resolution stage; 2 + 4 + 3 for super-resolution); 0 = unconditional.
        out_channels: output channels (usually ``in_channels``).
        model_channels: base width (paper 64); level ``i`` has ``model_channels * channel_mult[i]``.
        channel_mult: per-level width multipliers (paper [1, 2, 3, 4]); each level after the first halves
            X, Y and Z, so sizes must be divisible by ``2**(len(channel_mult) - 1)``.
        num_blocks: residual blocks per encoder level (the decoder has one more, as in EDM2; paper 3).
        attn_levels: level indices (negative allowed) with self-attention in every block of the level,
            including the coarsest decoder's first block; None = the coarsest only (paper), [] = none.
        dropout: dropout probability inside the residual branches.
        label_balance: EDM2's weight of the conditioning embedding against the noise embedding
            (mp_sum t).  Used only with ``cond_embed=True``.
        concat_balance: EDM2's weight of the encoder skip against the decoder path in the skip
            concatenation (mp_cat t); 0.5 = equal.
        cond_embed: also feed the spatial mean of ``cond`` (B, cond_channels) through EDM2's class-label
            path into the block embedding (for constant demographic channels this is the demographic
            vector itself).  Off by default: the paper conditions by concatenation only.
        channels_per_head: attention head width (EDM2: 64).
        logvar_channels: Fourier features of the log-variance head u(σ) (EDM2: 128).
        res_balance, attn_balance: mp_sum weights of the residual and attention branches (EDM2: 0.3).

    forward(x (B, in, X, Y, Z), c_noise (B,), cond (B, cond, X, Y, Z) | None) → (B, out, X, Y, Z);
    with ``return_logvar=True`` also u(σ) of shape (B,) in float32.
    """

    def __init__(self, in_channels: int = 2, cond_channels: int = 0, out_channels: int | None = None,
                 model_channels: int = 64, channel_mult: Sequence[int] = (1, 2, 3, 4), num_blocks: int = 3,
                 attn_levels: Sequence[int] | None = None, dropout: float = 0.0, label_balance: float = 0.5,
                 concat_balance: float = 0.5, cond_embed: bool = False, channels_per_head: int = 64,
                 logvar_channels: int = 128, res_balance: float = 0.3, attn_balance: float = 0.3):
        super().__init__()
        levels = len(channel_mult)
        attn_levels = [levels - 1] if attn_levels is None else [int(a) for a in attn_levels]
        if any(not -levels <= a < levels for a in attn_levels):
            raise ValueError(f"attn_levels {attn_levels} outside the {levels} levels of {list(channel_mult)}")
        attn_levels = [a % levels for a in attn_levels]
        self.in_channels, self.cond_channels = in_channels, cond_channels
        self.out_channels = in_channels if out_channels is None else out_channels
        self.levels, self.label_balance, self.concat_balance = levels, label_balance, concat_balance
        widths = [model_channels * m for m in channel_mult]
        cemb = max(widths)
        kw = dict(channels_per_head=channels_per_head, dropout=dropout, res_balance=res_balance,
                  attn_balance=attn_balance)
        self.emb_fourier = MPFourier(widths[0])
        self.emb_noise = MPConv3d(widths[0], cemb, 0)
        self.emb_label = MPConv3d(cond_channels, cemb, 0) if cond_embed and cond_channels else None
        self.enc = self._encoder(in_channels + cond_channels + 1, widths, cemb, num_blocks, attn_levels, kw)
        self.dec = self._decoder(widths, cemb, num_blocks, attn_levels, kw)
        self.out_conv = MPConv3d(widths[0], self.out_channels, 3)
        self.out_gain = nn.Parameter(torch.zeros([]))
        self.logvar_fourier = MPFourier(logvar_channels)
        self.logvar_linear = MPConv3d(logvar_channels, 1, 0)

    @staticmethod
    def _encoder(cin, widths, cemb, num_blocks, attn_levels, kw) -> nn.ModuleDict:
        enc = nn.ModuleDict()
        for level, width in enumerate(widths):
            if level == 0:
                enc[f"L{level}_conv"] = MPConv3d(cin, width, 3)  # input + cond + a ones channel
                cin = width
            else:
                enc[f"L{level}_down"] = Block(cin, cin, cemb, "enc", resample_mode="down", **kw)
            for idx in range(num_blocks):
                enc[f"L{level}_block{idx}"] = Block(cin, width, cemb, "enc", attention=level in attn_levels,
                                                    **kw)
                cin = width
        return enc

    def _decoder(self, widths, cemb, num_blocks, attn_levels, kw) -> nn.ModuleDict:
        dec, skips = nn.ModuleDict(), [m.out_channels for m in self.enc.values()]
        cout = widths[-1]
        for level in reversed(range(len(widths))):
            attn = level in attn_levels
            if level == len(widths) - 1:
                dec[f"L{level}_in0"] = Block(cout, cout, cemb, "dec", attention=attn, **kw)
                dec[f"L{level}_in1"] = Block(cout, cout, cemb, "dec", **kw)
            else:
                dec[f"L{level}_up"] = Block(cout, cout, cemb, "dec", resample_mode="up", **kw)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), widths[level]
                dec[f"L{level}_block{idx}"] = Block(cin, cout, cemb, "dec", attention=attn, **kw)
        return dec

    def check_input(self, x: torch.Tensor, c_noise: torch.Tensor, cond: torch.Tensor | None) -> None:
        """Raise ValueError naming the shape when the inputs do not fit this network."""
        factor = 2 ** (self.levels - 1)
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must be (B, {self.in_channels}, X, Y, Z), got {tuple(x.shape)}")
        if any(s % factor for s in x.shape[2:]):
            raise ValueError(f"spatial size {tuple(x.shape[2:])} of x {tuple(x.shape)} is not divisible "
                             f"by 2**(levels-1) = {factor}")
        if c_noise.numel() not in (1, x.shape[0]):
            raise ValueError(f"c_noise must be (B,) = ({x.shape[0]},), got {tuple(c_noise.shape)}")
        want = (x.shape[0], self.cond_channels, *x.shape[2:])
        if self.cond_channels and (cond is None or tuple(cond.shape) != want):
            got = None if cond is None else tuple(cond.shape)
            raise ValueError(f"cond must be {want}, got {got}")
        if not self.cond_channels and cond is not None and cond.shape[1] != 0:
            raise ValueError(f"this network takes no cond, got {tuple(cond.shape)}")

    def embedding(self, c_noise: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        """Block embedding (B, E) from c_noise (B,) and, with ``cond_embed``, the mean of cond."""
        emb = self.emb_noise(self.emb_fourier(c_noise))
        if self.emb_label is not None:
            label = cond.float().mean(dim=(2, 3, 4)).to(emb.dtype)
            emb = mp_sum(emb, self.emb_label(label), t=self.label_balance)
        return mp_silu(emb)

    def logvar(self, c_noise: torch.Tensor) -> torch.Tensor:
        """Learned log-variance u(σ) of the EDM2 uncertainty loss: c_noise (B,) → (B,) float32."""
        return self.logvar_linear(self.logvar_fourier(c_noise.float())).reshape(-1).float()

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, cond: torch.Tensor | None = None,
                return_logvar: bool = False):
        """x (B, in, X, Y, Z), c_noise (B,), cond (B, cond, X, Y, Z) | None → (B, out, X, Y, Z)
        [, logvar (B,)]."""
        self.check_input(x, c_noise, cond)
        c_noise = c_noise.reshape(-1).expand(x.shape[0])
        emb = self.embedding(c_noise, cond)
        parts = [x] + ([cond.to(x.dtype)] if self.cond_channels else []) + [torch.ones_like(x[:, :1])]
        x = torch.cat(parts, dim=1)
        skips = []
        for name, block in self.enc.items():
            x = block(x) if name.endswith("_conv") else block(x, emb)
            skips.append(x)
        for name, block in self.dec.items():
            if "_block" in name:
                x = mp_cat(x, skips.pop(), t=self.concat_balance)
            x = block(x, emb)
        out = self.out_conv(x, gain=self.out_gain)
        return (out, self.logvar(c_noise)) if return_logvar else out


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
