"""EDM2-style 3D UNet: shapes, conditioning, attention, magnitude preservation, memory format, autocast."""

import math

import pytest
import torch

from libs.nn import MPConv3d, MPFourier, UNet, count_parameters, mp_cat, mp_silu, mp_sum, normalize

SHAPE = (8, 8, 16)


def tiny(**kw):
    """A tiny net with its zero-initialized gains set to 1, so the output depends on every input."""
    torch.manual_seed(0)
    args = dict(in_channels=2, cond_channels=4, out_channels=2, model_channels=8, channel_mult=[1, 2],
                num_blocks=1, attn_levels=[1])
    net = UNet(**{**args, **kw})
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("_gain"):
                p.fill_(1.0)
    return net


def inputs(batch=2, shape=SHAPE, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 2, *shape, generator=g)
    cond = torch.rand(batch, 4, 1, 1, 1, generator=g).expand(batch, 4, *shape)
    return x, torch.randn(batch, generator=g), cond


def test_output_shape_and_logvar():
    net = tiny().eval()
    x, c_noise, cond = inputs()
    out, logvar = net(x, c_noise, cond, return_logvar=True)
    assert out.shape == (2, 2, *SHAPE), f"output shape {tuple(out.shape)}, expected (2, 2, 8, 8, 16)"
    assert logvar.shape == (2,) and logvar.dtype == torch.float32, f"logvar {logvar.shape} {logvar.dtype}"
    assert torch.isfinite(out).all() and out.abs().max() > 0, "output must be finite and not all zero"
    assert not torch.equal(logvar, net(x, c_noise + 1, cond, return_logvar=True)[1]), "u(σ) ignores σ"


def test_fresh_net_outputs_zero():
    x, c_noise, cond = inputs()
    out = UNet(2, 4, 2, model_channels=8, channel_mult=[1, 2], num_blocks=1)(x, c_noise, cond)
    assert out.abs().max().item() == 0.0, "out_gain starts at 0 (EDM2), so a fresh net outputs zeros"


@torch.no_grad()
def test_conditioning_and_noise_level_change_output():
    net = tiny().eval()
    x, c_noise, cond = inputs()
    base = net(x, c_noise, cond)
    other_cond = torch.rand(2, 4, 1, 1, 1).expand_as(cond)
    assert (net(x, c_noise, other_cond) - base).abs().max() > 1e-3, "cond does not affect the output"
    assert (net(x, c_noise + 1.0, cond) - base).abs().max() > 1e-3, "c_noise does not affect the output"


@torch.no_grad()
def test_cond_embed_path():
    net = tiny(cond_embed=True).eval()
    x, c_noise, cond = inputs()
    assert net.emb_label is not None, "cond_embed=True must create the label embedding"
    assert net(x, c_noise, cond).shape == (2, 2, *SHAPE)


def test_attention_on_off_parameter_count():
    with_attn, without = tiny(attn_levels=[1]), tiny(attn_levels=[])
    x, c_noise, cond = inputs()
    assert with_attn(x, c_noise, cond).shape == without(x, c_noise, cond).shape
    # Level 1 (16 channels) has attention in: 1 encoder block, decoder in0, 2 decoder blocks; each adds
    # qkv (16 → 48) and proj (16 → 16) 1×1 convolutions = 4·16² weights.
    diff = count_parameters(with_attn) - count_parameters(without)
    assert diff == 4 * 4 * 16**2, f"attention adds {diff} parameters, expected {4 * 4 * 16**2}"
    assert tiny(attn_levels=None).enc["L1_block0"].num_heads == 1, "default = attention at the coarsest"


def test_bad_spatial_size_raises():
    net = tiny(channel_mult=[1, 2, 2])
    x, c_noise, cond = inputs(shape=(8, 8, 10))
    with pytest.raises(ValueError, match=r"\(8, 8, 10\)"):
        net(x, c_noise, cond)


def test_bad_cond_raises():
    net = tiny()
    x, c_noise, cond = inputs()
    with pytest.raises(ValueError, match="cond"):
        net(x, c_noise, None)
    with pytest.raises(ValueError, match="cond"):
        net(x, c_noise, cond[:, :3])


def test_magnitude_preserving_primitives():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 96, 32, 32, generator=g), torch.randn(4, 32, 32, 32, generator=g)
    for t in (0.3, 0.5):
        std = mp_sum(a, torch.randn(a.shape, generator=g), t=t).std().item()
        assert abs(std - 1) < 0.01, f"mp_sum(t={t}) std {std:.4f}, expected 1"
        cat = mp_cat(a, b, t=t)
        std = cat.std().item()
        assert cat.shape[1] == 128 and abs(std - 1) < 0.01, f"mp_cat(t={t}) std {std:.4f}, expected 1"
        ratio = cat[:, 96:].std().item() / cat[:, :96].std().item()
        assert ratio == pytest.approx(t / (1 - t) * math.sqrt(96 / 32), rel=0.02), f"mp_cat weights {ratio}"
    rms = mp_silu(a).square().mean().sqrt().item()
    assert abs(rms - 1) < 0.01, f"mp_silu RMS {rms:.4f}, expected 1"
    per_sample = normalize(a * torch.tensor([0.5, 1, 10, 100]).reshape(4, 1, 1, 1)).square().mean((1, 2, 3))
    assert torch.allclose(per_sample, torch.ones(4), atol=1e-3), f"normalize RMS² {per_sample.tolist()}"
    rms = MPFourier(256)(torch.randn(512, generator=g)).square().mean().sqrt().item()
    assert abs(rms - 1) < 0.02, f"MPFourier RMS {rms:.4f}, expected 1"


def test_mpconv3d_preserves_magnitude_and_forces_weight_norm():
    torch.manual_seed(0)
    conv = MPConv3d(32, 64, 3).train()
    with torch.no_grad():
        conv.weight.mul_(7.0)
    y = conv(torch.randn(2, 32, 16, 16, 16))[:, :, 1:-1, 1:-1, 1:-1]  # interior: no zero padding
    assert abs(y.std().item() - 1) < 0.03, f"MPConv3d output std {y.std().item():.4f}, expected 1"
    rms = conv.weight.detach().square().mean(dim=(1, 2, 3, 4))
    assert torch.allclose(rms, torch.ones(64), atol=1e-4), "training forward must reset weights to unit RMS"
    linear = MPConv3d(128, 16, 0)
    y = linear(torch.randn(4096, 128))
    assert y.shape == (4096, 16) and abs(y.std().item() - 1) < 0.03, f"linear std {y.std().item():.4f}"


@torch.no_grad()
def test_channels_last_3d_matches():
    net = tiny().eval()
    x, c_noise, cond = inputs()
    ref = net(x, c_noise, cond)
    net_cl = net.to(memory_format=torch.channels_last_3d)
    out = net_cl(x.to(memory_format=torch.channels_last_3d), c_noise,
                 cond.contiguous().to(memory_format=torch.channels_last_3d))
    assert torch.allclose(out, ref, atol=1e-5), f"channels_last_3d differs by {(out - ref).abs().max():.2e}"


@torch.no_grad()
def test_bf16_autocast_runs():
    net = tiny().eval()
    x, c_noise, cond = inputs()
    ref = net(x, c_noise, cond)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x, c_noise, cond)
    err = (out.float() - ref).abs().max().item() / ref.abs().max().item()
    assert torch.isfinite(out).all() and err < 0.1, f"bf16 autocast relative error {err:.3f}"


def test_paper_preset_parameter_count():
    with torch.device("meta"):
        net = UNet(in_channels=2, cond_channels=4, out_channels=2, model_channels=64,
                   channel_mult=[1, 2, 3, 4], num_blocks=3)
    n = count_parameters(net)
    assert 50e6 < n < 120e6, f"paper preset has {n / 1e6:.1f} M parameters; DESIGN.md says about 80 M"
